"""Activation checkpointing applied from outside the model: same loss, same gradients, same
state_dict keys, with and without it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from phi3.errors import Phi3Error
from phi3.model import MLP, Transformer
from phi3.train.parallel import apply_activation_checkpointing, is_checkpointed, unwrapped_name
from tests.conftest import tiny_config
from tests.test_model import with_training


def loss_and_grads(model, ids, doc_ids, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    logits = model(ids[:, :-1], document_ids=doc_ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {unwrapped_name(n): p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_keeps_loss_and_gradients(dropout, monkeypatch):
    cfg = with_training(tiny_config("mini-4k"), attention_dropout=dropout, resid_pdrop=dropout, embd_pdrop=dropout)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    plain.init_weights()
    checkpointed = apply_activation_checkpointing(copy.deepcopy(plain))
    assert is_checkpointed(checkpointed) and not is_checkpointed(plain)
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    doc_ids = torch.tensor([[0] * 12 + [1] * 21, [0] * 33])
    loss, grads = loss_and_grads(plain.train(), ids, doc_ids, seed=2)
    calls = []
    mlp_forward = MLP.forward
    # (Not a forward hook: under torch 2.13 hooks did not fire during the recompute.)
    monkeypatch.setattr(MLP, "forward", lambda self, x: calls.append(1) or mlp_forward(self, x))
    loss_ac, grads_ac = loss_and_grads(checkpointed.train(), ids, doc_ids, seed=2)
    # Each layer's MLP ran again in the backward pass: its activations were not kept.
    assert len(calls) == 2 * cfg.num_hidden_layers
    # Recomputation replays the same ops and (RNG state preserved) the same dropout masks.
    assert torch.equal(loss, loss_ac)
    assert grads.keys() == grads_ac.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_ac[name]), name


def test_activation_checkpointing_keeps_state_dict_keys_and_inference():
    cfg = tiny_config("medium")
    torch.manual_seed(0)
    plain = Transformer(cfg)
    plain.init_weights()
    checkpointed = apply_activation_checkpointing(copy.deepcopy(plain))
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    fresh = apply_activation_checkpointing(Transformer(cfg))
    fresh.load_state_dict(plain.state_dict())  # a Hugging Face state_dict loads as it is
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        expected = plain.eval()(ids)
        assert torch.equal(fresh.eval()(ids), expected)
        # Decoding through the wrappers (decode_step reaches DecoderLayer.decode_rows) still works.
        cache = fresh.new_cache(1, 16)
        fresh(ids, cache=cache)
        step = fresh.decode_step(torch.tensor([5]), [cache])
        cache2 = plain.new_cache(1, 16)
        plain(ids, cache=cache2)
        assert torch.equal(step, plain.decode_step(torch.tensor([5]), [cache2]))
    with pytest.raises(Phi3Error, match="already applied"):
        apply_activation_checkpointing(fresh)


def test_fully_shard_over_checkpointed_layers(tmp_path):
    """The order a training loop uses (torchtitan's): checkpointing, then FSDP2 per layer and on the
    whole model. One gloo process: loss, gradients and state_dict keys are the plain model's."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    cfg = tiny_config("mini-128k")
    torch.manual_seed(0)
    plain = Transformer(cfg)
    plain.init_weights()
    sharded = apply_activation_checkpointing(copy.deepcopy(plain))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        torch.manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (2, 41))
        doc_ids = torch.tensor([[0] * 35 + [1] * 6, [0] * 41])  # a 35-token document (> 32): LongRoPE's long factors
        loss, grads = loss_and_grads(plain.train(), ids, doc_ids, seed=2)
        loss_fsdp, grads_fsdp = loss_and_grads(sharded.train(), ids, doc_ids, seed=2)
        assert list(sharded.state_dict()) == list(plain.state_dict())
        assert torch.allclose(loss, loss_fsdp, rtol=0, atol=1e-6)
        for name, g in grads.items():
            assert torch.allclose(g, grads_fsdp[name].full_tensor(), rtol=0, atol=1e-6), name
    finally:
        dist.destroy_process_group()


def test_param_groups_decay_matrices_only():
    from phi3.train.trainer import param_groups
    for kind in ("mini-4k", "medium"):
        cfg = tiny_config(kind)
        for tied in (False, True):
            model = apply_activation_checkpointing(Transformer(cfg.with_(tie_word_embeddings=tied)))
            decay, no_decay = param_groups(model, 0.1)
            names = {id(p): unwrapped_name(n) for n, p in model.named_parameters()}
            assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
            assert {names[id(p)] for p in no_decay["params"]} == {
                n for n in map(unwrapped_name, dict(model.named_parameters())) if "norm" in n or "embed_tokens" in n}
            decayed = {names[id(p)] for p in decay["params"]}
            assert ("lm_head.weight" in decayed) == (not tied)
            assert all(("proj" in n) or n == "lm_head.weight" for n in decayed)


@pytest.mark.parametrize("parallel", ["none", "fsdp"])
def test_bfloat16_trains_float32_master_weights(parallel, tmp_path):
    """precision = bfloat16: autocast alone, FSDP2's MixedPrecisionPolicy(bf16 params, fp32
    reduce) under fsdp (here a 1-process gloo group). Parameters and AdamW state stay float32; the
    losses follow the float32 run's within bf16's rounding."""
    import json

    from phi3.train.parallel import DistContext, init_distributed
    from phi3.train.trainer import run
    from tests.test_train_distributed import toy_job

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    ref = toy_job("none")
    run(ref, DistContext(), tmp_path / "fp32", export=False, progress=False)
    job = toy_job(parallel)
    job.recipe.precision = "bfloat16"
    ctx = init_distributed(need_group=parallel == "fsdp")
    try:
        run(job, ctx, tmp_path / "bf16", export=False, progress=False)
        assert all(p.dtype == torch.float32 for p in job.model.parameters())
        if parallel == "fsdp":
            assert type(job.model.model.layers[0].mlp.down_proj.weight).__name__ == "DTensor"
    finally:
        ctx.close()
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(a) == len(b) == 5 and a != b
    for x, y in zip(a, b):
        assert abs(x - y) < 0.02 * x, (a, b)


def test_fsdp_with_tied_embeddings_matches_plain(tmp_path):
    """SmolLM2's layout (llama, grouped-query attention, head tied to the embedding) under FSDP2
    (1-process gloo group): the tied weight is sharded once in the root group and the losses equal
    the unwrapped model's."""
    import json

    from phi3.train.parallel import DistContext, init_distributed
    from phi3.train.trainer import run
    from tests.test_model import packing_config
    from tests.test_train_distributed import toy_job

    def losses(out):
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    cfg = packing_config("llama")
    assert cfg.tie_word_embeddings
    run(toy_job("none", cfg=cfg), DistContext(), tmp_path / "plain", export=False, progress=False)
    job = toy_job("fsdp", cfg=cfg)
    ctx = init_distributed(need_group=True)
    try:
        run(job, ctx, tmp_path / "fsdp", export=False, progress=False)
        assert job.model.lm_head.weight is job.model.model.embed_tokens.weight
    finally:
        ctx.close()
    for x, y in zip(losses(tmp_path / "plain"), losses(tmp_path / "fsdp")):
        assert abs(x - y) <= 1e-5 * abs(x)
