"""`phi3 train STAGE`: one training loop for pretrain, sft, dpo and longctx.

    phi3 train pretrain --model phi-3-mini:layers=4,hidden=256,heads=4 --tokenizer TOK --data a.txt --out runs/a
    phi3 train sft --model runs/a --data chat.jsonl --out runs/sft --epochs 2   (no budget: 1 epoch)
    torchrun --nproc-per-node 2 -m phi3.cli train pretrain ... (same command: RANK/WORLD_SIZE come from torchrun)

The loop, in order (nanoGPT's loop with torchtitan's pieces):
  1. process group (torchrun's env; gloo on the CPU, nccl on CUDA), seeded full model on the CPU;
  2. activation checkpointing, then DDP or FSDP2 (`fully_shard` per layer + root), then AdamW
     (created after wrapping: FSDP2 replaces the parameters by DTensors);
  3. per optimizer step: the global rows [s*G, (s+1)*G) of the deterministic data stream; this
     rank's micro-batches; forward/backward with gradient sync only on the last micro-batch; the
     loss is the sum of per-token losses divided by the label tokens of the WHOLE step (all
     micro-batches, all ranks), so 2 processes x 1 micro-batch equal 1 process x 2 micro-batches;
     clip, step, schedule;
  4. metrics.jsonl + tqdm on rank 0; numbered DCP checkpoints; at the end `final/` (a Hugging
     Face folder) and metrics.png.

Stages differ only in their data and loss:
  pretrain  packed documents (phi3.train.data.PackedStream), one stream per phase; weights,
            optimizer and the one LR schedule continue across phases;
  sft       chat jsonl, loss on assistant tokens only, packed the same way; lora.r > 0 trains peft
            adapters, merged into plain weights in final/;
  dpo       preference pairs; the reference log-probs are computed once, before the first step,
            with the initial model, and looked up by pair index; sigmoid loss with beta and label
            smoothing, TRL's reward metrics logged;
  longctx   LongRoPE's factor search on the loaded model (phi3.train.longrope), the new
            rope_scaling put into the model, then training on documents mixed with their first C
            tokens (the short rows, longctx.short_fraction of the tokens).

Budgets: a phase trains `steps`, `tokens` (rounded up to whole steps) or `epochs`, 1 epoch when
no budget is given. Epochs become steps here, once the sources are open (make_job): the rows the
packed stream produces until every document has been read that many times (epoch_rows, which
replays the packer on document lengths; dpo: pairs / global_batch_size), rounded up to whole
optimizer steps, the same on every rank (checked). The LR schedule and the warmup default use
those steps, and a resume compares them as it compares any other budget's.

precision = "bfloat16": autocast around the forward (alone and DDP), FSDP2's
MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) under fsdp; the parameters the
optimizer steps stay float32 either way.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from phi3.errors import Phi3Error
from phi3.train import ckpt
from phi3.train.parallel import (
    DistContext,
    apply_activation_checkpointing,
    apply_ddp,
    apply_fsdp,
    init_distributed,
    resolve_parallel,
    unwrapped_name,
)

STAGES = ("pretrain", "sft", "dpo", "longctx")
IGNORE = -100


# --- What the loop runs ---------------------------------------------------------------------------

@dataclass
class PhasePlan:
    """One phase of the data mixture: its number of optimizer steps and how to open its stream
    (a fresh, seeded PackedStream-like object: next_rows(n) -> Batch, state_dict, load_state_dict)."""

    name: str
    steps: int
    make_stream: Callable[[], Any]
    describe: Any = None  # JSON-able description (sources, weights, budget) a resume must match


@dataclass
class Job:
    """Everything `run` needs, built by `main` from a Recipe (tests build it directly)."""

    stage: str
    recipe: Any  # phi3.train.recipe.Recipe (or an object with the same attributes)
    model: nn.Module  # full model on the CPU, seeded; a peft model under LoRA
    config: Any  # phi3.config.ModelConfig of the model being trained (after longctx's rope change)
    tokenizer: Any
    phases: list[PhasePlan]
    lora: dict | None = None
    # DPO: reference log-probs, computed once before training (pair index -> (chosen, rejected)).
    dpo_reference: Any = None
    extra_state: dict = field(default_factory=dict)
    note: str | None = None  # one line rank 0 prints once the run is known to start (an epoch budget's steps)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)


# --- Optimizer ------------------------------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the matrices (attention, MLP, an untied head, LoRA's A and B);
    none on norms, biases and the embedding (nor the head tied to it): decaying the embedding pulls
    the rows of rare tokens toward zero (litgpt and OLMo exclude it too; nanoGPT decays every 2-D
    tensor). Names are the wrapper-free ones (phi3.train.parallel.unwrapped_name), so DDP, AC and
    compile do not change the grouping; named_parameters() lists a tied weight once, under the
    embedding's name."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        n = unwrapped_name(name).removeprefix("module.")
        (decay if p.dim() >= 2 and "embed_tokens" not in n else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _base_transformer(model: nn.Module) -> nn.Module:
    """The phi3 Transformer inside DDP / peft wrappers."""
    from phi3.model import Transformer
    for m in model.modules():
        if isinstance(m, Transformer):
            return m
    return model


def make_optimizer(model: nn.Module, optim: Any, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters) on CUDA and on the CPU, where torch 2.13 has
    it: clip + step of a 37.8M-parameter model took 0.15 CPU-s fused against 0.70 with the
    multi-tensor (foreach) path (benchmarks/train_baselines/profile_step.py). FSDP2's DTensor
    parameters keep the foreach path, which torch supports for them."""
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    fused = device.type in ("cuda", "cpu") and not sharded
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas),
                             eps=optim.eps, fused=True if fused else None, foreach=None if fused else True)


