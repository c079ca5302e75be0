"""Where a training step's time goes: phi3's step (the trainer's own micro-step: packed rows with
document_ids, phi3's float32 token losses, AdamW as phi3.train.trainer.make_optimizer builds it)
against the same step on transformers' Phi3ForCausalLM (HF Trainer's model and loss), part by
part, interleaved, medians of --reps. Also the variants a fix would pick between (no document
mask, F.cross_entropy, fused AdamW), and a torch.profiler table of one phi3 step (--trace).

    .venv/bin/python benchmarks/train_baselines/profile_step.py [--precision bfloat16] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="phi-3-mini:layers=4,hidden=512,heads=8,kv_heads=8,intermediate=1376,"
                                      "vocab=49152,tie_word_embeddings=true")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--docs", type=int, default=3, help="documents per packed row (phi3's document mask)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--trace", action="store_true", help="print torch.profiler's table for one phi3 step")
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, Phi3Config

    from phi3.model import Transformer
    from phi3.train.losses import token_losses
    from phi3.train.recipe import preset_config
    from phi3.train.trainer import param_groups

    torch.manual_seed(0)
    cfg, _ = preset_config(a.spec)
    ours = Transformer(cfg)
    ours.init_weights()
    ours.train()
    d = cfg.to_hf_dict()
    d["sliding_window"] = None
    hf = AutoModelForCausalLM.from_config(Phi3Config(**{k: v for k, v in d.items() if k != "architectures"}),
                                          dtype=torch.float32)
    hf.train()
    B, T = a.batch, a.seq_len
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    labels = torch.roll(ids, -1, 1)
    docs = (torch.arange(T) * a.docs // T).expand(B, T).contiguous()
    auto = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.precision == "bfloat16" else \
        (lambda: torch.autocast("cpu", enabled=False))

    def opt_for(model, **kw):
        return torch.optim.AdamW(param_groups(model, 0.1) if model is ours else model.parameters(),
                                 lr=1e-4, betas=(0.9, 0.95), **kw)

    variants = {
        # name: (model, forward -> logits, loss(logits) -> scalar, optimizer)
        "phi3 (trainer's step)": (ours, lambda: ours(ids, document_ids=docs), lambda lg: token_losses(lg, labels).sum() / (B * T),
                                  opt_for(ours, foreach=True)),
        "phi3, no document mask": (ours, lambda: ours(ids), lambda lg: token_losses(lg, labels).sum() / (B * T),
                                   opt_for(ours, foreach=True)),
        "phi3, F.cross_entropy": (ours, lambda: ours(ids, document_ids=docs),
                                  lambda lg: F.cross_entropy(lg.view(B * T, -1).float(), labels.view(-1)),
                                  opt_for(ours, foreach=True)),
        "phi3, fused AdamW": (ours, lambda: ours(ids, document_ids=docs), lambda lg: token_losses(lg, labels).sum() / (B * T),
                              opt_for(ours, fused=True)),
        "HF Phi3ForCausalLM": (hf, lambda: hf(input_ids=ids).logits,
                               lambda lg: F.cross_entropy(lg[:, :].reshape(B * T, -1).float(), labels.view(-1)),
                               opt_for(hf)),
    }
    parts = {k: {"forward": [], "loss": [], "backward": [], "clip+AdamW": [], "step": []} for k in variants}

    # CPU seconds of this process (all threads), not wall time: on a shared machine the wall
    # time of a part depends on what else runs; its CPU time much less.
    clock = time.process_time if a.clock == "cpu" else time.perf_counter

    def step(name):
        model, fwd, loss_fn, opt = variants[name]
        t0 = clock()
        with auto():
            logits = fwd()
        t1 = clock()
        loss = loss_fn(logits)
        t2 = clock()
        loss.backward()
        t3 = clock()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = clock()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0]

    for name in variants:  # warm-up (allocator, optimizer state)
        step(name)
    for _ in range(a.reps):
        for name in variants:
            for key, v in zip(parts[name], step(name)):
                parts[name][key].append(v)
    print(f"{a.precision}, B={B} T={T}, {torch.get_num_threads()} threads, medians of {a.reps} "
          f"({'CPU' if a.clock == 'cpu' else 'wall'} seconds):")
    keys = list(next(iter(parts.values())))
    print(f"{'':26s}" + "".join(f"{k:>12s}" for k in keys))
    for name, p in parts.items():
        print(f"{name:26s}" + "".join(f"{statistics.median(p[k]):12.3f}" for k in keys))
    if a.trace:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step("phi3 (trainer's step)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step("HF Phi3ForCausalLM")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
