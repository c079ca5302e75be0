"""litgpt's pretraining loop (`litgpt.pretrain.setup`, litgpt 0.5.13) on the benchmark's token
stream: an adapter run by benchmarks/train_throughput.py in its own venv (litgpt pins its own
dependencies, so it never goes into phi3's .venv):

    python -m venv /work/venv-litgpt
    /work/venv-litgpt/bin/pip install torch==2.13.0 litgpt==0.5.13

What the adapter changes around litgpt's own loop, and why:
  - data: a litgpt DataModule over the stream (rows of seq_len + 1 consecutive tokens, no shuffle),
    the rows every other trainer here sees, instead of litdata shards;
  - torch.compile: litgpt's pretrain always compiles; the default here runs it eager like every
    other trainer (phi3's recipe default compile=false, HF Trainer's torch_compile=False, nanoGPT
    --compile=False); `--compile` keeps litgpt's compile;
  - model: litgpt's Phi-3 config resized (sliding_window_size dropped: 2048 never binds at seq 512,
    and litgpt would otherwise build an explicit mask), or its SmolLM2-135M config; the head tied to
    the embedding in both (as SmolLM2 does, and as nanoGPT always does; the harness ties it for
    every trainer); random init (litgpt's initialize_weights): throughput does not depend on the values;
  - no final checkpoint (after the timed steps; see below);
  - timing: a post-hook on the optimizer prints `STEP <i> <seconds>` from one step's end to the
    next (the first from the optimizer's creation), the same span the other adapters time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["phi3-shape", "smollm2-135m"], required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1376)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--tokens", required=True, help="uint16 token stream (nanoGPT's train.bin layout)")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    import litgpt.pretrain as lp
    from litgpt.args import EvalArgs, TrainArgs
    from litgpt.config import Config
    from litgpt.data import DataModule

    T, B = a.seq_len, a.batch
    stream = np.memmap(a.tokens, dtype=np.uint16, mode="r")
    n_rows = a.steps * B
    need = n_rows * T + 1
    reps = -(-need // len(stream))
    flat = torch.from_numpy(np.tile(np.asarray(stream, dtype=np.int64), reps)[:need])
    rows = torch.stack([flat[i * T:(i + 1) * T + 1] for i in range(n_rows)])

    class Rows(DataModule):
        def connect(self, tokenizer=None, batch_size: int = 1, max_seq_length: int | None = None, **kw) -> None:
            self.batch_size = batch_size

        def train_dataloader(self):
            return torch.utils.data.DataLoader(rows, batch_size=self.batch_size, shuffle=False)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(rows[:2 * self.batch_size], batch_size=self.batch_size)

    if a.model == "smollm2-135m":
        config = Config.from_name("SmolLM2-135M")
    else:
        config = Config.from_name("Phi-3-mini-4k-instruct", n_layer=a.layers, n_embd=a.hidden, n_head=a.heads,
                                  n_query_groups=a.heads, intermediate_size=a.intermediate, vocab_size=a.vocab,
                                  padded_vocab_size=a.vocab, sliding_window_size=None)

    if not a.compile:
        lp.torch.compile = lambda model, *args, **kw: model  # litgpt.pretrain compiles unconditionally

    make_optimizer = lp.instantiate_torch_optimizer

    def timed_optimizer(*args, **kw):
        opt = make_optimizer(*args, **kw)
        last = [time.perf_counter()]
        count = [0]

        def hook(*_):
            now = time.perf_counter()
            count[0] += 1
            print(f"STEP {count[0]} {now - last[0]:.6f}", flush=True)
            last[0] = now

        opt.register_step_post_hook(hook)
        return opt

    lp.instantiate_torch_optimizer = timed_optimizer
    # The final checkpoint comes after the last timed step, and litgpt's save_hyperparameters
    # re-reads sys.argv as litgpt's own CLI (it fails on this adapter's flags): skip it.
    lp.save_checkpoint = lambda *args, **kw: print("final checkpoint skipped (not timed)", flush=True)

    torch.manual_seed(0)
    lp.setup(
        model_name=config.name, model_config=config, out_dir=Path(a.out),
        precision="bf16-mixed" if a.precision == "bfloat16" else "32-true",
        data=Rows(),
        train=TrainArgs(save_interval=None, log_interval=1, global_batch_size=B, micro_batch_size=B,
                        max_tokens=n_rows * T, lr_warmup_steps=1, max_seq_length=T, tie_embeddings=True,
                        max_norm=1.0, min_lr=3e-5),
        eval=EvalArgs(interval=10**9, max_iters=1, initial_validation=False, final_validation=False),
        optimizer={"class_path": "torch.optim.AdamW",
                   "init_args": {"lr": 3e-4, "weight_decay": 0.1, "betas": (0.9, 0.95)}},
        devices=1, logger_name="csv", seed=0,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
