"""The whole phi-3-small-8k shape at 4 bits, random weights (issue 17's benchmark): prefill and
decode speed, peak RSS and KV-cache bytes at 1K and 8K context, with and without the head-aware cache.

Run it from the repository root:

    .venv/bin/python benchmarks/bench_small_model.py --gguf /tmp/small-q4_0.gguf --contexts 1024,8192 \
        [--new-tokens 32] [--threads 2] [--no-head-aware] [--dry-run [--prefill-layers 2]] [--json-out F]

If --gguf does not exist it is built first (`phi3 bench --shape phi-3-small`'s file: all 32 layers,
every matrix Q4_0, ~4.3 GB; --layers N for fewer), then reused. For each context C, in a fresh
process (so VmHWM is that run's): load; prefill a random prompt of C - new_tokens tokens in one
forward into a full float16 cache of C positions (as `phi3 generate` runs a prompt), wall and CPU
seconds; decode --new-tokens greedily; then copy the prompt's keys into a head-aware cache and feed the
same tokens again (each step's argmax must be the same, the logits equal up to rounding). KV bytes
are the caches' allocated tensors, checked against model_small.kv_cache_bytes.

--dry-run runs the prompt through the first --prefill-layers layers only (the CPU seconds of all
layers are extrapolated from them) and decodes from a cache filled with random keys: the decode
figures at that context and the prefill's cost, in a fraction of the time. The 8K prefill of the
whole model is ~125 TFLOP of matmuls (8128 tokens x 32 layers x ~0.44 GFLOP): many minutes on 2 cores.

Printed: one JSON object per context (--json-out appends them to a file), then a Markdown table with
the machine (CPU model, AVX-512 VNNI) and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi3.bench import _prepare, bench_contexts  # noqa: E402
from phi3.errors import Phi3Error  # noqa: E402


def machine() -> str:
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vnni = "yes" if "avx512_vnni" in flags else "no"
    return f"{model}, {os.cpu_count()} CPUs, AVX-512 VNNI {vnni}"


def table(results: list[dict]) -> str:
    rows = ["| context | prompt | prefill tok/s (wall) | prefill CPU s | decode tok/s (wall) | decode CPU s / token "
            "| head-aware decode tok/s | head-aware CPU s / token | same argmax | KV full MiB | KV head-aware MiB "
            "| peak RSS MB | load avg before / after |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in results:
        if r["dry_run"]:
            pre = (f"dry: {r['prefill_layers']} layers {r['prefill_partial_s']} s", f"{r['prefill_partial_cpu_s']} "
                   f"(all: ~{r['prefill_cpu_s_estimated']:.0f})")
        else:
            pre = (str(r["prefill_tok_s"]), str(r["prefill_cpu_s"]))
        mib = lambda b: f"{b / 2**20:,.0f}" if b is not None else "-"  # noqa: E731
        rows.append(f"| {r['context']} | {r['prompt_tokens']} | {pre[0]} | {pre[1]} | {r['decode_tok_s']} "
                    f"| {r['decode_cpu_s_per_token']} | {r.get('ha_decode_tok_s', '-')} "
                    f"| {r.get('ha_decode_cpu_s_per_token', '-')} | {r.get('ha_same_argmax', '-')} "
                    f"| {mib(r['kv_bytes_full'])} | {mib(r.get('kv_bytes_head_aware'))} | {r['peak_rss_mb']:,.0f} "
                    f"| {'/'.join(f'{x:.1f}' for x in r['load_avg_before'])} → "
                    f"{'/'.join(f'{x:.1f}' for x in r['load_avg_after'])} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default="/tmp/small-q4_0.gguf", help="the Q4_0 file; built if absent")
    ap.add_argument("--layers", type=int, default=None, help="when building: keep only the first N layers")
    ap.add_argument("--contexts", default="1024,8192", help="comma-separated context lengths (default 1024,8192)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens decoded at each context (default 32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-head-aware", action="store_true", help="skip the head-aware cache's decode")
    ap.add_argument("--dry-run", action="store_true",
                    help="prefill only --prefill-layers layers (extrapolated) and decode from a random-filled cache")
    ap.add_argument("--prefill-layers", type=int, default=2)
    ap.add_argument("--json-out", default=None, help="append each context's JSON object to this file")
    args = ap.parse_args(argv)
    try:
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    except ValueError:
        print(f"bench_small_model: --contexts {args.contexts!r} is not a comma-separated list of integers",
              file=sys.stderr)
        return 2
    try:
        path = Path(args.gguf)
        if not path.exists():
            t, c = time.perf_counter(), time.process_time()
            _prepare("phi-3-small", args.layers, "q4_0", path, quiet=False)
            print(f"built {path}: {time.perf_counter() - t:.0f} s wall, {time.process_time() - c:.0f} CPU s",
                  file=sys.stderr)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        results = bench_contexts(path, contexts, args.new_tokens, args.threads, not args.no_head_aware,
                                 args.dry_run, args.prefill_layers)
    except Phi3Error as e:
        print(f"bench_small_model: {e}", file=sys.stderr)
        return 2
    info = {"started": started, "ended": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "machine": machine(), "gguf": str(path)}
    for r in results:
        r.update(info)
        print(json.dumps(r))
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(f"\n{info['started']} to {info['ended']}; {info['machine']}; {path}\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
