"""Where a decode step's time goes: each compiled kernel's share (block matmuls, fused attention,
RMSNorm) against the whole step; the rest is PyTorch glue ops and Python.

    python benchmarks/profile_decode.py MODEL.gguf [--steps 64] [--prompt 64] [--threads 2]

(`phi3 bench --shape phi-3-mini --save-gguf mini.gguf` makes a phi-3-mini-shape file.)
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from phi3 import cpu_kernels, quant
from phi3.checkpoint import load
from phi3.generate import advance


class TimedKernels:
    """Stands in for the compiled extension and times every call by function name."""

    def __init__(self, ext) -> None:
        self._ext = ext
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __getattr__(self, name: str):
        fn = getattr(self._ext, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - t
            self.calls[name] += 1
            return out
        return timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load(args.model)
    model = lm.model
    tokens = torch.randint(0, model.config.vocab_size, (1, args.prompt + args.steps + 8),
                           generator=torch.Generator().manual_seed(0))
    timed = TimedKernels(quant.kernel())
    with torch.inference_mode():
        cache = model.new_cache(1, model.config.max_position_embeddings)
        logits = advance(model, cache, tokens[:, :args.prompt])
        length = args.prompt
        for _ in range(4):  # warm up
            length += 1
            logits = advance(model, cache, tokens[:, :length])
        cpu_kernels._ext = timed
        t = time.perf_counter()
        for _ in range(args.steps):
            tokens[0, length] = logits[0, -1].argmax()
            length += 1
            logits = advance(model, cache, tokens[:, :length])
        total = time.perf_counter() - t
    per_step = total / args.steps * 1e3
    print("| part | ms per token | share | calls per token |\n|---|---|---|---|")
    kernel_ms = 0.0
    for name, sec in sorted(timed.seconds.items(), key=lambda kv: -kv[1]):
        ms = sec / args.steps * 1e3
        kernel_ms += ms
        print(f"| {name} | {ms:.2f} | {ms / per_step:.1%} | {timed.calls[name] // args.steps} |")
    rest = per_step - kernel_ms
    print(f"| everything else (PyTorch glue, Python, argmax) | {rest:.2f} | {rest / per_step:.1%} | |")
    print(f"| **decode step** | **{per_step:.2f}** | 100% | ({1e3 / per_step:.1f} tok/s) |")


if __name__ == "__main__":
    main()
