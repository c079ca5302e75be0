"""Training losses: token cross-entropy against torch's, packed batches against documents alone,
and DPO against TRL 1.16's DPOTrainer itself (loss, per-pair rewards, every parameter's gradient)
on the same tiny model and batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phi3.errors import Phi3Error
from phi3.model import Transformer
from phi3.train.losses import (IGNORE, dpo_loss, dpo_metrics, lm_loss_sum, pair_logps, reference_logps,
                               sequence_logps, token_losses)
from tests.conftest import tiny_config


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [50, 70000])  # 70000: several rows per chunk vs one row per chunk
def test_token_losses_equal_torch_cross_entropy(dtype, vocab):
    torch.manual_seed(0)
    T = 300 if vocab < 1000 else 30
    x = (3 * torch.randn(3, T, vocab)).to(dtype).requires_grad_(True)
    y = torch.randint(0, vocab, (3, T))
    y[0, :40] = IGNORE
    y[2, 5:60] = IGNORE
    g = torch.randn(3, T)
    ours = token_losses(x, y)
    assert ours.dtype == torch.float32
    (ours * g).sum().backward()
    ours_grad, x.grad = x.grad.clone(), None
    ref = F.cross_entropy(x.float().flatten(0, 1), y.flatten(), reduction="none").view(3, T)
    (ref * g).sum().backward()
    assert ours_grad.dtype == dtype
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ours[y == IGNORE] == 0).all()
    assert (ours_grad.float() - x.grad.float()).abs().max().item() <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert (ours_grad[y == IGNORE] == 0).all()
    total, n = lm_loss_sum(x, y)
    assert n == int((y != IGNORE).sum())
    assert abs(total.item() - ref.sum().item()) <= 1e-6 * ref.sum().item()
    assert torch.allclose(sequence_logps(x, y), -ref.sum(-1), rtol=1e-6, atol=1e-5)


def test_token_losses_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    x = (3 * torch.randn(2, 50, 300)).requires_grad_(True)
    y = torch.randint(0, 300, (2, 50))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = token_losses(x, y)
        ours.sum().backward()
    ours_grad, x.grad = x.grad.clone(), None
    ref = F.cross_entropy(x.flatten(0, 1), y.flatten(), reduction="none").view(2, 50)
    ref.sum().backward()
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-6 and (ours_grad - x.grad).abs().max().item() <= 1e-6


def test_bad_shapes_give_one_line():
    with pytest.raises(Phi3Error, match="do not match"):
        token_losses(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(Phi3Error, match="integer token ids"):
        token_losses(torch.zeros(2, 3, 5), torch.zeros(2, 3))


def test_lm_loss_sum_over_a_packed_batch_equals_per_document_sums():
    cfg = tiny_config("medium")
    model = random_model(cfg).eval()
    torch.manual_seed(1)
    lengths = [[5, 20, 39], [1, 30, 22, 11]]
    docs = [[torch.randint(0, cfg.vocab_size, (n,)) for n in row] for row in lengths]

    def shifted(doc):  # labels as the packer writes them: -100 on each document's last token
        return torch.cat([doc[1:], torch.tensor([IGNORE])])

    ids = torch.stack([torch.cat(row) for row in docs])
    labels = torch.stack([torch.cat([shifted(d) for d in row]) for row in docs])
    doc_ids = torch.stack([torch.cat([torch.full((len(d),), j) for j, d in enumerate(row)]) for row in docs])
    labels[1, -11:] = IGNORE  # the last document is padding: no loss at all
    with torch.no_grad():
        packed, n_packed = lm_loss_sum(model(ids, document_ids=doc_ids), labels)
        total, n_alone = 0.0, 0
        for row in docs:
            for d in row:
                if d is docs[1][-1]:
                    continue
                s, n = lm_loss_sum(model(d[None]), shifted(d)[None])
                total, n_alone = total + s.item(), n_alone + n
    assert n_packed == n_alone == sum(n - 1 for row in lengths for n in row) - 10
    # float32; packed and alone differ only in how SDPA blocks the masked matmuls (~4e-6 on logits)
    assert abs(packed.item() - total) <= 1e-6 * abs(total)


# --- DPO ----------------------------------------------------------------------------------------

def closed_form(pi_c, pi_r, ref_c, ref_r, beta, eps):
    d = (pi_c.double() - ref_c.double()) - (pi_r.double() - ref_r.double())
    return -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2), (2.0, 0.1)])
def test_dpo_loss_is_the_cdpo_formula(beta, eps):
    torch.manual_seed(0)
    pi_c, pi_r = (-40 * torch.rand(6)).requires_grad_(True), (-40 * torch.rand(6)).requires_grad_(True)
    ref_c, ref_r = -40 * torch.rand(6), -40 * torch.rand(6)
    losses, r_c, r_r = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta, label_smoothing=eps)
    assert torch.allclose(losses.double(), closed_form(pi_c, pi_r, ref_c, ref_r, beta, eps), atol=1e-6, rtol=1e-6)
    assert torch.allclose(r_c, beta * (pi_c - ref_c).detach()) and torch.allclose(r_r, beta * (pi_r - ref_r).detach())
    assert not r_c.requires_grad
    losses.sum().backward()
    # dL/dpi_c = -beta [(1 - e) s(-b D) - e s(b D)], and dL/dpi_r is its negative
    z = beta * ((pi_c - ref_c) - (pi_r - ref_r)).detach()
    want = -beta * ((1 - eps) * torch.sigmoid(-z) - eps * torch.sigmoid(z))
    assert torch.allclose(pi_c.grad, want, atol=1e-6) and torch.allclose(pi_r.grad, -want, atol=1e-6)


def test_dpo_bad_settings_give_one_line():
    x = torch.zeros(2)
    with pytest.raises(Phi3Error, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(Phi3Error, match="label_smoothing"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(Phi3Error, match="shapes"):
        dpo_loss(x, torch.zeros(3), x, x)


def test_dpo_metrics_names_and_values():
    m = dpo_metrics(torch.tensor([0.5, 0.7, 0.9]), torch.tensor([0.2, -0.1, 0.0]), torch.tensor([0.1, 0.3, 0.0]))
    assert set(m) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    assert m["rewards/accuracies"] == pytest.approx(1 / 3)
    assert m["rewards/margins"] == pytest.approx((0.1 - 0.4 + 0.0) / 3)
    assert m["loss"] == pytest.approx(0.7)


@pytest.mark.parametrize("kind", ["medium", "llama"])
def test_dpo_equals_trl(tmp_path, kind):
    """Issue 15, Done-when 5: loss, rewards and gradients equal TRL's DPOTrainer on the same tiny
    model and batch within 1e-5. TRL scores the batch with its fused LM head (log-probs of the
    completion tokens, prompt labels -100); phi3 gets the same ids, right padding and a shifted
    labels tensor. A policy and a different reference (other seed), three pairs that TRL
    tokenizes itself, beta 0.3. `llama`: transformers keeps q/k/v and gate/up apart while phi3 fuses them, so
    the fused gradient is compared with TRL's concatenated."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from phi3.checkpoint import load
    from phi3.fastpath import remove_cpu_fast_path
    from tests.conftest import hf_reference, save_hf_model

    tmp = tmp_path
    cfg = tiny_config("medium")
    if kind == "llama":
        cfg = cfg.with_(model_type="llama", tie_word_embeddings=True)
    # No pad id in the config: transformers builds its embedding with padding_idx = pad_token_id,
    # which zeroes that row's gradient, and TRL appends <|endoftext|> (id 256, tiny_config's pad)
    # to every answer as a real token.
    cfg = cfg.with_(pad_token_id=None)
    folders = {}
    for name, seed in [("policy", 0), ("ref", 1)]:
        folders[name] = save_hf_model(hf_reference(cfg, seed=seed), cfg, tmp / name)
    hf_policy = AutoModelForCausalLM.from_pretrained(folders["policy"], dtype=torch.float32, attn_implementation="eager")
    hf_ref = AutoModelForCausalLM.from_pretrained(folders["ref"], dtype=torch.float32, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(folders["policy"])
    data = Dataset.from_dict({
        "prompt": ["How do I pick a lock?", "What is 2+2?", "Name a colour."],
        "chosen": [" I can't help with that.", " 4", " Blue, like the sky at noon"],
        "rejected": [" First, take a tension wrench and", " It is five, obviously", " Seven"]})
    beta = 0.3
    args = DPOConfig(output_dir=str(tmp / "out"), use_cpu=True, report_to=[], beta=beta, max_length=None,
                     save_strategy="no", logging_strategy="no", disable_tqdm=True, per_device_train_batch_size=3,
                     bf16=False)  # DPOConfig's default is bf16=True: accelerate would autocast the reference
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_ref, args=args, train_dataset=data, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    gathered = []  # TRL's per-pair values go through accelerator.gather on their way to the logs
    gather = trainer.accelerator.gather
    trainer.accelerator.gather = lambda t: gathered.append(t.detach().clone()) or gather(t)
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    # gather's calls in _compute_loss, last six: rewards/chosen, rewards/rejected, accuracies, margins,
    # logps/chosen, logps/rejected
    trl_chosen, trl_rejected, _, _, trl_pi_c, trl_pi_r = gathered[-6:]
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # phi3: the same ids; labels shifted (the token after position t, where it is a completion token)
    ids, attn, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = torch.where(completion[:, 1:].bool(), ids[:, 1:], IGNORE)
    assert (completion.sum() - completion[:, 0].sum()).item() == int((labels != IGNORE).sum())
    policy, ref = (load(folders[n], dtype="float32").model for n in ("policy", "ref"))
    for m in (policy, ref):
        remove_cpu_fast_path(m)
    policy.train()
    with torch.no_grad():
        ref_c, ref_r = pair_logps(ref.eval(), ids, labels, attn)
    pi_c, pi_r = pair_logps(policy, ids, labels, attn)
    losses, r_c, r_r = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=beta)
    loss = losses.mean()
    loss.backward()
    metrics = dpo_metrics(losses, r_c, r_r)

    assert abs(loss.item() - trl_loss.item()) <= 1e-5
    assert (pi_c - trl_pi_c).abs().max().item() <= 1e-4 * trl_pi_c.abs().max().item()
    assert (pi_r - trl_pi_r).abs().max().item() <= 1e-4 * trl_pi_r.abs().max().item()
    assert (r_c - trl_chosen).abs().max().item() <= 1e-5
    assert (r_r - trl_rejected).abs().max().item() <= 1e-5
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-5), name
    assert 0 < metrics["rewards/accuracies"] < 1  # the batch is not trivially one-sided

    hf_grads = {n: p.grad for n, p in hf_policy.named_parameters()}
    compared, worst = 0, 0.0
    for name, p in policy.named_parameters():
        if name.endswith("qkv_proj.weight") and kind == "llama":
            base = name.removesuffix("qkv_proj.weight")
            want = torch.cat([hf_grads[base + s + "_proj.weight"] for s in "qkv"])
        elif name.endswith("gate_up_proj.weight") and kind == "llama":
            base = name.removesuffix("gate_up_proj.weight")
            want = torch.cat([hf_grads[base + "gate_proj.weight"], hf_grads[base + "up_proj.weight"]])
        else:
            want = hf_grads[name]
        assert p.grad is not None and want is not None and p.grad.shape == want.shape, name
        worst = max(worst, (p.grad - want).abs().max().item())
        compared += 1
    assert compared == len(list(policy.parameters()))
    assert worst <= 1e-5, worst  # measured 2.1e-6 (medium), 2.3e-6 (llama); largest gradient 1.3 / 2.6
    assert max(p.grad.abs().max().item() for p in policy.parameters()) > 1e-2  # gradients are not ~0


