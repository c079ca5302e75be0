"""The Phi-3 decoder (Llama-2 block structure), in one file.

    tokens -> embed -> N x [x + attn(rmsnorm(x)); x + mlp(rmsnorm(x))] -> rmsnorm -> lm_head

Attention uses a fused qkv projection, grouped-query heads, rotary embeddings (with Phi-3's
LongRoPE for the 128K models) and an optional sliding window; the MLP is SwiGLU with a fused
gate_up projection. Parameter names follow Hugging Face's Phi3ForCausalLM so that a Phi-3
checkpoint loads without renaming.

This file imports only torch and is what a trainer wraps: submodules are called normally (so
hooks, FSDP and compile see them) and every path is plain PyTorch. Fast paths are applied from
outside: the loader swaps packed 4/8-bit linears in (quant.py) and, on a CPU, fused kernels for
RMSNorm and one-token attention (fastpath.py).

Positions and padding: every row of a batch has its own positions (left padding shifts them), and
a KVCache remembers which of its slots hold real tokens, so batched prompts of different lengths
decode together.

Training: `forward(ids, document_ids=...)` runs rows packed with several documents (positions
restart per document, no token attends across a boundary); dropout follows the config and acts
only in train mode; `init_weights` initialises as transformers does. Activation checkpointing is
applied from outside (phi3/train/parallel.py).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from phi3.config import ModelConfig
from phi3.errors import Phi3Error


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op in float32 math (16-bit inputs are rounded once, where transformers rounds
        # before and after the weight: a last-bit difference in bfloat16).
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros whose memory the OS supplies as it is first written (an anonymous mapping): a cache
    sized for the whole context costs resident memory only for the positions actually used. Not
    np.zeros or torch.zeros: they ask for 2 MB huge pages, and one touched slot per head would
    then commit the whole cache."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    carrier = {1: np.int8, 2: np.int16, 4: np.float32, 8: np.float64}[torch.empty(0, dtype=dtype).element_size()]
    nbytes = int(np.prod(shape)) * np.dtype(carrier).itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes)
    return torch.from_numpy(np.frombuffer(buf, dtype=carrier).reshape(shape)).view(dtype)


Q8_0 = "q8_0"  # a KV cache type: int8 per element plus one float16 scale per 32 (llama.cpp's q8_0)


class KVCache:
    """Keys and values for every layer, allocated once for a whole sequence (batch x max_len).

    `length` slots are filled, the same number in every row; `valid` marks which of them hold real
    tokens (left padding does not), and `next_position` is each row's next rotary position.

    `kind` is a float dtype, or Q8_0: then `k`/`v` hold int8 codes and `k_scale`/`v_scale` one
    float16 scale per 32 elements of a head (8.5 bits per element instead of 16 or 32); `store`
    rounds as llama.cpp's quantize_row_q8_0 does and `load` gives back floats.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 kind: torch.dtype | str, device: torch.device | str = "cpu") -> None:
        hd = cfg.dim_per_head
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, hd)
        self.kind = kind
        if kind == Q8_0:
            if hd % 32:
                raise Phi3Error(f"a q8_0 KV cache needs a head dim that is a multiple of 32 (this model's is {hd}); "
                                "use --kv-cache f16")
            self.k, self.v = _lazy_zeros(shape, torch.int8, device), _lazy_zeros(shape, torch.int8, device)
            scales = shape[:-1] + (hd // 32,)
            self.k_scale = _lazy_zeros(scales, torch.float16, device)
            self.v_scale = _lazy_zeros(scales, torch.float16, device)
        else:
            self.k, self.v = _lazy_zeros(shape, kind, device), _lazy_zeros(shape, kind, device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0
        self.max_len = max_len
        # Per row: whether the cached keys were rotated with LongRoPE's long factor set.
        self.rope_long = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.has_padding = False

    @property
    def quantized(self) -> bool:
        return self.kind == Q8_0

    def reset(self) -> None:
        self.length = 0
        self.valid.zero_()
        self.next_position.zero_()
        self.rope_long.zero_()
        self.has_padding = False

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys and values [B, KV, T, hd] into slots start:start+T of `layer`."""
        end = start + k.shape[2]
        if not self.quantized:
            self.k[layer, :, :, start:end] = k
            self.v[layer, :, :, start:end] = v
            return
        for x, codes, scales in ((k, self.k, self.k_scale), (v, self.v, self.v_scale)):
            blocks = x.float().unflatten(-1, (-1, 32))
            d = blocks.abs().amax(-1) / 127
            inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
            codes[layer, :, :, start:end] = torch.round(blocks * inverse[..., None]).to(torch.int8).flatten(-2)
            scales[layer, :, :, start:end] = d.half()

    def load(self, layer: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots 0:end of `layer` in `dtype`, [B, KV, end, hd]."""
        k, v = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if self.quantized:
            k, v = ((codes.unflatten(-1, (-1, 32)).float() * scales[layer, :, :, :end].float()[..., None]).flatten(-2)
                    for codes, scales in ((k, self.k_scale), (v, self.v_scale)))
        return (k, v) if k.dtype == dtype else (k.to(dtype), v.to(dtype))

    def copy_prefix(self, other: "KVCache", n: int) -> None:
        """Slots 0:n of every layer from `other` (same model and kind)."""
        self.k[:, :, :, :n] = other.k[:, :, :, :n]
        self.v[:, :, :, :n] = other.v[:, :, :, :n]
        if self.quantized:
            self.k_scale[:, :, :, :n] = other.k_scale[:, :, :, :n]
            self.v_scale[:, :, :, :n] = other.v_scale[:, :, :, :n]


@dataclass
class DecodeRows:
    """One new token for each of M sequences that have caches of their own (decode_step's rows):
    each row's rotary tables and mask as `_prepare` made them for it alone."""
    caches: list[KVCache]
    cos: torch.Tensor  # [M, 1, 1, head_dim]
    sin: torch.Tensor
    masks: list[torch.Tensor | None]  # [1, 1, 1, S_i] per row, or None (no padding, no window)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.dim_per_head
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        # On the attention probabilities, in train mode only (transformers' Phi3/LlamaAttention).
        self.attention_dropout = float(cfg.attention_dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, is_causal: bool,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        return self.o_proj(self.attend(self.qkv_proj(x), cos, sin, mask, is_causal, cache, layer))

    def attend_rows(self, qkv: torch.Tensor, rows: DecodeRows, layer: int) -> torch.Tensor:
        """Projected qkv [M, 1, width] of M independent sequences -> attention output [M, 1, H * hd],
        each row against its own cache."""
        return torch.cat([self.attend(qkv[i:i + 1], rows.cos[i:i + 1], rows.sin[i:i + 1], rows.masks[i], False,
                                      rows.caches[i], layer) for i in range(qkv.shape[0])])

    def attend(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor | None, is_causal: bool,
               cache: KVCache | None, layer: int) -> torch.Tensor:
        """Projected qkv [B, T, (H + 2 KV) * hd] -> attention output [B, T, H * hd]."""
        B, T, _ = qkv.shape
        H, KV = self.n_heads, self.n_kv_heads
        qkv = qkv.view(B, T, H + 2 * KV, self.head_dim)
        # Rotate queries and keys together: one set of ops instead of two.
        qk = apply_rotary(qkv[:, :, :H + KV], cos, sin)
        q = qk[:, :, :H].transpose(1, 2)
        k = qk[:, :, H:].transpose(1, 2)
        v = qkv[:, :, H + KV:].transpose(1, 2)
        if cache is not None:
            cache.store(layer, cache.length, k, v)
            k, v = cache.load(layer, cache.length + T, q.dtype)
        dropout = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                             enable_gqa=H != KV)
        return out.transpose(1, 2).reshape(B, T, H * self.head_dim)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        # Phi-3 drops each branch's output before the residual add (resid_pdrop; Llama has none).
        # A float and F.dropout rather than nn.Dropout modules: in eval mode the path is unchanged.
        self.resid_pdrop = float(cfg.resid_pdrop)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None, layer: int) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, cache, layer)
        if self.training and self.resid_pdrop:
            h = F.dropout(h, self.resid_pdrop, training=True)
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.training and self.resid_pdrop:
            h = F.dropout(h, self.resid_pdrop, training=True)
        return x + h

    def decode_rows(self, x: torch.Tensor, rows: DecodeRows, layer: int) -> torch.Tensor:
        """forward for one new token of each of M independent sequences (x [M, 1, hidden])."""
        attn = self.self_attn
        x = x + attn.o_proj(attn.attend_rows(attn.qkv_proj(self.input_layernorm(x)), rows, layer))
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary inverse frequencies for sequences within / beyond the original context. LongRoPE
    divides each frequency by its factor: 1 / (factor_j * theta^(2j/d))."""
    hd = cfg.dim_per_head
    base = cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd)
    if cfg.rope_scaling is None:
        return 1.0 / base, 1.0 / base
    short = 1.0 / (torch.tensor(cfg.rope_scaling.short_factor, dtype=torch.float32) * base)
    long = 1.0 / (torch.tensor(cfg.rope_scaling.long_factor, dtype=torch.float32) * base)
    return short, long


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Transformer(nn.Module):
    """A causal language model of the Phi-3 / Llama family. `forward` returns float32 logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Computed on the CPU, then moved: the same float32 values on every device, and on the meta
        # device (the loaders' empty model) the division would import torch._dynamo and sympy,
        # 76 MiB that counted in every load's peak memory.
        with torch.device("cpu"):
            short, long = rope_inv_freq(cfg)
        short, long = short.to(torch.get_default_device()), long.to(torch.get_default_device())
        self.register_buffer("inv_freq_short", short, persistent=False)
        self.register_buffer("inv_freq_long", long, persistent=False)
        self.rope_scale = cfg.rope_attention_factor
        # Phi-3's config has embd_pdrop; transformers' Phi3Model reads but never applies it. Here it
        # drops the token embeddings in train mode, as Phi-1/2 (and the name) do.
        self.embd_pdrop = float(cfg.embd_pdrop)
        # The KV cache's element type (a float dtype or Q8_0); None: the activations'. A GGUF model
        # with int8 activations caches float16, as llama.cpp does: half the memory (1.6 GB instead
        # of 3.2 GB for phi-3-mini's 4K context) for a rounding no coarser than its matmuls'.
        self.kv_dtype: torch.dtype | str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def tie_weights(self) -> None:
        # Packed (quant.QuantEmbedding) embeddings share their blocks with the head at load.
        if self.config.tie_word_embeddings and isinstance(self.model.embed_tokens, nn.Embedding):
            self.lm_head.weight = self.model.embed_tokens.weight

    def uses_long_rope(self, sequence_length: torch.Tensor) -> torch.Tensor:
        """LongRoPE picks the long factors once a sequence exceeds the original context. Each row
        decides for itself (transformers decides once for the whole batch), so that a sequence's
        result never depends on what it was batched with."""
        if self.config.rope_scaling is None:
            return torch.zeros_like(sequence_length, dtype=torch.bool)
        return sequence_length > self.config.original_max_position_embeddings

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        if max_len > self.config.max_position_embeddings:
            raise Phi3Error(
                f"{max_len} tokens exceed the model's context of {self.config.max_position_embeddings}")
        return KVCache(self.config, batch_size, max_len, self.kv_dtype or self.dtype, self.device)

    def rotary(self, positions: torch.Tensor, long: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, T, 1, head_dim] for positions [B, T]; `long` [B] picks each row's factors,
        [B, T] each token's (None: no LongRoPE)."""
        if long is None or not bool(long.any()):
            inv_freq = self.inv_freq_short[None, None, :]
        else:
            inv_freq = torch.where(long[..., None], self.inv_freq_long, self.inv_freq_short)
            if long.dim() == 1:  # one choice per row (a [B, T] `long` chooses per token: packed documents)
                inv_freq = inv_freq[:, None, :]
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.rope_scale != 1.0:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        # [B, T, 1, head_dim] broadcasts over heads.
        return cos.to(self.dtype).unsqueeze(2), sin.to(self.dtype).unsqueeze(2)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None,
                last_only: bool = False,
                allowed: torch.Tensor | None = None,
                rows: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None,
                float_logits: bool = True) -> torch.Tensor:
        """input_ids [B, T]; attention_mask [B, T] with 0 at (left) padding; returns logits
        [B, T, vocab] (or [B, 1, vocab] with last_only) in float32.

        `allowed` [B, T, S] (S = cached + T) replaces the causal mask: which keys each new token
        sees, for several sequences packed into one (the evaluator scores a shared context once
        and every answer after it); give `positions` with it. `rows` [R] returns logits
        [B, R, vocab] for those positions only: the head is the largest matmul of a small model
        and most positions' logits are not wanted.

        `document_ids` [B, T] (training): each row is several documents packed end to end, a run of
        equal ids being one document. Each document gets the logits it would get alone: positions
        restart at 0, attention stays within it, and LongRoPE picks factors by its own length.

        `float_logits=False` (training under bfloat16 autocast) returns the head's own dtype:
        phi3.train.losses upcasts 16 MB chunks itself, so neither the [B, T, V] float32 copy (400 MB
        at 4 x 512 x 49,152) nor its float32 gradient is made. The values are the same: the upcast
        is exact, and the gradient is rounded to bfloat16 once either way."""
        if document_ids is not None:
            if cache is not None or attention_mask is not None or positions is not None or allowed is not None:
                raise Phi3Error("forward: document_ids set positions and the mask themselves; "
                                "pass no cache, attention_mask, positions or allowed with them")
            cos, sin, mask, is_causal = self._prepare_documents(document_ids)
        elif allowed is not None:
            if positions is None:
                raise Phi3Error("forward: a custom attention mask needs explicit positions")
            cos, sin, _, _ = self._prepare(input_ids, cache, None, positions)
            mask, is_causal = allowed[:, None], False
        else:
            cos, sin, mask, is_causal = self._prepare(input_ids, cache, attention_mask, positions)
        x = self.model.embed_tokens(input_ids)
        if self.training and self.embd_pdrop:
            x = F.dropout(x, self.embd_pdrop, training=True)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, is_causal, cache, i)
        if cache is not None:
            cache.length += input_ids.shape[1]
        if last_only:
            x = x[:, -1:]
        elif rows is not None:
            x = x[:, rows]
        logits = self.lm_head(self.model.norm(x))
        return logits.float() if float_logits else logits

    def decode_step(self, input_ids: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
        """One new token for each of several independent sequences, each with its own cache
        (a server's requests, which start and finish at different times): input_ids [M] ->
        logits [M, vocab] in float32.

        Norms, projections, the MLP and the head run on all M rows at once, so each weight is
        read once per step rather than M times; attention runs per sequence against its own
        cache. Every row's numbers are bit for bit those of decoding it alone (for packed
        weights; a dense float matmul may sum differently at other batch sizes)."""
        M = input_ids.shape[0]
        if M != len(caches):
            raise Phi3Error(f"decode_step: {M} tokens but {len(caches)} caches")
        ids = input_ids.view(M, 1)
        prepared = [self._prepare(ids[i:i + 1], c, None, None) for i, c in enumerate(caches)]
        rows = DecodeRows(caches, torch.cat([p[0] for p in prepared]), torch.cat([p[1] for p in prepared]),
                          [p[2] for p in prepared])
        x = self.model.embed_tokens(ids)
        for i, layer in enumerate(self.model.layers):
            x = layer.decode_rows(x, rows, i)
        for c in caches:
            c.length += 1
        return self.lm_head(self.model.norm(x)).float().view(M, -1)

    def _prepare(self, input_ids: torch.Tensor, cache: KVCache | None, attention_mask: torch.Tensor | None,
                 positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Positions, rotary tables and the attention mask for input_ids [B, T] after what the
        cache holds; records the new tokens' bookkeeping in the cache (its `length` is advanced
        by the caller once every layer has written its keys)."""
        B, T = input_ids.shape
        device = input_ids.device
        start = cache.length if cache is not None else 0
        S = start + T
        if cache is not None and S > cache.max_len:
            raise Phi3Error(f"KV cache holds {cache.max_len} tokens; {S} requested")
        padded = attention_mask is not None and not bool(attention_mask.all())
        if positions is None:
            # Decoding calls this once per token: skip the cumsum unless there is padding.
            offset = cache.next_position[:, None] if cache is not None else torch.zeros(B, 1, dtype=torch.long, device=device)
            if padded:
                positions = (offset + attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                positions = offset + torch.arange(T, device=device)
        long = None
        if self.config.rope_scaling is not None:
            long = self.uses_long_rope(positions.max(dim=1).values + 1)
        if cache is not None:
            if long is not None:
                if cache.length > 0 and bool((cache.rope_long != long).any()):
                    raise Phi3Error("KV cache holds keys rotated with the other LongRoPE factor set; "
                                    "re-encode the sequence (phi3.generate.advance does)")
                cache.rope_long = long
            cache.valid[:, start:S] = attention_mask.bool() if attention_mask is not None else True
            cache.next_position = positions[:, -1] + 1
            cache.has_padding = cache.has_padding or padded
            key_valid = cache.valid[:, :S]
            any_padding = cache.has_padding
        else:
            key_valid = (attention_mask.bool() if attention_mask is not None
                         else torch.ones(B, T, dtype=torch.bool, device=device))
            any_padding = padded

        window = self.config.sliding_window
        window_binds = window is not None and S > window
        mask, is_causal = None, False
        if any_padding or window_binds or (T > 1 and start > 0):
            mask = self._mask(key_valid, start, T, window if window_binds else None)
        elif T > 1:
            is_causal = True
        cos, sin = self.rotary(positions, long)
        return cos, sin, mask, is_causal

    def _prepare_documents(self, document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """Rotary tables and a block-diagonal causal mask [B, 1, T, T] for packed documents.

        Document ids rather than position_ids that restart at 0 or flash-attn's cu_seqlens: the
        packer knows them, a padding tail is just one more document, and the mask is a comparison
        of ids; SDPA takes no cu_seqlens. A document is a run of equal ids, so an id that recurs
        later in the row starts a new document. (flex_attention would skip the masked blocks, but
        it is fast only under torch.compile; SDPA with a boolean mask runs everywhere as it is.)"""
        B, T = document_ids.shape
        device = document_ids.device
        idx = torch.arange(T, device=device)
        starts = torch.ones(B, T, dtype=torch.bool, device=device)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        run = starts.long().cumsum(-1)  # [B, T]: which document (1-based) each token is in
        first = torch.where(starts, idx, 0).cummax(-1).values  # index of each token's first token
        positions = idx - first
        long = None
        if self.config.rope_scaling is not None:
            lengths = torch.zeros(B, T + 1, dtype=torch.long, device=device).scatter_add_(1, run, torch.ones_like(run))
            long = self.uses_long_rope(lengths.gather(1, run))
        window = self.config.sliding_window
        cos, sin = self.rotary(positions, long)
        if not bool(starts[:, 1:].any()) and (window is None or T <= window):
            # One document per row: plain causal attention, which SDPA's flash kernels run without
            # reading a mask and skipping the upper triangle (a boolean mask makes them do neither).
            return cos, sin, None, True
        q_idx, k_idx = idx[:, None], idx[None, :]
        allowed = (k_idx <= q_idx)[None] & (run[:, :, None] == run[:, None, :])
        if window is not None and T > window:
            allowed = allowed & (k_idx > q_idx - window)[None]
        return cos, sin, allowed[:, None], False

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random weights as transformers' Phi3/LlamaPreTrainedModel._init_weights: normal(0,
        initializer_range) for linears and the embedding, the padding token's row zero, norms one.
        Draws from torch's global generator (seed it first). Also recomputes the rotary buffers, so
        a model built on the meta device and then `to_empty`'d (as FSDP2 does) is complete."""
        std = self.config.initializer_range or 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if module.weight is not self.model.embed_tokens.weight:  # a tied head is drawn once
                    nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
                # transformers builds the embedding with padding_idx=pad_token_id and zeroes its row.
                pad = self.config.pad_token_id
                if pad is not None and 0 <= pad < module.num_embeddings:
                    module.weight[pad].zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        with torch.device("cpu"):
            short, long = rope_inv_freq(self.config)
        self.inv_freq_short.copy_(short)
        self.inv_freq_long.copy_(long)

    @staticmethod
    def _mask(key_valid: torch.Tensor, start: int, T: int, window: int | None) -> torch.Tensor:
        """Boolean [B, 1, T, S]: causal, no padded keys, within the sliding window (counted in
        cache slots, as transformers counts it). A padded query still sees itself, so that no row
        is fully masked (which would give NaN)."""
        S = key_valid.shape[1]
        device = key_valid.device
        q_idx = torch.arange(start, start + T, device=device)[:, None]
        k_idx = torch.arange(S, device=device)[None, :]
        allowed = k_idx <= q_idx
        if window is not None:
            allowed = allowed & (k_idx > q_idx - window)
        allowed = allowed[None] & key_valid[:, None, :]
        allowed = allowed | (k_idx == q_idx)[None]
        return allowed[:, None]