# --- Data helpers ---------------------------------------------------------------------------------

def step_batches(stream: Any, global_batch: int, micro_batch: int, world: int, rank: int) -> list[Any]:
    """This rank's micro-batches of the next optimizer step (phi3.train.data.global_step_batches)."""
    from phi3.train.data import global_step_batches
    return global_step_batches(stream, global_batch, micro_batch, world, rank)


def check_batch_sizes(global_batch: int, micro_batch: int, world: int) -> int:
    """Gradient-accumulation steps per rank; every rank must get the same number of micro-batches."""
    if global_batch <= 0 or micro_batch <= 0:
        raise Phi3Error(f"global_batch_size {global_batch} and micro_batch_size {micro_batch} must be positive")
    if global_batch % (micro_batch * world):
        raise Phi3Error(f"global_batch_size {global_batch} is not a multiple of micro_batch_size {micro_batch} "
                        f"x {world} processes; make it one (e.g. {micro_batch * world * max(1, global_batch // (micro_batch * world))})")
    return global_batch // (micro_batch * world)


# --- The loop -------------------------------------------------------------------------------------

class _Precision:
    def __init__(self, precision: str, parallel: str, device: torch.device) -> None:
        if precision not in ("float32", "bfloat16"):
            raise Phi3Error(f"precision = {precision!r} is not float32 or bfloat16 (float16 needs a grad "
                            "scaler, which FSDP2 does not support)")
        self.bf16 = precision == "bfloat16"
        # Under FSDP2, bf16 is its MixedPrecisionPolicy (weights all-gathered in bf16); elsewhere
        # autocast. Either way the optimizer steps float32 master weights.
        self.autocast = self.bf16 and parallel != "fsdp"
        self.device_type = device.type
        # Whether the training forward upcasts the logits to float32 itself; in bfloat16 the run
        # turns it off for phi3's Transformer (train(): its loss upcasts chunk by chunk instead).
        self.float_logits = True

    def __call__(self) -> contextlib.AbstractContextManager:
        if self.autocast:
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _sync_context(model: nn.Module, parallel: str, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce / reduce-scatter on every micro-batch but the last."""
    if parallel == "fsdp":
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if parallel == "ddp" and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def _lm_micro_step(model: nn.Module, batch: Any, device: torch.device, precision: _Precision,
                   scale: float) -> torch.Tensor:
    from phi3.train.losses import token_losses
    ids = batch.input_ids.to(device, non_blocking=True)
    labels = batch.labels.to(device, non_blocking=True)
    docs = batch.document_ids.to(device, non_blocking=True)
    with precision():
        if precision.float_logits:
            logits = model(ids, document_ids=docs)
        else:
            logits = model(ids, document_ids=docs, float_logits=False)
    loss_sum = token_losses(logits, labels).sum()
    (loss_sum * scale).backward()
    return loss_sum.detach().float()


def _count_labels(batches: Sequence[Any]) -> int:
    return int(sum(int((b.labels != IGNORE).sum()) for b in batches))


def _metrics_truncate(path: Path, last_step: int) -> None:
    """On resume, drop metrics of steps after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@contextlib.contextmanager
def _reuse_freed_memory(device: torch.device):
    """While training on a CPU, glibc keeps freed memory for reuse instead of handing it back.

    By default glibc serves a large tensor (above 32 MiB: the step's [B, T, vocab] logits and
    their gradient, 200 MB each in the benchmark's phi3-shape) from a fresh mmap and unmaps it
    when freed, and trims the heap's free top beyond 64 MiB; every step then faults the same
    memory in again, page by page, and the kernel zeroes it. phi3-shape bf16, 4 x 512 tokens,
    1 thread, same process, modes interleaved: ~300,000 minor faults and 0.65-0.86 s of system
    time per step (of ~9 CPU-s) by default; with the thresholds raised, 0 faults and 0.01 s, user
    time unchanged (8.20 against 8.25 s), peak RSS not higher (1,685 against 1,718 MiB): the step's
    allocations repeat, so the heap settles at the first step's peak. On leaving, the thresholds go
    back to the values glibc's dynamic threshold settles at (32 MiB mmap, 64 MiB trim) and the kept
    memory is returned (malloc_trim). No-op off glibc and on accelerators."""
    libc = None
    if device.type == "cpu" and sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc only: musl has neither)
        except (OSError, AttributeError):
            libc = None
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
            libc.malloc_trim(0)


