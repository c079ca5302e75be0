"""Training losses: next-token cross-entropy on already-shifted labels, per-sequence log-probs,
and DPO's sigmoid loss (with cDPO label smoothing) and its logged metrics.

Labels follow phi3.train.data: `labels[b, t]` is the token that should follow `input_ids[b, t]`
(already shifted by the packer), IGNORE (-100) where there is no loss. So logits[b, t] scores
labels[b, t] directly: no slicing here, and no off-by-one to get wrong in two places.

Memory. The head's float32 logits [B, T, V] are the largest activation of a small-model step
(SmolLM2: V = 49152, so 4 rows x 512 tokens = 403 MB). F.cross_entropy keeps a second [B, T, V]
float32 tensor (its log_softmax output) from the forward to the backward, and its backward makes
two more. Here the forward walks the rows in 16 MB chunks and saves nothing but the logits
themselves; the backward recomputes softmax chunk by chunk and writes straight into the logits'
gradient. Rows whose label is -100 (prompts in SFT/DPO) are skipped in both directions. Measured
on [2048, 49152] float32 (one [N, V] = 384 MB), peak resident memory above the step's start (logits included):
forward 506 MB vs 776 MB, forward+backward 940 MB vs 1161 MB; time (2 threads) 0.86 s vs 0.88 s
with every label, 0.94 s vs 1.35 s with a quarter of them. Math is float32 whatever the logits'
dtype; the gradient comes back in the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from phi3.errors import Phi3Error

IGNORE = -100
# Elements of [N, V] processed at once (16 MB of float32 per temporary): the rows per chunk follow
# from V. Bigger chunks only grow the peak: 1024 rows at V = 49152 (two 200 MB temporaries in the
# backward) made the backward peak 3.0x one [N, V] instead of 2.0x.
CHUNK_ELEMENTS = 1 << 22


def _chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


class _TokenLogProbs(torch.autograd.Function):
    """log p(label) per row of logits [N, V], 0 where the label is IGNORE, without keeping a
    [N, V] log_softmax for the backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        valid = labels != IGNORE
        safe = labels.clamp(min=0)
        # Only rows with a label are scored: SFT and DPO put -100 on every prompt token, often most
        # of a row. (Pretraining rows are nearly all labels: then plain slices, no index copies.)
        rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        out = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
        n = logits.shape[0] if rows is None else rows.numel()
        step = _chunk_rows(logits.shape[1])
        for s in range(0, n, step):
            idx = slice(s, s + step) if rows is None else rows[s:s + step]
            # log_softmax, not logsumexp: on a CPU torch's logsumexp took 1.56 s for [2048, 49152]
            # where log_softmax took 0.39 s (2 threads).
            ls = F.log_softmax(logits[idx].float(), dim=-1)
            out[idx] = ls.gather(1, safe[idx, None]).squeeze(1)
        ctx.save_for_backward(logits, safe, rows if rows is not None else torch.empty(0, dtype=torch.long))
        ctx.all_rows = rows is None
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, safe, rows = ctx.saved_tensors
        # d log p(y) / d z = onehot(y) - softmax(z); rows without a label get no gradient.
        if ctx.all_rows:
            grad = torch.empty_like(logits)
            n = logits.shape[0]
        else:
            grad = torch.zeros_like(logits)
            n = rows.numel()
        g = grad_out.float()
        step = _chunk_rows(logits.shape[1])
        for s in range(0, n, step):
            idx = slice(s, s + step) if ctx.all_rows else rows[s:s + step]
            gs = g[idx, None]
            chunk = torch.softmax(logits[idx].float(), dim=-1).mul_(-gs)
            chunk.scatter_add_(1, safe[idx, None], gs)
            grad[idx] = chunk.to(grad.dtype)
        return grad, None


