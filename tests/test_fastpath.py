"""fastpath.py: fused CPU kernels are installed onto a loaded model from outside, and a trainer
sees a plain model either way (same parameters, plain numbers under autograd)."""

from __future__ import annotations

import pytest
import torch

from phi3 import cpu_kernels
from phi3.fastpath import FusedAttention, FusedRMSNorm, install_cpu_fast_path, remove_cpu_fast_path
from phi3.model import Attention, RMSNorm, Transformer
from tests.conftest import tiny_config


@pytest.fixture()
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(tiny_config("mini-4k")).eval()  # head dim 16: fits the attention kernel
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.08) if p.dim() > 1 else p.copy_(1 + 0.1 * torch.randn_like(p))
    return m


def decode(model: Transformer, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Prompt logits, then `steps` one-token steps through decode_step with two caches."""
    caches = [model.new_cache(1, 64), model.new_cache(1, 64)]
    out = [model(ids[:, :8], cache=caches[0])[0, -1], model(ids[:, :5], cache=caches[1])[0, -1]]
    for s in range(steps):
        out.append(model.decode_step(torch.tensor([int(ids[0, 8 + s]), int(ids[0, 5 + s])]), caches))
    return torch.cat([o.reshape(-1) for o in out])


def test_install_swaps_modules_and_keeps_the_state_dict(model):
    before = dict(model.state_dict())
    used = install_cpu_fast_path(model)
    if cpu_kernels.kernel() is None:
        assert used["rmsnorm"] == "PyTorch"
        assert not any(isinstance(m, (FusedRMSNorm, FusedAttention)) for m in model.modules())
        return
    assert used["rmsnorm"].startswith("phi3 ") and used["decode attention"].startswith("phi3 ")
    assert sum(isinstance(m, FusedRMSNorm) for m in model.modules()) == 2 * 2 + 1
    assert sum(isinstance(m, FusedAttention) for m in model.modules()) == 2
    after = model.state_dict()
    assert list(after) == list(before) and all(after[k] is before[k] or torch.equal(after[k], before[k]) for k in before)
    remove_cpu_fast_path(model)
    assert all(type(m) in (RMSNorm, Attention) for m in model.modules() if isinstance(m, (RMSNorm, Attention)))


def test_fused_decoding_matches_plain_pytorch(model):
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = decode(model, ids, 6)
        install_cpu_fast_path(model)
        fused = decode(model, ids, 6)
    assert torch.allclose(fused, plain, rtol=1e-4, atol=1e-4), (fused - plain).abs().max()


def test_autograd_sees_the_plain_model(model):
    """With gradients on, the installed modules run exactly the plain code: a trainer can wrap a
    loaded model unchanged."""
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(2))
    plain = model(ids)
    install_cpu_fast_path(model)
    fused = model(ids)
    assert torch.equal(fused, plain)
    fused.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
