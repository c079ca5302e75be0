"""phi3's training step against litgpt's, in one process, by CPU time and by op: where phi3 loses
(or wins) on the phi3-shape benchmark. Runs in litgpt's venv (same torch, 2.13), importing phi3
from this checkout:

    /work/venv-litgpt/bin/python benchmarks/train_baselines/profile_vs_litgpt.py [--precision bfloat16]
        [--reps 5] [--docs 2] [--trace]

phi3 side: the trainer's own micro-step (phi3.train.trainer._lm_micro_step: packed rows with
document_ids, autocast, bf16 logits into the chunked float32 loss) then clip + make_optimizer's
fused AdamW + zero_grad, as trainer.run does. litgpt side: what litgpt.pretrain.fit does under
Fabric's bf16-mixed plugin (autocast around the forward, the output cast to float32 by
convert_output, chunked_cross_entropy, clip_grad_norm_, torch.optim.AdamW with its defaults (the
single-tensor loop on a CPU), zero_grad). Same shape (4 x 512, 8 heads, SwiGLU 1376, vocab 49,152,
tied head), same rows. Parts are CPU seconds of this process (time.process_time), interleaved,
medians; --trace prints torch.profiler's self-CPU time per op for one step of each, side by side
(the profiler's times are wall times: on a busy machine read them as proportions only). Both sides
share this process's glibc malloc, so the system time `phi3 train` saves by keeping freed memory
(phi3.train.trainer._reuse_freed_memory) does not show here; benchmarks/train_throughput.py shows it.

Measured (2026-12-02, Xeon with AVX-512 BF16, 1 thread, load 7, medians of 3, CPU-s per step):
phi3 9.20 (fwd+loss+bwd 9.10, clip+AdamW 0.10), litgpt 9.77 (9.47, 0.30). aten::mm is ~77% of
both (the same FLOPs: 51 calls against litgpt's 63 with its unfused MLP), and the tied head's three
[2048 x 512 x 49,152] bf16 matmuls alone are 4.2 of the 9.2 CPU-s (about 70 GFLOP/s each, whatever
the operand layout); loss forward+backward 0.9 CPU-s (litgpt's chunked F.cross_entropy about 1.5).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--docs", type=int, default=2, help="documents per packed row on phi3's side (1: is_causal)")
    ap.add_argument("--only", default="", help="comma-separated substrings of the variants to run")
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--rows", type=int, default=30, help="rows of the --trace table")
    a = ap.parse_args()

    from litgpt.config import Config
    from litgpt.model import GPT
    from litgpt.utils import chunked_cross_entropy

    from phi3.train.data import Batch
    from phi3.train.recipe import preset_config
    from phi3.train.trainer import _lm_micro_step, _Precision, make_optimizer

    torch.manual_seed(0)
    B, T = a.batch, a.seq_len
    bf16 = a.precision == "bfloat16"
    cfg, _ = preset_config("phi-3-mini:layers=4,hidden=512,heads=8,kv_heads=8,intermediate=1376,vocab=49152,"
                           "tie_word_embeddings=true")
    from phi3.model import Transformer
    ours = Transformer(cfg)
    ours.init_weights()
    ours.train()
    prec = _Precision(a.precision, "none", torch.device("cpu"))
    prec.float_logits = not bf16
    optim = SimpleNamespace(lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours_opt = make_optimizer(ours, optim, torch.device("cpu"))

    lcfg = Config.from_name("Phi-3-mini-4k-instruct", n_layer=4, n_embd=512, n_head=8, n_query_groups=8,
                            intermediate_size=1376, vocab_size=49152, padded_vocab_size=49152,
                            sliding_window_size=None)
    lit = GPT(lcfg)
    lit.transformer.wte.weight = lit.lm_head.weight  # TrainArgs(tie_embeddings=True)
    lit.max_seq_length = T
    lit.train()
    lit_opt = torch.optim.AdamW(lit.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))

    ids = torch.randint(0, 49152, (B, T + 1))
    x, y = ids[:, :T].contiguous(), ids[:, 1:].contiguous()
    docs = (torch.arange(T) * a.docs // T).expand(B, T).contiguous()
    batch = Batch(input_ids=x, labels=y, document_ids=docs)
    auto = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else \
        (lambda: torch.autocast("cpu", enabled=False))
    clock = time.process_time

    def phi3_step():
        t0 = clock()
        _lm_micro_step(ours, batch, torch.device("cpu"), prec, 1.0 / (B * T))
        t1 = clock()
        torch.nn.utils.clip_grad_norm_([p for p in ours.parameters() if p.requires_grad], 1.0)
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        t2 = clock()
        return {"fwd+loss+bwd": t1 - t0, "clip+AdamW": t2 - t1, "step": t2 - t0}

    def lit_step():
        t0 = clock()
        with auto():
            logits = lit(x)
        logits = logits.float()  # Fabric's MixedPrecision.convert_output
        loss = chunked_cross_entropy(logits, y)
        loss.backward()
        t1 = clock()
        torch.nn.utils.clip_grad_norm_(lit.parameters(), 1.0)
        lit_opt.step()
        lit_opt.zero_grad()
        t2 = clock()
        return {"fwd+loss+bwd": t1 - t0, "clip+AdamW": t2 - t1, "step": t2 - t0}

    variants = {"phi3": phi3_step, "litgpt": lit_step}
    if a.only:
        variants = {k: v for k, v in variants.items() if any(o in k for o in a.only.split(","))}
    for f in variants.values():  # warm-up: allocator, optimizer state
        f()
    parts: dict[str, dict[str, list[float]]] = {k: defaultdict(list) for k in variants}
    for _ in range(a.reps):
        for name, f in variants.items():
            for k, v in f().items():
                parts[name][k].append(v)
    print(f"{a.precision}, B={B} T={T}, phi3 docs/row {a.docs}, {torch.get_num_threads()} threads, "
          f"medians of {a.reps} (CPU seconds); load {open('/proc/loadavg').read().split()[:3]}")
    keys = ["fwd+loss+bwd", "clip+AdamW", "step"]
    print(f"{'':10s}" + "".join(f"{k:>14s}" for k in keys))
    for name, p in parts.items():
        print(f"{name:10s}" + "".join(f"{statistics.median(p[k]):14.3f}" for k in keys))
    if a.trace:
        from torch.profiler import ProfilerActivity, profile
        tables = {}
        for name, f in variants.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                f()
            tables[name] = {e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()}
        names = list(tables)
        allk = sorted({k for t in tables.values() for k in t},
                      key=lambda k: -max(t.get(k, (0, 0))[0] for t in tables.values()))
        print(f"\nself CPU seconds per op, one step ({', '.join(names)}):")
        print(f"{'op':44s}" + "".join(f"{n:>12s}{'calls':>7s}" for n in names))
        for k in allk[:a.rows]:
            print(f"{k[:44]:44s}" + "".join(f"{tables[n].get(k, (0, 0))[0]:12.3f}{tables[n].get(k, (0, 0))[1]:7d}"
                                           for n in names))
        print(f"{'total':44s}" + "".join(f"{sum(v[0] for v in tables[n].values()):12.3f}{'':7s}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
