"""Wrapping a phi3.model.Transformer for training, from outside the model file (as torchtitan's
apply_ac / apply_fsdp do): the model stays a plain nn.Module with Hugging Face parameter names.

Order, as in torchtitan: activation checkpointing first, then `fully_shard` per layer and on the
whole model (FSDP2 then shards each CheckpointWrapper, which recomputes inside its unsharded
window), then torch.compile if wanted.
"""

from __future__ import annotations

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
