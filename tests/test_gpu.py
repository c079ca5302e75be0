"""--device: the same code paths on a GPU as on the CPU. Each test runs on the CPU here and on CUDA
where PyTorch sees a GPU (skipped otherwise). 4-bit GGUF weights stay packed on the device and are
unpacked a slice at a time per matmul."""

from __future__ import annotations

import pytest
import torch

from phi3 import quant
from phi3.checkpoint import load, resolve_device
from phi3.engine import Engine
from phi3.errors import Phi3Error
from phi3.generate import SamplingParams, generate
from tests.test_engine import _run_together

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="no CUDA GPU visible to PyTorch"))]


def test_device_names_resolve_or_fail_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    with pytest.raises(Phi3Error, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(Phi3Error, match="sees no CUDA GPU"):
            resolve_device("cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_gguf_runs_packed_on_the_device(smollm_gguf, device):
    lm = load(smollm_gguf, device=device, dtype="auto")
    down = lm.model.model.layers[0].mlp.down_proj
    assert isinstance(down, quant.QuantLinear) and down.qs.device.type == device
    assert lm.model.dtype == (torch.bfloat16 if device == "cuda" else torch.float32)
    # Not "What is the capital of France?": a near tie for the first token under int8 activations
    # (tests/test_cli.py's ROBUST_FRANCE says how near).
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": "Name the capital of France."}])
    out = generate(lm.model, lm.tokenizer, [ids], SamplingParams(max_new_tokens=12))[0]
    assert "Paris" in out.text
    # Through the unpacking path (more tokens than the CPU kernel takes): the dequantized weight's
    # numbers to bfloat16 rounding (the fast mode multiplies in bfloat16 where the hardware does).
    x = torch.randn(3, quant.PROMPT_ROWS + 1, down.in_features, device=device, dtype=lm.model.dtype)
    ref = x.float() @ down.dequantize().t()
    assert torch.allclose(down(x).float(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_server_batching_on_the_device(smollm_gguf, device):
    lm = load(smollm_gguf, device=device)
    tok = lm.tokenizer
    ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in ("Name a color.", "What is 2+2?")]
    params = SamplingParams(max_new_tokens=8)
    alone = [generate(lm.model, tok, [x], params)[0] for x in ids]
    engine = Engine(lm.model, tok, max_batch=4).start()
    try:
        together = _run_together(engine, ids, params)
    finally:
        engine.stop()
    if device == "cpu":  # packed CPU kernels give each row its solo numbers bit for bit
        assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    else:  # a GPU matmul may sum a batch in another order: near-ties can flip late tokens
        assert all(c.token_ids[:2] == a.token_ids[:2] for c, a in zip(together, alone))
