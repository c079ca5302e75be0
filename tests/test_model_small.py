"""Phi-3-small (phi3/model_small.py, phi3/config_small.py) against a reference written here from
the fact sheet's formulas (../shared/reference/phi3-small.md), on tiny random models scaled down
so that 64 tokens cross many blocks: block 4, 3 local blocks, vertical stride 3, 4 query heads in
2 KV groups (2 of the 3 residues per group, so the head-aware cache drops blocks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from phi3.config import RopeScaling
from phi3.config_small import SMALL_PRESETS, SmallConfig, small_config_from_hf_dict
from phi3.errors import Phi3Error
from phi3.model_small import (HeadAwareKVCache, SmallTransformer, blocksparse_allowed, gegelu,
                              kv_cache_bytes)

B_, L_, V_ = 4, 3, 3  # block, local blocks, vertical stride of the tiny models
SEQ = 64


def tiny(**changes) -> SmallConfig:
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=128,
                blocksparse_block_size=B_, blocksparse_num_local_blocks=L_, blocksparse_vert_stride=V_,
                dummy_token_indices=(5, 7, 200), gegelu_limit=0.5, name="tiny")
    return SmallConfig(**{**base, **changes})


def build(cfg: SmallConfig, seed: int = 0) -> SmallTransformer:
    torch.manual_seed(seed)
    model = SmallTransformer(cfg).float()
    model.init_weights()
    with torch.no_grad():  # larger weights than HF's init, so that attention is far from uniform
        for name, p in model.named_parameters():
            if "layernorm" not in name:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> SmallTransformer:
    return build(tiny())


# --- The reference: the fact sheet's formulas, nothing from model_small ---------------------------

def mask_formula(i: int, j: int, h: int, B: int, L: int, V: int, H: int, homo: bool = False) -> bool:
    """§4.2, scalar."""
    s = 0 if homo else max(1, V // H)
    return j <= i and ((i // B - j // B) < L or (j // B + h * s + 1) % V == 0)


def reference_logits(model: SmallTransformer, ids: torch.Tensor) -> torch.Tensor:
    """Full forward of ids [B, T] from the state dict: §2.1-§3 and §4.2/§4.5 as written."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    H, KV, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    hd, G = d // H, H // KV
    Bn, T = ids.shape
    x = sd["model.embed_tokens.weight"][ids] * cfg.mup_embedding_multiplier
    pos = torch.arange(T, dtype=torch.float64)
    base = cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    factors, mscale = torch.ones(hd // 2, dtype=torch.float64), 1.0
    if cfg.rope_scaling is not None:
        if T > cfg.original_max_position_embeddings:
            factors = torch.tensor(cfg.rope_scaling.long_factor, dtype=torch.float64)
            s = cfg.max_position_embeddings / cfg.original_max_position_embeddings
            mscale = cfg.long_mscale or math.sqrt(1 + math.log(s) / math.log(cfg.original_max_position_embeddings))
        else:
            factors = torch.tensor(cfg.rope_scaling.short_factor, dtype=torch.float64)
            mscale = cfg.short_mscale or 1.0
    ang = pos[:, None] / (factors * base)
    cos = torch.cat([ang.cos(), ang.cos()], -1) * mscale
    sin = torch.cat([ang.sin(), ang.sin()], -1) * mscale

    def rope(t):  # [B, T, n, hd]
        rot = torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1)
        return t * cos[None, :, None] + rot * sin[None, :, None]

    # §2.3 row formula: q head h dim e -> (h//G)*(G+2)*hd + (h%G)*hd + e; k: g*(G+2)*hd + G*hd + e; v: +(G+1)*hd
    e = torch.arange(hd)
    q_rows = torch.stack([(h // G) * (G + 2) * hd + (h % G) * hd + e for h in range(H)])
    k_rows = torch.stack([g * (G + 2) * hd + G * hd + e for g in range(KV)])
    v_rows = k_rows + hd
    allowed_sparse = torch.tensor([[[mask_formula(i, j, h, cfg.blocksparse_block_size,
                                                  cfg.blocksparse_num_local_blocks, cfg.blocksparse_vert_stride, H,
                                                  cfg.blocksparse_homo_head_pattern)
                                     for j in range(T)] for i in range(T)] for h in range(H)])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        ln = F.layer_norm(x, (d,), sd[p + "input_layernorm.weight"], sd[p + "input_layernorm.bias"],
                          cfg.layer_norm_epsilon)
        qkv = ln @ sd[p + "self_attn.query_key_value.weight"].T + sd[p + "self_attn.query_key_value.bias"]
        q, k, v = rope(qkv[..., q_rows]), rope(qkv[..., k_rows]), qkv[..., v_rows]
        k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)  # q head h uses kv head h // G
        scores = torch.einsum("bihd,bjhd->bhij", q, k) * (cfg.mup_attn_multiplier / hd)
        dense = (layer + 1) % cfg.dense_attention_every_n_layers == 0
        allowed = causal[None] if dense else allowed_sparse
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        att = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(Bn, T, d)
        x = x + att @ sd[p + "self_attn.dense.weight"].T + sd[p + "self_attn.dense.bias"]
        ln = F.layer_norm(x, (d,), sd[p + "post_attention_layernorm.weight"], sd[p + "post_attention_layernorm.bias"],
                          cfg.layer_norm_epsilon)
        u = ln @ sd[p + "mlp.up_proj.weight"].T + sd[p + "mlp.up_proj.bias"]
        a, b = u[..., 0::2], u[..., 1::2]
        lim = cfg.gegelu_limit
        a, b = torch.where(a.isinf(), a, a.clamp(max=lim)), torch.where(b.isinf(), b, b.clamp(-lim, lim))
        y = a * torch.sigmoid(1.702 * a) * (b + 1)
        x = x + y @ sd[p + "mlp.down_proj.weight"].T + sd[p + "mlp.down_proj.bias"]
    x = F.layer_norm(x, (d,), sd["model.final_layernorm.weight"], sd["model.final_layernorm.bias"],
                     cfg.layer_norm_epsilon)
    logits = (x @ sd["model.embed_tokens.weight"].T / cfg.mup_width_multiplier).float()
    dummy = [i for i in cfg.dummy_token_indices if i < cfg.vocab_size]
    logits[..., dummy] = torch.finfo(torch.float32).min
    return logits


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- The mask -----------------------------------------------------------------------------------

GOLDEN = """\
1                      1
11                     11
111                    111
1111                   1111
..111                  ..111
..1111                 ..1111
....111                ..11111
....1111               ..111111
....11111              ..11..111
....111111             ..11..1111
....11..111            ..11....111
....11..1111           ..11....1111"""


def test_golden_12_token_matrix():
    """§4.2's tiny example, B=2 L=2 V=3 H=2: the formula and blocksparse_allowed both give it."""
    cfg = SmallConfig(num_attention_heads=2, num_key_value_heads=2, hidden_size=16, blocksparse_block_size=2,
                      blocksparse_num_local_blocks=2, blocksparse_vert_stride=3)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    for h in range(2):
        expected = [line.split()[h] for line in GOLDEN.splitlines()]
        formula = ["".join("1" if mask_formula(a, b, h, 2, 2, 3, 2) else "." for b in range(a + 1)) for a in range(12)]
        got = blocksparse_allowed(i, j, h, cfg)
        ours = ["".join("1" if got[a, b] else "." for b in range(a + 1)) for a in range(12)]
        assert formula == expected
        assert ours == expected
        assert not bool(got.triu(1).any())


def test_query_block_40_of_the_real_config():
    cfg = SMALL_PRESETS["phi-3-small-8k-instruct"]
    kb = torch.arange(41)
    for h, vertical in ((0, {7, 15, 23}), (1, {6, 14, 22}), (2, {5, 13, 21}), (8, {7, 15, 23})):
        expected = set(range(25, 41)) | vertical
        assert {b for b in range(41) if mask_formula(40 * 64, b * 64, h, 64, 16, 8, 32)} == expected
        got = blocksparse_allowed(40 * 64, kb * 64, h, cfg)
        assert set(kb[got].tolist()) == expected


def test_heads_cover_every_causal_pair_and_repeat_every_v():
    cfg = SMALL_PRESETS["phi-3-small-8k-instruct"]
    i, j = torch.arange(0, 4096, 32)[:, None], torch.arange(0, 4096, 32)[None, :]
    heads = torch.stack([blocksparse_allowed(i, j, h, cfg) for h in range(32)])
    assert torch.equal(heads.any(0), j <= i)
    assert torch.equal(heads[:8], heads[8:16]) and torch.equal(heads[:8], heads[24:])
    small = tiny()
    i, j = torch.arange(SEQ)[:, None], torch.arange(SEQ)[None, :]
    assert torch.equal(torch.stack([blocksparse_allowed(i, j, h, small) for h in range(4)]).any(0), j <= i)
    # Up to L blocks the pattern is plain causal (§4.3 test 5: <= 1024 tokens for the real model).
    i, j = torch.arange(1024)[:, None], torch.arange(1024)[None, :]
    assert torch.equal(blocksparse_allowed(i, j, 5, cfg), j <= i)


def test_density_at_8k_is_a_third_of_causal():
    """§4.2: a head keeps 31.8% of the causal pairs of an 8192-token prefill (counted per block pair)."""
    qb, kb = torch.arange(128)[:, None], torch.arange(128)[None, :]
    pairs = torch.where(qb == kb, 64 * 65 / 2, 64.0 * 64) * (kb <= qb)
    kept = pairs * ((qb - kb < 16) | ((kb + 1) % 8 == 0))
    assert kept.sum() / pairs.sum() == pytest.approx(0.318, abs=5e-4)


def test_dense_layers_follow_hf_rule():
    cfg = tiny(num_hidden_layers=2, dense_attention_every_n_layers=2)
    assert [cfg.is_dense_layer(i) for i in range(2)] == [False, True]
    m = SmallTransformer(cfg)
    assert [layer.self_attn.sparse for layer in m.model.layers] == [True, False]
    assert [tiny(num_hidden_layers=6, dense_attention_every_n_layers=3).is_dense_layer(i) for i in range(6)] == \
        [False, False, True, False, False, True]
    assert not any(tiny(dense_attention_every_n_layers=None).is_dense_layer(i) for i in range(4))


# --- The model against the reference -------------------------------------------------------------

@pytest.mark.parametrize("length", [5, 13, 37, SEQ])
def test_prefill_matches_reference(model, length):
    torch.manual_seed(length)
    ids = torch.randint(0, 96, (2, length))
    with torch.no_grad():
        assert close(model(ids), reference_logits(model, ids)) <= 1e-5


@pytest.mark.parametrize("head_aware", [False, True])
def test_decode_step_by_step_matches_reference(model, head_aware):
    """Token by token through the cache, past the local window (12 tokens) and at every length
    (most not multiples of the block), equals the reference's full forward at each position."""
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, SEQ))
    ref = reference_logits(model, ids)
    cache = model.new_cache(2, SEQ, head_aware=head_aware)
    assert isinstance(cache, HeadAwareKVCache) == head_aware
    with torch.no_grad():
        steps = torch.cat([model(ids[:, t:t + 1], cache) for t in range(SEQ)], dim=1)
    assert cache.length == SEQ
    assert close(steps, ref) <= 1e-5


