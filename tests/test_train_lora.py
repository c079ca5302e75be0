"""LoRA through peft on phi3's Transformer: only adapters train, the merge gives the same logits
as before it with the plain names back, and it composes with activation checkpointing and
FSDP2 (one gloo process)."""

from __future__ import annotations

import sys

import pytest
import torch

from phi3.errors import Phi3Error
from phi3.model import Transformer
from phi3.train.lora import (DEFAULT_TARGETS, apply_lora, is_lora, lora_parameter_count, lora_state_dict,
                             merge_lora, merge_lora_state_dict)
from phi3.train.losses import lm_loss_sum
from tests.conftest import tiny_config

pytest.importorskip("peft")

R, ALPHA = 4, 8.0


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return model


def config(kind):
    if kind == "llama":  # SmolLM2's shape (a Llama-layout checkpoint is fused at load, like this)
        return tiny_config("medium").with_(model_type="llama", tie_word_embeddings=True)
    return tiny_config(kind)


def move_adapters(model, seed=1):
    """Non-zero B (peft starts it at zero, which would make any merge trivially exact)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)


def packed_batch(vocab):
    torch.manual_seed(2)
    ids = torch.randint(0, vocab, (2, 40))
    doc_ids = torch.tensor([[0] * 12 + [1] * 28, [0] * 30 + [1] * 10])
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[0, 11] = labels[1, 29] = -100
    return ids, doc_ids, labels


@pytest.mark.parametrize("kind", ["mini-4k", "llama"])
def test_merged_model_gives_the_same_logits_with_plain_names(kind):
    cfg = config(kind)
    model = random_model(cfg)
    plain_keys = list(model.state_dict())
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=R, alpha=ALPHA, dropout=0.1)
    assert is_lora(model) and isinstance(model, Transformer)
    ids, doc_ids, _ = packed_batch(cfg.vocab_size)
    model.eval()
    with torch.no_grad():  # B = 0: LoRA changes nothing yet
        assert torch.equal(model(ids, document_ids=doc_ids), Transformer.forward(model, ids, document_ids=doc_ids))
        before_move = model(ids)
    move_adapters(model)
    with torch.no_grad():
        lora_packed, lora_plain = model(ids, document_ids=doc_ids), model(ids)
    assert (lora_plain - before_move).abs().max().item() > 1e-2  # the adapters now matter
    adapters = lora_state_dict(model)
    merged = merge_lora(model)
    assert merged is model and not is_lora(model)
    assert list(model.state_dict()) == plain_keys
    assert all(type(m).__module__.startswith(("torch", "phi3")) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert (model(ids, document_ids=doc_ids) - lora_packed).abs().max().item() <= 1e-5
        assert (model(ids) - lora_plain).abs().max().item() <= 1e-5
    # the merged weight is W + alpha / r * B A, and untargeted weights are untouched
    key = "model.layers.1.self_attn.qkv_proj"
    a, b = adapters[f"{key}.lora_A.default.weight"], adapters[f"{key}.lora_B.default.weight"]
    assert torch.allclose(model.state_dict()[f"{key}.weight"], base[f"{key}.weight"] + ALPHA / R * b @ a, atol=1e-6)
    assert torch.equal(model.state_dict()["model.norm.weight"], base["model.norm.weight"])
    # a fresh plain Transformer takes the merged state dict as it is (what save_hf_folder writes)
    fresh = Transformer(cfg)
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_only_adapters_train_and_their_count_is_r_times_in_plus_out():
    cfg = tiny_config("medium")  # grouped-query: qkv_proj is (4 + 2 x 1) x 32 = 192 rows
    model = random_model(cfg)
    total_before = sum(p.numel() for p in model.parameters())
    apply_lora(model, r=R, alpha=ALPHA)
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.dim_per_head
    qkv_out = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    per_layer = R * ((h + qkv_out) + (cfg.num_attention_heads * hd + h) + (h + 2 * i) + (i + h))
    want = cfg.num_hidden_layers * per_layer
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == lora_parameter_count(model) == want == 2 * 4 * (128 + 192 + 128 + 128 + 128 + 320 + 160 + 128)
    assert sum(p.numel() for p in model.parameters()) == total_before + want
    move_adapters(model)
    model.train()
    ids, doc_ids, labels = packed_batch(cfg.vocab_size)
    loss, n = lm_loss_sum(model(ids, document_ids=doc_ids), labels)
    loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
        if p.requires_grad:
            assert p.grad.abs().sum() > 0, name


def test_targets_subset_and_bad_settings_give_one_line(monkeypatch):
    cfg = tiny_config("medium")
    model = random_model(cfg)
    apply_lora(model, r=2, alpha=4, targets=["qkv_proj"])
    adapted = {n.rpartition(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {f"model.layers.{i}.self_attn.qkv_proj" for i in range(cfg.num_hidden_layers)}
    with pytest.raises(Phi3Error, match="already applied"):
        apply_lora(model, r=2, alpha=4)
    for kwargs, match in [({"r": 0}, "positive integer"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
                          ({"targets": ["q_proj"]}, "unknown module 'q_proj'"), ({"targets": []}, "empty")]:
        with pytest.raises(Phi3Error, match=match):
            apply_lora(random_model(cfg), **{"r": 2, "alpha": 4, **kwargs})
    from phi3.train.parallel import apply_activation_checkpointing
    with pytest.raises(Phi3Error, match="before activation checkpointing"):
        apply_lora(apply_activation_checkpointing(random_model(cfg)), r=2, alpha=4)
    with pytest.raises(Phi3Error, match="no LoRA adapters"):
        merge_lora(random_model(cfg))
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(Phi3Error, match=r"pip install 'phi3\[train\]'"):
        apply_lora(random_model(cfg), r=2, alpha=4)


def test_lora_then_activation_checkpointing_gives_the_same_gradients():
    """Order LoRA -> AC. With LoRA dropout on, the recomputed forward must draw the same masks
    (AC preserves the RNG state), so gradients equal the plain LoRA model's exactly."""
    from phi3.train.parallel import apply_activation_checkpointing
    cfg = tiny_config("medium")
    ids, doc_ids, labels = packed_batch(cfg.vocab_size)
    grads, keys = [], []
    for ac in (False, True):
        model = random_model(cfg)
        torch.manual_seed(5)
        apply_lora(model, r=R, alpha=ALPHA, dropout=0.2)
        move_adapters(model)
        if ac:
            apply_activation_checkpointing(model)
        model.train()
        torch.manual_seed(7)
        loss, _ = lm_loss_sum(model(ids, document_ids=doc_ids), labels)
        loss.backward()
        grads.append({n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()
                      if p.requires_grad})
        keys.append(list(model.state_dict()))
        if ac:  # merge works through the checkpoint wrappers and gives the plain names
            merge_lora(model)
            assert list(model.state_dict()) == list(random_model(cfg).state_dict())
    assert keys[0] == keys[1]  # AC's state_dict hooks strip its prefix
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 4 * 2
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_lora_under_fsdp2_trains_only_adapters_and_merges_from_a_full_state_dict(tmp_path):
    """FSDP2 on one gloo process: fully_shard accepts the frozen base weights beside trainable
    adapters, a step moves only the adapters, and the gathered full state dict merges into the
    same weights as merge_lora on an unsharded copy."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already in this process")
    cfg = tiny_config("medium")
    ids, doc_ids, labels = packed_batch(cfg.vocab_size)

    def build():
        model = random_model(cfg)
        torch.manual_seed(5)
        apply_lora(model, r=R, alpha=ALPHA)
        move_adapters(model)
        return model.train()

    def step(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loss, n = lm_loss_sum(model(ids, document_ids=doc_ids), labels)
        (loss / n).backward()
        opt.step()
        return (loss / n).item()

    reference = build()
    ref_loss = step(reference)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = build()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        loss = step(model)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    finally:
        dist.destroy_process_group()
    assert abs(loss - ref_loss) <= 1e-6
    for k, v in full.items():
        changed = not torch.equal(v, before[k])
        assert changed == (".lora_" in k), k
    merged = merge_lora_state_dict(full, r=R, alpha=ALPHA)
    merge_lora(reference)
    want = reference.state_dict()
    assert list(merged) == list(want)
    for k in want:
        assert torch.allclose(merged[k], want[k], atol=1e-6), k


def test_default_targets_are_the_fused_projections():
    assert DEFAULT_TARGETS == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def test_adapters_disabled_gives_the_base_model_and_restores_training_flags():
    from phi3.train.lora import adapters_disabled
    cfg = tiny_config("medium")
    base = random_model(cfg).eval()
    model = random_model(cfg)
    apply_lora(model, r=R, alpha=ALPHA)
    move_adapters(model)
    model.eval()
    ids = packed_batch(cfg.vocab_size)[0]
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        with_lora = model(ids)
        with adapters_disabled(model):
            off = model(ids)
        again = model(ids)
        assert torch.equal(off, base(ids))
        assert torch.equal(again, with_lora) and not torch.equal(off, with_lora)
    assert [p.requires_grad for p in model.parameters()] == flags
