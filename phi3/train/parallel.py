"""Wrapping a phi3.model.Transformer for training, from outside the model file (as torchtitan's
apply_ac / apply_fsdp do): the model stays a plain nn.Module with Hugging Face parameter names.

Order, as in torchtitan: activation checkpointing first, then `fully_shard` per layer and on the
whole model (FSDP2 then shards each CheckpointWrapper, which recomputes inside its unsharded
window), then torch.compile if wanted.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

from phi3.errors import Phi3Error
from phi3.model import DecoderLayer, Transformer


def apply_activation_checkpointing(model: Transformer) -> Transformer:
    """Recompute each DecoderLayer's activations in the backward pass instead of keeping them
    (non-reentrant torch.utils.checkpoint, RNG state preserved so dropout masks recompute the
    same). Memory for activations drops from all layers' to about one layer's; the price is one
    more forward per layer. Loss and gradients are unchanged.

    Each layer is replaced in place by torch's CheckpointWrapper. Its state_dict hooks strip the
    `_checkpoint_wrapped_module.` prefix, so state_dict() keys (and torch.distributed.checkpoint's,
    which strips it too) stay the Hugging Face names; `named_parameters()` does show the prefix,
    and `unwrapped_name` removes it. Returns the same model."""
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if isinstance(layer, CheckpointWrapper):
            raise Phi3Error("activation checkpointing is already applied to this model; apply it once")
        if not isinstance(layer, DecoderLayer):
            raise Phi3Error(f"layer {i} is a {type(layer).__name__}, not a DecoderLayer; "
                            "apply activation checkpointing before fully_shard or torch.compile")
        layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=True)
    return model


def unwrapped_name(name: str) -> str:
    """A parameter name from named_parameters() without the wrappers' prefixes (activation
    checkpointing's, torch.compile's), i.e. its state_dict / Hugging Face name."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def is_checkpointed(model: nn.Module) -> bool:
    return any(isinstance(m, CheckpointWrapper) for m in model.modules())


# --- Process group, DDP and FSDP2 ---------------------------------------------------------------

@dataclass
class DistContext:
    """Where this process stands: rank, world size, its device and (when distributed) a 1-D mesh
    over all ranks. One process without torchrun is rank 0 of 1 with no process group."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh, when a process group exists
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a no-op alone). On the CPU for gloo, on the device for nccl."""
        if self.distributed:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t

    def close(self) -> None:
        if self.owns_group and self.distributed:
            dist.destroy_process_group()


def init_distributed(need_group: bool = False, device: str | None = None) -> DistContext:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR in
    the environment): gloo on the CPU, nccl on CUDA. Without torchrun, one process; with
    `need_group` (DDP or FSDP2 asked for alone) it makes a 1-process gloo group on a file store,
    so the same wrapping code runs.

    The mesh is always passed explicitly: on a machine with GPUs, fully_shard over a gloo group
    without a CPU mesh moves parameters to CUDA and crashes (pytorch/pytorch#132471)."""
    from torch.distributed.device_mesh import init_device_mesh

    if device is None or device == "auto":
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    under_launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if dist.is_initialized():  # a caller (a test) made the group already
        owns = False
    elif under_launcher:
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        owns = True
    elif need_group:
        store = os.path.join(tempfile.mkdtemp(prefix="phi3-pg-"), "store")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
        owns = True
    else:
        return DistContext(device=dev)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    mesh = init_device_mesh(dev.type, (world,))
    return DistContext(rank=rank, world=world, local_rank=local, device=dev, mesh=mesh, owns_group=owns)


def apply_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """DistributedDataParallel: every rank holds all weights; gradients are averaged in buckets
    during backward. Gradient accumulation skips that all-reduce with `no_sync()`."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    if not ctx.distributed:
        raise Phi3Error("DDP needs a process group; run under torchrun or let init_distributed make one")
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def apply_fsdp(model: nn.Module, ctx: DistContext, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the whole model (embedding, final norm, head),
    in place; parameters become DTensors sharded on dim 0 over the mesh, and the model stays a
    Transformer (its class is swapped for an FSDP subclass). Call it on the full model built on
    the CPU with the run's seed (a meta-device init would draw from DTensor's RNG, which gives
    other weights), and create the optimizer afterwards.

    param_dtype=bfloat16 is FSDP2's mixed precision (module-level: weights are all-gathered in
    bf16, the sharded fp32 masters are what the optimizer steps); reduce_dtype float32 keeps the
    gradient reduce-scatter exact. Gradient accumulation: set_requires_gradient_sync(False) on
    all micro-batches but the last."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    if not ctx.distributed:
        raise Phi3Error("FSDP needs a process group; run under torchrun or let init_distributed make one")
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    base = next((m for m in model.modules() if isinstance(m, Transformer)), None)  # inside peft's wrappers
    if base is None:
        raise Phi3Error(f"apply_fsdp expects a phi3 Transformer, got {type(model).__name__}")
    for layer in base.model.layers:
        fully_shard(layer, mesh=ctx.mesh, mp_policy=mp)
    fully_shard(model, mesh=ctx.mesh, mp_policy=mp)
    return model


def resolve_parallel(parallel: str, world: int) -> str:
    """auto: FSDP2 under more than one process (it holds 1/world of the weights, gradients and
    optimizer state per rank; DDP holds all), nothing alone."""
    if parallel not in ("auto", "none", "ddp", "fsdp"):
        raise Phi3Error(f"parallel = {parallel!r} is not one of auto, none, ddp, fsdp")
    if parallel == "auto":
        return "fsdp" if world > 1 else "none"
    if parallel == "none" and world > 1:
        raise Phi3Error(f"parallel = 'none' with {world} processes would train {world} separate models; "
                        "use ddp or fsdp (or auto)")
    return parallel