def _check(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise Phi3Error(f"loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match; "
                        "pass logits [B, T, V] and shifted labels [B, T]")
    if labels.dtype not in (torch.int64, torch.int32):
        raise Phi3Error(f"loss: labels are {labels.dtype}; pass integer token ids (int64) with -100 for no loss")


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(labels[b, t] | ...) from logits[b, t], float32 [B, T]; 0 where the label is -100."""
    _check(logits, labels)
    B, T, V = logits.shape
    out = _TokenLogProbs.apply(logits.reshape(B * T, V), labels.reshape(B * T).long())
    return out.view(B, T)


def token_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy per token, float32 [B, T]; 0 where the label is -100."""
    return -token_logps(logits, labels)


def lm_loss_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """(sum of per-token cross-entropy, number of label tokens). The trainer divides the sum by the
    label tokens of the whole optimizer step (all micro-batches, all ranks), so the loss is exact
    whatever the accumulation and world size."""
    return token_losses(logits, labels).sum(), int((labels != IGNORE).sum())


def sequence_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of log p(label) over each row's label tokens, float32 [B] (DPO's log pi(y|x): the
    prompt and padding carry -100)."""
    return token_logps(logits, labels).sum(dim=-1)


def dpo_loss(pi_chosen: Tensor, pi_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0, rpo_alpha: float | None = None,
             chosen_tokens: Tensor | int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """DPO's sigmoid loss per pair, and the implicit rewards (detached, for logging).

        D = (pi_c - ref_c) - (pi_r - ref_r)
        L = -(1 - e) log s(b D) - e log s(-b D)      (e = label_smoothing: cDPO, the preference
                                                     labels are taken to be flipped with prob. e)
        r_c = b (pi_c - ref_c),  r_r = b (pi_r - ref_r)

    With e = 0 this is TRL 1.x's `-F.logsigmoid(beta * delta)` exactly (TRL 1.x ignores
    label_smoothing for "sigmoid"; TRL <= 0.28 had the cDPO form above). The mean over pairs is
    the caller's: sum, then divide by the pairs in the whole optimizer step.

    rpo_alpha (RPO, TRL <= 0.2x's DPOConfig.rpo_alpha; TRL 1.x: loss_type=["sigmoid", "sft"],
    loss_weights=[1, rpo_alpha]): adds rpo_alpha * NLL to every pair's loss, where NLL is the chosen
    answers' negative log-likelihood per token over the batch given, -sum(pi_c) / sum(chosen_tokens)
    (TRL: the mean of -log p over all the chosen rows' completion tokens, one number for the batch),
    so the pair mean is DPO's + rpo_alpha * NLL. `chosen_tokens` counts the label tokens of each chosen
    answer (or all of them). Why: plain DPO can widen the margin only by pushing unlikely rejected answers
    further down; the NLL term raises the chosen ones (finetune-demo run 4: rewards/chosen +0.04 against
    rewards/rejected -1.05). None or 0: the plain loss, bit for bit."""
    if not beta > 0:
        raise Phi3Error(f"dpo: beta is {beta}; it must be > 0 (0.1 is the usual value)")
    if not 0.0 <= label_smoothing < 0.5:
        raise Phi3Error(f"dpo: label_smoothing is {label_smoothing}; it must be in [0, 0.5) "
                        "(the assumed probability that a preference is flipped)")
    shapes = {tuple(t.shape) for t in (pi_chosen, pi_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise Phi3Error(f"dpo: log-prob tensors have different shapes {sorted(shapes)}; pass one value per pair")
    ref_chosen = ref_chosen.to(pi_chosen.dtype)
    ref_rejected = ref_rejected.to(pi_rejected.dtype)
    chosen_logratios = pi_chosen - ref_chosen
    rejected_logratios = pi_rejected - ref_rejected
    logits = beta * (chosen_logratios - rejected_logratios)
    if label_smoothing == 0.0:
        losses = -F.logsigmoid(logits)
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    if rpo_alpha:
        if rpo_alpha < 0:
            raise Phi3Error(f"dpo: rpo_alpha is {rpo_alpha}; it must be >= 0 (TRL's RPO uses 1.0; 0 turns it off)")
        if chosen_tokens is None:
            raise Phi3Error("dpo: rpo_alpha needs chosen_tokens (the label tokens of the chosen answers)")
        n = torch.as_tensor(chosen_tokens).sum().clamp(min=1).to(pi_chosen.device, pi_chosen.dtype)
        losses = losses + rpo_alpha * (-pi_chosen.sum() / n)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_metrics(loss: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """Means over the pairs given, under TRL's names. For a step of several micro-batches (or ranks)
    pass the concatenated (all-gathered) per-pair tensors, so each pair counts once."""
    loss, chosen_rewards, rejected_rewards = loss.detach(), chosen_rewards.detach(), rejected_rewards.detach()
    if chosen_rewards.numel() == 0:
        raise Phi3Error("dpo_metrics: no pairs given")
    return {
        "loss": loss.float().mean().item(),
        "rewards/chosen": chosen_rewards.float().mean().item(),
        "rewards/rejected": rejected_rewards.float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).float().mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
    }


def pair_logps(model: torch.nn.Module, input_ids: Tensor, labels: Tensor,
               attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """log pi(chosen), log pi(rejected) [P] each for a DPO batch whose rows 0..P-1 are the chosen
    answers and P..2P-1 the rejected ones (phi3.train.data.PairBatch: right padding, labels -100
    on the prompt and padding). Chosen and rejected go through one forward, as TRL does: one
    batch, and the same numerics for both. Call it under torch.no_grad() on the frozen reference."""
    if input_ids.shape[0] % 2:
        raise Phi3Error(f"dpo: a pair batch has an even number of rows (chosen then rejected); got {input_ids.shape[0]}")
    logits = model(input_ids, attention_mask=attention_mask)
    return sequence_logps(logits, labels).chunk(2)


@torch.no_grad()
def reference_logps(model: torch.nn.Module, batches, num_pairs: int) -> Tensor:
    """The frozen reference's log pi(chosen), log pi(rejected) for every pair, computed once
    before training: float32 [num_pairs, 2], row i for the pair whose PairBatch.index is i.
    `model` is the policy before its first step (TRL's precompute_ref_log_probs with no ref model:
    no second copy of the weights is ever held; with LoRA, B = 0 makes it the base model). Eval
    mode (no dropout) for the pass; the caller wraps it in the same autocast as training steps.
    Pairs no batch covered stay NaN, so a gap is loud rather than a silent zero."""
    out = torch.full((num_pairs, 2), float("nan"), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if batch.index is None:
                raise Phi3Error("reference_logps: the pair batch carries no pair index; build it with pair_batches")
            chosen, rejected = pair_logps(model, batch.input_ids, batch.labels, batch.attention_mask)
            out[batch.index.long().cpu()] = torch.stack([chosen, rejected], dim=1).float().cpu()
    finally:
        model.train(was_training)
    return out