@pytest.mark.parametrize("head_aware", [False, True])
def test_chunked_prefill_then_decode(model, head_aware):
    """Chunks that start and end mid-block, then single tokens."""
    torch.manual_seed(2)
    ids = torch.randint(0, 96, (1, SEQ))
    cache = model.new_cache(1, SEQ, head_aware=head_aware)
    with torch.no_grad():
        parts = [model(ids[:, a:b], cache) for a, b in ((0, 7), (7, 33), (33, 34), (34, 59))]
        parts += [model(ids[:, t:t + 1], cache) for t in range(59, SEQ)]
    assert close(torch.cat(parts, 1), reference_logits(model, ids)) <= 1e-5


@pytest.mark.parametrize("kv_dtype", [None, torch.float16])
def test_head_aware_cache_gives_the_full_caches_logits_with_less_memory(model, kv_dtype):
    torch.manual_seed(3)
    ids = torch.randint(0, 96, (1, SEQ))
    out = {}
    model.kv_dtype = kv_dtype
    try:
        for head_aware in (False, True):
            cache = model.new_cache(1, SEQ, head_aware=head_aware)
            with torch.no_grad():
                out[head_aware] = torch.cat([model(ids[:, :45], cache)] +
                                            [model(ids[:, t:t + 1], cache) for t in range(45, SEQ)], 1)
    finally:
        model.kv_dtype = None
    # Both caches hand the kernel the same keys in the same order and layout: equal bit for bit.
    assert torch.equal(out[True], out[False])
    if kv_dtype is not None:
        return
    cache = model.new_cache(1, SEQ, head_aware=True)
    cfg = model.config
    assert cache.nbytes == kv_cache_bytes(cfg, 1, SEQ, element_size=4, head_aware=True)
    # 2 sparse layers: a ring of 12 positions + blocks of 2 of the 3 residues below block 13 (5 rounds x 2 x 4)
    assert kv_cache_bytes(cfg, 1, SEQ, 4, head_aware=True) == (2 * SEQ + 2 * (12 + 5 * 2 * 4)) * 2 * 2 * 8 * 4
    assert kv_cache_bytes(cfg, 1, SEQ, 4) == 4 * SEQ * 2 * 2 * 8 * 4