def _kill_hook(step: int) -> None:
    """Tests only: PHI3_TRAIN_KILL_AFTER_STEP=k SIGKILLs this process right after step k (after its
    metrics line and any checkpoint): a crash with no chance to clean up."""
    if os.environ.get("PHI3_TRAIN_KILL_AFTER_STEP") == str(step):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def run_state(job: Job, ctx: DistContext) -> dict[str, Any]:
    """What a checkpoint of this job must match to be resumed (ckpt.check_compatible)."""
    r = job.recipe
    return {"stage": job.stage, "model_config": job.config.to_hf_dict(), "lora": job.lora,
            "seq_len": r.seq_len, "global_batch_size": r.global_batch_size,
            "phases": [{"name": p.name, "steps": p.steps, "data": p.describe} for p in job.phases]}


def run(job: Job, ctx: DistContext, out: Path, resume: bool = False, export: bool = True,
        progress: bool = True) -> list[dict[str, Any]]:
    """Train `job` in this process (one rank of ctx). Returns the metrics records (rank 0)."""
    r = job.recipe
    out = Path(out)
    parallel = resolve_parallel(r.parallel, ctx.world)
    accum = check_batch_sizes(r.global_batch_size, r.micro_batch_size, ctx.world)
    precision = _Precision(r.precision, parallel, ctx.device)
    existing = ckpt.latest_checkpoint(out)
    if resume and existing is None:
        raise Phi3Error(f"--resume: no checkpoint in {out} (step_NNNNNN folders); run without --resume to start")
    if not resume and existing is not None:
        raise Phi3Error(f"{out} already holds checkpoints ({existing.name}); pass --resume to continue that run "
                        "or choose another --out")
    current = run_state(job, ctx)
    if resume:
        ckpt.check_compatible(ckpt.read_state(existing), current, existing)
    if job.note and ctx.is_main:
        print(job.note, file=sys.stderr)

    # Wrap: activation checkpointing, then DDP / FSDP2, then the optimizer.
    model = job.model
    base = _base_transformer(model)
    from phi3.model import Transformer
    if precision.bf16 and isinstance(base, Transformer):
        # bfloat16 logits straight into the chunked loss: no [B, T, V] float32 copy and gradient
        # (400 MB each at 4 x 512 x 49,152), the same bits (tests/test_train_losses.py).
        # phi3-shape bf16 peak RSS 1,675 MiB (TRAINING.md "What is slow").
        precision.float_logits = False
    if r.activation_checkpointing:
        apply_activation_checkpointing(base)
    if getattr(r, "compile", False):
        for i, layer in enumerate(base.model.layers):
            base.model.layers[i] = torch.compile(layer)
    model.to(ctx.device)
    if parallel == "fsdp":
        model = apply_fsdp(model, ctx, param_dtype=torch.bfloat16 if precision.bf16 else None)
    elif parallel == "ddp":
        model = apply_ddp(model, ctx)
    model.train()
    optimizer = make_optimizer(model, r.optim, ctx.device)
    total = job.total_steps
    # One schedule over all phases (recipe.lr_at: WSD or cosine), as a LambdaLR so that its state
    # is checkpointed like torchtitan's.
    from phi3.train.recipe import lr_at
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(r.optim, s, total) / r.optim.lr if r.optim.lr else 0.0)

    start, phase_index, stream_state, tokens_seen, elapsed_before = 0, 0, None, 0, 0.0
    if resume:
        state = ckpt.load_checkpoint(ctx, existing, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        start, phase_index, stream_state = state["step"], state["phase"], state["data"]
        tokens_seen, elapsed_before = state.get("tokens", 0), state.get("elapsed", 0.0)
        if state.get("world_size") != ctx.world:
            torch.manual_seed(r.seed + 1000 * ctx.rank + start)  # this rank's RNG was not saved
    else:
        # Dropout masks differ per rank (the weights were drawn before, with the shared seed).
        torch.manual_seed(r.seed + 1000 * ctx.rank + 1)

    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            _metrics_truncate(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()
    tb = None
    if ctx.is_main and getattr(r, "tensorboard", False):
        from phi3.train.report import tensorboard_logger
        tb = tensorboard_logger(out / "tensorboard")

    # Phase boundaries: phase i covers steps [bounds[i], bounds[i+1]).
    bounds = [0]
    for p in job.phases:
        bounds.append(bounds[-1] + p.steps)
    stream = None
    records: list[dict[str, Any]] = []
    bar = None
    if ctx.is_main and progress:
        from tqdm import tqdm
        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                   desc=f"{job.stage}")
    t0 = time.perf_counter()
    t_last = t0
    save_every = getattr(r, "save_every", 0) or 0
    log_every = max(1, getattr(r, "log_every", 1) or 1)
    grad_clip = r.optim.grad_clip
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        with _reuse_freed_memory(ctx.device):
            for step in range(start, total):
                while step >= bounds[phase_index + 1]:
                    phase_index, stream, stream_state = phase_index + 1, None, None
                if stream is None:
                    stream = job.phases[phase_index].make_stream()
                    if stream_state is not None:
                        stream.load_state_dict(stream_state)
                        stream_state = None
                batches = step_batches(stream, r.global_batch_size, r.micro_batch_size, ctx.world, ctx.rank)
                if len(batches) != accum:
                    raise Phi3Error(f"data: got {len(batches)} micro-batches for this rank, expected {accum}")
                if job.stage == "dpo":
                    loss_total, n_global, extra = _dpo_step(job, model, batches, ctx, precision, parallel)
                else:
                    n_local = torch.tensor([float(_count_labels(batches))], dtype=torch.float64)
                    n_global = ctx.all_reduce_sum(n_local).item()
                    # DDP and FSDP2 average gradients over ranks: scale by world so that the sum over
                    # ranks of (this rank's token-loss sum / all tokens) is what arrives.
                    scale = ctx.world / max(n_global, 1.0)
                    loss_total = torch.zeros((), dtype=torch.float32)
                    for j, b in enumerate(batches):
                        with _sync_context(model, parallel, last=j == len(batches) - 1):
                            loss_total += _lm_micro_step(model, b, ctx.device, precision, scale).cpu()
                    loss_total = ctx.all_reduce_sum(loss_total.reshape(1)).cpu()[0] / max(n_global, 1.0)
                    extra = {}
                max_norm = grad_clip if grad_clip and grad_clip > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                # Tokens the step computed on: packed rows are full (padding included); DPO counts its
                # pairs' real tokens.
                tokens_step = int(extra.pop("_tokens", r.global_batch_size * r.seq_len))
                tokens_seen += tokens_step
                done = step + 1
                if ctx.is_main:
                    now = time.perf_counter()
                    rec = {"step": done, "phase": job.phases[phase_index].name, "loss": float(loss_total),
                           "lr": float(lr), "grad_norm": float(grad_norm), "tokens": tokens_seen,
                           "tokens_per_s": tokens_step / max(now - t_last, 1e-9),
                           "elapsed": elapsed_before + now - t0, **extra}
                    t_last = now
                    records.append(rec)
                    if done % log_every == 0 or done == total:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                        if tb is not None:
                            tb.log(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                        refresh=False)
                        bar.update(1)
                # save_every = 0: final/ only (no optimizer state on disk); else also the last step.
                if save_every and (done % save_every == 0 or done == total):
                    # At a phase's last step this is the finished phase's stream: a resume moves on to
                    # the next phase's fresh stream by the step number.
                    state = {**current, "step": done, "phase": phase_index, "data": stream.state_dict(),
                             "scheduler": scheduler.state_dict(), "world_size": ctx.world, "tokens": tokens_seen,
                             "elapsed": elapsed_before + time.perf_counter() - t0, **job.extra_state}
                    ckpt.save_checkpoint(ctx, out, done, model, optimizer, state, keep_last=getattr(r, "keep_last", 2))
                _kill_hook(done)
    finally:
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()

    if export:
        export_final(job, model, ctx, out)
    if ctx.is_main and metrics_path.exists():
        try:
            from phi3.train.report import plot_metrics
            plot_metrics(metrics_path)
        except Phi3Error:
            pass  # no records (nothing ran): no plot
    return records


def export_final(job: Job, model: nn.Module, ctx: DistContext, out: Path) -> Path | None:
    """OUT/final/: the trained weights as a Hugging Face folder (LoRA merged into plain weights)."""
    state = ckpt.full_model_state(model)  # collective under FSDP2
    path = None
    if ctx.is_main:
        if job.lora:
            state = _merged_lora_state(job, state)
        path = ckpt.export_hf_folder(state, job.config, job.tokenizer, Path(out) / "final")
    ctx.barrier()
    return path


def _merged_lora_state(job: Job, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from phi3.train.lora import merge_lora_state_dict
    return merge_lora_state_dict(state, job.lora["r"], job.lora["alpha"])


def _dpo_step(job: Job, model: nn.Module, batches: Sequence[Any], ctx: DistContext, precision: _Precision,
              parallel: str) -> tuple[torch.Tensor, float, dict[str, float]]:
    """One DPO optimizer step over this rank's micro-batches of pairs: sigmoid loss on the policy's
    sequence log-probs against the cached reference ones, mean over ALL pairs of the step."""
    from phi3.train.losses import dpo_loss, sequence_logps
    r = job.recipe
    pairs_global = float(r.global_batch_size)
    scale = ctx.world / pairs_global
    sums = torch.zeros(6, dtype=torch.float64)  # loss, r_c, r_r, margin, accuracy, real tokens
    for j, b in enumerate(batches):
        P = b.input_ids.shape[0] // 2
        ref = job.dpo_reference[b.index]
        with _sync_context(model, parallel, last=j == len(batches) - 1):
            with precision():
                logits = model(b.input_ids.to(ctx.device), attention_mask=b.attention_mask.to(ctx.device))
            lp = sequence_logps(logits, b.labels.to(ctx.device))
            losses, rc, rr = dpo_loss(lp[:P], lp[P:], ref[:, 0].to(lp.device), ref[:, 1].to(lp.device),
                                      beta=r.dpo.beta, label_smoothing=r.dpo.label_smoothing,
                                      rpo_alpha=r.dpo.rpo_alpha, chosen_tokens=(b.labels[:P] != -100).sum())
            (losses.sum() * scale).backward()
        sums += torch.tensor([float(losses.detach().sum()), float(rc.sum()), float(rr.sum()), float((rc - rr).sum()),
                              float((rc > rr).float().sum()), float(b.attention_mask.sum())], dtype=torch.float64)
    sums = ctx.all_reduce_sum(sums).cpu()
    n = pairs_global
    extra = {"rewards/chosen": float(sums[1] / n), "rewards/rejected": float(sums[2] / n),
             "rewards/margins": float(sums[3] / n), "rewards/accuracies": float(sums[4] / n),
             "_tokens": float(sums[5])}
    return sums[0].float() / n, n, extra


# --- Command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from phi3.cli import _Parser
    p = _Parser(prog="phi3 train", description="Train or fine-tune a Phi-3-family model (alone or under torchrun).")
    p.add_argument("stage", choices=STAGES, help="pretrain, sft, dpo or longctx")
    p.add_argument("--model", "-m", default=None,
                   help="preset[:overrides] (phi-3-mini:layers=4,hidden=256,heads=4), Hugging Face folder, "
                        "or a previous stage's output folder")
    p.add_argument("--tokenizer", default=None, help="GGUF or Hugging Face folder (needed with a preset)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="data files/folders: one phase, equal weights (a recipe's [[phases]] for mixtures)")
    p.add_argument("--out", "-o", default=None, help="run folder: checkpoints, metrics.jsonl, metrics.png, final/")
    p.add_argument("--recipe", default=None, metavar="FILE.toml", help="recipe file (recipes/ has examples)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (dotted: optim.lr=1e-4); repeatable")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=_positive_float, default=None, metavar="N",
                        help="train N passes over the data (the default, 1, when no budget is given); "
                             "sets the budget of a recipe's single phase")
    budget.add_argument("--steps", type=_positive_int, default=None, metavar="N", help="train N optimizer steps")
    budget.add_argument("--tokens", type=_positive_int, default=None, metavar="N",
                        help="train N tokens (2e6 or 2_000_000), rounded up to whole steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--dry-run", action="store_true",
                   help="print parameters, memory per device, tokens per step, steps, FLOPs and GPU-hours; train nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _positive_int(text: str) -> int:
    try:
        value = float(text.replace("_", "")) if any(c in text for c in ".eE") else int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number of at least 1")
    return int(value)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number (1 = one pass over the data)")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctx = None
    try:
        ctx = init_distributed()
        return _train_command(args, ctx)
    except Phi3Error as e:
        if ctx is None or ctx.is_main:
            print(f"phi3: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a read-only --out: one line, as the other verbs (phi3.cli.main)
        if os.environ.get("PHI3_DEBUG"):
            raise
        if ctx is None or ctx.is_main:
            print(f"phi3: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if ctx is not None:
            ctx.close()


def _train_command(args: argparse.Namespace, ctx: DistContext) -> int:
    from phi3.train.recipe import build_model, dry_run_report, load_recipe
    cli = {"stage": args.stage, "model": args.model, "tokenizer": args.tokenizer, "data": args.data,
           "out": args.out, "dry_run": args.dry_run, "world": ctx.world, "epochs": args.epochs,
           "steps": args.steps, "tokens": args.tokens}
    recipe = load_recipe(args.recipe, args.overrides, cli)
    if args.dry_run:
        if ctx.is_main:
            print(dry_run_report(recipe, ctx.world))
        return 0
    # Every rank builds the same full model on the CPU (build_model seeds with recipe.seed before
    # drawing a preset's weights); FSDP2 shards it afterwards. Data is opened and checked before
    # anything is written to --out: bad input leaves no partial run behind.
    model, tokenizer, cfg = build_model(recipe)
    saved = None
    if args.resume and (latest := ckpt.latest_checkpoint(Path(recipe.out))) is not None:
        saved = ckpt.read_state(latest)
    job = make_job(recipe, model, tokenizer, cfg, ctx, progress=not args.no_progress, saved=saved)
    if any(p.epochs is not None for p in recipe.phases):
        job.note = _budget_note(recipe, [p.steps for p in job.phases])
    run(job, ctx, Path(recipe.out), resume=args.resume, progress=not args.no_progress)
    if ctx.is_main:
        print(f"phi3 train: {job.stage} done; Hugging Face folder at {Path(recipe.out) / 'final'}", file=sys.stderr)
    return 0


# --- Epoch budgets -------------------------------------------------------------------------------

def document_lengths(source: Any) -> np.ndarray:
    """Tokens of each document of a DocumentSource in index order, as the packer lays them out: a
    .ds shard's from its index (plus the EOS the packer appends where a document lacks one), a
    longctx prefix view's capped at its length, anything else by reading each document once
    (tokenizing text, rendering conversations: one pass over the data, which an epoch budget
    needs as TRL's and litgpt's do when they build their datasets)."""
    from phi3.train.data import ConcatSource, TokenFile
    if isinstance(source, _Prefix):
        return np.minimum(document_lengths(source.source), source.n)
    if isinstance(source, ConcatSource):
        return np.concatenate([document_lengths(p) for p in source.parts])
    if isinstance(source, TokenFile):
        ends = np.asarray(source.ends, dtype=np.int64)
        lengths = np.diff(ends, prepend=0)
        if source.eos is not None:
            last = np.full(len(ends), -1, dtype=np.int64)
            nonempty = lengths > 0
            last[nonempty] = np.asarray(source.tokens[ends[nonempty] - 1], dtype=np.int64)
            lengths = lengths + (last != source.eos)
        return lengths
    out: list[int] = []
    for i in range(0, len(source), 1024):
        items = source.get_many(list(range(i, min(i + 1024, len(source)))))
        out.extend(len(d[0]) if isinstance(d, tuple) else len(d) for d in items)
    return np.asarray(out, dtype=np.int64)


def _passes(epochs: float, n: int) -> int:
    """Items in `epochs` passes over n, rounded up; exact for decimal epochs (0.1 * 30 is 3, not
    3.0000000000000004 -> 4)."""
    return math.ceil(Fraction(repr(float(epochs))) * n)


def epoch_rows(lengths: Sequence[np.ndarray], whole: Sequence[bool], weights: Sequence[float], seq_len: int,
               seed: int, epochs: float, counted: Sequence[int] | None = None) -> int:
    """Rows of seq_len a PackedStream(sources, weights, seq_len, seed) produces until every
    `counted` source (default: all) has had ceil(epochs * documents) of its documents drawn and the
    last of them laid out in full. It replays the packer on document lengths alone: the mixture's
    pick (smallest tokens taken / weight, ties to the first source), each source's permutation per
    epoch seeded by (seed, source, epoch), documents cut at row ends, and `whole` documents
    (conversations) that do not fit in the room left opening a new row (the rest padded).
    tests/test_train_trainer.py checks it row for row against PackedStream itself."""
    T, n = int(seq_len), len(lengths)
    total = float(sum(weights))
    w = [float(x) / total for x in weights]
    need = [_passes(epochs, len(lens)) for lens in lengths]

    def perm(s: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, s, epoch]).permutation(len(lengths[s]))

    if n == 1 and not whole[0]:
        # One source cut at row ends: every row is full, so rows = ceil(tokens / seq_len).
        full, rem = divmod(need[0], len(lengths[0]))
        tokens = full * int(lengths[0].sum()) + int(lengths[0][perm(0, full)[:rem]].sum())
        return -(-tokens // T)
    remaining = {s for s in (range(n) if counted is None else counted)}
    drawn, taken = [0] * n, [0] * n
    orders: dict[int, tuple[int, np.ndarray]] = {}
    rows = t = 0  # full rows so far, tokens in the current one
    while remaining:
        s = min(range(n), key=lambda i: (taken[i] / w[i], i))
        epoch, pos = divmod(drawn[s], len(lengths[s]))
        if s not in orders or orders[s][0] != epoch:
            orders[s] = (epoch, perm(s, epoch))
        L = int(lengths[s][orders[s][1][pos]])
        drawn[s] += 1
        taken[s] += L
        if whole[s] and t > 0 and L > T - t:
            rows, t = rows + 1, 0  # the conversation starts a new row; this one is padded
        if t + L < T:
            t += L
        else:
            rest = L - (T - t)
            rows, t = rows + 1 + rest // T, rest % T
        if drawn[s] >= need[s]:
            remaining.discard(s)
    return rows + (t > 0)


def _agree(ctx: DistContext | None, steps: int, what: str) -> None:
    """Every rank counted the same steps (each reads the same files): checked, since data that
    differs between nodes would otherwise hang or silently desynchronise the run."""
    if ctx is None or not ctx.distributed:
        return
    t = torch.tensor([float(steps), float(steps) ** 2], dtype=torch.float64)
    got = ctx.all_reduce_sum(t).cpu()
    if got[0] != steps * ctx.world or got[1] != steps ** 2 * ctx.world:
        raise Phi3Error(f"{what}: the processes counted different numbers of steps for the epoch budget; every "
                        f"node must see the same data files")


def _budget_note(recipe: Any, steps: list[int]) -> str:
    """The one line a run with an epoch budget prints (rank 0): what the epochs came to."""
    unit = "pairs" if recipe.stage == "dpo" else "rows"
    head = "phi3 train: no budget given (--epochs, --steps or --tokens), training " if recipe.default_budget \
        else "phi3 train: "
    tail = f" of {recipe.global_batch_size} {unit} (warmup {recipe.optim.warmup_steps} steps)"
    if len(recipe.phases) == 1:
        return f"{head}{recipe.phases[0].budget()} = {steps[0]:,} steps{tail}"
    parts = [f"phase {p.name} {p.budget()} = {n:,} steps" for p, n in zip(recipe.phases, steps) if p.epochs is not None]
    return f"{head}{'; '.join(parts)}{tail}"


def _phase_plans(recipe: Any, open_source: Callable[[Any], Any], seq_len: int, pad_id: int,
                 wrap: Callable[[list, list], tuple[list, list]] | None = None,
                 ctx: DistContext | None = None) -> list[PhasePlan]:
    """One PhasePlan per recipe phase; every source is opened (and so checked) now, and an epoch
    budget is turned into steps (epoch_rows; longctx counts passes over the real documents, not
    over their short prefix views)."""
    from phi3.train.data import PackedStream
    opened = []
    for i, phase in enumerate(recipe.phases):
        sources = [open_source(s) for s in phase.sources]
        weights = [s.weight for s in phase.sources]
        if wrap is not None:
            sources, weights = wrap(sources, weights)
        seed = recipe.seed + i  # each phase its own order; the same on every rank and world size

        def make(sources=sources, weights=weights, seed=seed) -> Any:
            return PackedStream(sources, weights, seq_len, seed, pad_id=pad_id)

        make()  # weights and sources are checked now, not at the phase boundary
        opened.append((sources, weights, seed, make))
    counted_steps = {}
    for i, (phase, (sources, weights, seed, _)) in enumerate(zip(recipe.phases, opened)):
        if phase.epochs is None:
            continue
        rows = epoch_rows([document_lengths(s) for s in sources], [bool(getattr(s, "whole", False)) for s in sources],
                          weights, seq_len, seed, phase.epochs,
                          counted=[k for k, s in enumerate(sources) if not isinstance(s, _Prefix)])
        counted_steps[i] = -(-rows // recipe.global_batch_size)
        _agree(ctx, counted_steps[i], f"phase {phase.name!r}")
    if counted_steps:
        recipe.resolve_epochs(counted_steps)
    plans = []
    for i, (phase, steps, (_, _, _, make)) in enumerate(zip(recipe.phases, recipe.phase_steps(), opened)):
        describe = {"sources": [[s.path, s.weight] for s in phase.sources], "steps": steps}
        plans.append(PhasePlan(phase.name or f"phase{i + 1}", steps, make, describe))
    return plans


def make_job(recipe: Any, model: nn.Module, tokenizer: Any, cfg: Any, ctx: DistContext, progress: bool = True,
             saved: dict | None = None) -> Job:
    """The stage's data, model changes (LoRA, longctx's rope) and reference log-probs (dpo).
    `saved`: the trainer state of the checkpoint a --resume continues (longctx then takes the
    rope factors it found instead of searching again)."""
    from phi3.train.data import open_documents, open_pairs, open_sft, pair_batches
    stage = recipe.stage
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    extra: dict[str, Any] = {}
    if stage in ("pretrain", "longctx"):
        open_source = lambda s: open_documents(s.path, tokenizer, s.text_key)  # noqa: E731
    else:
        open_source = lambda s: open_sft(s.path, tokenizer)  # noqa: E731

    if stage == "longctx":
        phases, cfg, report = _longctx_prepare(recipe, model, tokenizer, cfg, open_source, pad_id,
                                               progress and ctx.is_main, saved, ctx.device, ctx)
        extra["longrope"] = report
    elif stage == "dpo":
        if len(recipe.phases) != 1:
            raise Phi3Error(f"dpo takes one phase of preference data; the recipe has {len(recipe.phases)}")
        phase = recipe.phases[0]
        pairs = []
        for s in phase.sources:
            for p in open_pairs(s.path, tokenizer, recipe.seq_len):
                p.index = len(pairs)  # one numbering over all files: the reference cache's key
                pairs.append(p)
        if phase.epochs is not None:
            # PairStream serves pairs in a fresh permutation per epoch, global_batch_size a step.
            counted = -(-_passes(phase.epochs, len(pairs)) // recipe.global_batch_size)
            _agree(ctx, counted, f"phase {phase.name!r}")
            recipe.resolve_epochs({0: counted})
        steps = recipe.phase_steps()[0]
        make = lambda: pair_batches(pairs, recipe.global_batch_size, recipe.seed, pad_id)  # noqa: E731
        phases = [PhasePlan(phase.name or "phase1", steps, make,
                            {"sources": [[s.path, s.weight] for s in phase.sources], "steps": steps})]
    else:
        phases = _phase_plans(recipe, open_source, recipe.seq_len, pad_id, ctx=ctx)

    lora = None
    if recipe.lora.r > 0:
        if stage == "pretrain":
            raise Phi3Error("LoRA is for fine-tuning (sft, dpo); set lora.r = 0 for pretrain")
        from phi3.train.lora import apply_lora
        lora = {"r": recipe.lora.r, "alpha": recipe.lora.alpha, "dropout": recipe.lora.dropout,
                "targets": list(recipe.lora.targets)}
        model = apply_lora(model, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], targets=lora["targets"])
    job = Job(stage=stage, recipe=recipe, model=model, config=cfg, tokenizer=tokenizer, phases=phases, lora=lora,
              extra_state=extra)
    if stage == "dpo":
        job.dpo_reference = dpo_reference(job, pairs, ctx, progress)
    return job


# --- longctx --------------------------------------------------------------------------------------

class _Prefix:
    """A DocumentSource view holding the first `n` tokens of each document: the short rows of
    longctx's long/short mixture (each piece <= the original context, so it runs with the short
    factors, as Phi-3 does for short sequences)."""

    whole = False

    def __init__(self, source: Any, n: int) -> None:
        self.source, self.n, self.name = source, n, f"{source.name} (first {n} tokens)"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        return self.get_many([i])[0]

    def get_many(self, indices: Sequence[int]) -> list[Any]:
        import numpy as np
        out = []
        for d in self.source.get_many(indices):
            # An item is ids, or (ids, loss mask) for a .ds shard with a .ds.loss file.
            out.append((np.asarray(d[0])[:self.n], np.asarray(d[1])[:self.n]) if isinstance(d, tuple)
                       else np.asarray(d)[:self.n])
        return out


def _longctx_prepare(recipe: Any, model: nn.Module, tokenizer: Any, cfg: Any, open_source: Callable,
                     pad_id: int, progress: bool, saved: dict | None = None,
                     device: torch.device | None = None,
                     ctx: DistContext | None = None) -> tuple[list[PhasePlan], Any, dict]:
    """LongRoPE: search the factors on the loaded model (rank 0; broadcast), put the new rope into
    the model, then train on rows of seq_len (= the target context, or less) mixing the original
    documents (long, long factors) with their first C tokens (short, short factors) at
    longctx.short_fraction of the tokens."""
    from phi3.train.longrope import long_windows, original_context, run_longctx_search
    lc = recipe.longctx
    # A model that already has LongRoPE factors switches at original_max_position_embeddings, not at
    # its (already extended) max_position_embeddings.
    C = lc.original_len or original_context(cfg)
    if saved is not None and saved.get("stage") == "longctx" and "longrope" in saved:
        # Resuming: the factors this run found are in the checkpoint (the search is the slow part).
        from phi3.config import config_from_hf_dict
        from phi3.train.longrope import apply_rope_config
        new_cfg = config_from_hf_dict(saved["model_config"], name=cfg.name)
        apply_rope_config(model, new_cfg)
        report = saved["longrope"]
    else:
        first = open_source(recipe.phases[0].sources[0])
        windows = long_windows(first, lc.target_len, lc.search_documents, seed=recipe.seed)
        new_cfg, report = run_longctx_search(model, [torch.as_tensor(w) for w in windows], lc.target_len,
                                             original_len=C, seed=recipe.seed, progress=progress,
                                             population=lc.population, iterations=lc.iterations,
                                             device=device if device is not None and device.type == "cuda" else None)

    def wrap(sources: list, weights: list) -> tuple[list, list]:
        total = float(sum(weights))
        f = lc.short_fraction
        if f <= 0:
            return sources, weights
        return ([*sources, *(_Prefix(s, C) for s in sources)],
                [*(w / total * (1 - f) for w in weights), *(w / total * f for w in weights)])

    return _phase_plans(recipe, open_source, recipe.seq_len, pad_id, wrap, ctx), new_cfg, report


# --- DPO ------------------------------------------------------------------------------------------

def dpo_reference(job: Job, pairs: list, ctx: DistContext, progress: bool) -> torch.Tensor:
    """log pi_ref(chosen), log pi_ref(rejected) of every pair [N, 2], computed once, before
    training, with the initial model (LoRA: B = 0, so the base model) in eval mode under the
    training precision; the loop looks them up by pair index (TRL's precompute_ref_log_probs).
    Every rank computes all of them: no second copy of the weights, no communication."""
    from phi3.train.data import collate_pairs
    from phi3.train.losses import reference_logps
    from phi3.train.data import PairBatch
    bs = max(1, job.recipe.micro_batch_size)
    pad = job.config.pad_token_id if job.config.pad_token_id is not None else 0
    dev = ctx.device
    job.model.to(dev)  # on a GPU the reference pass runs there too (run() leaves it there)

    def on_device(b: Any) -> Any:
        return PairBatch(b.input_ids.to(dev), b.labels.to(dev), b.attention_mask.to(dev), b.index)

    batches = (on_device(collate_pairs(pairs[i:i + bs], pad)) for i in range(0, len(pairs), bs))
    if progress and ctx.is_main:
        from tqdm import tqdm
        batches = tqdm(batches, total=-(-len(pairs) // bs), desc="dpo reference log-probs", unit="batch",
                       file=sys.stderr)
    precision = _Precision(job.recipe.precision, "none", dev)
    with precision():
        return reference_logps(job.model, batches, len(pairs))


if __name__ == "__main__":
    sys.exit(main())
