"""LoRA fine-tuning through peft, on phi3's own Transformer, and the merge back into plain weights.

peft's `inject_adapter_in_model` swaps each targeted nn.Linear for a lora.Linear in place: the
model stays a phi3.model.Transformer (no PeftModel wrapper), so `forward(ids, document_ids=...)`,
activation checkpointing, FSDP2's fully_shard and torch.compile see the same module tree as in
full fine-tuning. Targets are phi3's fused projections (qkv_proj, o_proj, gate_up_proj, down_proj;
Llama-layout checkpoints are fused at load too), so one adapter covers q, k and v together: with
rank r that is r-dimensional across all three, where Hugging Face's per-projection LoRA would have
three rank-r adapters. The merged weights are what matter for export, and they are exact either way.

While LoRA is applied, parameter names gain peft's infixes (`...qkv_proj.base_layer.weight`,
`...qkv_proj.lora_A.default.weight`); `merge_lora` (a model) or `merge_lora_state_dict` (a full
state dict, e.g. gathered from FSDP2) gives back the plain names with W + (alpha / r) B A.

peft is optional (`pip install 'phi3[train]'`) and imported only when LoRA is asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from phi3.errors import Phi3Error
from phi3.model import Transformer

DEFAULT_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ADAPTER = "default"  # peft's adapter name; it appears in parameter names


def _peft():
    try:
        import peft
    except ImportError:
        raise Phi3Error("LoRA needs the peft package, which is not installed; run: pip install 'phi3[train]'") from None
    return peft


def is_lora(model: nn.Module) -> bool:
    """Whether LoRA adapters are applied (and not yet merged)."""
    return any(".lora_A." in name or name.startswith("lora_A.") for name, _ in model.named_parameters())


def apply_lora(model: Transformer, r: int, alpha: float, dropout: float = 0.0,
               targets: Sequence[str] = DEFAULT_TARGETS) -> Transformer:
    """Add LoRA adapters (rank r, scaling alpha / r, dropout on the adapter's input in train mode)
    to every linear named in `targets`, in place, and freeze everything else: afterwards only the
    lora_A / lora_B matrices require grad. B starts at zero, so the model's outputs are unchanged
    until training moves it; A is drawn from torch's global generator (seed it first).

    Order: LoRA first, then activation checkpointing, then fully_shard / DDP / compile."""
    if not isinstance(model, Transformer):
        raise Phi3Error(f"apply_lora expects a phi3.model.Transformer, got {type(model).__name__}; "
                        "apply LoRA before wrapping the model (DDP, fully_shard, torch.compile)")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise Phi3Error(f"lora.r is {r!r}; it must be a positive integer (e.g. 16; 0 means full fine-tuning)")
    if not alpha > 0:
        raise Phi3Error(f"lora.alpha is {alpha!r}; it must be > 0 (commonly 2 x r)")
    if not 0.0 <= dropout < 1.0:
        raise Phi3Error(f"lora.dropout is {dropout!r}; it must be in [0, 1)")
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise Phi3Error(f"lora.targets is empty; name some of {', '.join(DEFAULT_TARGETS)}")
    unknown = [t for t in targets if t not in DEFAULT_TARGETS]
    if unknown:
        raise Phi3Error(f"lora.targets: unknown module {unknown[0]!r}; choose from {', '.join(DEFAULT_TARGETS)}")
    if is_lora(model):
        raise Phi3Error("LoRA is already applied to this model; apply it once")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    if any(isinstance(m, CheckpointWrapper) for m in model.modules()):
        raise Phi3Error("apply LoRA before activation checkpointing (LoRA first, then AC, then fully_shard)")
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise Phi3Error("apply LoRA before fully_shard: this model's parameters are already sharded")
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in targets and type(module) is not nn.Linear:
            raise Phi3Error(f"LoRA needs float weights, but {name} is a {type(module).__name__} "
                            "(a packed GGUF?); load a Hugging Face folder or a float GGUF to fine-tune")
    peft = _peft()
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model with the adapters bypassed (peft's PeftModel.disable_adapter, for a
    model whose adapters were injected in place): e.g. a DPO reference pass after training has
    moved the adapters. Before the first step it is not needed (B = 0: the outputs are the base
    model's already). A model without adapters is yielded unchanged."""
    layers = []
    if is_lora(model):
        _peft()
        from peft.tuners.tuners_utils import BaseTunerLayer
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    # peft's enable_adapters also flips the adapters' requires_grad: put the caller's flags back.
    flags = {p: p.requires_grad for m in layers for p in m.parameters()}
    try:
        for m in layers:
            m.enable_adapters(False)
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags.items():
            p.requires_grad_(flag)


def lora_parameter_count(model: nn.Module) -> int:
    """Trainable LoRA parameters: r x (in + out) per adapted linear."""
    return sum(p.numel() for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights alone (peft's names, activation-checkpointing prefix removed)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight (W + alpha / r * B A, in the weight's dtype) and put the
    plain nn.Linear back, in place: the model is again a plain Transformer whose state_dict has
    the normal names (what phi3.checkpoint.save_hf_folder exports), every parameter trainable
    again. Works through activation checkpointing's wrappers; for an FSDP2-sharded model gather a
    full state dict and use merge_lora_state_dict instead."""
    _peft()
    from peft.tuners.lora import LoraLayer as lora_layer
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, lora_layer)]
    if not layers:
        raise Phi3Error("merge_lora: this model has no LoRA adapters to merge")
    for name, module in layers:
        if any(type(p).__name__ == "DTensor" for p in module.parameters()):
            raise Phi3Error("merge_lora: the model is sharded by fully_shard; gather a full state dict "
                            "(get_model_state_dict(..., full_state_dict=True)) and use merge_lora_state_dict")
        module.merge(safe_merge=True)  # safe_merge: refuse (not write) a NaN/inf merged weight
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def merge_lora_state_dict(state: dict[str, torch.Tensor], r: int, alpha: float) -> dict[str, torch.Tensor]:
    """A full (unsharded) state dict of a LoRA model -> the plain model's state dict, with each
    `X.base_layer.weight` replaced by `X.weight` = W + alpha / r * B A (computed in float32, stored
    in W's dtype). For FSDP2: get_model_state_dict(model, options=StateDictOptions(
    full_state_dict=True, cpu_offload=True)) on every rank, then this on rank 0."""
    scaling = alpha / r
    out: dict[str, torch.Tensor] = {}
    merged = 0
    for key, value in state.items():
        if f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key:
            continue
        if key.endswith(".base_layer.weight"):
            prefix = key.removesuffix(".base_layer.weight")
            a, b = state.get(f"{prefix}.lora_A.{ADAPTER}.weight"), state.get(f"{prefix}.lora_B.{ADAPTER}.weight")
            if a is None or b is None:
                raise Phi3Error(f"merge_lora_state_dict: {key} has no lora_A/lora_B beside it; "
                                "pass the whole state dict of the LoRA model")
            if b.shape[1] != r or a.shape[0] != r:
                raise Phi3Error(f"merge_lora_state_dict: {prefix}'s adapter has rank {a.shape[0]}, not r={r}; "
                                "pass the r and alpha the model was trained with")
            delta = (b.float() @ a.float()) * scaling
            out[prefix + ".weight"] = (value.float() + delta).to(value.dtype)
            merged += 1
        elif ".base_layer." in key:  # a bias (phi3's linears have none; kept for completeness)
            out[key.replace(".base_layer.", ".")] = value
        else:
            out[key] = value
    if not merged:
        raise Phi3Error("merge_lora_state_dict: no LoRA adapters in this state dict")
    return out