def test_dense_decode_on_a_float16_cache_merges_chunks(model, monkeypatch):
    """A dense layer's decode step reads a float16 cache under float32 activations in pieces of
    DENSE_DECODE_CHUNK keys merged through their log-sum-exps: pieces of 16 give the logits of one
    piece within 1e-5."""
    import phi3.model_small as model_small
    torch.manual_seed(4)
    ids = torch.randint(0, 96, (1, SEQ))
    out = {}
    model.kv_dtype = torch.float16
    try:
        for chunk in (16, 1 << 30):
            monkeypatch.setattr(model_small, "DENSE_DECODE_CHUNK", chunk)
            cache = model.new_cache(1, SEQ)
            with torch.no_grad():
                out[chunk] = torch.cat([model(ids[:, :62], cache)] + [model(ids[:, t:t + 1], cache) for t in range(62, SEQ)], 1)
    finally:
        model.kv_dtype = None
    assert close(out[16], out[1 << 30]) <= 1e-5


def test_real_block_pattern_past_1024_tokens():
    """Block 64, 16 local blocks, stride 8 and 8 heads (the 8 residues, 4 per KV group, as the real
    model): a 1037-token prefill, 3 decode steps and a 60-token chunk (lengths not multiples of 64,
    past the 1024-token window) equal the dense-mask path (`allowed`: SDPA over the pattern
    intersected with a causal mask) within 1e-5, and the head-aware cache equals the full one bit
    for bit."""
    cfg = tiny(num_hidden_layers=2, num_attention_heads=8, blocksparse_block_size=64,
               blocksparse_num_local_blocks=16, blocksparse_vert_stride=8, max_position_embeddings=1100,
               original_max_position_embeddings=1100)
    model = build(cfg, seed=9)
    torch.manual_seed(9)
    ids = torch.randint(0, 96, (1, 1100))
    with torch.no_grad():
        ref = model(ids, positions=torch.arange(1100)[None], allowed=torch.ones(1100, 1100, dtype=torch.bool).tril()[None])
        out = {}
        for head_aware in (False, True):
            cache = model.new_cache(1, 1100, head_aware=head_aware)
            parts = [model(ids[:, :1037], cache)] + [model(ids[:, t:t + 1], cache) for t in range(1037, 1040)]
            out[head_aware] = torch.cat(parts + [model(ids[:, 1040:], cache)], 1)
    assert close(out[False], ref) <= 1e-5
    assert torch.equal(out[True], out[False])


