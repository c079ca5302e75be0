"""phi-3-small's attention at 8K: KV-cache bytes with and without the head-aware cache, and the
time of one blocksparse layer's attention against one dense layer's (issue 17's benchmark).

Run it from the repository root:

    .venv/bin/python benchmarks/bench_small_attention.py [--context 8192] [--repeats 5] [--threads 1]

(a) KV-cache bytes for the full 32-layer phi-3-small-8k shape at --context tokens, float16 (the
    cache a packed GGUF model uses on the CPU): model_small.kv_cache_bytes for the whole model,
    checked against a real HeadAwareKVCache / KVCache allocated for 2 layers (one sparse, one
    dense) and multiplied by 16.
(b) Attention of layer 0 (blocksparse) and layer 1 (dense) of the real shape (32 query heads,
    8 KV heads, head dim 128, block 64, 16 local blocks, stride 8): SmallAttention.attend on a
    random projected qkv, i.e. the qkv split, rotary, the cache write and attention; the qkv and
    output projections (the same matmuls in both layer kinds) are left out. Prefill: --context
    tokens into an empty cache. Decode: one token at position --context - 1 against a cache
    holding the --context - 1 before it (full float32 cache, full float16 cache, head-aware float16).

Times are CPU seconds of this process (time.process_time: the machine is shared, wall time is
not the layer's), the median of --repeats runs after one warm-up, sparse and dense alternating
(the load drifts: both get the same drift); --threads 1 by default, so that CPU time is not
inflated by OpenMP threads spinning while they wait. The script prints a Markdown table, the CPU
model and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ab_times(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (CPU seconds, wall seconds) of each function, run in turns (a, b, c, a, b, c, ...)
    after one warm-up each: on a shared machine the load drifts, and taking turns gives all the
    same drift."""
    for fn in fns.values():
        fn()
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    wall: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t, w = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - t)
            wall[name].append(time.perf_counter() - w)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in fns}


def ab_cpu_time(a, b, repeats: int) -> tuple[float, float]:
    """Median CPU seconds of a() and of b(), taking turns (ab_times)."""
    t = ab_times({"a": a, "b": b}, repeats)
    return t["a"][0], t["b"][0]


