"""GB/s of phi3's packed Q4_0 matmul at one row (decoding), per phi-3 matrix shape.

    python benchmarks/bench_gemv.py [SHAPE-SUBSTRING | sweep]

Random weights (speed does not depend on values); four layers of each shape, more than the L3
cache, so every call streams its weights from memory as real decoding does. `sweep` holds the
weight size of phi-3-medium's down projection and varies the row length K.
"""

from __future__ import annotations

import sys
import time

import torch

from phi3 import quant

SHAPES = {"mini qkv": (9216, 3072), "mini gate_up": (16384, 3072), "mini down": (3072, 8192),
          "medium qkv": (7680, 5120), "medium gate_up": (35840, 5120), "medium down": (5120, 17920)}


def random_layer(n: int, k: int) -> quant.QuantLinear:
    qs = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    d = (torch.rand(n, k // 32) * 0.01 + 0.001).half()
    return quant.QuantLinear("q4_0", qs, d, None, None, k, n)


def gb_per_s(n: int, k: int, seconds: float = 2.0) -> float:
    layers = [random_layer(n, k) for _ in range(4)]
    x = torch.randn(1, 1, k)
    for layer in layers:
        layer(x)
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for layer in layers:
            layer(x)
        reps += 1
    per_call = (time.perf_counter() - start) / (reps * len(layers))
    return layers[0].weight_bytes / 1e9 / per_call


def main() -> None:
    torch.set_num_threads(2)
    if quant.kernel() is None:
        sys.exit(f"phi3's kernels are unavailable: {quant.kernel_error()}")
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    if which == "sweep":
        for k in (4096, 8192, 12288, 17920, 24576):
            n = 5120 * 17920 // k // 32 * 32
            print(f"K={k:6d} N={n:6d} {gb_per_s(n, k, 1.5):6.1f} GB/s")
        return
    for name, (n, k) in SHAPES.items():
        if which in name:
            print(f"{name:15s} N={n:6d} K={k:6d} {gb_per_s(n, k):6.1f} GB/s")


if __name__ == "__main__":
    main()