def test_head_grid_of_several_rows_of_residues():
    """16 heads, stride 8 (two heads per residue, as the real model's 32 heads make four): the
    blocksparse prefill's one kernel call per count of vertical blocks over a strided view of all
    heads (_head_grids: 2 x 8), whole and in chunks not multiples of the block, and left-padded
    rows through both caches, equal the dense-mask path within 1e-5; head-aware == full, bit for bit."""
    cfg = tiny(num_hidden_layers=2, num_attention_heads=16, blocksparse_block_size=16, blocksparse_num_local_blocks=4,
               blocksparse_vert_stride=8, max_position_embeddings=320, original_max_position_embeddings=320)
    assert SmallTransformer(cfg).model.layers[0].self_attn._head_grids(fast=True) == [(0, 2, 8, 8, 1, 0)]
    model = build(cfg, seed=3)
    torch.manual_seed(3)
    ids = torch.randint(0, 96, (2, 300))
    with torch.no_grad():
        ref = model(ids, positions=torch.arange(300).expand(2, 300),
                    allowed=torch.ones(300, 300, dtype=torch.bool).tril().expand(2, 300, 300))
        assert close(model(ids), ref) <= 1e-5
        cache = model.new_cache(2, 300)
        chunks = [model(ids[:, a:e], cache) for a, e in ((0, 70), (70, 71), (71, 203), (203, 300))]
        assert close(torch.cat(chunks, 1), ref) <= 1e-5
        mask = torch.ones(2, 300, dtype=torch.long)
        mask[1, :37] = 0
        padded = {}
        for head_aware in (False, True):
            cache = model.new_cache(2, 300, head_aware=head_aware)
            padded[head_aware] = torch.cat([model(ids[:, :250], cache, attention_mask=mask[:, :250]),
                                            model(ids[:, 250:], cache, attention_mask=mask[:, 250:])], 1)
        assert torch.equal(padded[True], padded[False])
        assert close(padded[False][0], ref[0]) <= 1e-5
        alone = model(ids[1:, 37:], positions=torch.arange(263)[None],
                      allowed=torch.ones(263, 263, dtype=torch.bool).tril()[None])
        assert close(padded[False][1, 37:], alone[0]) <= 1e-5


