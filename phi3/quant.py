"""Weights kept in llama.cpp's block formats (Q4_0, Q4_1, Q8_0) instead of dense floats.

Decoding one token reads every weight once, so bytes per weight set the speed on a CPU. A GGUF's
Q4_0/Q4_1/Q8_0 tensors are repacked at load into `QuantLinear` modules that multiply with a small
AVX-512 kernel of ours (phi3/kernels/quant_cpu.cpp, compiled on first use with
torch.utils.cpp_extension) and accumulate in float32. Where that kernel cannot be built (no
compiler, no AVX-512), `kernel_available()` is False and the loader dequantizes to dense weights
instead, which gives the same numbers more slowly.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

BLOCK = 32
PROMPT_ROWS = 16  # from this many activation rows on, unpack the weight and use a dense matmul
QUANT_KINDS = ("Q4_0", "Q4_1", "Q8_0")
_SOURCE = Path(__file__).parent / "kernels" / "quant_cpu.cpp"
_ext: Any = None
_ext_error: str | None = None


def _cpu_has_avx512() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512vl"))


def kernel() -> Any:
    """The compiled extension, building it on first use (about a minute, cached afterwards)."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    if os.environ.get("PHI3_NO_KERNELS"):
        _ext_error = "disabled by PHI3_NO_KERNELS"
        return None
    if not _cpu_has_avx512():
        _ext_error = "this CPU has no AVX-512"
        return None
    try:
        from torch.utils.cpp_extension import load
        # pip installs ninja next to this interpreter, which is not on PATH unless the venv is active.
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        src = _SOURCE.read_bytes()
        tag = hashlib.sha1(src + torch.__version__.encode()).hexdigest()[:10]
        build = Path(os.environ.get("PHI3_CACHE") or Path.home() / ".cache" / "phi3") / "kernels" / tag
        build.mkdir(parents=True, exist_ok=True)
        if not (build / "phi3_quant_cpu.so").exists():
            print("phi3: compiling the quantized matmul kernel (first use only) ...", file=sys.stderr)
        _ext = load(name="phi3_quant_cpu", sources=[str(_SOURCE)], build_directory=str(build),
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"], verbose=False)
    except Exception as e:  # no compiler, no headers, no ninja: fall back to dense weights
        _ext_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        _ext = None
    return _ext


def kernel_available() -> bool:
    return kernel() is not None


def kernel_error() -> str | None:
    kernel()
    return _ext_error


class QuantLinear(nn.Module):
    """y = x @ W^T with W [out, in] held as blocks of 32: Q4 (4-bit, scale and min per block) or
    Q8 (8-bit, scale per block)."""

    def __init__(self, kind: str, qs: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None,
                 in_features: int, out_features: int) -> None:
        super().__init__()
        self.kind = kind
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qs", qs)
        self.register_buffer("scale", scale)
        self.register_buffer("minimum", minimum if minimum is not None else torch.zeros(0))

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.scale, self.minimum))

    def to_int4pack(self) -> None:
        """Switch a Q4 weight to PyTorch's own int4 CPU kernel, for bfloat16 activations: it does
        the layer matmuls of a SmolLM2 decode step in 2.4 ms where ours takes 4.4 ms, but keeps
        scale and min in bfloat16 (a rounding the bfloat16 mode makes anyway)."""
        assert self.kind == "q4"
        n, k = self.out_features, self.in_features
        q = torch.cat([(self.qs & 0x0F).view(n, k // BLOCK, 16), (self.qs >> 4).view(n, k // BLOCK, 16)], -1)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(n, k).to(torch.int32), 8)
        # The kernel computes (q - 8) * scale + zero per group of 32: zero = min + 8 * scale.
        scales_zeros = torch.stack([self.scale, self.minimum + 8 * self.scale], -1).transpose(0, 1)
        self.kind = "q4pack"
        self.qs = packed
        self.scale = scales_zeros.contiguous().to(torch.bfloat16)
        self.minimum = torch.zeros(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "q4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(-1, self.in_features).to(torch.bfloat16), self.qs, BLOCK, self.scale)
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        ext = _ext if _ext is not None else kernel()
        if ext is None:
            return (x.float() @ self.dequantize().t()).to(x.dtype)
        if x.numel() >= PROMPT_ROWS * self.in_features:
            # Many rows (a prompt): unpack once and let a dense matmul reuse each weight.
            w = ext.dequantize(self.qs, self.scale, self.minimum, self.kind == "q4")
            return (x.float() @ w.t()).to(x.dtype)
        if self.kind == "q4":
            return ext.q4_matmul(x, self.qs, self.scale, self.minimum)
        return ext.q8_matmul(x, self.qs, self.scale)

    def dequantize(self) -> torch.Tensor:
        """The dense float32 weight [out, in]."""
        n, k = self.out_features, self.in_features
        if self.kind == "q4pack":
            eye = torch.eye(k, dtype=torch.bfloat16)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qs, BLOCK, self.scale).float().t().contiguous()
        if self.kind == "q4":
            lo = (self.qs & 0x0F).view(n, k // BLOCK, 16)
            hi = (self.qs >> 4).view(n, k // BLOCK, 16)
            q = torch.cat([lo, hi], dim=-1).float()
            return (q * self.scale[..., None] + self.minimum[..., None]).view(n, k)
        q = self.qs.view(n, k // BLOCK, BLOCK).float()
        return (q * self.scale[..., None]).view(n, k)

    def extra_repr(self) -> str:
        return f"{self.kind}, in={self.in_features}, out={self.out_features}"


def from_gguf_blocks(kind: str, data: np.ndarray, rows: int, cols: int) -> QuantLinear:
    """Repack a GGUF tensor's raw bytes (Q4_0, Q4_1 or Q8_0) into a QuantLinear."""
    nb = cols // BLOCK
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, nb, -1)
    scale = raw[:, :, 0:2].copy().view(np.float16).reshape(rows, nb).astype(np.float32)
    if kind == "Q4_0":
        qs = raw[:, :, 2:18].reshape(rows, nb * 16)
        minimum = -8.0 * scale  # Q4_0 stores q - 8: fold the offset into the min term
        return QuantLinear("q4", torch.from_numpy(qs.copy()), torch.from_numpy(scale),
                           torch.from_numpy(minimum), cols, rows)
    if kind == "Q4_1":
        minimum = raw[:, :, 2:4].copy().view(np.float16).reshape(rows, nb).astype(np.float32)
        qs = raw[:, :, 4:20].reshape(rows, nb * 16)
        return QuantLinear("q4", torch.from_numpy(qs.copy()), torch.from_numpy(scale),
                           torch.from_numpy(minimum), cols, rows)
    if kind == "Q8_0":
        qs = raw[:, :, 2:34].copy().view(np.int8).reshape(rows, nb * BLOCK)
        return QuantLinear("q8", torch.from_numpy(qs), torch.from_numpy(scale), None, cols, rows)
    raise ValueError(f"not a block format phi3 keeps packed: {kind}")


def concat_rows(parts: list[QuantLinear]) -> QuantLinear:
    """Stack several weights' rows (q, k, v into qkv; gate, up into gate_up)."""
    kinds = {p.kind for p in parts}
    assert len(kinds) == 1 and len({p.in_features for p in parts}) == 1
    first = parts[0]
    minimum = torch.cat([p.minimum for p in parts]) if first.kind == "q4" else None
    return QuantLinear(first.kind, torch.cat([p.qs for p in parts]), torch.cat([p.scale for p in parts]),
                       minimum, first.in_features, sum(p.out_features for p in parts))


def permute_rows(q: QuantLinear, order: torch.Tensor) -> QuantLinear:
    minimum = q.minimum[order] if q.kind == "q4" else None
    return QuantLinear(q.kind, q.qs[order].contiguous(), q.scale[order].contiguous(),
                       minimum.contiguous() if minimum is not None else None, q.in_features, q.out_features)