def test_reference_logps_cache_every_pair_by_index():
    from types import SimpleNamespace
    cfg = tiny_config("medium")
    model = random_model(cfg).train()
    torch.manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (4, 12))  # pairs 5 and 2: rows chosen 5, chosen 2, rejected 5, rejected 2
    attn = torch.ones_like(ids)
    attn[1, 9:] = attn[3, 7:] = 0
    labels = torch.roll(ids, -1, 1)
    labels[:, :4] = IGNORE  # the prompt
    labels[attn == 0] = IGNORE
    labels[:, -1] = IGNORE
    labels[1, 8] = labels[3, 6] = IGNORE
    batch = SimpleNamespace(input_ids=ids, labels=labels, attention_mask=attn, index=torch.tensor([5, 2]))
    cache = reference_logps(model, [batch], num_pairs=6)
    assert model.training  # restored
    with torch.no_grad():
        want = sequence_logps(model(ids, attention_mask=attn), labels)
    assert torch.equal(cache[5], torch.stack([want[0], want[2]])) and torch.equal(cache[2], torch.stack([want[1], want[3]]))
    assert cache[[0, 1, 3, 4]].isnan().all()


def test_bf16_logits_into_the_loss_equal_float32_logits_bit_for_bit():
    """The trainer in bfloat16 passes the head's bf16 logits to token_losses (forward(...,
    float_logits=False)) rather than a float32 copy: the loss and every weight's gradient are the
    same bits (the upcast is exact; the logits' gradient is rounded to bf16 once either way)."""
    cfg = tiny_config("medium")
    model = random_model(cfg).train()
    torch.manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    labels = torch.roll(ids, -1, 1)
    labels[0, :5] = IGNORE
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    results = []
    for float_logits in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids, document_ids=doc_ids, float_logits=float_logits)
        assert logits.dtype == (torch.float32 if float_logits else torch.bfloat16)
        loss, _ = lm_loss_sum(logits, labels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_dpo_rpo_alpha_adds_trl_chosen_nll():
    """rpo_alpha (TRL's RPO): each pair's loss gains rpo_alpha * the chosen rows' cross-entropy, one
    mean over all their label tokens (TRL: F.cross_entropy over the chosen logits, ignore_index);
    None and 0 leave the plain loss bit for bit."""
    cfg = tiny_config("medium")
    model = random_model(cfg)
    torch.manual_seed(3)
    P, T = 3, 20
    ids = torch.randint(0, cfg.vocab_size, (2 * P, T))
    labels = torch.roll(ids, -1, 1)
    for row, start in enumerate([4, 7, 5, 6, 3, 9]):  # prompt tokens and a padded tail carry no label
        labels[row, :start] = IGNORE
        labels[row, T - row - 1:] = IGNORE
    with torch.no_grad():
        logits = model(ids)
    lp = sequence_logps(logits, labels)
    ref = lp.detach() + torch.tensor([0.3, -0.2, 0.1, -0.4, 0.25, 0.05])
    args = (lp[:P], lp[P:], ref[:P], ref[P:])
    plain, rc, rr = dpo_loss(*args, beta=0.1)
    n_chosen = (labels[:P] != IGNORE).sum()
    for off in (None, 0.0):
        same, _, _ = dpo_loss(*args, beta=0.1, rpo_alpha=off, chosen_tokens=n_chosen)
        assert torch.equal(same, plain)
    nll = F.cross_entropy(logits[:P].flatten(0, 1), labels[:P].flatten(), ignore_index=IGNORE)
    for alpha in (0.5, 1.0):
        per_row = (labels[:P] != IGNORE).sum(dim=1)  # per-answer counts sum to the same total
        for tokens in (n_chosen, per_row, int(n_chosen)):
            losses, rc2, rr2 = dpo_loss(*args, beta=0.1, rpo_alpha=alpha, chosen_tokens=tokens)
            torch.testing.assert_close(losses, plain + alpha * nll, rtol=0, atol=1e-6)
            assert torch.equal(rc2, rc) and torch.equal(rr2, rr)  # the rewards logged are DPO's own
    with pytest.raises(Phi3Error, match="rpo_alpha"):
        dpo_loss(*args, rpo_alpha=-1.0, chosen_tokens=n_chosen)
    with pytest.raises(Phi3Error, match="chosen_tokens"):
        dpo_loss(*args, rpo_alpha=1.0)