def test_kv_bytes_at_8k_of_the_real_shape():
    """§4.3: a sparse layer needs 72 of 128 blocks at 8K (44% less); 32 layers in bfloat16."""
    cfg = SMALL_PRESETS["phi-3-small-8k-instruct"]
    full = kv_cache_bytes(cfg, 1, 8192)
    aware = kv_cache_bytes(cfg, 1, 8192, head_aware=True)
    assert full == 32 * 2 * 8 * 8192 * 128 * 2 == 2**30
    sparse_full = full // 2
    assert aware - sparse_full == sparse_full * 72 // 128


def test_left_padded_batch_and_generate_style_decoding(model):
    """Rows of different lengths, left padded: each row's logits are its own unpadded forward's."""
    torch.manual_seed(4)
    a, b = torch.randint(0, 96, (1, 40)), torch.randint(0, 96, (1, 27))
    ids = torch.full((2, 40), 0)
    mask = torch.zeros(2, 40, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, 13:], mask[1, 13:] = b[0], 1
    ref_a, ref_b = reference_logits(model, a), reference_logits(model, b)
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
        assert close(got[0], ref_a[0]) <= 1e-5
        assert close(got[1, 13:], ref_b[0]) <= 1e-5
        for head_aware in (False, True):  # prefill 30 columns, then one column at a time
            cache = model.new_cache(2, 40, head_aware=head_aware)
            parts = [model(ids[:, :30], cache, attention_mask=mask[:, :30])]
            parts += [model(ids[:, t:t + 1], cache, attention_mask=mask[:, t:t + 1]) for t in range(30, 40)]
            got = torch.cat(parts, 1)
            assert close(got[0], ref_a[0]) <= 1e-5
            assert close(got[1, 13:], ref_b[0]) <= 1e-5


def test_decode_step_rows_with_their_own_caches(model):
    torch.manual_seed(5)
    seqs = [torch.randint(0, 96, (1, n)) for n in (30, 17, 45)]
    refs = [reference_logits(model, s) for s in seqs]
    for head_aware in (False, True):
        caches = [model.new_cache(1, 50, head_aware=head_aware) for _ in seqs]
        with torch.no_grad():
            for s, c in zip(seqs, caches):
                model(s[:, :-1], c)
            got = model.decode_step(torch.tensor([int(s[0, -1]) for s in seqs]), caches)
        for i, r in enumerate(refs):
            assert close(got[i], r[0, -1]) <= 1e-5


def test_allowed_rows_and_documents(model):
    """eval's packed scoring (`allowed` with positions, `rows`), and packed training documents."""
    torch.manual_seed(6)
    ids = torch.randint(0, 96, (1, 50))
    ref = reference_logits(model, ids)
    causal = torch.ones(50, 50, dtype=torch.bool).tril()[None]
    cache = model.new_cache(1, 50)
    with torch.no_grad():
        model(ids[:, :18], cache)  # a cached prefix, as the scorer keeps one
        got = model(ids[:, 18:], cache, positions=torch.arange(18, 50)[None], allowed=causal[:, 18:],
                    rows=torch.tensor([0, 5, 31]))
        assert close(got[0], ref[0, [18, 23, 49]]) <= 1e-5
        docs = torch.tensor([[0] * 50 + [1] * 14])
        two = torch.cat([ids, ids[:, :14]], 1)
        got = model(two, document_ids=docs)
        assert close(got[0, :50], ref[0]) <= 1e-5
        assert close(got[0, 50:], ref[0, :14]) <= 1e-5
        with pytest.raises(Phi3Error):
            model(ids[:, :4], model.new_cache(1, 8, head_aware=True), positions=torch.arange(4)[None],
                  allowed=causal[:, :4, :4])


