"""Training checkpoints: numbered `torch.distributed.checkpoint` (DCP) folders, resume, and the
final Hugging Face export.

    OUT/step_000100/            one numbered checkpoint
        .metadata, __0_0.distcp, __1_0.distcp   DCP: model + optimizer, sharded (one file per rank)
        rank_0.pt, rank_1.pt     each rank's RNG states (torch, CUDA, python, numpy)
        trainer_state.json       step, phase, data position, scheduler, and what a resume must match
    OUT/final/                  config.json, model.safetensors, tokenizer files, generation_config.json

A checkpoint is written into `step_000100.tmp/` and renamed once every rank has finished writing
(os.replace of a directory is atomic on one filesystem): a kill at any moment leaves either the
new checkpoint complete or no trace of it but a `.tmp` folder, which is never read and is removed
by the next save. DCP reshards on load, so a run saved by N processes resumes on M.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from phi3.errors import Phi3Error
from phi3.train.parallel import DistContext

CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
FORMAT_VERSION = 1


class ModelAndOptimizer(Stateful):
    """What DCP saves and loads: the model's and the optimizer's state keyed by parameter name
    (get_state_dict strips the DDP / activation-checkpointing / compile prefixes, so a checkpoint
    is independent of how the model was wrapped)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def checkpoint_path(out: Path, step: int) -> Path:
    return Path(out) / f"step_{step:06d}"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in OUT, oldest first (a `.tmp` folder is an interrupted save)."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


# --- RNG ------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # As plain lists: torch.load(weights_only=True) refuses numpy arrays.
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# --- Save / load ----------------------------------------------------------------------------------

def _test_hook(name: str, step: int) -> None:
    """Tests only: PHI3_TRAIN_KILL_IN_SAVE=N SIGKILLs this process in the middle of saving step N
    (after the files are written, before the rename that publishes them)."""
    if os.environ.get(name) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _single_process_quiet(ctx: DistContext) -> Iterator[None]:
    """DCP warns that it 'assumes a single process' even when told so (no_dist=True): one process is
    a normal way to train here, so that warning is silenced then, and only then."""
    with warnings.catch_warnings():
        if not ctx.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(ctx: DistContext, out: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write checkpoint `step` (collective: every rank calls it). `state` is the JSON-able trainer
    state (rank 0's is written); each rank's RNG is saved beside it."""
    final = checkpoint_path(out, step)
    tmp = final.with_name(final.name + ".tmp")
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    with _single_process_quiet(ctx):
        dcp.save({"train": ModelAndOptimizer(model, optimizer)}, checkpoint_id=str(tmp), no_dist=not ctx.distributed)
    torch.save(rng_state(), tmp / f"rank_{ctx.rank}.pt")
    ctx.barrier()
    if ctx.is_main:
        body = json.dumps({"format": FORMAT_VERSION, **state}, indent=1)
        with open(tmp / STATE_FILE, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _test_hook("PHI3_TRAIN_KILL_IN_SAVE", step)
        if final.exists():  # only after a resume from an older checkpoint than this one
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        for _, old in list_checkpoints(out)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()
    return final


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Phi3Error(f"{path} is not a readable phi3 training checkpoint ({e}); "
                        "resume from another one or start without --resume") from None


def load_checkpoint(ctx: DistContext, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model + optimizer into the (already wrapped) model and its optimizer, and this rank's
    RNG when the checkpoint has one for it (a resume on more ranks than were saved seeds the new
    ranks from the run's seed instead: their dropout masks then differ from any earlier run).
    Returns the trainer state."""
    state = read_state(path)
    with _single_process_quiet(ctx):
        dcp.load({"train": ModelAndOptimizer(model, optimizer)}, checkpoint_id=str(path), no_dist=not ctx.distributed)
    rng_file = Path(path) / f"rank_{ctx.rank}.pt"
    if rng_file.exists() and state.get("world_size") == ctx.world:
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse a resume that would silently train something else. What must match: the stage, the
    model's shape (config), LoRA settings, the sequence length and the global batch (the data
    position counts global rows). What may change: the number of processes and the parallel mode
    (DCP reshards), the micro-batch size (same rows, other accumulation), the learning rate and
    everything else in the optimizer recipe, save/log intervals."""
    if saved.get("format") != FORMAT_VERSION:
        raise Phi3Error(f"{path} was written by another checkpoint format ({saved.get('format')}); "
                        "start a new run in another --out")
    for key, what in (("stage", "stage"), ("model_config", "model shape"), ("lora", "LoRA settings"),
                      ("seq_len", "seq_len"), ("global_batch_size", "global_batch_size"),
                      ("phases", "phases (sources and budgets)")):
        if saved.get(key) != current.get(key):
            a, b = saved.get(key), current.get(key)
            if isinstance(a, dict) and isinstance(b, dict):
                diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                detail = f"{', '.join(diff[:4])} differ"
            else:
                detail = f"{_short(a)} saved, {_short(b)} now"
            raise Phi3Error(f"cannot resume from {path}: its {what} differs ({detail}); "
                            "the world size, parallel mode, micro-batch size and optimizer settings may change, "
                            "these may not (use another --out to start a new run)")


def _short(x: Any) -> str:
    s = json.dumps(x)
    return s if len(s) <= 80 else s[:77] + "..."


# --- Export ---------------------------------------------------------------------------------------

def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors on rank 0 (collective under FSDP2; other
    ranks get an empty dict)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def export_hf_folder(state: dict[str, torch.Tensor], cfg: Any, tokenizer: Any, out_dir: Path) -> Path:
    """Write `out_dir` (config.json, model.safetensors, tokenizer files, generation_config.json)
    from a full plain-Transformer state dict, through a temp folder renamed at the end."""
    from phi3.checkpoint import LoadedModel, save_hf_folder
    from phi3.model import Transformer

    if tokenizer is None:
        raise Phi3Error("no tokenizer to export with the model; give --tokenizer (a GGUF or Hugging Face folder)")
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise Phi3Error(f"export: the trained weights do not match the model ({(missing + unexpected)[:3]})")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_folder(LoadedModel(model=model, tokenizer=tokenizer, config=cfg, path=out_dir, source="safetensors",
                               file_bytes=0, weight_types={}), tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
