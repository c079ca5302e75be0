"""CPU fast paths applied to a loaded model from outside, as gpt-fast's quantize handlers are:
model.py stays plain PyTorch, and `install_cpu_fast_path` turns its RMSNorm and Attention modules
into the subclasses below, which call phi3's compiled kernels (cpu_kernels.py) when decoding.

Why: decoding one token runs ~30 norms and ~30 attention steps whose PyTorch ops cost more in
per-call overhead than in arithmetic (bfloat16 SDPA ~60 us and bfloat16 rms_norm ~19 us per call
on our test CPU; the fused kernels take a few microseconds). Every subclass falls back to the
plain module's code whenever gradients are on, the tensor is not on the CPU, or no kernel is built,
so a trainer can wrap an installed model unchanged.

The swap changes each module's class in place (`module.__class__ = ...`): parameters, buffers and
their names stay exactly where they were, so state dicts, hooks and `phi3 convert` see no change.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from phi3 import cpu_kernels
from phi3.model import Attention, DecodeRows, KVCache, RMSNorm


def kernels_for(x: torch.Tensor) -> Any:
    """The compiled CPU kernels when they apply to x (CPU, float32 or bfloat16, inference), else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or torch.is_grad_enabled():
        return None
    return cpu_kernels.kernel()


class FusedRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ext = kernels_for(x) if x.dtype == self.weight.dtype else None
        if ext is not None:
            return ext.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def fits_attention_kernel(head_dim: int) -> bool:
    return head_dim % 16 == 0 and head_dim <= 128  # the decode attention kernel's limits


class FusedAttention(Attention):
    def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = qkv.shape
        ext = kernels_for(qkv) if cache is not None and T == 1 and not cache.quantized else None
        if ext is None:
            return super().attend(qkv, cos, sin, mask, is_causal, cache, layer)
        # One new token: rotary, the cache write and attention in one kernel call (the ~15 small
        # PyTorch ops it replaces cost more than the arithmetic).
        allowed = mask[:, 0, 0, :] if mask is not None else torch.empty(0, dtype=torch.bool)
        out = ext.decode_attention(qkv.reshape(B, -1), cos.view(B, -1), sin.view(B, -1), cache.k[layer],
                                   cache.v[layer], cache.length, allowed, self.head_dim ** -0.5, self.n_heads)
        return out.view(B, 1, self.n_heads * self.head_dim)

    def attend_rows(self, qkv: torch.Tensor, rows: DecodeRows, layer: int) -> torch.Tensor:
        M = qkv.shape[0]
        ext = kernels_for(qkv) if not any(c.quantized for c in rows.caches) else None
        if ext is None:
            return super().attend_rows(qkv, rows, layer)
        # All rows in one call: rows x heads in parallel, each row with the per-head code that
        # decode_attention runs for it alone (so batching never changes a row's numbers).
        masks = [m[:, 0, 0, :].contiguous() if m is not None else torch.empty(0, dtype=torch.bool)
                 for m in rows.masks]
        out = ext.decode_attention_many(qkv.view(M, -1), rows.cos.reshape(M, -1), rows.sin.reshape(M, -1),
                                        [c.k for c in rows.caches], [c.v for c in rows.caches], layer,
                                        [c.length for c in rows.caches], masks, self.head_dim ** -0.5,
                                        self.n_heads)
        return out.view(M, 1, -1)


# phi-3-small (model_small.py) has no fused kernels: its LayerNorm is one PyTorch op already, and
# its attention is not model.py's (interleaved qkv, a 1/d scale, a per-head blocksparse pattern in
# every other layer), so install_cpu_fast_path leaves those modules as they are. Its 4/8-bit
# linears are packed by the loader like every other model's.
SMALL_PARTS = {
    "layernorm": "PyTorch (torch.layer_norm, with bias)",
    "attention": "PyTorch: blocksparse layers compute only each head's allowed blocks (local window + "
                 "vertical stride), dense layers SDPA; no fused decode kernel",
}


def _is_small(config: object) -> bool:
    return hasattr(config, "blocksparse_block_size")  # a SmallConfig (phi3/config_small.py)


def install_cpu_fast_path(model: nn.Module) -> dict[str, str]:
    """Swap in the fused RMSNorm and one-token attention where a compiled kernel exists and the
    shapes fit it; returns what each part of the model now runs (for `phi3 info`). Modules of other
    classes (phi-3-small's LayerNorm and blocksparse attention) are left as they are."""
    if _is_small(getattr(model, "config", None)):
        return dict(SMALL_PARTS)
    isa = cpu_kernels.kernel_isa()
    used = {"rmsnorm": "PyTorch", "decode attention": "PyTorch (SDPA)"}
    if isa is None:
        return used
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = FusedRMSNorm
            used["rmsnorm"] = f"phi3 {isa} kernel"
        elif type(module) is Attention and fits_attention_kernel(module.head_dim):
            module.__class__ = FusedAttention
            used["decode attention"] = f"phi3 {isa} kernel (rotary + cache write + attention fused)"
    return used


def remove_cpu_fast_path(model: nn.Module) -> None:
    """Back to the plain modules (e.g. before training a loaded model)."""
    for module in model.modules():
        if type(module) is FusedRMSNorm:
            module.__class__ = RMSNorm
        elif type(module) is FusedAttention:
            module.__class__ = Attention