def test_training_documents_give_each_documents_loss_and_finite_gradients():
    """Packed documents in train mode (dropout off): the row's loss is the sum of each document's
    alone, and so are the gradients (masked softmax rows must not leak NaN into them)."""
    model = build(tiny(embedding_dropout_prob=0.0, ffn_dropout_prob=0.0), seed=8).train()
    torch.manual_seed(8)
    ids = torch.randint(0, 96, (1, 60))
    weights = torch.randn(96)
    weights[[5, 7]] = 0

    def loss(x, **kw):
        return (model(x, **kw).clamp(min=-1e4) * weights).sum()

    packed = loss(ids, document_ids=torch.tensor([[0] * 41 + [1] * 19]))
    packed.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone = loss(ids[:, :41]) + loss(ids[:, 41:])
    alone.backward()
    assert abs(packed.item() - alone.item()) <= 1e-3 * abs(alone.item())
    for g, p in zip(got, model.parameters()):
        assert torch.isfinite(g).all()
        assert close(g, p.grad) <= 1e-4 * max(1.0, p.grad.abs().max().item())


def test_long_rope_switches_factors_by_total_length():
    """128K-style: factors and mscale by total length (short up to 24 tokens here, long beyond);
    generate.advance re-encodes at the switch, so decoding equals a full forward."""
    from phi3.generate import advance
    short = tuple(1.0 + 0.1 * i for i in range(4))
    long = tuple(2.0 + 3.0 * i for i in range(4))
    cfg = tiny(max_position_embeddings=96, original_max_position_embeddings=24,
               rope_scaling=RopeScaling(short, long), short_mscale=1.05)
    model = build(cfg, seed=7)
    torch.manual_seed(7)
    ids = torch.randint(0, 96, (1, 40))
    with torch.no_grad():
        for n in (20, 40):
            assert close(model(ids[:, :n]), reference_logits(model, ids[:, :n])) <= 1e-5
        cache = model.new_cache(1, 40, head_aware=True)
        worst = max(close(advance(model, cache, ids[:, :t])[:, -1], reference_logits(model, ids[:, :t])[:, -1])
                    for t in range(20, 41, 5))
    assert worst <= 1e-5
    assert cfg.rope_long_mscale == pytest.approx(math.sqrt(1 + math.log(4) / math.log(24)))


# --- Parts ----------------------------------------------------------------------------------------

def test_gegelu_interleaved_channels_clamps_and_infinities():
    u = torch.tensor([30.0, 30.0, -30.0, -30.0, 1.0, 2.0, float("inf"), float("-inf"), 0.5, float("inf")])
    out = gegelu(u, 20.0)
    q = lambda a: a * torch.sigmoid(torch.tensor(1.702 * a))  # noqa: E731
    assert out[0] == pytest.approx(float(q(20.0)) * 21)  # gelu branch clamped to 20, linear to 20
    assert out[1] == pytest.approx(float(q(-30.0)) * -19)  # gelu not clamped from below, linear to -20
    assert out[2] == pytest.approx(float(q(1.0)) * 3)  # even = gelu (1.0), odd = linear (2.0)
    assert out[3] == float("-inf")  # +inf gelu passes through: inf * sigmoid(inf) * (-inf + 1)
    assert out[4] == float("inf")
    assert torch.equal(gegelu(u, None)[:1], q(30.0)[None] * 31)


def test_embedding_scale_logit_scale_dummy_ids_and_tied_head(model):
    cfg = model.config
    seen = {}
    handle = model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    ids = torch.tensor([[1, 2, 3, 5]])
    with torch.no_grad():
        logits = model(ids)
    handle.remove()
    assert torch.equal(seen["x"], model.model.embed_tokens.weight[ids] * 10)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (logits[..., [5, 7]] == torch.finfo(torch.float32).min).all()
    with torch.no_grad():
        hidden = torch.randn(1, 4, 32)
        raw = model.lm_head(model.model.final_layernorm(hidden)).float()
        scaled = model._logits(hidden)
    assert close(scaled[..., :5], raw[..., :5] / 8) <= 1e-6
    assert model.model.layers[0].self_attn.scale == 1 / 8  # mup_attn_multiplier / head_dim (8 here)
    assert SmallTransformer(tiny(mup_use_scaling=False)).model.layers[0].self_attn.scale == 8 ** -0.5
    names = set(model.state_dict())
    for suffix in ("input_layernorm.bias", "self_attn.query_key_value.bias", "self_attn.dense.bias",
                   "post_attention_layernorm.weight", "mlp.up_proj.bias", "mlp.down_proj.weight"):
        assert f"model.layers.3.{suffix}" in names
    assert {"model.embed_tokens.weight", "model.final_layernorm.weight", "model.final_layernorm.bias"} <= names
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


