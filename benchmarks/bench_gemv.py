"""GB/s of phi3's packed matmul at one row (decoding), per phi-3 matrix shape and block type.

    python benchmarks/bench_gemv.py [SHAPE-SUBSTRING | sweep] [--type TYPE] [--build NAME ...] [--rounds N]
                                    [--threads N] [--rows M] [--baseline DIR]

Random weights (speed does not depend on values); four layers of each shape, more than the L3
cache, so every call streams its weights from memory as real decoding does. `sweep` holds the
weight size of phi-3-medium's down projection and varies the row length K.

--type: the GGUF block type (q4_0 by default; any of phi3's kernel types). GB/s counts the
bytes the packed weight holds (codes, high bits and scales).

--build (avx512, avx2, neon; repeatable) measures those kernel builds instead of the one phi3
picks; with several, their rounds alternate on each shape and the medians are reported, since on
a shared machine memory bandwidth drifts by tens of percent within minutes.

Times are CPU time (time.process_time, all of the process's threads together), not wall time: on a
machine shared with other jobs wall time swings by 2x between rounds, CPU time by a few percent. So
with --threads 2 the GB/s are per CPU-second (about half the wall-clock figure of an idle machine);
--threads 1 gives the one-core speed. Each cell also gives the CPU milliseconds per matrix.

--rows M multiplies M activation rows at once (a prompt: 512 is a phi-3 prefill) and reports
rows per second (tok/s of that one matrix) instead of GB/s.

--baseline DIR also builds each --build from the kernel sources in DIR (a copy of an older
phi3/kernels/, e.g. `git show REV:phi3/kernels/quant_core.h`), named `<build>-base`, and alternates
it with the current one: an A/B in one process, which a shared machine's drift cannot skew. (Sources
from before block_matmul's `decode` argument, 2026-12-02, no longer fit QuantLinear's call.)
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path
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


def load_baseline(name: str, source: Path) -> Any:
    """Kernel build `name` compiled from the quant_cpu.cpp and quant_core.h in `source`."""
    from torch.utils.cpp_extension import load
    files = [source / "quant_cpu.cpp", source / "quant_core.h"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        sys.exit(f"phi3: --baseline {source}: no {', '.join(missing)}; copy an older phi3/kernels/ there")
    flags = cpu_kernels._compiler_flags(name)
    digest = hashlib.sha1(b"".join(f.read_bytes() for f in files) + " ".join(flags).encode()).hexdigest()[:10]
    build = Path.home() / ".cache" / "phi3" / "kernels" / f"base-{name}-{digest}"
    build.mkdir(parents=True, exist_ok=True)
    return load(name=f"phi3_quant_base_{name}", sources=[str(files[0])], build_directory=str(build),
                extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)


def gb_per_s(layers: list[quant.QuantLinear], ext: Any, seconds: float, rows: int = 1) -> float:
    """Weight bytes streamed per CPU-second by `ext`'s kernel, cycling through `layers`, `rows`
    activation rows per call."""
    cpu_kernels._ext = ext  # the build QuantLinear.forward calls
    x = torch.randn(1, rows, layers[0].in_features)
    for layer in layers:
        layer(x)
    start, reps = time.process_time(), 0
    while time.process_time() - start < seconds:
        for layer in layers:
            layer(x)
        reps += 1
    per_call = (time.process_time() - start) / (reps * len(layers))
    return layers[0].weight_bytes / 1e9 / per_call


def measure(label: str, kind: str, n: int, k: int, builds: dict[str, Any], rounds: int, seconds: float,
            rows: int = 1) -> None:
    layers = [random_layer(kind, n, k) for _ in range(4 if rows == 1 else 1)]  # prompts reuse weights anyway
    results: dict[str, list[float]] = {name: [] for name in builds}
    for _ in range(rounds):
        for name, ext in builds.items():
            results[name].append(gb_per_s(layers, ext, seconds, rows))
    if rows > 1:  # a prompt: compute-bound, so rows (tokens) per second of this one matrix
        per_row = rows / (layers[0].weight_bytes / 1e9)  # GB/s -> rows per second
        results = {name: [g * per_row for g in v] for name, v in results.items()}
    unit = "rows/s" if rows > 1 else "GB/s"
    ms = {name: layers[0].weight_bytes / 1e6 / statistics.median(v) if rows == 1 else rows * 1e3 / statistics.median(v)
          for name, v in results.items()}  # CPU ms per matrix (per call)
    cells = [f"{name} {statistics.median(v):6.1f} {unit}" + (f" ({min(v):.1f}-{max(v):.1f})" if len(v) > 1 else "")
             + f" {ms[name]:.3f} ms" for name, v in results.items()]
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
    parser.add_argument("--rows", type=int, default=1, help="activation rows per call (default 1: decoding)")
    parser.add_argument("--baseline", type=Path, help="folder with older quant_cpu.cpp, quant_core.h to A/B against")
    args = parser.parse_args()
    if args.rows < 1:
        sys.exit(f"phi3: --rows must be at least 1, got {args.rows}")
    if args.baseline and not args.build:
        sys.exit("phi3: --baseline needs --build NAME: the build to compile from both sources")
    torch.set_num_threads(args.threads)
    if args.build:
        try:
            builds = {}
            for name in args.build:
                if args.baseline:
                    builds[f"{name}-base"] = load_baseline(name, args.baseline)
                builds[name] = cpu_kernels.load_build(name)
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
            measure(f"{args.type} K={k:6d} N={n:6d}", args.type.upper(), n, k, builds, rounds, seconds * 0.75, args.rows)
        return
    for name, (n, k) in SHAPES.items():
        if args.which in name:
            measure(f"{args.type} {name:15s} N={n:6d} K={k:6d}", args.type.upper(), n, k, builds, rounds, seconds,
                    args.rows)


if __name__ == "__main__":
    main()
