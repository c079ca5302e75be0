"""GB/s of phi3's packed matmul at one row (decoding), per phi-3 matrix shape and block type.

    python benchmarks/bench_gemv.py [SHAPE-SUBSTRING | sweep] [--type TYPE] [--build NAME ...] [--rounds N]
                                    [--threads N]

Random weights (speed does not depend on values); four layers of each shape, more than the L3
cache, so every call streams its weights from memory as real decoding does. `sweep` holds the
weight size of phi-3-medium's down projection and varies the row length K.

--type: the GGUF block type (q4_0 by default; any of phi3's kernel types). GB/s counts the
bytes the packed weight holds (codes, high bits and scales).

--build (avx512, avx2, neon; repeatable) measures those kernel builds instead of the one phi3
picks; with several, their rounds alternate on each shape and the medians are reported, since on
a shared machine memory bandwidth drifts by tens of percent within minutes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import gguf
import numpy as np
import torch

from phi3 import cpu_kernels, quant

SHAPES = {"mini qkv": (9216, 3072), "mini gate_up": (16384, 3072), "mini down": (3072, 8192),
          "medium qkv": (7680, 5120), "medium gate_up": (35840, 5120), "medium down": (5120, 17920)}


# Byte offsets of each block type's half-precision scales, set to finite values in random blocks.
HALVES = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q5_K": [0, 2],
          "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}


def random_layer(kind: str, n: int, k: int) -> quant.QuantLinear:
    """Random GGUF blocks of `kind`, loaded as phi3 loads a file's tensor."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    raw = np.random.default_rng(0).integers(0, 256, (n * k // block, size), dtype=np.uint8)
    for at in HALVES[kind]:
        raw[:, at:at + 2] = np.full((len(raw), 1), 0.005, np.float16).view(np.uint8)
    return quant.from_gguf_blocks(kind, raw.reshape(-1), n, k)


def gb_per_s(layers: list[quant.QuantLinear], ext: Any, seconds: float) -> float:
    """Weight bytes streamed per second by `ext`'s kernel, cycling through `layers`."""
    cpu_kernels._ext = ext  # the build QuantLinear.forward calls
    x = torch.randn(1, 1, layers[0].in_features)
    for layer in layers:
        layer(x)
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for layer in layers:
            layer(x)
        reps += 1
    per_call = (time.perf_counter() - start) / (reps * len(layers))
    return layers[0].weight_bytes / 1e9 / per_call


def measure(label: str, kind: str, n: int, k: int, builds: dict[str, Any], rounds: int, seconds: float) -> None:
    layers = [random_layer(kind, n, k) for _ in range(4)]
    results: dict[str, list[float]] = {name: [] for name in builds}
    for _ in range(rounds):
        for name, ext in builds.items():
            results[name].append(gb_per_s(layers, ext, seconds))
    cells = [f"{name} {statistics.median(v):6.1f} GB/s" + (f" ({min(v):.1f}-{max(v):.1f})" if len(v) > 1 else "")
             for name, v in results.items()]
    print(f"{label}  " + "  ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="", help="a substring of the shapes' names, or `sweep`")
    parser.add_argument("--type", default="q4_0", choices=[k.lower() for k in quant.PACKED_KINDS],
                        help="GGUF block type (default q4_0)")
    parser.add_argument("--build", action="append", choices=["avx512", "avx2", "neon"],
                        help="kernel build to measure (repeatable); default: the one phi3 picks")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per build (default 1; 5 with several)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.build:
        try:
            builds = {name: cpu_kernels.load_build(name) for name in args.build}
        except RuntimeError as e:
            sys.exit(f"phi3: {e}")
    else:
        if cpu_kernels.kernel() is None:
            sys.exit(f"phi3's kernels are unavailable: {cpu_kernels.kernel_error()}")
        builds = {cpu_kernels.kernel_isa(): cpu_kernels.kernel()}
    rounds = args.rounds or (5 if len(builds) > 1 else 1)
    seconds = 2.0 if rounds == 1 else 0.5  # per build, round and shape
    if args.which == "sweep":
        for k in (4096, 8192, 12288, 17920, 24576):
            n = 5120 * 17920 // k // 32 * 32
            measure(f"{args.type} K={k:6d} N={n:6d}", args.type.upper(), n, k, builds, rounds, seconds * 0.75)
        return
    for name, (n, k) in SHAPES.items():
        if args.which in name:
            measure(f"{args.type} {name:15s} N={n:6d} K={k:6d}", args.type.upper(), n, k, builds, rounds, seconds)


if __name__ == "__main__":
    main()