def test_qkv_split_follows_the_row_formula():
    cfg = SMALL_PRESETS["phi-3-small-8k-instruct"].with_(num_hidden_layers=1, vocab_size=16, hidden_size=4096)
    with torch.device("meta"):
        attn = SmallTransformer(cfg).model.layers[0].self_attn
    rows = torch.arange(6144, dtype=torch.float64).view(1, 1, 6144)
    q, k, v = attn.split_qkv(rows)
    d = torch.arange(128)
    for h in (0, 3, 4, 17, 31):
        assert torch.equal(q[0, 0, h], ((h // 4) * 6 * 128 + (h % 4) * 128 + d).double())
    for g in (0, 5, 7):
        assert torch.equal(k[0, 0, g], (g * 768 + 4 * 128 + d).double())
        assert torch.equal(v[0, 0, g], (g * 768 + 5 * 128 + d).double())
    back = torch.empty(6144, dtype=torch.float64)  # and back: every row exactly once
    back[q[0, 0].long().flatten()] = q[0, 0].flatten()
    back[k[0, 0].long().flatten()] = k[0, 0].flatten()
    back[v[0, 0].long().flatten()] = v[0, 0].flatten()
    assert torch.equal(back, rows[0, 0])


# --- Config ---------------------------------------------------------------------------------------

def test_presets_and_hf_roundtrip():
    c8 = SMALL_PRESETS["phi-3-small-8k-instruct"]
    assert c8.num_parameters() == 7_392_272_384
    assert len(c8.dummy_token_indices) == 91 and c8.eos_token_id == (100257, 100266)
    for cfg in SMALL_PRESETS.values():
        d = cfg.to_hf_dict()
        assert d["model_type"] == "phi3small" and d["rope_embedding_base"] == 1e6
        assert small_config_from_hf_dict(d, name=cfg.name) == cfg
    c128 = SMALL_PRESETS["phi-3-small-128k-instruct"]
    assert c128.rope_long_mscale == pytest.approx(1.1435437, abs=1e-7) and c128.rope_short_mscale == 1.0
    hf8k = {k: v for k, v in c8.to_hf_dict().items() if k not in ("eos_token_id", "dummy_token_indices",
                                                                  "tie_word_embeddings", "pad_token_id")}
    hf8k["eos_token_id"] = 100257  # as the real config.json has it
    assert small_config_from_hf_dict(hf8k, name=c8.name) == c8


@pytest.mark.parametrize("change, words", [
    (dict(rope_scaling={"type": "longrope", "long_factor": [1.0] * 64}), "short_factor is missing"),
    (dict(rope_scaling={"short_factor": [1.0] * 3, "long_factor": [1.0] * 64}), "expected head_dim/2 = 64"),
    (dict(num_attention_heads=30), "not divisible"),
    (dict(num_key_value_heads=5), "not a multiple"),
    (dict(blocksparse_block_size=0), "blocksparse_block_size"),
    (dict(blocksparse_vert_stride=-1), "blocksparse_vert_stride"),
    (dict(blocksparse_num_local_blocks=1.5), "blocksparse_num_local_blocks"),
    (dict(hidden_act="gelu"), "gegelu"),
    (dict(model_type="phi3"), "phi3small"),
    (dict(ff_intermediate_size=None), "ff_intermediate_size"),
    (dict(mup_width_multiplier="8"), "mup_width_multiplier"),
])
def test_bad_configs_give_one_line(change, words):
    d = {**SMALL_PRESETS["phi-3-small-8k-instruct"].to_hf_dict(), **change}
    with pytest.raises(Phi3Error) as err:
        small_config_from_hf_dict(d)
    assert words in str(err.value) and "\n" not in str(err.value)
