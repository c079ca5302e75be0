"""Where a training step's time goes: phi3's step (the trainer's own micro-step: packed rows with
document_ids, phi3's float32 token losses, AdamW as phi3.train.trainer.make_optimizer builds it)
against the same step on transformers' Phi3ForCausalLM (HF Trainer's model and loss), part by
part, interleaved, medians of --reps. Also the variants a fix would pick between (one document
per row, F.cross_entropy, foreach AdamW, in bfloat16 float32 logits), and a torch.profiler table
of one phi3 step (--trace). `--spec smollm2` takes SmolLM2-135M's shape (1 row; HF side
LlamaForCausalLM); `--only` runs the variants whose names contain the given substrings.

    .venv/bin/python benchmarks/train_baselines/profile_step.py [--spec smollm2] [--precision bfloat16] [--reps 5]
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
SPECS = {
    "phi3-shape": "phi-3-mini:layers=4,hidden=512,heads=8,kv_heads=8,intermediate=1376,vocab=49152,"
                  "tie_word_embeddings=true",
    "smollm2": "phi-3-mini:layers=30,hidden=576,heads=9,kv_heads=3,intermediate=1536,vocab=49152,"
               "tie_word_embeddings=true,rope_theta=100000",
}
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="phi3-shape",
                    help="phi3-shape, smollm2 (SmolLM2-135M's shape: HF side is LlamaForCausalLM, as HF Trainer "
                         "trains it) or a phi3 preset spec")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=None, help="rows (default: 4 for phi3-shape, 1 for smollm2, "
                                                           "as benchmarks/train_throughput.py)")
    ap.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--docs", type=int, default=3, help="documents per packed row (phi3's document mask)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the variants they name")
    ap.add_argument("--trace", action="store_true", help="print torch.profiler's table for one phi3 step")
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

    from phi3.model import Transformer
    from phi3.train.losses import token_losses
    from phi3.train.recipe import preset_config
    from phi3.train.trainer import make_optimizer, param_groups

    torch.manual_seed(0)
    spec = SPECS.get(a.spec, a.spec)
    cfg, _ = preset_config(spec)
    ours = Transformer(cfg)
    ours.init_weights()
    ours.train()
    d = {k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"}
    d["sliding_window"] = None
    if a.spec == "smollm2":
        # SmolLM2-135M is a LlamaForCausalLM (separate q/k/v and gate/up projections), which is what
        # HF Trainer trains in the benchmark.
        hf_cfg = LlamaConfig(**{k: d[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                  "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                                                  "rope_theta") if k in d})
    else:
        hf_cfg = Phi3Config(**d)
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    hf.train()
    B = a.batch if a.batch is not None else (1 if a.spec == "smollm2" else 4)
    T = a.seq_len
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    labels = torch.roll(ids, -1, 1)
    docs = (torch.arange(T) * a.docs // T).expand(B, T).contiguous()
    one_doc = torch.zeros(B, T, dtype=torch.long)
    auto = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.precision == "bfloat16" else \
        (lambda: torch.autocast("cpu", enabled=False))

    def opt_for(model, **kw):
        return torch.optim.AdamW(param_groups(model, 0.1) if model is ours else model.parameters(),
                                 lr=1e-4, betas=(0.9, 0.95), **kw)

    bf16 = a.precision == "bfloat16"

    class _Optim:
        lr, betas, eps, weight_decay = 1e-4, (0.9, 0.95), 1e-8, 0.1

    hf_name = f"HF {type(hf).__name__}"
    variants = {
        # name: (model, forward -> logits, loss(logits) -> scalar, optimizer)
        # In bfloat16 the trainer keeps the head's bf16 logits (float_logits=False); the loss upcasts.
        "phi3 (trainer's step)": (ours, lambda: ours(ids, document_ids=docs, float_logits=not bf16),
                                  lambda lg: token_losses(lg, labels).sum() / (B * T),
                                  make_optimizer(ours, _Optim, torch.device("cpu"))),
        "phi3, one doc per row": (ours, lambda: ours(ids, document_ids=one_doc),
                                  lambda lg: token_losses(lg, labels).sum() / (B * T), opt_for(ours, fused=True)),
        "phi3, F.cross_entropy": (ours, lambda: ours(ids, document_ids=docs),
                                  lambda lg: F.cross_entropy(lg.view(B * T, -1).float(), labels.view(-1)),
                                  opt_for(ours, fused=True)),
        "phi3, foreach AdamW": (ours, lambda: ours(ids, document_ids=docs), lambda lg: token_losses(lg, labels).sum() / (B * T),
                                opt_for(ours, foreach=True)),
        # HF Trainer's default optimizer in transformers 5 is adamw_torch_fused.
        hf_name: (hf, lambda: hf(input_ids=ids).logits,
                  lambda lg: F.cross_entropy(lg[:, :].reshape(B * T, -1).float(), labels.view(-1)),
                  opt_for(hf, fused=True)),
    }
    if bf16:
        variants["phi3, float32 logits"] = (ours, lambda: ours(ids, document_ids=docs),
                                            lambda lg: token_losses(lg, labels).sum() / (B * T),
                                            opt_for(ours, fused=True))
    if a.only:
        keep = [k for k in variants if any(o in k for o in a.only.split(","))]
        variants = {k: variants[k] for k in keep}
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
    print(f"{'':28s}" + "".join(f"{k:>12s}" for k in keys))
    for name, p in parts.items():
        print(f"{name:28s}" + "".join(f"{statistics.median(p[k]):12.3f}" for k in keys))
    if a.trace:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(next(iter(variants)))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        if hf_name in variants:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(hf_name)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
