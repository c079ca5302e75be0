"""Weights kept in llama.cpp's block formats (Q4_0, Q4_1, Q4_K, Q8_0), and quantizers that make them.

Decoding one token reads every weight once, so bytes per weight set the speed on a CPU. A GGUF's
Q4_0/Q4_1/Q4_K/Q8_0 tensors are repacked at load into `QuantLinear` modules that keep the file's
bits (4-bit codes plus per-block scales) and multiply with an AVX-512 VNNI kernel of ours
(phi3/kernels/quant_cpu.cpp, compiled on first use with torch.utils.cpp_extension). Where that
kernel cannot be built (no compiler, no AVX-512 VNNI), `kernel_available()` is False and the
loader dequantizes to dense weights instead.

Two ways to multiply a packed weight, chosen per module by `int8_activations`:
- True (default, what llama.cpp does): activations rounded to int8 per block of 32; fastest.
- False (`--exact`): float activations; equal to multiplying the dequantized weight, so results
  match transformers' GGUF loader to float rounding.

The quantizers (`quantize_blocks`) write GGUF's byte layout: Q4_0, Q4_1 and Q8_0 through gguf-py's
reference implementations, Q4_K with our port of llama.cpp's weighted scale/min search (gguf-py
does not implement K-quant quantization).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from phi3 import cpu_kernels
from phi3.cpu_kernels import kernel, kernel_available, kernel_error  # noqa: F401 (re-exported)

BLOCK = 32
SUPER = 256  # K-quant super-block
PROMPT_ROWS = 16  # from this many tokens per sequence on, unpack the weight and use a dense matmul
UNPACK_ELEMENTS = 1 << 23  # weights unpacked at a time for that (32 MB in float32)
QUANT_KINDS = ("Q4_0", "Q4_1", "Q4_K", "Q8_0")  # GGUF types kept packed
FORMAT_IDS = {"q4_0": 0, "q4_1": 1, "q4_k": 2, "q8_0": 3}  # must match quant_cpu.cpp
WRITE_TYPES = ("q4_0", "q4_1", "q4_k", "q8_0", "f16", "f32")  # what `phi3 quantize` writes
class QuantLinear(nn.Module):
    """y = x @ W^T with W [out, in] held in blocks of 32 along `in` (see quant_cpu.cpp for the layout).

    Buffers, all with `out` rows: `qs` (4-bit codes, two per byte, or int8), `a`, `b`, `c`: the
    format's scales (q4_0/q8_0: a = d; q4_1: a = d, b = m; q4_k: a = sub-scales, b = sub-mins,
    c = (d, dmin) per super-block of 256).
    """

    def __init__(self, kind: str, qs: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None,
                 c: torch.Tensor | None, in_features: int, out_features: int,
                 int8_activations: bool = True) -> None:
        super().__init__()
        assert kind in FORMAT_IDS, kind
        self.kind = kind
        self.fmt = FORMAT_IDS[kind]
        self.in_features, self.out_features = in_features, out_features
        self.int8_activations = int8_activations
        empty = torch.zeros(out_features, 0, dtype=torch.uint8)
        self.register_buffer("qs", qs)
        self.register_buffer("a", a)
        self.register_buffer("b", b if b is not None else empty)
        self.register_buffer("c", c if c is not None else empty)

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.a, self.b, self.c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ext = cpu_kernels.kernel()
        if ext is None:
            return (x.float() @ self.dequantize().t()).to(x.dtype)
        # Tokens per sequence, not rows in all: a batch of decode steps ([rows, 1, in]) stays on
        # the kernel, whose rows are computed exactly as one alone would be.
        tokens = x.shape[-2] if x.dim() >= 2 else 1
        if tokens >= PROMPT_ROWS:
            # Many tokens (a prompt): unpack and let a dense matmul reuse each weight, a slice of
            # output rows at a time so that the unpacked copy stays small. Unless exact, in
            # bfloat16: ~4.5x float32's speed here (AVX512-BF16), and its rounding of activations
            # is no coarser than the int8 rounding of the decode path.
            compute = torch.bfloat16 if x.dtype == torch.bfloat16 or self.int8_activations else torch.float32
            xc = x.reshape(-1, self.in_features).to(compute)
            y = torch.empty(xc.shape[0], self.out_features, dtype=compute)
            step = max(256, UNPACK_ELEMENTS // self.in_features)
            for r in range(0, self.out_features, step):
                parts = [t[r:r + step] if t.numel() else t for t in (self.qs, self.a, self.b, self.c)]
                w = ext.block_dequantize(self.fmt, *parts, compute)
                y[:, r:r + step] = xc @ w.t()
            return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return ext.block_matmul(x, self.fmt, self.qs, self.a, self.b, self.c, self.int8_activations)

    def block_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float scale and min of every block [out, in/32]: w = scale * q + min."""
        n = self.out_features
        if self.kind == "q4_k":
            dm = self.c.view(torch.float16).float().view(n, -1, 1, 2)
            sc = self.a.float().view(n, -1, SUPER // BLOCK)
            mn = self.b.float().view(n, -1, SUPER // BLOCK)
            return (dm[..., 0] * sc).view(n, -1), (-dm[..., 1] * mn).view(n, -1)
        d = self.a.view(torch.float16).float()
        if self.kind == "q4_0":
            return d, -8 * d
        if self.kind == "q4_1":
            return d, self.b.view(torch.float16).float()
        return d, torch.zeros_like(d)

    def dequantize(self) -> torch.Tensor:
        """The dense float32 weight [out, in], in plain PyTorch (the kernels' reference)."""
        n, k = self.out_features, self.in_features
        scale, minimum = self.block_scales()
        if self.kind == "q8_0":
            q = self.qs.view(torch.int8).view(n, k // BLOCK, BLOCK).float()
        else:
            lo = (self.qs & 0x0F).view(n, k // BLOCK, 16)
            hi = (self.qs >> 4).view(n, k // BLOCK, 16)
            q = torch.cat([lo, hi], dim=-1).float()
        return (q * scale[..., None] + minimum[..., None]).view(n, k)

    def extra_repr(self) -> str:
        act = "int8" if self.int8_activations else "float"
        return f"{self.kind}, in={self.in_features}, out={self.out_features}, activations={act}"


# --- GGUF blocks <-> QuantLinear -------------------------------------------------------------------

def _q4k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack K-quant 6-bit sub-block scales and mins: [..., 12] bytes -> two [..., 8] (llama.cpp's
    get_scale_min_k4)."""
    s = scales.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _pack_q4_order(q: np.ndarray) -> np.ndarray:
    """Codes [..., 32] (0..15) -> 16 bytes per block: low nibble element j, high nibble j + 16."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def from_gguf_blocks(kind: str, data: np.ndarray, rows: int, cols: int) -> QuantLinear:
    """Repack a GGUF tensor's raw bytes (Q4_0, Q4_1, Q4_K or Q8_0) into a QuantLinear."""
    nb = cols // BLOCK
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, -1)

    def half(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.float16).reshape(rows, -1).copy())

    if kind in ("Q4_0", "Q4_1", "Q8_0"):
        blocks = raw.reshape(rows, nb, -1)
        d = half(blocks[:, :, 0:2])
        if kind == "Q4_0":
            qs = blocks[:, :, 2:18].reshape(rows, nb * 16)
            return QuantLinear("q4_0", torch.from_numpy(qs.copy()), d, None, None, cols, rows)
        if kind == "Q4_1":
            qs = blocks[:, :, 4:20].reshape(rows, nb * 16)
            return QuantLinear("q4_1", torch.from_numpy(qs.copy()), d, half(blocks[:, :, 2:4]), None, cols, rows)
        qs = blocks[:, :, 2:34].reshape(rows, nb * BLOCK)
        return QuantLinear("q8_0", torch.from_numpy(qs.view(np.int8).copy()), d, None, None, cols, rows)
    if kind == "Q4_K":
        ns = cols // SUPER
        blocks = raw.reshape(rows, ns, 144)
        dm = half(blocks[:, :, 0:4])  # (d, dmin) per super-block
        sc, mn = _q4k_scale_min(blocks[:, :, 4:16])
        # 128 bytes = 4 chunks of 32: low nibbles are sub-block 2c, high nibbles sub-block 2c + 1.
        packed = blocks[:, :, 16:144].reshape(rows, ns, 4, 32)
        codes = np.stack([packed & 0x0F, packed >> 4], axis=3).reshape(rows, ns * 8, BLOCK)
        qs = _pack_q4_order(codes).reshape(rows, nb * 16)
        return QuantLinear("q4_k", torch.from_numpy(qs), torch.from_numpy(sc.reshape(rows, nb).copy()),
                           torch.from_numpy(mn.reshape(rows, nb).copy()), dm, cols, rows)
    raise ValueError(f"not a block format phi3 keeps packed: {kind}")


def concat_rows(parts: list[QuantLinear]) -> QuantLinear:
    """Stack several weights' rows (q, k, v into qkv; gate, up into gate_up)."""
    assert len({p.kind for p in parts}) == 1 and len({p.in_features for p in parts}) == 1
    first = parts[0]
    cat = [torch.cat([getattr(p, name) for p in parts]) for name in ("qs", "a", "b", "c")]
    return QuantLinear(first.kind, *cat, first.in_features, sum(p.out_features for p in parts),
                       first.int8_activations)


def permute_rows(q: QuantLinear, order: torch.Tensor) -> QuantLinear:
    """The rows `order` (a permutation, or any selection) of a packed weight."""
    bufs = [getattr(q, name)[order].contiguous() for name in ("qs", "a", "b", "c")]
    return QuantLinear(q.kind, *bufs, q.in_features, len(order), q.int8_activations)


class QuantEmbedding(nn.Module):
    """Token embeddings kept in blocks: a lookup unpacks only the rows it needs (llama.cpp's
    get_rows), so a 4-bit file's embedding stays at 4 bits in memory. With tied embeddings the
    same `table` is the output head."""

    def __init__(self, table: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = permute_rows(self.table, ids.reshape(-1))
        return rows.dequantize().to(self.dtype).view(*ids.shape, self.embedding_dim)


# --- Quantizers (write side) -------------------------------------------------------------------------

def _nearest(x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int32)  # round half to even, as llama.cpp's nearest_int


def _sum_in_order(a: np.ndarray) -> np.ndarray:
    """Column sums of [n, S] float32, rows added first to last as llama.cpp's scalar loops add them:
    numpy's pairwise .sum() can differ in the last bit, and that bit can move a half-precision
    scale (18 of 3456 Q4_K blocks of one SmolLM2 matrix did), so the written bytes would not be
    llama.cpp's."""
    acc = a[0].copy()
    for row in a[1:]:
        acc += row
    return acc


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
                      nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """llama.cpp's make_qkx2_quants over many sub-blocks at once: x, w [S, 32] -> codes [S, 32],
    scale [S], min [S] (w = scale * code - min) minimising the weighted squared error over a sweep
    of candidate scales, each refined by weighted least squares. Works on [32, S] copies so that
    the in-order sums add contiguous rows."""
    x = np.ascontiguousarray(x.T, dtype=np.float32)
    w = np.ascontiguousarray(w.T, dtype=np.float32)
    mn = np.minimum(x.min(0), 0).astype(np.float32)
    mx = x.max(0)
    sum_w = _sum_in_order(w)
    sum_x = _sum_in_order(w * x)
    flat = mx == mn
    rng0 = np.where(flat, 1, mx - mn).astype(np.float32)
    iscale = np.float32(nmax) / rng0
    scale = np.float32(1) / iscale
    codes = np.clip(_nearest(iscale * (x - mn)), 0, nmax)
    err = _sum_in_order(w * (scale * codes + mn - x) ** 2)
    best_min = mn.copy()
    for i in range(nstep + 1):
        rng = np.where(flat, 1, mx - best_min).astype(np.float32)
        # In float32 step by step, as C evaluates rmin + rdelta*is + nmax with float operands.
        isc = (np.float32(rmin) + np.float32(rdelta) * np.float32(i) + np.float32(nmax)) / rng
        laux = np.clip(_nearest(isc * (x - best_min)), 0, nmax).astype(np.float32)
        wl = w * laux
        sl = _sum_in_order(wl)
        sl2 = _sum_in_order(wl * laux)
        sxl = _sum_in_order(wl * x)
        det = sum_w * sl2 - sl * sl
        ok = det > 0
        det = np.where(ok, det, 1)
        this_scale = (sum_w * sxl - sum_x * sl) / det
        this_min = (sl2 * sum_x - sl * sxl) / det
        pos = this_min > 0
        this_scale = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1), this_scale)
        this_min = np.where(pos, 0, this_min)
        cur = _sum_in_order(w * (this_scale * laux + this_min - x) ** 2)
        better = ok & (cur < err) & ~flat
        codes = np.where(better, laux.astype(np.int32), codes)
        err = np.where(better, cur, err)
        scale = np.where(better, this_scale, scale)
        best_min = np.where(better, this_min, best_min)
    scale = np.where(flat, 0, scale)
    codes = np.where(flat, 0, codes)
    return codes.T, scale.astype(np.float32), (-best_min).astype(np.float32)


def quantize_q4_k(a: np.ndarray) -> np.ndarray:
    """Float [rows, cols] (cols a multiple of 256) -> GGUF Q4_K bytes [rows, cols / 256 * 144],
    following llama.cpp's quantize_row_q4_K_ref."""
    rows, cols = a.shape
    x = a.astype(np.float32).reshape(-1, BLOCK)  # sub-blocks
    av = np.sqrt(_sum_in_order(np.ascontiguousarray((x * x).T))[:, None] / np.float32(BLOCK))
    weights = av + np.abs(x)
    _, scales, mins = _make_qkx2_quants(x, weights)
    scales, mins = scales.reshape(-1, 8), mins.reshape(-1, 8)
    max_scale, max_min = np.maximum(scales.max(1), 0), np.maximum(mins.max(1), 0)
    inv_scale = np.where(max_scale > 0, 63 / np.where(max_scale > 0, max_scale, 1), 0).astype(np.float32)
    inv_min = np.where(max_min > 0, 63 / np.where(max_min > 0, max_min, 1), 0).astype(np.float32)
    ls = np.minimum(63, _nearest(inv_scale[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, _nearest(inv_min[:, None] * mins)).astype(np.uint8)
    d = (max_scale / 63).astype(np.float16)
    dmin = (max_min / 63).astype(np.float16)
    sub_d = d.astype(np.float32)[:, None] * ls
    sub_m = dmin.astype(np.float32)[:, None] * lm
    xs = x.reshape(-1, 8, BLOCK)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.clip(_nearest((xs + sub_m[..., None]) / sub_d[..., None]), 0, 15)
    codes = np.where(sub_d[..., None] == 0, 0, codes).astype(np.uint8)
    packed_scales = np.zeros((len(ls), 12), np.uint8)
    packed_scales[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed_scales[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed_scales[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    chunks = codes.reshape(-1, 4, 2, BLOCK)  # (sub-block 2c, 2c + 1) share chunk c's bytes
    qs = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                          packed_scales, qs], axis=1)
    return out.reshape(rows, cols // SUPER * 144)


def quantize_blocks(a: np.ndarray, kind: str) -> np.ndarray:
    """Float [rows, cols] -> GGUF bytes of `kind` (one of WRITE_TYPES); f16/f32 stay arrays."""
    import gguf
    if kind == "f32":
        return np.ascontiguousarray(a, dtype=np.float32)
    if kind == "f16":
        return np.ascontiguousarray(a, dtype=np.float16)
    if kind == "q4_k":
        return quantize_q4_k(a)
    return gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), gguf.GGMLQuantizationType[kind.upper()])


def block_size(kind: str) -> int:
    """Elements per block of a type name (q4_k: 256; other q*: 32; floats: 1)."""
    return SUPER if kind == "q4_k" else BLOCK if kind.startswith("q") else 1
