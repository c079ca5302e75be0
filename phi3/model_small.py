"""The Phi-3-small decoder, in one file (fact sheet: ../shared/reference/phi3-small.md, § below).

    tokens -> embed x10 -> N x [x + attn(layernorm(x)); x + gegelu_mlp(layernorm(x))]
           -> layernorm -> tied head, float32, / 8, dummy ids at the float32 minimum

Unlike phi-3-mini: LayerNorm with biases, biases on all four linears, a qkv projection whose rows
are interleaved per KV group (§2.3), GEGELU on interleaved channels (§3), muP multipliers (§2.5)
and, every other layer, blocksparse attention whose pattern differs per head (§4.2):

    head h, query i, key j (positions from the sequence's first real token), qb = i // B, kb = j // B
    allowed = j <= i and (qb - kb < L  or  (kb + h*s + 1) % V == 0)     s = max(1, V // H), or 0 if homo

so each head sees a local window of L blocks plus every V-th block before it, a different residue
per head (8K prefill: 31.8% of the causal pairs per head).

Blocksparse layers compute only the allowed blocks; no T x T mask exists, and a prefill is a
few large calls of PyTorch's CPU flash-attention kernel, which also returns each row's
log-sum-exp, so that partial attentions merge exactly (SmallAttention._prefill):
  - the first L-1 blocks: plain causal attention (the window still reaches position 0);
  - the local window: ONE call whose batch is the query blocks, each against its own L-block
    slice of the keys (an `unfold` view, nothing copied), the own block causal through one
    [B, L*B] additive mask shared by all blocks;
  - the vertical blocks: query rows that see the same number c of vertical blocks are, per head,
    V consecutive blocks offset by the head's residue; one strided view of the queries lines
    them up for all heads (nothing copied), one call per c against a prefix of each head's
    gathered vertical blocks, no mask, merged into the window's output in the same step.
At 8K: 1 + 1 + 21 calls (13 for all heads, 8 clipped at the end) where the per-query-block loop
made 240. The output overwrites the queries' buffer. Measured at 8K, real shape, float32, CPU
time of one layer's attend, A/B in one process on a quiet machine (BENCHMARKS.md, "Blocksparse
prefill merged in place"): dense causal SDPA / blocksparse 2.04x at 2 threads (1.83x before this
layout), 2.13x at 1 thread (1.98x); under load the 2-thread ratio falls to ~1.8x. Decoding
reads the local window and each head's vertical blocks only (`_one_token`, shared by both
caches: the head-aware cache's logits equal the full cache's bit for bit). Training (gradients
on) takes the same path with plain matmul and softmax.

Which mask variant: the formula at absolute positions (§4.4): HF's SDPA fallback, vLLM, TRT and
ORT agree; mlx's right-aligned prefill differs past 1024 tokens at lengths not multiples of 64.

A head-aware KV cache (`new_cache(..., head_aware=True)`) keeps, for the sparse layers, only
what some query head of each KV group can still see: a ring of the last L blocks, and the
blocks of the group's vertical residues (8K: 72 of 128 blocks per sparse layer).

Positions, padding, packed scoring (`allowed`) and packed documents follow model.py; this file
shares its rotary helpers and its KVCache. Sampling lives in generate.py. Left-padded rows count
positions from their first real token (the mask's blocks too; HF's padded kernel is not public,
§8). `allowed` (eval's packed scoring) builds a dense [B, H, T, S] mask intersected with the
pattern: correct, not sparse. LongRoPE (128K) picks factors per row by total length as model.py
does, and generate.advance re-encodes at the switch (HF keeps the short-factor keys; §4.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from phi3.config_small import SmallConfig
from phi3.errors import Phi3Error
from phi3.model import Q8_0, KVCache, Transformer, apply_rotary, rope_inv_freq


# --- The blocksparse pattern ----------------------------------------------------------------------

def _sliding_step(cfg: SmallConfig) -> int:
    # §4.2: heads step through the residues mod V by s; homo: every head sees residue V-1.
    if cfg.blocksparse_homo_head_pattern:
        return 0
    return max(1, cfg.blocksparse_vert_stride // cfg.num_attention_heads)


def head_residues(cfg: SmallConfig) -> torch.Tensor:
    """[H] long: the vertical-stride residue of each query head, kb with (kb + h*s + 1) % V == 0."""
    V = cfg.blocksparse_vert_stride
    h = torch.arange(cfg.num_attention_heads)
    return (-(h * _sliding_step(cfg) + 1)) % V


def blocksparse_allowed(q_pos: torch.Tensor | int, k_pos: torch.Tensor | int, head: torch.Tensor | int,
                        cfg: SmallConfig) -> torch.Tensor:
    """The §4.2 formula, element-wise with broadcasting (e.g. q_pos[:, None], k_pos[None, :]):
    whether query head `head` at position q_pos may attend to the key at k_pos. Includes causality."""
    q_pos, k_pos, head = (torch.as_tensor(x) for x in (q_pos, k_pos, head))
    B, L, V = cfg.blocksparse_block_size, cfg.blocksparse_num_local_blocks, cfg.blocksparse_vert_stride
    qb, kb = torch.div(q_pos, B, rounding_mode="floor"), torch.div(k_pos, B, rounding_mode="floor")
    vertical = (kb + head * _sliding_step(cfg) + 1) % V == 0
    return (k_pos <= q_pos) & ((qb - kb < L) | vertical)


# --- Head-aware KV cache --------------------------------------------------------------------------

class HeadAwareKVCache(KVCache):
    """A KVCache whose blocksparse layers keep only what a query can still see (§4.3).

    Dense layers: the inherited full storage (`k`, `v`, slot-indexed, `store`/`load` with the
    dense layer's index in `dense_index`). Sparse layers, indexed by token position (not slot, so
    left-padded rows need no special case), per layer, row and KV group:
      - `ring_k`/`ring_v`: the last L*B positions (position p in slot p % ring_len), which hold the
        next query's local window; `ring_pos` says which position each slot holds (-1: none).
      - `vert_k`/`vert_v` [.., KV, M, R, B, hd]: block kb = m*V + residue, for the group's R
        distinct residues, for the blocks that can leave the window (kb < blocks - L).
    A block both recent and vertical is in both (one block's worth per group at most).
    At 8K (B 64, L 16, V 8, 4 query heads per group): 16 + 14*4 = 72 of 128 blocks per sparse layer.

    Float kinds only (a q8_0 cache would need its scales gathered the same way: not built).
    Everything engine/generate/eval touch (length, max_len, valid, next_position, rope_long,
    reset, copy_prefix, quantized) behaves as KVCache's."""

    def __init__(self, cfg: SmallConfig, batch_size: int, max_len: int,
                 kind: torch.dtype | str, device: torch.device | str = "cpu") -> None:
        if kind == Q8_0:
            raise Phi3Error("the head-aware KV cache stores float keys; use --kv-cache f16 (or f32) with it, "
                            "or the full cache for q8_0")
        dense = [i for i in range(cfg.num_hidden_layers) if cfg.is_dense_layer(i)]
        sparse = [i for i in range(cfg.num_hidden_layers) if not cfg.is_dense_layer(i)]
        hd, KV = cfg.dim_per_head, cfg.num_key_value_heads
        # KVCache reads only these three sizes: it then allocates the dense layers alone.
        super().__init__(SimpleNamespace(dim_per_head=hd, num_hidden_layers=len(dense), num_key_value_heads=KV),
                         batch_size, max_len, kind, device)
        self.dense_index = {layer: j for j, layer in enumerate(dense)}
        self.sparse_index = {layer: j for j, layer in enumerate(sparse)}
        Bs, L, V = cfg.blocksparse_block_size, cfg.blocksparse_num_local_blocks, cfg.blocksparse_vert_stride
        self.block, self.local_blocks, self.stride = Bs, L, V
        self.ring_len = min(L * Bs, max_len)
        G = cfg.num_attention_heads // KV
        residues = head_residues(cfg)
        # Each group's distinct residues, in the order of its heads: slot_of_head[h] is where head
        # h's vertical blocks live in its group's store; res_slot[g, r] the slot of residue r (-1).
        res_slot = torch.full((KV, V), -1, dtype=torch.long)
        slot_of_head = torch.empty(cfg.num_attention_heads, dtype=torch.long)
        R = 0
        for g in range(KV):
            n = 0
            for h in range(g * G, (g + 1) * G):
                r = int(residues[h])
                if res_slot[g, r] < 0:
                    res_slot[g, r] = n
                    n += 1
                slot_of_head[h] = res_slot[g, r]
            R = max(R, n)
        self.res_slot, self.slot_of_head, self.residues = res_slot.to(device), slot_of_head.to(device), residues.to(device)
        blocks = -(-max_len // Bs)
        self.vert_blocks = max(0, blocks - L)  # blocks below this may leave the window
        M = -(-self.vert_blocks // V)
        n = len(sparse)
        self.ring_k = torch.zeros(n, batch_size, KV, self.ring_len, hd, dtype=kind, device=device)
        self.ring_v = torch.zeros_like(self.ring_k)
        self.ring_pos = torch.full((n, batch_size, self.ring_len), -1, dtype=torch.long, device=device)
        self.vert_k = torch.zeros(n, batch_size, KV, M, R, Bs, hd, dtype=kind, device=device)
        self.vert_v = torch.zeros_like(self.vert_k)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held (dense layers' full storage + the sparse layers' stores)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.ring_k, self.ring_v,
                                                          self.vert_k, self.vert_v))

    def reset(self) -> None:
        super().reset()
        self.ring_pos.fill_(-1)

    def store_sparse(self, j: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     real: torch.Tensor) -> None:
        """Keys and values [B, KV, T, hd] of sparse layer j at `positions` [B, T] (only where `real`)."""
        B, KV, T, hd = k.shape
        Bs, V = self.block, self.stride
        # The ring: only each row's last ring_len positions (earlier ones would be overwritten in the
        # same write, and index_put with repeated indices keeps an unspecified one).
        last = torch.where(real, positions, -1).amax(dim=1, keepdim=True)
        keep = real & (positions > last - self.ring_len)
        b, t = keep.nonzero(as_tuple=True)
        slot = positions[b, t] % self.ring_len
        self.ring_k[j, b, :, slot] = k[b, :, t]
        self.ring_v[j, b, :, slot] = v[b, :, t]
        self.ring_pos[j, b, slot] = positions[b, t]
        # The vertical store: tokens of blocks that can leave the window, in each group whose
        # residues include their block's.
        kb = torch.div(positions, Bs, rounding_mode="floor")
        slot = self.res_slot[:, kb % V].permute(1, 0, 2)  # [B, KV, T]
        keep = (real & (kb < self.vert_blocks))[:, None, :] & (slot >= 0)
        b, g, t = keep.nonzero(as_tuple=True)
        if b.numel():
            m, s, o = kb[b, t] // V, slot[b, g, t], positions[b, t] % Bs
            self.vert_k[j, b, g, m, s, o] = k[b, g, t]
            self.vert_v[j, b, g, m, s, o] = v[b, g, t]

    def materialize(self, j: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of sparse layer j laid out by position, [B, KV, length, hd]: what the
        cache holds, zeros elsewhere (never read: the pattern does not reach dropped blocks)."""
        B, KV = self.ring_k.shape[1], self.ring_k.shape[2]
        hd = self.ring_k.shape[-1]
        k = self.ring_k.new_zeros(B, KV, length, hd)
        v = torch.zeros_like(k)
        M, R, Bs = self.vert_k.shape[3], self.vert_k.shape[4], self.block
        if M and length > 0:
            # Block of each (group, m, slot): m*V + residue; the slot -> residue map per group.
            res_of_slot = torch.full((KV, R), -1, dtype=torch.long, device=k.device)
            g, r = (self.res_slot >= 0).nonzero(as_tuple=True)
            res_of_slot[g, self.res_slot[g, r]] = r
            kb = torch.arange(M, device=k.device)[None, :, None] * self.stride + res_of_slot[:, None, :]  # [KV, M, R]
            ok = (res_of_slot[:, None, :] >= 0) & ((kb + 1) * Bs <= length) & (kb < self.vert_blocks)
            g, m, s = ok.nonzero(as_tuple=True)
            pos = kb[g, m, s][:, None] * Bs + torch.arange(Bs, device=k.device)  # [n, Bs]
            k[:, g[:, None], pos] = self.vert_k[j][:, g, m, s]
            v[:, g[:, None], pos] = self.vert_v[j][:, g, m, s]
        b, slot = ((self.ring_pos[j] >= 0) & (self.ring_pos[j] < length)).nonzero(as_tuple=True)
        p = self.ring_pos[j][b, slot]
        k[b, :, p] = self.ring_k[j][b, :, slot]
        v[b, :, p] = self.ring_v[j][b, :, slot]
        return k, v

    def copy_prefix(self, other: KVCache, n: int) -> None:
        """Positions 0:n of every layer from `other` (the same model; head-aware or a full KVCache
        without padding)."""
        if isinstance(other, HeadAwareKVCache):
            # Positions the next query (at n) may see must still be in `other`: its ring has moved
            # on once it holds more than the prefix (engine.Prefix builds it with exactly n).
            window = max(0, n // self.block - self.local_blocks + 1) * self.block
            if other.length > n and window < other.length - other.ring_len:
                raise Phi3Error(f"copy_prefix: this head-aware cache has dropped keys of its first {n} tokens "
                                f"(it holds {other.length}); copy from a cache of exactly the prefix")
            KVCache.copy_prefix(self, other, n)
            for j in range(self.ring_k.shape[0]):
                k, v = other.materialize(j, n)
                self._store_prefix(j, k, v, n)
            return
        for layer, j in self.dense_index.items():
            self.k[j, :, :, :n] = other.k[layer, :, :, :n]
            self.v[j, :, :, :n] = other.v[layer, :, :, :n]
        for layer, j in self.sparse_index.items():
            k, v = other.load(layer, n, self.ring_k.dtype)
            self._store_prefix(j, k, v, n)

    def _store_prefix(self, j: int, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        B = self.ring_k.shape[1]
        positions = torch.arange(n, device=k.device).expand(B, n)
        self.ring_pos[j].fill_(-1)
        self.store_sparse(j, k, v, positions, torch.ones(B, n, dtype=torch.bool, device=k.device))


def kv_cache_bytes(cfg: SmallConfig, batch_size: int, max_len: int, element_size: int = 2,
                   head_aware: bool = False) -> int:
    """Bytes of keys and values a cache holds, computed from the config without allocating it
    (element_size 2: float16/bfloat16). The head-aware count is HeadAwareKVCache's exact layout."""
    hd, KV, Bs = cfg.dim_per_head, cfg.num_key_value_heads, cfg.blocksparse_block_size
    per_position = 2 * batch_size * KV * hd * element_size  # keys and values, one layer
    if not head_aware:
        return cfg.num_hidden_layers * max_len * per_position
    dense = sum(cfg.is_dense_layer(i) for i in range(cfg.num_hidden_layers))
    sparse = cfg.num_hidden_layers - dense
    L, V = cfg.blocksparse_num_local_blocks, cfg.blocksparse_vert_stride
    G = cfg.num_attention_heads // KV
    res = head_residues(cfg)
    R = max(len({int(r) for r in res[g * G:(g + 1) * G]}) for g in range(KV))
    vert_blocks = max(0, -(-max_len // Bs) - L)
    kept = min(L * Bs, max_len) + -(-vert_blocks // V) * R * Bs
    return (dense * max_len + sparse * kept) * per_position


# --- Attention ------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What every layer of one forward needs, computed once by SmallTransformer._prepare."""
    cos: torch.Tensor  # [B, T, 1, hd]
    sin: torch.Tensor
    positions: torch.Tensor  # [B, T] the new tokens' positions
    real: torch.Tensor  # [B, T] bool: not padding
    start: int  # slots already cached
    key_valid: torch.Tensor | None  # [B, S] real slots (None: all)
    layout: str  # sparse layers: "simple" (slot = position, batched), "left" (left padding, per row),
    #              "documents", "general" (a dense mask with the pattern: `allowed` or odd masks)
    dense_mask: torch.Tensor | None  # [B, 1, T, S] for dense layers (None: see dense_causal)
    dense_causal: bool
    allowed: torch.Tensor | None = None  # [B, T, S] eval's packed mask
    documents: list[list[tuple[int, int]]] | None = None  # per row: [start, end) of each document


# PyTorch's CPU flash-attention kernel, which also returns each row's log-sum-exp: partial
# attentions over separate key sets (a group's local window, a head's vertical blocks) then merge
# exactly. Measured (1 thread, float32, 8 groups x 256 rows x 1024 keys): 40 GMAC/s against 25 for
# matmul + softmax + matmul, whose passes over the scores cost as much as the products.
# Keys converted at a time by a dense layer's decode step on a float16 cache (SmallAttention._dense).
# One step at 8K, CPU ms (load ~6, A/B in turns): 1 thread 14.1 (1024), 15.4 (2048), 18.1 (4096),
# 33.9 (whole prefix); 2 threads 87.7, 63.9, 50.6, 53.4: each piece is 3 parallel regions, which
# wait on a descheduled thread on a loaded machine.
DENSE_DECODE_CHUNK = 4096
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
             alive: torch.Tensor | None = None, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, t, hd] over one key set, and each row's log-sum-exp (decoding).

    k, v [B, KV, n, hd] with KV < H are shared by the H/KV query heads of each group: those heads'
    rows are stacked ([B, KV, G*t, hd]), so one product serves the group and no key is copied;
    `mask` (bool, True = allowed) must then be the same for all heads ([B or 1, 1, t, n]). With
    KV == H, keys are per head and `mask` broadcasts to [B, H, t, n]. `alive` [B or 1, H, 1]: heads
    with at least one allowed key (a row with none must weigh nothing in the merge)."""
    B, H, t, hd = q.shape
    KV, n = k.shape[1], k.shape[2]
    G = H // KV
    if k.dtype != q.dtype:  # a float16 cache under float32 activations: convert what is read
        k, v = k.to(q.dtype), v.to(q.dtype)
    qq = q.reshape(B, KV, G * t, hd)
    if mask is not None and G > 1 and t > 1:
        mask = mask.repeat(1, 1, G, 1)  # row g*t + r of the stack is row r of head g
    if _FLASH is not None and q.device.type == "cpu" and not torch.is_grad_enabled():
        out, lse = _FLASH(qq, k, v, attn_mask=None if mask is None else _bias(mask, q.dtype)[0, 0], scale=scale)
    else:  # plain ops (training, other devices)
        scores = torch.matmul(qq, k.transpose(-1, -2)).float() * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        # A row with no allowed key has lse -inf: subtract 0 there (its weights are exp(-inf) = 0),
        # not -inf, whose NaN would reach the gradients through exp's derivative.
        safe = lse.masked_fill(torch.isinf(lse), 0.0)
        out = torch.matmul(torch.exp(scores - safe[..., None]).to(v.dtype), v)
    out, lse = out.reshape(B, H, t, hd), lse.reshape(B, H, t)
    if alive is not None:
        lse = lse.masked_fill(~alive, float("-inf"))
        out = out.masked_fill(~alive[..., None], 0.0)
    return out, lse


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """One softmax over the union of the parts' keys, from each part's output and log-sum-exp:
    weights softmax(lse) over the parts."""
    if len(parts) == 1:
        return parts[0][0].to(dtype)
    w = torch.softmax(torch.stack([lse for _, lse in parts]), dim=0)[..., None]  # [P, B, H, t, 1]
    out = parts[0][0] * w[0]
    for i in range(1, len(parts)):
        if torch.is_grad_enabled():
            out = out + parts[i][0] * w[i]
        else:
            out.addcmul_(parts[i][0], w[i])
    return out.to(dtype)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
               causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [N, h, t, hd] over k, v [N, kv, n, hd] (kv divides h: query head i reads
    key head i // (h // kv), as the kernel does; any strides, the last dimension contiguous) and
    each row's log-sum-exp. `bias`: additive, broadcast to [N, h, t, n]; `causal`: row i sees keys
    0..i (aligned at the top left, as the kernel does). Every row must see a key. The CPU flash
    kernel; plain ops when gradients are on or on other devices."""
    if _FLASH is not None and q.device.type == "cpu" and not torch.is_grad_enabled():
        out, lse = _FLASH(q, k, v, is_causal=causal, attn_mask=bias, scale=scale)[:2]
        return out, lse
    if k.shape[1] != q.shape[1]:
        k, v = k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // k.shape[1], 1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if causal:
        t, n = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(t, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]).to(v.dtype), v), lse


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = allowed) as the kernel's additive mask, [1, 1, *allowed.shape]."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    return bias[None, None]


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.apply_rotary (x * cos + rotate_half(x) * sin) written per half into one output, without
    rotate_half's negated copy and concatenation: 0.22 instead of 0.50 CPU s for the 8K prefill of
    one layer (1 thread, measured), the same numbers up to rounding. Autograd: the plain formula."""
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad):
        return apply_rotary(x, cos, sin)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    out = torch.empty(torch.broadcast_shapes(x.shape, cos.shape), dtype=torch.promote_types(x.dtype, cos.dtype),
                      device=x.device)
    o1, o2 = out[..., :h], out[..., h:]
    torch.mul(x1, cos[..., :h], out=o1)
    o1.addcmul_(x2, sin[..., :h], value=-1)
    torch.mul(x2, cos[..., h:], out=o2)
    o2.addcmul_(x1, sin[..., h:])
    return out


class SmallAttention(nn.Module):
    def __init__(self, cfg: SmallConfig, layer: int) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.dim_per_head
        self.query_key_value = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim)
        self.dense = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size)
        self.sparse = not cfg.is_dense_layer(layer)
        # §2.4: muP's 1/d (1/128), not 1/sqrt(d).
        self.scale = cfg.mup_attn_multiplier / self.head_dim if cfg.mup_use_scaling else self.head_dim ** -0.5
        self.block = cfg.blocksparse_block_size
        self.local_blocks = cfg.blocksparse_num_local_blocks
        self.stride = cfg.blocksparse_vert_stride
        self.cfg = cfg
        with torch.device("cpu"):
            residues = head_residues(cfg)
        self.min_residue = int(residues.min())
        self.register_buffer("residues", residues.to(torch.get_default_device()), persistent=False)

    def _part(self, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return _partial(*args, scale=self.scale, **kwargs)

    def forward(self, x: torch.Tensor, plan: Plan, cache: KVCache | None, layer: int) -> torch.Tensor:
        return self.dense(self.attend(self.query_key_value(x), plan, cache, layer))

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, W] -> q [B, T, H, hd], k and v [B, T, KV, hd]. §2.3: the rows are
        [group 0: q0..q3, k0, v0][group 1: q4..q7, k1, v1]...: view per group, then split."""
        B, T, _ = qkv.shape
        KV, G = self.n_kv_heads, self.n_heads // self.n_kv_heads
        grouped = qkv.view(B, T, KV, G + 2, self.head_dim)
        return grouped[:, :, :, :G].reshape(B, T, self.n_heads, self.head_dim), grouped[:, :, :, G], grouped[:, :, :, G + 1]

    def attend(self, qkv: torch.Tensor, plan: Plan, cache: KVCache | None, layer: int) -> torch.Tensor:
        """Projected qkv [B, T, W] -> attention output [B, T, H * hd]."""
        B, T, _ = qkv.shape
        KV, G = self.n_kv_heads, self.n_heads // self.n_kv_heads
        grouped = qkv.view(B, T, KV, G + 2, self.head_dim)  # split_qkv's layout
        # Queries and keys rotated into buffers of their own: q [B, T, H, hd] then needs no copy (one
        # rotation of q and k together left q strided per group, and its reshape copied 128 MB at 8K).
        q = _rotary(grouped[:, :, :, :G], plan.cos[:, :, :, None], plan.sin[:, :, :, None])
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = _rotary(grouped[:, :, :, G], plan.cos, plan.sin).transpose(1, 2)
        v = grouped[:, :, :, G + 1].transpose(1, 2)
        if self.sparse:
            out = self._sparse(q, k, v, plan, cache, layer)
        else:
            out = self._dense(q, k, v, plan, cache, layer)
        return out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)

    # --- dense layers: plain causal attention, as model.py --------------------------------------
    def _dense(self, q, k, v, plan: Plan, cache: KVCache | None, layer: int) -> torch.Tensor:
        if cache is not None:
            j = cache.dense_index[layer] if isinstance(cache, HeadAwareKVCache) else layer
            cache.store(j, cache.length, k, v)
            n = cache.length + q.shape[2]
            if (q.shape[2] == 1 and plan.dense_mask is None and plan.allowed is None and not cache.quantized
                    and cache.k.dtype != q.dtype):
                # One token against a float16 cache under float32 activations: cache.load would convert
                # the whole prefix (at 8K 32 MB read, 64 MB written and read again: 59% of the step,
                # profiled). Converting DENSE_DECODE_CHUNK keys at a time inside _partial keeps each
                # piece in cache; the parts merge through their log-sum-exps.
                C = DENSE_DECODE_CHUNK
                return _merge([self._part(q, cache.k[j, :, :, a:min(n, a + C)], cache.v[j, :, :, a:min(n, a + C)], None)
                               for a in range(0, n, C)], q.dtype)
            k, v = cache.load(j, n, q.dtype)
        mask = plan.allowed[:, None] if plan.allowed is not None else plan.dense_mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=plan.dense_causal and mask is None,
                                              scale=self.scale, enable_gqa=self.n_heads != self.n_kv_heads)

    # --- sparse layers ----------------------------------------------------------------------------
    def _sparse(self, q, k, v, plan: Plan, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, H, T, hd = q.shape
        if isinstance(cache, HeadAwareKVCache):
            return self._sparse_head_aware(q, k, v, plan, cache, cache.sparse_index[layer])
        if cache is not None:
            cache.store(layer, cache.length, k, v)
            if cache.quantized:  # dequantizes the whole prefix (as model.py does), then reads blocks
                k, v = cache.load(layer, cache.length + T, q.dtype)
            else:  # a view: only the blocks the pattern reaches are read (and converted, if the cache is f16)
                k, v = cache.k[layer, :, :, :cache.length + T], cache.v[layer, :, :, :cache.length + T]
        if plan.layout == "simple":
            return self._prefill(q, k, v, plan.start)
        if plan.layout == "general":
            return self._general(q, k, v, plan)
        out = q.new_zeros(B, H, T, hd)
        if plan.layout == "documents":
            for b, runs in enumerate(plan.documents):
                for a, e in runs:
                    out[b:b + 1, :, a:e] = self._prefill(q[b:b + 1, :, a:e], k[b:b + 1, :, a:e], v[b:b + 1, :, a:e], 0)
            return out
        # "left": row b's real tokens are slots pad_b.. with positions 0..; padded queries give 0.
        S = plan.start + T
        pads = S - plan.key_valid.sum(1)
        for b in range(B):
            p = int(pads[b])
            first = max(plan.start, p)
            if first < S:
                out[b:b + 1, :, first - plan.start:] = self._prefill(
                    q[b:b + 1, :, first - plan.start:], k[b:b + 1, :, p:S], v[b:b + 1, :, p:S], first - p)
        return out

    def _vertical(self, k: torch.Tensor, upto: int,
                  heads: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's vertical blocks below block `upto`, gathered once per layer:
        [B, h, M * B, hd] where row m of head h is block residue_h + m*V; and their block ids [h, M].
        `heads`: which heads, in which order (default all, in order)."""
        B, KV, _, hd = k.shape
        Bs, V, H = self.block, self.stride, self.n_heads
        heads = torch.arange(H, device=k.device) if heads is None else heads
        M = max(1, -(-(upto - self.min_residue) // V))
        ids = self.residues[heads, None] + V * torch.arange(M, device=k.device)  # [h, M]
        group = heads // (H // KV)
        s0, s1, s2, s3 = k.stride()
        if s3 == 1 and s2 == hd and s1 % (Bs * hd) == 0:
            # Keys by position in each group (a cache): every block of every group is one row of a
            # [B, blocks, Bs, hd] view, and index_select copies whole blocks, 4x faster than the
            # element-wise advanced indexing below (0.7 against 2.9 ms for a decode step's keys at
            # 8K, float16, measured).
            per_group = s1 // (Bs * hd)
            rows = (group[:, None] * per_group + ids.clamp(max=upto - 1)).flatten()
            flat = k.as_strided((B, (KV - 1) * per_group + upto, Bs, hd), (s0, Bs * hd, hd, 1), k.storage_offset())
            gathered = flat.index_select(1, rows)
        else:
            blocks = k[:, :, :upto * Bs].view(B, KV, upto, Bs, hd)
            gathered = blocks[:, group[:, None], ids.clamp(max=upto - 1)]  # [B, h, M, Bs, hd]
        return gathered.reshape(B, len(heads), M * Bs, hd), ids

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p0: int) -> torch.Tensor:
        """Queries q [B, H, T, hd] at positions p0..p0+T-1 against keys [B, KV, S, hd] at positions
        0..S-1 (S = p0 + T), computing only the allowed blocks in a few large kernel calls:
          - rows in the first L-1 blocks see everything before them: plain causal attention;
          - from block L-1 on, the local window (_window): ONE call whose batch is the query
            blocks, each against its own L-block slice of the keys;
          - the vertical blocks (_vertical_rows): one call per count c of vertical blocks seen;
          - both parts merge through their log-sum-exps (weight sigmoid(lse_a - lse_b)).
        At 8K (real shape): 1 + 1 + 21 calls, in place of 240 calls of small blocks before
        (their glue, not their products, was what kept blocksparse from 2x). T == 1 (decoding
        with a full cache) goes to _one_token, which the head-aware cache shares."""
        B, H, T, hd = q.shape
        if T == 1:
            return self._one_token_full(q, k, v, p0)
        S = p0 + T
        Bs, L = self.block, self.local_blocks
        if k.dtype != q.dtype:  # a long prefill reads every key several times: convert once
            k, v = k.to(q.dtype), v.to(q.dtype)
        first, last = p0 // Bs, (S - 1) // Bs
        wf = max(first, L - 1)  # the first block whose window is L whole blocks
        lo_pos = min(p0, wf * Bs)
        if not torch.is_grad_enabled() and lo_pos == p0 and q.transpose(1, 2).is_contiguous():
            # The output overwrites the queries (attend's fresh buffer): every (row, head) is read by
            # its last kernel call before it is written (_window, _vertical_rows), and a new 128 MB
            # buffer costs 32K page faults at 8K (~0.08 CPU s, measured by getrusage).
            res = q.transpose(1, 2)
        else:
            res = q.new_empty(B, (last + 1) * Bs - lo_pos, H, hd)  # rows from position lo_pos, in attend's layout
        if p0 < (L - 1) * Bs:
            # Before block L-1 the window reaches position 0 and no block has left it: causal.
            E = min(S, (L - 1) * Bs)
            ke, ve = k[:, :, :E], v[:, :, :E]
            if p0 == 0:
                out, _ = _attention(q[:, :, :E], ke, ve, self.scale, causal=True)
            else:  # queries p0..E-1 against keys 0..E-1: causal aligned at the bottom right
                seen = torch.arange(E, device=q.device)[None, :] <= torch.arange(p0, E, device=q.device)[:, None]
                out, _ = _attention(q[:, :, :E - p0], ke, ve, self.scale, bias=_bias(seen, q.dtype))
            res[:, :E - p0] = out.transpose(1, 2)
        if last >= wf:
            frame = res[:, wf * Bs - lo_pos:]  # rows of blocks wf..last
            self._window(q, k, v, p0, wf, last, frame)
        return res[:, p0 - lo_pos:p0 - lo_pos + T].transpose(1, 2)

    def _window(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p0: int, wf: int, last: int,
                frame: torch.Tensor) -> None:
        """_prefill's query blocks wf..last (wf >= L-1): their local window and vertical blocks,
        merged, written into frame [B, (last+1-wf)*Bs, H, hd] (rows of positions wf*Bs..).

        The window: the query blocks are the batch of one kernel call, [nw, H, Bs, hd], a view of
        the queries (the kernel reads key head h // G for query head h, so nothing is stacked or
        copied). Block qb attends to keys (qb-L+1)*Bs..(qb+1)*Bs-1, an `unfold` of the keys
        (overlapping views, nothing copied: [nw, KV, L*Bs, hd]); its own block is causal through
        one additive [Bs, L*Bs] bias shared by every block. That computes 16 whole blocks where
        15.5 are allowed (3% more products). The kernel's output is laid out [nw, Bs, H, hd], as
        the frame is: the vertical part (_vertical_rows) merges it into the frame in one pass."""
        B, H, T, hd = q.shape
        S = p0 + T
        Bs, L = self.block, self.local_blocks
        nw = last - wf + 1
        R = nw * Bs
        a = max(p0, wf * Bs) - wf * Bs  # frame row of the first real query
        tw = S - wf * Bs - a  # real queries in the frame
        rows = q.transpose(1, 2)[:, T - tw:]  # [B, tw, H, hd]: attend's layout, a view
        if a or tw != R:  # a partial first or last block: pad the queries to whole blocks
            rows = F.pad(rows, (0, 0, 0, 0, a, R - a - tw))
        blocks = rows.unflatten(1, (nw, Bs)).transpose(2, 3)  # [B, nw, H, Bs, hd]
        kw, vw = k[:, :, (wf - L + 1) * Bs:S], v[:, :, (wf - L + 1) * Bs:S]
        if (last + 1) * Bs > S:
            kw, vw = F.pad(kw, (0, 0, 0, (last + 1) * Bs - S)), F.pad(vw, (0, 0, 0, (last + 1) * Bs - S))
        bias = _bias(torch.arange(L * Bs, device=q.device)[None, :]
                     <= (L - 1) * Bs + torch.arange(Bs, device=q.device)[:, None], q.dtype)
        for b in range(B):
            windows_k = kw[b].unfold(1, L * Bs, Bs).permute(1, 0, 3, 2)  # [nw, KV, L*Bs, hd]
            windows_v = vw[b].unfold(1, L * Bs, Bs).permute(1, 0, 3, 2)
            o, lse = _attention(blocks[b], windows_k, windows_v, self.scale, bias=bias)
            # [nw, H, Bs(, hd)] -> [R, H(, hd)] by position: a view of the kernel's layout.
            out_w, lse_w = o.transpose(1, 2).reshape(R, H, hd), lse.transpose(1, 2).reshape(R, H)
            if last - L + 1 <= 0:  # no query block sees a vertical block yet
                frame[b, a:a + tw].copy_(out_w[a:a + tw])
            else:
                qr = q[b].transpose(0, 1)  # [T, H, hd]: attend's layout; other callers' rows may be head-major
                self._vertical_rows(qr if qr.is_contiguous() else qr.contiguous(), out_w, lse_w, frame[b],
                                    k[b:b + 1], v[b:b + 1], last, wf, a, a + tw, T - tw - a)

    def _head_grids(self, fast: bool) -> list[tuple[int, int, int, int, int, int]]:
        """The query heads as grids (h0, N, dj, n, s, sh0): head h0 + j*dj + i (j < N, i < n) has
        its vertical blocks shifted by sh0 + i*s blocks against the first residue's (that is, row
        r of its shifted layout is query row r - (sh0 + i*s)*Bs: shift = (h*s mod V) blocks, §4.2).
        With `fast` and the real pattern (H >= V, V divides H, s = 1: 4 x 8 heads at 8K) or H*s <= V,
        or the homogeneous one: one grid, so that one kernel call serves all heads for each count of
        vertical blocks (_vertical_rows). Otherwise one grid of n = 1 per residue (heads sharing
        a residue are evenly spaced: h, h+V, ... when s = 1; all residues differ when s > 1)."""
        H, V = self.n_heads, self.stride
        s = _sliding_step(self.cfg)
        if fast and s == 0:
            return [(0, H, 1, 1, 0, 0)]
        if fast and H * s <= V:
            return [(0, 1, 0, H, s, 0)]
        if fast and s == 1 and H % V == 0:
            return [(0, H // V, V, V, 1, 0)]
        heads: dict[int, list[int]] = {}
        for h, r in enumerate(self.residues.tolist()):
            heads.setdefault(r, []).append(h)
        grids = []
        for r, hs in sorted(heads.items()):
            step = hs[1] - hs[0] if len(hs) > 1 else 1
            assert hs == list(range(hs[0], hs[-1] + 1, step)), (r, hs)
            grids.append((hs[0], len(hs), step, 1, 0, V - 1 - r))
        return grids

    def _grid_view(self, x: torch.Tensor, grid: tuple[int, int, int, int, int, int], row: int, t: int,
                   i0: int, i1: int) -> torch.Tensor:
        """x [rows, H, *rest] -> the view [N, i1-i0, t, *rest] of grid columns i = n-1-i' (i' in
        i0..i1-1; reversed so that every stride is positive) whose element (j, i', r) is
        x[row + r - shift_i, h0 + j*dj + i]: the rows of each head that attend to the same count
        of vertical blocks, side by side, with nothing copied. The caller keeps them in range."""
        h0, N, dj, n, s, sh0 = grid
        Bs = self.block
        if n == 1:  # plain slicing (also what autograd sees)
            r0 = row - sh0 * Bs
            return x[r0:r0 + t, h0:h0 + (N - 1) * dj + 1:dj].transpose(0, 1)[:, None]
        sT, sH = x.stride(0), x.stride(1)
        i = n - 1 - i0
        offset = x.storage_offset() + (row - (sh0 + i * s) * Bs) * sT + (h0 + i) * sH
        return x.as_strided((N, i1 - i0, t) + tuple(x.shape[2:]),
                            (dj * sH, s * Bs * sT - sH, sT) + tuple(x.stride()[2:]), offset)

    def _vertical_rows(self, q: torch.Tensor, out_w: torch.Tensor, lse_w: torch.Tensor, frame: torch.Tensor,
                       k: torch.Tensor, v: torch.Tensor, last: int, wf: int, lo: int, hi: int, qoff: int) -> None:
        """Merge each head's vertical blocks into _window's rows (one batch row): q [T, H, hd] the
        queries (frame row i is row i + qoff), k, v [1, KV, S, hd], the window's out_w [R, H, hd] and lse_w [R, H] by
        frame row; written into frame [R, H, hd] rows lo..hi-1 (the real queries).

        Frame block n (query block wf+n) of a head with residue r sees c = (wf+n - L - r + V) // V
        vertical blocks, the first c of its gathered ones. Shifted by V-1-r blocks, rows that see c
        blocks are the same rows S_c..S_c + V*Bs for every head: a strided view of the queries
        (_grid_view: no shifted copy), one kernel call per c against a prefix of each head's
        gathered blocks, no mask, merged into the frame in the same step through the log-sum-exps
        (weight sigmoid(lse_w - lse_v)), through the same kind of view: each row is written once.
        Heads whose shifted rows would leave lo..hi (the first and last c) get calls of their own,
        clipped. At 8K: 13 calls of 32 heads x 512 rows against 64..832 keys, then 8 clipped ones
        of 4 heads. (Before: a shifted gather of all queries, a concatenation, an unshift and the
        merge, four more passes over 128 MB and as many new buffers: the layer's 8K prefill went
        from 3.39 to 2.83 CPU s at 1 thread with this alone, measured A/B, load ~8.)"""
        Bs, L, V = self.block, self.local_blocks, self.stride
        upto = last - L + 1  # vertical blocks lie below the last window's first block
        grad = torch.is_grad_enabled()
        for grid in self._head_grids(fast=not grad):
            h0, N, dj, n, s, sh0 = grid
            heads = (h0 + torch.arange(N, device=q.device)[:, None] * dj
                     + torch.arange(n - 1, -1, -1, device=q.device)).flatten()
            k_vert, v_vert = self._vertical(k, upto, heads)[0][0], self._vertical(v, upto, heads)[0][0]
            k_vert, v_vert = k_vert.unflatten(0, (N, n)), v_vert.unflatten(0, (N, n))  # [N, n, M*Bs, hd]
            shift = [(sh0 + (n - 1 - i) * s) * Bs for i in range(n)]  # of column i', in rows

            def rows(a: int, e: int, i: int) -> tuple[int, int]:  # column i's real frame rows of shifted a..e
                return max(lo, a - shift[i]), min(hi, e - shift[i])

            def merge(a: int, t: int, i0: int, i1: int, c: int) -> None:  # shifted rows a..a+t of columns i0..i1-1
                o, lse_v = _attention(self._grid_view(q, grid, a + qoff, t, i0, i1), k_vert[:, i0:i1, :c * Bs],
                                      v_vert[:, i0:i1, :c * Bs], self.scale)
                w = torch.sigmoid(self._grid_view(lse_w, grid, a, t, i0, i1) - lse_v)[..., None].to(q.dtype)
                target = self._grid_view(frame, grid, a, t, i0, i1)
                if grad:
                    target.copy_(torch.lerp(o, self._grid_view(out_w, grid, a, t, i0, i1), w))
                else:
                    torch.lerp(o, self._grid_view(out_w, grid, a, t, i0, i1), w, out=target)

            S1 = (V + L - 1 - wf) * Bs  # shifted rows before S1 see no vertical block: the window alone
            for i in range(n):
                a, e = rows(-(1 << 40), S1, i)
                if a < e:
                    self._grid_view(frame, grid, a + shift[i], e - a, i, i + 1).copy_(
                        self._grid_view(out_w, grid, a + shift[i], e - a, i, i + 1))
            c = 1
            while (S := (c * V + L - 1 - wf) * Bs) - shift[0] < hi:
                E = S + V * Bs
                whole = [i for i in range(n) if rows(S, E, i) == (S - shift[i], E - shift[i])]
                if whole:  # a contiguous run of columns (shift falls as i' rises)
                    merge(S, V * Bs, whole[0], whole[-1] + 1, c)
                for i in range(n):
                    a, e = rows(S, E, i)
                    if i not in whole and a < e:
                        merge(a + shift[i], e - a, i, i + 1, c)
                c += 1

    def _one_token_full(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor:
        """One query (q [B, H, 1, hd], position pos) against keys [B, KV, pos+1, hd] laid out by
        position: the window's keys are a slice, the vertical blocks _vertical's gather."""
        lo = max(0, pos // self.block - self.local_blocks + 1)  # the window's first block
        vertical = None
        if lo:
            k_vert, ids = self._vertical(k, lo)
            v_vert, _ = self._vertical(v, lo)
            vertical = (k_vert, v_vert, ids < lo)
        return self._one_token(q, k[:, :, lo * self.block:pos + 1], v[:, :, lo * self.block:pos + 1], vertical)

    def _one_token(self, q: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,
                   vertical: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """One query per row: q [B, H, 1, hd] against its window's keys k_win [B, KV, n, hd] in
        position order (the group's heads stacked, no mask), and `vertical` = (k [B, H, M*Bs, hd],
        v, have [H, M]): each head's gathered vertical blocks and which of them it may see. Both
        caches call this with the same tensors, so their logits are equal bit for bit."""
        parts = [self._part(q, k_win, v_win, None)]
        if vertical is not None:
            k_vert, v_vert, have = vertical
            if bool(have.any()):
                mask = have.repeat_interleave(self.block, 1)[None, :, None, :]
                parts.append(self._part(q, k_vert, v_vert, mask, have[None, :, :1]))
        return _merge(parts, q.dtype)

    def _general(self, q, k, v, plan: Plan) -> torch.Tensor:
        """Any mask (eval's packed `allowed`, masks with holes): a dense [B, H, T, S] mask, the
        pattern intersected with it, from each slot's position (the cached slots': real tokens
        counted from the first, as they were written). Correct for everything, sparse for nothing."""
        B, H, T, hd = q.shape
        S = k.shape[2]
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        valid = plan.key_valid if plan.key_valid is not None else torch.ones(B, S, dtype=torch.bool, device=q.device)
        k_pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        k_pos[:, plan.start:] = torch.where(plan.real, plan.positions, k_pos[:, plan.start:])
        if plan.allowed is not None:
            base = plan.allowed[:, None]
        else:
            base = Transformer._mask(valid, plan.start, T, None)
        head = torch.arange(H, device=q.device)[None, :, None, None]
        pattern = blocksparse_allowed(plan.positions[:, None, :, None], k_pos[:, None, None, :], head, self.cfg)
        slot = torch.arange(S, device=q.device)
        own = slot[None, :] == (plan.start + torch.arange(T, device=q.device))[:, None]  # no row fully masked
        mask = (base & pattern) | own[None, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=H != k.shape[1])

    def _sparse_head_aware(self, q, k, v, plan: Plan, cache: HeadAwareKVCache, j: int) -> torch.Tensor:
        if plan.allowed is not None or plan.layout == "documents":
            raise Phi3Error("the head-aware KV cache keeps blocks by position: it cannot serve a packed mask; "
                            "use a full cache (new_cache(..., head_aware=False))")
        B, H, T, hd = q.shape
        # Keys as the cache holds them (float16 under float32 activations), as a full cache reads them back.
        k, v = k.to(cache.ring_k.dtype), v.to(cache.ring_k.dtype)
        if T == 1 and bool(plan.real.all()):
            cache.store_sparse(j, k, v, plan.positions, plan.real)
            return self._decode_head_aware(q, plan.positions[:, 0], cache, j)
        # Several tokens: lay the cache out by position once, attend as a full cache would, store.
        ends = torch.where(plan.real, plan.positions, -1).amax(1) + 1  # [B] each row's length after
        counts = plan.real.sum(1)
        P = int(ends.max())
        kk, vv = cache.materialize(j, P)
        b, t = plan.real.nonzero(as_tuple=True)
        kk[b, :, plan.positions[b, t]] = k[b, :, t]
        vv[b, :, plan.positions[b, t]] = v[b, :, t]
        cache.store_sparse(j, k, v, plan.positions, plan.real)
        if bool(plan.real.all()) and bool((ends == P).all()):
            return self._prefill(q, kk, vv, P - T)
        out = q.new_zeros(B, H, T, hd)
        for r in range(B):
            n, e = int(counts[r]), int(ends[r])
            if n:
                idx = plan.real[r].nonzero()[:, 0]
                out[r, :, idx] = self._prefill(q[r:r + 1, :, idx], kk[r:r + 1, :, :e], vv[r:r + 1, :, :e], e - n)[0]
        return out

    def _decode_head_aware(self, q: torch.Tensor, pos: torch.Tensor, cache: HeadAwareKVCache, j: int) -> torch.Tensor:
        """One new token per row (at position pos [B], already stored): the window's keys read from
        the ring in position order, each head's vertical blocks from the vertical store, laid out
        as _one_token_full lays them out from a full cache (same order, same shapes)."""
        B = q.shape[0]
        Bs, L, V = self.block, self.local_blocks, self.stride
        H = self.n_heads
        group = torch.arange(H, device=q.device) // (H // self.n_kv_heads)
        outs = []
        for b in range(B):  # rows may be at different positions (left padding)
            p = int(pos[b])
            lo = max(0, p // Bs - L + 1)
            slots = torch.arange(lo * Bs, p + 1, device=q.device) % cache.ring_len
            vertical = None
            if lo:
                M = max(1, -(-(lo - self.min_residue) // V))  # as _vertical
                # Each head's own blocks, [1, H, M*Bs, hd]: whole blocks of the store [KV, M', R, Bs, hd]
                # by index_select (as _vertical; element-wise advanced indexing was 4x slower).
                Mt, R = cache.vert_k.shape[3], cache.vert_k.shape[4]
                rows = ((group[:, None] * Mt + torch.arange(M, device=q.device)) * R
                        + cache.slot_of_head[:, None]).flatten()
                k_vert, v_vert = (s[j][b:b + 1].reshape(1, -1, Bs, s.shape[-1]).index_select(1, rows)
                                  .view(1, H, M * Bs, -1) for s in (cache.vert_k, cache.vert_v))
                ids = self.residues[:, None] + V * torch.arange(M, device=q.device)
                vertical = (k_vert, v_vert, ids < lo)
            outs.append(self._one_token(q[b:b + 1], cache.ring_k[j][b:b + 1].index_select(2, slots),
                                        cache.ring_v[j][b:b + 1].index_select(2, slots), vertical))
        return torch.cat(outs) if B > 1 else outs[0]


def gegelu(u: torch.Tensor, limit: float | None) -> torch.Tensor:
    """§3: even channels are the gelu branch, odd the linear one (interleaved, not halves); both
    clamped (the gelu branch from above only), +-inf passed through as HF does; quick-gelu gate,
    and +1 on the linear branch."""
    a_gelu, a_linear = u[..., 0::2], u[..., 1::2]
    if limit is not None:
        a_gelu = torch.where(torch.isinf(a_gelu), a_gelu, a_gelu.clamp(max=limit))
        a_linear = torch.where(torch.isinf(a_linear), a_linear, a_linear.clamp(min=-limit, max=limit))
    return a_gelu * torch.sigmoid(1.702 * a_gelu) * (a_linear + 1)


class SmallMLP(nn.Module):
    def __init__(self, cfg: SmallConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.limit = cfg.gegelu_limit
        self.dropout = float(cfg.ffn_dropout_prob)  # on the output, in train mode only (HF)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(gegelu(self.up_proj(x), self.limit))
        if self.training and self.dropout:
            out = F.dropout(out, self.dropout, training=True)
        return out


class SmallDecoderLayer(nn.Module):
    def __init__(self, cfg: SmallConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.self_attn = SmallAttention(cfg, layer)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.mlp = SmallMLP(cfg)

    def forward(self, x: torch.Tensor, plan: Plan, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), plan, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode_rows(self, x: torch.Tensor, plans: list[Plan], caches: list[KVCache], layer: int) -> torch.Tensor:
        """forward for one new token of each of M independent sequences (x [M, 1, hidden])."""
        attn = self.self_attn
        qkv = attn.query_key_value(self.input_layernorm(x))
        out = torch.cat([attn.attend(qkv[i:i + 1], p, c, layer) for i, (p, c) in enumerate(zip(plans, caches))])
        x = x + attn.dense(out)
        return x + self.mlp(self.post_attention_layernorm(x))


class SmallBackbone(nn.Module):
    def __init__(self, cfg: SmallConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(SmallDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)


def _dummy_ids(cfg: SmallConfig) -> torch.Tensor:
    # Ids beyond a (tiny test) vocabulary are ignored: there is no logit to mask.
    return torch.tensor(sorted(i for i in set(cfg.dummy_token_indices) if i < cfg.vocab_size), dtype=torch.long)


class SmallTransformer(nn.Module):
    """Phi-3-small as a causal LM with phi3.model.Transformer's interface; float32 logits."""

    def __init__(self, cfg: SmallConfig) -> None:
        super().__init__()
        if not isinstance(cfg, SmallConfig):
            raise Phi3Error(f"SmallTransformer needs a SmallConfig (model_type phi3small), got model_type "
                            f"{cfg.model_type!r}")
        self.config = cfg
        self.model = SmallBackbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        with torch.device("cpu"):  # as model.py: the same float32 values on every device
            short, long = rope_inv_freq(cfg)
        self.register_buffer("inv_freq_short", short.to(torch.get_default_device()), persistent=False)
        self.register_buffer("inv_freq_long", long.to(torch.get_default_device()), persistent=False)
        with torch.device("cpu"):
            dummy = _dummy_ids(cfg)
        self.register_buffer("dummy_ids", dummy.to(torch.get_default_device()), persistent=False)
        self.kv_dtype: torch.dtype | str | None = None  # as model.py: None = the activations' dtype
        self.head_aware_cache = False  # new_cache's default (S4 can switch it for a run)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.final_layernorm.weight.device

    def tie_weights(self) -> None:
        # §2.3: no lm_head in the checkpoint; packed embeddings share their blocks at load (quant.py).
        if self.config.tie_word_embeddings and isinstance(self.model.embed_tokens, nn.Embedding):
            self.lm_head.weight = self.model.embed_tokens.weight

    def uses_long_rope(self, sequence_length: torch.Tensor) -> torch.Tensor:
        """LongRoPE's long factors once a row's total length passes the original context (§4.5).
        Per row, and on a switch generate.advance re-encodes the sequence, as for mini: every step
        then equals a full forward. (HF keeps keys cached with the short factors after the switch;
        vLLM decides per batch. Neither is a full forward's result.)"""
        if self.config.rope_scaling is None:
            return torch.zeros_like(sequence_length, dtype=torch.bool)
        return sequence_length > self.config.original_max_position_embeddings

    def new_cache(self, batch_size: int, max_len: int, head_aware: bool | None = None) -> KVCache:
        """A full KVCache, or (head_aware; default `self.head_aware_cache`) a HeadAwareKVCache."""
        if max_len > self.config.max_position_embeddings:
            raise Phi3Error(f"{max_len} tokens exceed the model's context of {self.config.max_position_embeddings}")
        kind = self.kv_dtype or self.dtype
        if self.head_aware_cache if head_aware is None else head_aware:
            return HeadAwareKVCache(self.config, batch_size, max_len, kind, self.device)
        return KVCache(self.config, batch_size, max_len, kind, self.device)

    def rotary(self, positions: torch.Tensor, long: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, T, 1, hd] (NeoX half-split, §4.5); `long` [B] or [B, T] picks the factor set
        and its mscale (short 1.0 and long 1.1435 by default for 128K)."""
        cfg = self.config
        if long is None or not bool(long.any()):
            inv_freq = self.inv_freq_short[None, None, :]
        else:
            inv_freq = torch.where(long[..., None], self.inv_freq_long, self.inv_freq_short)
            if long.dim() == 1:
                inv_freq = inv_freq[:, None, :]
        t = positions[..., None].float()
        if cfg.rope_position_scale != 1.0:
            t = t * cfg.rope_position_scale
        freqs = t * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if cfg.rope_scaling is not None:
            short, lng = cfg.rope_short_mscale, cfg.rope_long_mscale
            if long is None:
                scale = torch.full((), short)
            else:
                scale = torch.where(long, lng, short).to(cos.dtype)
                scale = scale[:, None, None] if long.dim() == 1 else scale[..., None]
            cos, sin = cos * scale, sin * scale
        return cos.to(self.dtype).unsqueeze(2), sin.to(self.dtype).unsqueeze(2)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None,
                last_only: bool = False,
                allowed: torch.Tensor | None = None,
                rows: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As phi3.model.Transformer.forward: input_ids [B, T], attention_mask [B, T] (0 at left
        padding), `allowed` [B, T, S] with `positions` (packed scoring: a dense mask, intersected
        with the pattern in sparse layers), `rows` / `last_only` to run the head on some positions,
        `document_ids` [B, T] for packed training rows. Returns float32 logits / mup_width_multiplier
        with the dummy ids at float32's minimum."""
        if document_ids is not None:
            if cache is not None or attention_mask is not None or positions is not None or allowed is not None:
                raise Phi3Error("forward: document_ids set positions and the mask themselves; "
                                "pass no cache, attention_mask, positions or allowed with them")
            plan = self._prepare_documents(document_ids)
        elif allowed is not None:
            if positions is None:
                raise Phi3Error("forward: a custom attention mask needs explicit positions")
            plan = self._prepare(input_ids, cache, None, positions, allowed)
        else:
            plan = self._prepare(input_ids, cache, attention_mask, positions, None)
        x = self._embed(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, plan, cache, i)
        if cache is not None:
            cache.length += input_ids.shape[1]
        if last_only:
            x = x[:, -1:]
        elif rows is not None:
            x = x[:, rows]
        return self._logits(x)

    def decode_step(self, input_ids: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One new token for each of several sequences with caches of their own: input_ids [M] ->
        logits [M, vocab]. Norms, projections, MLP and head run on all rows at once; attention
        per row against its cache."""
        M = input_ids.shape[0]
        if M != len(caches):
            raise Phi3Error(f"decode_step: {M} tokens but {len(caches)} caches")
        ids = input_ids.view(M, 1)
        plans = [self._prepare(ids[i:i + 1], c, None, None, None) for i, c in enumerate(caches)]
        x = self._embed(ids)
        for i, layer in enumerate(self.model.layers):
            x = layer.decode_rows(x, plans, caches, i)
        for c in caches:
            c.length += 1
        return self._logits(x).view(M, -1)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        if self.training and self.config.embedding_dropout_prob:  # HF: dropout before the multiplier
            x = F.dropout(x, self.config.embedding_dropout_prob, training=True)
        m = self.config.mup_embedding_multiplier
        return x * m if m and m > 0 else x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.final_layernorm(x)).float()
        if self.config.mup_width_multiplier:
            logits = logits / self.config.mup_width_multiplier
        if self.dummy_ids.numel():
            # HF's value; vLLM and mlx use -inf. The minimum keeps softmax and sampling free of NaN.
            logits = logits.index_fill(-1, self.dummy_ids, torch.finfo(torch.float32).min)
        return logits

    def _prepare(self, input_ids: torch.Tensor, cache: KVCache | None, attention_mask: torch.Tensor | None,
                 positions: torch.Tensor | None, allowed: torch.Tensor | None) -> Plan:
        """model.py's _prepare (positions, rotary, the cache's bookkeeping, the dense layers' mask)
        plus how sparse layers may lay out their keys."""
        B, T = input_ids.shape
        device = input_ids.device
        start = cache.length if cache is not None else 0
        S = start + T
        if cache is not None and S > cache.max_len:
            raise Phi3Error(f"KV cache holds {cache.max_len} tokens; {S} requested")
        padded = attention_mask is not None and not bool(attention_mask.all())
        given = positions
        if positions is None:
            offset = cache.next_position[:, None] if cache is not None else torch.zeros(B, 1, dtype=torch.long, device=device)
            if padded:
                positions = (offset + attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                positions = offset + torch.arange(T, device=device)
        long = None
        if self.config.rope_scaling is not None:
            long = self.uses_long_rope(positions.max(dim=1).values + 1)
        real = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
        if cache is not None:
            if long is not None:
                if cache.length > 0 and bool((cache.rope_long != long).any()):
                    raise Phi3Error("KV cache holds keys rotated with the other LongRoPE factor set; "
                                    "re-encode the sequence (phi3.generate.advance does)")
                cache.rope_long = long
            cache.valid[:, start:S] = real
            cache.next_position = positions[:, -1] + 1
            cache.has_padding = cache.has_padding or padded
            key_valid = cache.valid[:, :S]
            any_padding = cache.has_padding
        else:
            key_valid = real
            any_padding = padded
        mask, causal = None, False
        if allowed is None and (any_padding or (T > 1 and start > 0)):
            mask = Transformer._mask(key_valid, start, T, None)
        elif allowed is None and T > 1:
            causal = True
        # Sparse layers: "simple" when every slot's position is its index (one batched pass);
        # "left" when each row is left padding then real tokens counted from 0 (per row).
        slots = torch.arange(start, S, device=device)
        if allowed is not None:
            layout = "general"
        elif not any_padding and bool((positions == slots).all()):
            layout = "simple"
        else:
            pads = S - key_valid.sum(1, keepdim=True)
            all_slots = torch.arange(S, device=device)[None]
            left = bool((key_valid == (all_slots >= pads)).all())
            layout = "left" if left and bool(((positions == slots - pads) | ~real).all()) else "general"
        if given is not None and isinstance(cache, HeadAwareKVCache) and layout == "general":
            raise Phi3Error("the head-aware KV cache needs positions counted from each row's first token; "
                            "use a full cache with explicit positions")
        cos, sin = self.rotary(positions, long)
        return Plan(cos, sin, positions, real, start, key_valid if any_padding else None, layout, mask, causal,
                    allowed)

    def _prepare_documents(self, document_ids: torch.Tensor) -> Plan:
        """Packed documents (training): positions restart per document; dense layers get model.py's
        block-diagonal mask, sparse layers run each document on its own (no T x T mask)."""
        B, T = document_ids.shape
        device = document_ids.device
        idx = torch.arange(T, device=device)
        starts = torch.ones(B, T, dtype=torch.bool, device=device)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        run = starts.long().cumsum(-1)
        first = torch.where(starts, idx, 0).cummax(-1).values
        positions = idx - first
        long = None
        if self.config.rope_scaling is not None:
            lengths = torch.zeros(B, T + 1, dtype=torch.long, device=device).scatter_add_(1, run, torch.ones_like(run))
            long = self.uses_long_rope(lengths.gather(1, run))
        cos, sin = self.rotary(positions, long)
        real = torch.ones(B, T, dtype=torch.bool, device=device)
        if not bool(starts[:, 1:].any()):
            return Plan(cos, sin, positions, real, 0, None, "simple", None, True)
        documents = []
        for b in range(B):
            edges = starts[b].nonzero()[:, 0].tolist() + [T]
            documents.append(list(zip(edges[:-1], edges[1:])))
        allowed = (idx[None, :] <= idx[:, None])[None] & (run[:, :, None] == run[:, None, :])
        return Plan(cos, sin, positions, real, 0, None, "documents", allowed[:, None], False, None, documents)

    @torch.no_grad()
    def init_weights(self) -> None:
        """HF's _init_weights: normal(0, initializer_range) for linears and the embedding, the
        output projections (dense, down_proj) normal(0, range / sqrt(2 * layers)), biases 0,
        LayerNorms 1 and 0. Draws from torch's global generator. Also recomputes the rotary buffers."""
        cfg = self.config
        std = cfg.initializer_range or 0.02
        out_std = std / math.sqrt(2 * cfg.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if module.weight is not self.model.embed_tokens.weight:
                    nn.init.normal_(module.weight, 0.0, out_std if name.endswith(("dense", "down_proj")) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the non-persistent buffers (rotary tables, dummy ids, head residues) on the
        CPU and move them to the model's device: the loaders build the model on the meta device."""
        cfg = self.config
        device = self.device
        with torch.device("cpu"):
            short, long = rope_inv_freq(cfg)
            dummy = _dummy_ids(cfg)
            residues = head_residues(cfg)
        self.inv_freq_short, self.inv_freq_long = short.to(device), long.to(device)
        self.dummy_ids = dummy.to(device)
        for layer in self.model.layers:
            layer.self_attn.residues = residues.to(device)
