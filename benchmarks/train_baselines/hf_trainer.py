"""Hugging Face Trainer on the benchmark's token stream (an adapter run by
benchmarks/train_throughput.py in /work/main/.venv; transformers 5.x).

The model is either a Hugging Face folder (SmolLM2-135M, `--model-dir`) or a config.json written by
the harness (the resized Phi-3 shape, `--config-json`, random init). Rows are consecutive
seq_len-token windows of the stream (labels = input_ids: transformers shifts them itself), no
shuffling, so every trainer sees the same tokens. Prints one `STEP <i> <seconds>` line per
optimizer step: the wall time from the end of the previous step (or from the first step's start)
to the end of this one, so data loading, forward, backward, clipping and AdamW are all inside it,
as in phi3's metrics.jsonl and nanoGPT's `time` column.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir")
    ap.add_argument("--config-json")
    ap.add_argument("--tokens", required=True, help="uint16 token stream (nanoGPT's train.bin layout)")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    from transformers import (AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback,
                              TrainingArguments)

    torch.manual_seed(0)
    if a.model_dir:
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    else:
        config = AutoConfig.from_pretrained(a.config_json)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    print(f"PARAMS {sum(p.numel() for p in model.parameters())}", flush=True)

    data = np.memmap(a.tokens, dtype=np.uint16, mode="r")
    T, n_rows = a.seq_len, a.steps * a.batch
    need = n_rows * T
    # Wrap around a short stream rather than train on fewer rows (same rule as the other adapters).
    reps = -(-need // len(data))
    ids = torch.from_numpy(np.tile(np.asarray(data, dtype=np.int64), reps)[:need]).view(n_rows, T)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n_rows

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": ids[i], "labels": ids[i], "attention_mask": torch.ones(T, dtype=torch.long)}

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.last = None

        def on_step_begin(self, args, state, control, **kw):
            if self.last is None:
                self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            print(f"STEP {state.global_step} {now - self.last:.6f}", flush=True)
            self.last = now

    args = TrainingArguments(
        output_dir=a.out, use_cpu=True, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
        max_steps=a.steps, learning_rate=3e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=1, bf16=a.precision == "bfloat16",
        logging_steps=10**9, save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[StepTimes()])
    # Trainer shuffles with a seeded RandomSampler; keep the stream's order like the others.
    trainer._get_train_sampler = lambda *_, **__: torch.utils.data.SequentialSampler(range(n_rows))
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
