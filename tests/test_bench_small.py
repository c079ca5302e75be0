"""phi3.bench.measure_model (issue 17's whole-model benchmark, benchmarks/bench_small_model.py) on a
tiny phi3small in memory: the figures are there and consistent, the head-aware decode gives the full
cache's ids, and the KV bytes are model_small.kv_cache_bytes'. (The packed GGUF path of the same model
is test_small_integration's; building one here costs ~20 s.)"""

from __future__ import annotations

import pytest
import torch

from phi3.errors import Phi3Error

config_small = pytest.importorskip("phi3.config_small", reason="phi3/config_small.py not there")
model_small = pytest.importorskip("phi3.model_small", reason="phi3/model_small.py not there")


@pytest.fixture(scope="module")
def tiny_small():
    cfg = config_small.SmallConfig(
        name="tiny-phi3small", hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256,
        blocksparse_block_size=4, blocksparse_num_local_blocks=3, blocksparse_vert_stride=3)
    torch.manual_seed(0)
    m = model_small.SmallTransformer(cfg)
    m.init_weights()
    with torch.no_grad():  # wide weights: clear argmaxes (test_small_integration's reason)
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    m.kv_dtype = torch.float16  # what a packed GGUF model caches on the CPU
    return m.eval()


@pytest.mark.parametrize("dry_run", [False, True])
def test_measure_model_reports_prefill_decode_and_both_caches(tiny_small, dry_run):
    from phi3.bench import measure_model
    r = measure_model(tiny_small, 48, new_tokens=4, threads=1, dry_run=dry_run, prefill_layers=1, progress=False)
    assert (r["context"], r["prompt_tokens"], r["new_tokens"], r["layers"]) == (48, 44, 4, 2)
    assert r["ha_same_argmax"] == "4/4" and r["ha_max_logit_diff"] < 1e-3 * r["logit_std"]
    # layer 0 sparse, layer 1 dense; 2 KV heads of 8, float16: full = 2 layers x 48 x (k, v) x 2 x 8 x 2 B
    assert r["kv_bytes_full"] == 2 * 48 * 2 * 2 * 8 * 2
    assert r["kv_bytes_formula"] == [r["kv_bytes_full"], r["kv_bytes_head_aware"]]
    assert r["kv_bytes_head_aware"] < r["kv_bytes_full"]
    if dry_run:
        assert "prefill_tok_s" not in r and r["prefill_layers"] == 1
        assert r["prefill_cpu_s_estimated"] == round(r["prefill_partial_cpu_s"] * 2, 0)
    else:
        assert r["prefill_tok_s"] > 0 and "prefill_layers" not in r
    assert r["peak_rss_mb"] >= r["rss_after_prefill_mb"] > 0


def test_head_aware_cache_on_another_architecture_is_refused():
    from conftest import tiny_config
    from phi3.bench import measure_model
    from phi3.model import Transformer
    torch.manual_seed(0)
    m = Transformer(tiny_config("mini-4k")).eval()
    with pytest.raises(Phi3Error, match="head-aware KV cache is phi3small's"):
        measure_model(m, 16, new_tokens=2, threads=1, progress=False)
    r = measure_model(m, 16, new_tokens=2, threads=1, head_aware=False, progress=False)
    assert r["prompt_tokens"] == 14 and "kv_bytes_head_aware" not in r
    with pytest.raises(Phi3Error, match="leaves no prompt"):
        measure_model(m, 2, new_tokens=2, threads=1, head_aware=False, progress=False)
