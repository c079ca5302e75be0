"""Weights kept in llama.cpp's block formats (Q4_0, Q4_1, Q4_K, Q8_0, Q5_0, Q5_1, Q5_K, Q6_K,
IQ4_NL, IQ4_XS), and quantizers that make some of them.

Decoding one token reads every weight once, so bytes per weight set the speed on a CPU. A GGUF's
tensors of those types are repacked at load into `QuantLinear` modules that keep the file's bits
(4-bit codes, high-bit planes, per-block scales) on every machine. They multiply with a kernel of
ours (phi3/kernels/, compiled on first use for AVX-512 VNNI, AVX2 or ARM NEON; see cpu_kernels.py).
Without a compiled kernel (no compiler, another CPU, PHI3_KERNELS=portable, a GPU) the weights
still stay packed: each matmul unpacks a slice of rows at a time with PyTorch ops, so memory stays
near the file size. Only `--dequantize` unpacks a whole model.

Two ways to multiply a packed weight, chosen per module by `int8_activations`:
- True (default, what llama.cpp does): activations rounded to int8 per block of 32; fastest.
  Needs a compiled kernel; the unpacking path always multiplies float activations.
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
from phi3.cpu_kernels import kernel, kernel_available, kernel_error, kernel_isa  # noqa: F401 (re-exported)

BLOCK = 32
SUPER = 256  # K-quant super-block
PROMPT_ROWS = 16  # from this many tokens per sequence on, unpack the weight and use a dense matmul
UNPACK_ELEMENTS = 1 << 23  # weights unpacked at a time for that (32 MB in float32)
# Without a compiled kernel every matmul unpacks, decoding too: slices of 2M elements took
# phi-3-mini Q4_0's peak RSS from 2637 to 2550 MB and its decoding from 0.16 to 0.44 tok/s against
# 8M (slices that stay in cache); 512K changed neither.
PORTABLE_UNPACK_ELEMENTS = 1 << 21
# GGUF types kept packed in memory on every machine, each with compiled kernels; QUANT_KINDS:
# those that our quantizers also write.
PACKED_KINDS = ("Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")
QUANT_KINDS = ("Q4_0", "Q4_1", "Q4_K", "Q8_0", "IQ4_NL", "IQ4_XS")
FORMAT_IDS = {"q4_0": 0, "q4_1": 1, "q4_k": 2, "q8_0": 3, "q5_0": 4, "q5_1": 5, "q5_k": 6, "q6_k": 7,
              "iq4_nl": 8, "iq4_xs": 9}  # must match quant_core.h
# llama.cpp's kvalues_iq4nl: the 16 levels of IQ4_NL and IQ4_XS codes.
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
WRITE_TYPES = ("q4_0", "q4_1", "q4_k", "iq4_nl", "iq4_xs", "q8_0", "f16", "f32")  # what `phi3 quantize` writes
def _cpu_has_bf16() -> bool:
    global _BF16
    if _BF16 is None:
        try:
            flags = set(open("/proc/cpuinfo").read().split())
        except OSError:
            flags = set()
        _BF16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    return _BF16


_BF16: bool | None = None


class QuantLinear(nn.Module):
    """y = x @ W^T with W [out, in] held in blocks of 32 along `in` (see kernels/quant_core.h for the layout).

    Buffers, all with `out` rows:
    - `qs`: codes, int8 for q8_0, else the low 4 bits two per byte (per block of 32, byte j holds
      element j in its low nibble and element j + 16 in its high nibble);
    - `qh`: the high bits of 5- and 6-bit codes: q5_*: 4 bytes per block, one 32-bit little-endian
      plane (bit e is bit 4 of element e); q6_k: 8 bytes per block, bits 4..5 of element 8k + i in
      bits 2k, 2k+1 of byte i (llama.cpp's 2 bits per code, grouped so that one 64-bit shift per
      8 elements expands them; see quant_core.h); empty for the others;
    - `a`, `b`, `c`: the format's scales:
        q4_0, q8_0, iq4_nl: a = d (half) per block;  q5_0: a = d;  q4_1, q5_1: a = d, b = m;
        q4_k, q5_k: a = 6-bit sub-scales, b = sub-mins (uint8 per block), c = (d, dmin) per 256;
        q6_k: a = int8 scale per 16 elements, c = d per 256;
        iq4_xs: a = int8 block scale (ls - 32), c = d per 256.
    Weights: q4_0 d*(q-8); q5_0 d*(q-16); q4_1/q5_1 d*q+m; q4_k/q5_k d*sc*q - dmin*mn;
    q6_k d*sc*(q-32); q8_0 d*q; iq4_nl d*L[q]; iq4_xs d*(ls-32)*L[q] with L = IQ4_LEVELS.
    """

    def __init__(self, kind: str, qs: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None,
                 c: torch.Tensor | None, in_features: int, out_features: int,
                 int8_activations: bool = True, qh: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> None:
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
        self.register_buffer("qh", qh if qh is not None else empty)
        # Optional [out] bias, added after the product (Phi-3-small's linears have one; the
        # kernels know nothing of it).
        self.register_buffer("bias", bias)

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.qh, self.a, self.b, self.c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._product(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        ext = cpu_kernels.kernel() if x.device.type == "cpu" else None
        # Tokens per sequence, not rows in all: a batch of decode steps ([rows, 1, in]) stays on
        # the kernel, whose rows are computed exactly as one alone would be.
        tokens = x.shape[-2] if x.dim() >= 2 else 1
        if ext is not None and tokens < PROMPT_ROWS:
            # One token per sequence: decoding's kernel (on AVX2 one weight row at a time for the q4
            # formats, 20-30% faster there than the prompts' tiles); a short prompt: the tiles.
            return ext.block_matmul(x, self.fmt, self.qs, self.qh, self.a, self.b, self.c, self.int8_activations,
                                    tokens == 1)
        compute = self._unpacked_dtype(x)
        # Prompts too stay on our int8 kernel where an unpacked matmul would run in float32 (no
        # native bfloat16, e.g. AVX2): 8192x3072 Q4_0 times 128 rows took 64 ms there against
        # 145 ms unpacked in float32 (48 ms in bfloat16 where the CPU has AVX512-BF16).
        if ext is not None and self.int8_activations and compute == torch.float32:
            return ext.block_matmul(x, self.fmt, self.qs, self.qh, self.a, self.b, self.c, True, False)
        # Many tokens (a prompt), or no compiled kernel: unpack a slice of output rows at a time
        # and let a dense matmul reuse each weight, so that the unpacked copy stays small (32 MB).
        xc = x.reshape(-1, self.in_features).to(compute)
        y = torch.empty(xc.shape[0], self.out_features, dtype=compute, device=x.device)
        step = max(256, (UNPACK_ELEMENTS if ext is not None else PORTABLE_UNPACK_ELEMENTS) // self.in_features)
        for r in range(0, self.out_features, step):
            if ext is not None:
                parts = [t[r:r + step] if t.numel() else t for t in (self.qs, self.qh, self.a, self.b, self.c)]
                w = ext.block_dequantize(self.fmt, *parts, compute)
            else:
                w = self.dequantize(r, r + step).to(compute)
            y[:, r:r + step] = xc @ w.t()
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _unpacked_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dense matmul's dtype when weights are unpacked. bfloat16 where the CPU multiplies it
        natively (AVX512-BF16: ~4.5x float32's speed on our test CPU; its rounding of activations
        is no coarser than the int8 rounding of the decode path) unless exact; elsewhere float32,
        since emulated bfloat16 matmuls are slower than float32 ones."""
        if x.device.type != "cpu" or x.dtype == torch.bfloat16:
            return x.dtype
        if self.int8_activations and kernel_isa() == "avx512" and _cpu_has_bf16():
            return torch.bfloat16
        return torch.float32

    def block_scales(self, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float scale and min of every block of rows start:end [rows, in/32] for the formats whose
        block is 32 codes times one scale plus one min (w = scale * q + min); q6_k, whose scales
        cover 16 elements, and the iq4 types, whose codes index IQ4_LEVELS, give the scale of
        each code unit instead (dequantize handles them)."""
        a, b, c = (t[start:end] if t.numel() else t for t in (self.a, self.b, self.c))
        n = a.shape[0]
        if self.kind in ("q4_k", "q5_k"):
            dm = c.view(torch.float16).float().view(n, -1, 1, 2)
            sc = a.float().view(n, -1, SUPER // BLOCK)
            mn = b.float().view(n, -1, SUPER // BLOCK)
            return (dm[..., 0] * sc).view(n, -1), (-dm[..., 1] * mn).view(n, -1)
        if self.kind in ("q6_k", "iq4_xs"):
            d = c.view(torch.float16).float()
            per = a.shape[1] // d.shape[1]  # q6_k: 16 scales per 256, iq4_xs: 8
            scale = (d[:, :, None] * a.view(torch.int8).float().view(n, -1, per)).view(n, -1)
            return scale, torch.zeros_like(scale)
        d = a.view(torch.float16).float()
        if self.kind == "q4_0":
            return d, -8 * d
        if self.kind == "q5_0":
            return d, -16 * d
        if self.kind in ("q4_1", "q5_1"):
            return d, b.view(torch.float16).float()
        return d, torch.zeros_like(d)

    def codes(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The integer codes of rows start:end as float32 [rows, in] (before scales; iq4 types:
        their levels)."""
        k = self.in_features
        qs = self.qs[start:end]
        n = qs.shape[0]
        if self.kind == "q8_0":
            return qs.view(torch.int8).view(n, k).float()
        blocks = qs.view(n, k // BLOCK, 16)
        q = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1)
        if self.kind == "q6_k":  # element 8k + i: bits 2k, 2k+1 of byte i
            high = self.qh[start:end].view(n, k // BLOCK, 1, 8)
            shift = 2 * torch.arange(4, dtype=torch.uint8, device=qs.device).view(1, 1, 4, 1)
            q = q | (((high >> shift) & 3) << 4).view(n, k // BLOCK, BLOCK)
        elif self.qh.numel():
            plane = self.qh[start:end].view(n, k // BLOCK, 4)  # one 32-bit plane per block: bit 4
            bit = torch.arange(BLOCK, device=qs.device)
            q = q | ((plane[:, :, bit // 8] >> (bit % 8) & 1) << 4)
        if self.kind in ("iq4_nl", "iq4_xs"):
            return torch.tensor(IQ4_LEVELS, dtype=torch.float32, device=qs.device)[q.long()].view(n, k)
        return q.float().view(n, k)

    def dequantize(self, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The dense float32 weight rows start:end [rows, in], in plain PyTorch (the kernels'
        reference, and the unpacking path where no kernel is compiled)."""
        k = self.in_features
        q = self.codes(start, end)
        n = q.shape[0]
        scale, minimum = self.block_scales(start, end)
        # In place: the unpacking path runs this per slice at every matmul, and each temporary
        # the size of the slice adds to peak memory.
        if self.kind == "q6_k":  # 16 codes per scale, codes offset by 32
            return q.view(n, -1, 16).sub_(32).mul_(scale[..., None]).view(n, k)
        return q.view(n, k // BLOCK, BLOCK).mul_(scale[..., None]).add_(minimum[..., None]).view(n, k)

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
    """Repack a GGUF tensor's raw bytes (one of PACKED_KINDS) into a QuantLinear."""
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
    if kind in ("Q5_0", "Q5_1"):
        blocks = raw.reshape(rows, nb, -1)
        d = half(blocks[:, :, 0:2])
        at = 2 if kind == "Q5_0" else 4
        qh = torch.from_numpy(blocks[:, :, at:at + 4].reshape(rows, nb * 4).copy())
        qs = torch.from_numpy(blocks[:, :, at + 4:at + 20].reshape(rows, nb * 16).copy())
        m = half(blocks[:, :, 2:4]) if kind == "Q5_1" else None
        return QuantLinear(kind.lower(), qs, d, m, None, cols, rows, qh=qh)
    if kind == "Q5_K":
        ns = cols // SUPER
        blocks = raw.reshape(rows, ns, 176)
        dm = half(blocks[:, :, 0:4])
        sc, mn = _q4k_scale_min(blocks[:, :, 4:16])
        high = blocks[:, :, 16:48]  # [rows, ns, 32]: bit s of byte l is bit 4 of element l of sub-block s
        packed = blocks[:, :, 48:176].reshape(rows, ns, 4, 32)
        codes = np.stack([packed & 0x0F, packed >> 4], axis=3).reshape(rows, ns * 8, BLOCK)
        bits = (high[:, :, None, :] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1
        qh = _pack_bit_plane(bits.reshape(rows, ns * 8, BLOCK))
        return QuantLinear("q5_k", torch.from_numpy(_pack_q4_order(codes).reshape(rows, nb * 16)),
                           torch.from_numpy(sc.reshape(rows, nb).copy()), torch.from_numpy(mn.reshape(rows, nb).copy()),
                           dm, cols, rows, qh=torch.from_numpy(qh.reshape(rows, nb * 4)))
    if kind == "Q6_K":
        ns = cols // SUPER
        blocks = raw.reshape(rows, ns, 210)
        ql = blocks[:, :, 0:128].reshape(rows, ns, 2, 2, 32)  # [half of 128, low/high 32 bytes, l]
        qh = blocks[:, :, 128:192].reshape(rows, ns, 2, 32)
        scales = blocks[:, :, 192:208].reshape(rows, ns * 16)
        d = half(blocks[:, :, 208:210])
        # Element 128h + 32g + l: low nibble of ql[h][g % 2][l] (g < 2) or high (g >= 2); its two
        # high bits are bits 2g, 2g+1 of qh[h][l].
        low = np.stack([ql[:, :, :, 0] & 0x0F, ql[:, :, :, 1] & 0x0F, ql[:, :, :, 0] >> 4, ql[:, :, :, 1] >> 4],
                       axis=3)  # [rows, ns, 2, 4, 32]
        high = np.stack([(qh >> (2 * g)) & 3 for g in range(4)], axis=3)
        low, high = low.reshape(rows, ns * 8, BLOCK), high.reshape(rows, ns * 8, 4, 8)
        # Element 8k + i of a block: bits 2k, 2k+1 of byte i (quant_core.h's q6_high_bits).
        packed_high = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).astype(np.uint8)
        return QuantLinear("q6_k", torch.from_numpy(_pack_q4_order(low).reshape(rows, nb * 16)),
                           torch.from_numpy(scales.view(np.int8).copy()), None, d, cols, rows,
                           qh=torch.from_numpy(packed_high.reshape(rows, nb * 8)))
    if kind == "IQ4_NL":
        blocks = raw.reshape(rows, nb, 18)
        return QuantLinear("iq4_nl", torch.from_numpy(blocks[:, :, 2:18].reshape(rows, nb * 16).copy()),
                           half(blocks[:, :, 0:2]), None, None, cols, rows)
    if kind == "IQ4_XS":
        ns = cols // SUPER
        blocks = raw.reshape(rows, ns, 136)
        d = half(blocks[:, :, 0:2])
        scales_h = blocks[:, :, 2:4].copy().view(np.uint16).reshape(rows, ns, 1).astype(np.int32)
        scales_l = blocks[:, :, 4:8].astype(np.int32)
        ib = np.arange(8)
        ls = ((scales_l[:, :, ib // 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4)
        return QuantLinear("iq4_xs", torch.from_numpy(blocks[:, :, 8:136].reshape(rows, nb * 16).copy()),
                           torch.from_numpy((ls - 32).astype(np.int8).reshape(rows, nb)), None, d, cols, rows)
    raise ValueError(f"not a block format phi3 keeps packed: {kind}")


def _pack_bit_plane(bits: np.ndarray) -> np.ndarray:
    """Bits [..., 32] (0/1) -> 4 bytes [..., 4], bit e of the little-endian 32-bit word = element e."""
    return np.packbits(bits.astype(np.uint8), axis=-1, bitorder="little")


BUFFERS = ("qs", "qh", "a", "b", "c")


def concat_rows(parts: list[QuantLinear]) -> QuantLinear:
    """Stack several weights' rows (q, k, v into qkv; gate, up into gate_up)."""
    assert len({p.kind for p in parts}) == 1 and len({p.in_features for p in parts}) == 1
    first = parts[0]
    cat = {name: torch.cat([getattr(p, name) for p in parts]) for name in BUFFERS}
    bias = None
    if any(p.bias is not None for p in parts):  # a part without one adds zeros
        dtype = next(p.bias.dtype for p in parts if p.bias is not None)
        bias = torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features, dtype=dtype) for p in parts])
    return QuantLinear(first.kind, cat["qs"], cat["a"], cat["b"], cat["c"], first.in_features,
                       sum(p.out_features for p in parts), first.int8_activations, qh=cat["qh"], bias=bias)


class ConcatLinear(nn.Module):
    """Several packed weights of different types side by side in the output dimension, e.g. a
    Q4_K_M file's q and k (Q4_K) next to its v (Q6_K) as one qkv projection."""

    def __init__(self, parts: list[QuantLinear], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        assert len({p.in_features for p in parts}) == 1
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.register_buffer("bias", bias)  # optional [out], added after the parts' outputs

    @property
    def weight_bytes(self) -> int:
        return sum(p.weight_bytes for p in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([p(x) for p in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def join_rows(parts: list[QuantLinear], bias: torch.Tensor | None = None) -> QuantLinear | ConcatLinear:
    """One module for weights stacked by rows: one QuantLinear when they share a type, else a
    ConcatLinear of runs of equal types. `bias`: the joined weight's [out] bias, if it has one."""
    if len({p.kind for p in parts}) == 1:
        joined = concat_rows(parts) if len(parts) > 1 else parts[0]
        if bias is not None:
            assert joined.bias is None and bias.shape == (joined.out_features,)
            joined.bias = bias
        return joined
    runs: list[list[QuantLinear]] = []
    for p in parts:
        if runs and runs[-1][0].kind == p.kind:
            runs[-1].append(p)
        else:
            runs.append([p])
    return ConcatLinear([concat_rows(r) if len(r) > 1 else r[0] for r in runs], bias)


def permute_rows(q: QuantLinear, order: torch.Tensor) -> QuantLinear:
    """The rows `order` (a permutation, or any selection) of a packed weight."""
    bufs = {name: getattr(q, name)[order].contiguous() for name in BUFFERS}
    bias = q.bias[order] if q.bias is not None else None
    return QuantLinear(q.kind, bufs["qs"], bufs["a"], bufs["b"], bufs["c"], q.in_features, len(order),
                       q.int8_activations, qh=bufs["qh"], bias=bias)


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


_IQ4_VALUES = np.array(IQ4_LEVELS, dtype=np.float32)


def _iq4_best_index(x: np.ndarray) -> np.ndarray:
    """llama.cpp's best_index_int8 over IQ4_LEVELS, elementwise: the nearest level, the upper one
    of a tie only when strictly nearer (as its `x - lo < hi - x ? lo : hi`)."""
    v = _IQ4_VALUES
    upper = np.clip(np.searchsorted(v, x, side="right"), 1, 15)
    lo, hi = v[upper - 1], v[upper]
    idx = np.where(x - lo < hi - x, upper - 1, upper)
    return np.where(x <= v[0], 0, np.where(x >= v[15], 15, idx)).astype(np.uint8)


def _iq4_block_scales(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The weighted scale search of llama.cpp's quantize_row_iq4_nl_impl (ntry = 7, no importance
    matrix: weights x^2) for blocks x [B, 32] in float32: (scale [B], codes [B, 32]). Sums run
    element by element as the C loops add them, so the scales round to llama-quantize's bits."""
    weight = x * x
    first_max = np.argmax(np.abs(x), axis=1)  # the first of equal magnitudes, as `ax > amax` keeps
    mx = x[np.arange(len(x)), first_max]
    empty = np.abs(mx) < np.float32(1e-15)
    mx_safe = np.where(empty, np.float32(1), mx)

    def sums(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = _IQ4_VALUES[codes]
        wq = weight * q
        return _sum_in_order(np.ascontiguousarray((wq * x).T)), _sum_in_order(np.ascontiguousarray((wq * q).T))

    d = -mx_safe / np.float32(-127)
    codes = _iq4_best_index((np.float32(1) / d)[:, None] * x)
    sumqx, sumq2 = sums(codes)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sumq2 > 0, sumqx / sumq2, np.float32(0)).astype(np.float32)
    best = d * sumqx
    for itry in range(-7, 8):
        inv = np.float32(itry - 127) / mx_safe
        sumqx, sumq2 = sums(_iq4_best_index(inv[:, None] * x))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(better, sumqx / sumq2, d).astype(np.float32)
        best = np.where(better, d * sumqx, best).astype(np.float32)
    return np.where(empty, np.float32(0), d), codes


def _pack_iq4(codes: np.ndarray) -> np.ndarray:
    """Codes [..., 32] -> 16 bytes per block (element j low nibble, j + 16 high)."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def quantize_iq4_nl(a: np.ndarray) -> np.ndarray:
    """Float [rows, cols] (cols a multiple of 32) -> GGUF IQ4_NL bytes, as llama-quantize writes
    them (ggml's quantize_iq4_nl without an importance matrix)."""
    rows, cols = a.shape
    x = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, BLOCK)
    scale, _ = _iq4_block_scales(x)
    d = scale.astype(np.float16)
    with np.errstate(divide="ignore"):
        inv = np.where(scale != 0, np.float32(1) / np.where(scale != 0, scale, 1), np.float32(0)).astype(np.float32)
    codes = _iq4_best_index(inv[:, None] * x)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), _pack_iq4(codes)], axis=1)
    return out.reshape(rows, cols // BLOCK * 18)


def quantize_iq4_xs(a: np.ndarray) -> np.ndarray:
    """Float [rows, cols] (cols a multiple of 256) -> GGUF IQ4_XS bytes, as llama-quantize writes
    them: IQ4_NL's search per 32, then 6-bit block scales under one half-precision scale per 256."""
    rows, cols = a.shape
    x = np.ascontiguousarray(a, dtype=np.float32).reshape(-1, BLOCK)
    scales, _ = _iq4_block_scales(x)
    scales = scales.reshape(-1, SUPER // BLOCK)
    first_max = np.argmax(np.abs(scales), axis=1)
    max_scale = scales[np.arange(len(scales)), first_max]
    d = (-max_scale / np.float32(32)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv_d = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0)).astype(np.float32)
    levels = np.clip(_nearest(inv_d[:, None] * scales), -32, 31)
    dl = (d[:, None] * levels.astype(np.float32)).reshape(-1)
    with np.errstate(divide="ignore"):
        inv_dl = np.where(dl != 0, np.float32(1) / np.where(dl != 0, dl, 1), np.float32(0)).astype(np.float32)
    codes = _iq4_best_index(inv_dl[:, None] * x)
    ls = (levels + 32).astype(np.uint16)  # [S, 8]
    scales_l = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
    scales_h = np.zeros(len(ls), np.uint16)
    for ib in range(SUPER // BLOCK):
        scales_h |= (ls[:, ib] >> 4) << (2 * ib)
    out = np.concatenate([d.astype(np.float16).view(np.uint8).reshape(-1, 2), scales_h.view(np.uint8).reshape(-1, 2),
                          scales_l.astype(np.uint8), _pack_iq4(codes).reshape(-1, 128)], axis=1)
    return out.reshape(rows, cols // SUPER * 136)


def quantize_blocks(a: np.ndarray, kind: str) -> np.ndarray:
    """Float [rows, cols] -> GGUF bytes of `kind` (one of WRITE_TYPES); f16/f32 stay arrays."""
    import gguf
    if kind == "f32":
        return np.ascontiguousarray(a, dtype=np.float32)
    if kind == "f16":
        return np.ascontiguousarray(a, dtype=np.float16)
    if kind == "q4_k":
        return quantize_q4_k(a)
    if kind == "iq4_nl":
        return quantize_iq4_nl(a)
    if kind == "iq4_xs":
        return quantize_iq4_xs(a)
    return gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), gguf.GGMLQuantizationType[kind.upper()])


def keeps_packed(kind: str, gguf_shape: tuple[int, ...]) -> bool:
    """Whether a GGUF tensor (type name, GGUF's [in, out] shape) loads as a QuantLinear."""
    return kind in PACKED_KINDS and len(gguf_shape) == 2 and gguf_shape[0] % block_size(kind) == 0


def block_size(kind: str) -> int:
    """Elements per block of a type name (K-quants and iq4_xs: 256; other block types: 32; floats: 1)."""
    kind = kind.lower()
    if kind.endswith("_k") or kind == "iq4_xs":
        return SUPER
    return BLOCK if kind.startswith(("q", "iq")) else 1
