"""GB/s of phi3's packed Q4_0 matmul at one row (decoding), per phi-3 matrix shape.

    python benchmarks/bench_gemv.py [SHAPE-SUBSTRING | sweep] [--build NAME ...] [--rounds N]

Random weights (speed does not depend on values); four layers of each shape, more than the L3
cache, so every call streams its weights from memory as real decoding does. `sweep` holds the
weight size of phi-3-medium's down projection and varies the row length K.

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

import torch

from phi3 import cpu_kernels, quant

SHAPES = {"mini qkv": (9216, 3072), "mini gate_up": (16384, 3072), "mini down": (3072, 8192),
          "medium qkv": (7680, 5120), "medium gate_up": (35840, 5120), "medium down": (5120, 17920)}


def random_layer(n: int, k: int) -> quant.QuantLinear:
    qs = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    d = (torch.rand(n, k // 32) * 0.01 + 0.001).half()
    return quant.QuantLinear("q4_0", qs, d, None, None, k, n)


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


def measure(label: str, n: int, k: int, builds: dict[str, Any], rounds: int, seconds: float) -> None:
    layers = [random_layer(n, k) for _ in range(4)]
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
    parser.add_argument("--build", action="append", choices=["avx512", "avx2", "neon"],
                        help="kernel build to measure (repeatable); default: the one phi3 picks")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per build (default 1; 5 with several)")
    args = parser.parse_args()
    torch.set_num_threads(2)
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
            measure(f"K={k:6d} N={n:6d}", n, k, builds, rounds, seconds * 0.75)
        return
    for name, (n, k) in SHAPES.items():
        if args.which in name:
            measure(f"{name:15s} N={n:6d} K={k:6d}", n, k, builds, rounds, seconds)


if __name__ == "__main__":
    main()