def load_baseline(path: str):
    """Another model_small.py (e.g. `git show HEAD~1:phi3/model_small.py > /tmp/old.py`) as a
    module of its own, to time its blocksparse prefill against this tree's in the same process."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("phi3._baseline_model_small", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def kv_bytes(context: int) -> dict[str, object]:
    from phi3.config_small import SMALL_PRESETS
    from phi3.model import KVCache
    from phi3.model_small import HeadAwareKVCache, kv_cache_bytes
    cfg = SMALL_PRESETS["phi-3-small-8k-instruct"]
    full = kv_cache_bytes(cfg, 1, context, 2, head_aware=False)
    aware = kv_cache_bytes(cfg, 1, context, 2, head_aware=True)
    # The same from real caches of 2 layers (sparse 0 + dense 1), x16 for the 32 layers.
    two = cfg.with_(num_hidden_layers=2)
    real_aware = HeadAwareKVCache(two, 1, context, torch.float16).nbytes * (cfg.num_hidden_layers // 2)
    c = KVCache(two, 1, context, torch.float16)
    real_full = (c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size()) * (cfg.num_hidden_layers // 2)
    assert (real_full, real_aware) == (full, aware), ((real_full, real_aware), (full, aware))
    sparse_full = full // 2
    sparse_aware = aware - full // 2
    return {"context": context, "full_bytes": full, "head_aware_bytes": aware,
            "saved_total": 1 - aware / full, "saved_sparse_layers": 1 - sparse_aware / sparse_full}


def attention_times(context: int, repeats: int, decode_repeats: int, baseline: str | None = None) -> dict[str, float]:
    from phi3.config_small import SMALL_PRESETS
    from phi3.model_small import SmallTransformer
    # The real attention shape; a tiny MLP and vocabulary (attention does not touch them).
    cfg = SMALL_PRESETS["phi-3-small-8k-instruct"].with_(num_hidden_layers=2, intermediate_size=64, vocab_size=512)
    assert not cfg.is_dense_layer(0) and cfg.is_dense_layer(1)
    torch.manual_seed(0)
    model = SmallTransformer(cfg).eval()
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
    width = (H + 2 * KV) * hd
    g = torch.Generator().manual_seed(0)
    qkv_prefill = torch.randn(1, context, width, generator=g)
    qkv_one = torch.randn(1, 1, width, generator=g)
    out: dict[str, float] = {}
    layers = {"sparse": 0, "dense": 1}
    with torch.inference_mode():
        def prefill(layer: int):
            attn = model.model.layers[layer].self_attn

            def run() -> None:
                cache = model.new_cache(1, context)
                plan = model._prepare(torch.zeros(1, context, dtype=torch.long), cache, None, None, None)
                attn.attend(qkv_prefill, plan, cache, layer)
            return run
        fns = {"sparse": prefill(0), "dense": prefill(1)}
        if baseline:
            torch.manual_seed(0)
            old = load_baseline(baseline).SmallTransformer(cfg).eval()
            attn_old = old.model.layers[0].self_attn

            def prefill_old() -> None:
                cache = old.new_cache(1, context)
                plan = old._prepare(torch.zeros(1, context, dtype=torch.long), cache, None, None, None)
                attn_old.attend(qkv_prefill, plan, cache, 0)
            fns["baseline_sparse"] = prefill_old
        for name, (cpu, wall) in ab_times(fns, repeats).items():
            out[f"prefill_{name}_s"], out[f"prefill_{name}_wall_s"] = cpu, wall

        for label, dtype, head_aware in (("f32", torch.float32, False), ("f16", torch.float16, False),
                                         ("head_aware_f16", torch.float16, True)):
            model.kv_dtype = dtype
            steps = {}
            for kind, layer in layers.items():
                attn = model.model.layers[layer].self_attn
                cache = model.new_cache(1, context, head_aware=head_aware)
                # Fill the first context-1 positions (a sparse layer's head-aware store through the
                # layer itself: it keeps only what it keeps), then one decode step at context-1.
                plan = model._prepare(torch.zeros(1, context - 1, dtype=torch.long), cache, None, None, None)
                if head_aware and attn.sparse:
                    attn.attend(qkv_prefill[:, :context - 1], plan, cache, layer)
                else:
                    kv = torch.randn(2, 1, KV, context - 1, hd, generator=g)
                    j = cache.dense_index[layer] if head_aware else layer
                    cache.store(j, 0, kv[0].to(dtype), kv[1].to(dtype))
                cache.length = context - 1
                plan = model._prepare(torch.zeros(1, 1, dtype=torch.long), cache, None, None, None)
                steps[kind] = (lambda a, p, c, i: lambda: a.attend(qkv_one, p, c, i))(attn, plan, cache, layer)
            out[f"decode_sparse_{label}_s"], out[f"decode_dense_{label}_s"] = ab_cpu_time(
                steps["sparse"], steps["dense"], decode_repeats)
        model.kv_dtype = None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3, help="prefill runs (median; after a warm-up)")
    p.add_argument("--decode-repeats", type=int, default=15, help="decode-step runs (median; after a warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baseline", metavar="MODEL_SMALL_PY",
                   help="another model_small.py whose blocksparse prefill is timed in turns with this one's")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    t0 = time.process_time()
    kv = kv_bytes(args.context)
    times = attention_times(args.context, args.repeats, args.decode_repeats, args.baseline)
    result = {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__,
              "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
              "cpu_s_total": round(time.process_time() - t0, 1), "kv": kv,
              "times": {k: round(v, 4) for k, v in times.items()}}
    if args.json:
        print(json.dumps(result))
        return
    mib = 2**20
    print(f"CPU {result['cpu']}, {args.threads} thread(s), torch {torch.__version__}; load average "
          f"{result['load_before']} before, {result['load_after']} after; {result['cpu_s_total']} CPU s in all\n")
    print(f"KV cache, phi-3-small-8k (32 layers), float16, {args.context} tokens: full "
          f"{kv['full_bytes'] / mib:,.0f} MiB, head-aware {kv['head_aware_bytes'] / mib:,.0f} MiB "
          f"({kv['saved_total']:.1%} less; {kv['saved_sparse_layers']:.1%} less in the 16 sparse layers)\n")
    t = times
    print("| attention of one layer, CPU s (median) | blocksparse (layer 0) | dense (layer 1) | dense / sparse |")
    print("|---|---:|---:|---:|")
    rows = [(f"prefill {args.context} tokens", "prefill_sparse_s", "prefill_dense_s")]
    rows += [(f"decode 1 token at {args.context}, {name} cache", f"decode_sparse_{lab}_s", f"decode_dense_{lab}_s")
             for name, lab in (("float32", "f32"), ("float16", "f16"), ("head-aware float16", "head_aware_f16"))]
    for name, s, d in rows:
        print(f"| {name} | {t[s]:.4f} | {t[d]:.4f} | {t[d] / t[s]:.2f}x |")
    print(f"\nPrefill wall seconds (median): blocksparse {t['prefill_sparse_wall_s']:.3f}, dense "
          f"{t['prefill_dense_wall_s']:.3f} ({t['prefill_dense_wall_s'] / t['prefill_sparse_wall_s']:.2f}x)")
    if "prefill_baseline_sparse_s" in t:
        print(f"Baseline {args.baseline}: blocksparse prefill {t['prefill_baseline_sparse_s']:.4f} CPU s, "
              f"{t['prefill_baseline_sparse_wall_s']:.3f} wall s (dense / baseline "
              f"{t['prefill_dense_s'] / t['prefill_baseline_sparse_s']:.2f}x CPU, "
              f"{t['prefill_dense_wall_s'] / t['prefill_baseline_sparse_wall_s']:.2f}x wall)")


if __name__ == "__main__":
    main()
