"""Block-format weights: repacking from GGUF bytes and the CPU kernel against dense float32."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from phi3 import quant


def blocks(kind: str, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    data = gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])
    return data, gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])


@pytest.mark.parametrize("kind", quant.QUANT_KINDS)
def test_repacked_blocks_dequantize_exactly(kind):
    data, dense = blocks(kind, 48, 96)
    q = quant.from_gguf_blocks(kind, data, 48, 96)
    assert torch.equal(q.dequantize(), torch.from_numpy(dense))


@pytest.mark.parametrize("kind", quant.QUANT_KINDS)
@pytest.mark.parametrize("m", [1, 3, 17, 40])
def test_kernel_matches_dense(kind, m):
    if not quant.kernel_available():
        pytest.skip(f"quantized CPU kernel unavailable: {quant.kernel_error()}")
    data, dense = blocks(kind, 200, 320, seed=m)
    q = quant.from_gguf_blocks(kind, data, 200, 320)
    x = torch.randn(2, m, 320)
    expected = x @ torch.from_numpy(dense).t()
    got = q(x)
    assert got.shape == (2, m, 200)
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    # bfloat16 activations go through the same float32 kernel
    got16 = q(x.bfloat16())
    assert got16.dtype == torch.bfloat16
    assert (got16.float() - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()


def test_fallback_without_kernel_gives_the_same_numbers(monkeypatch):
    data, dense = blocks("Q4_1", 64, 128)
    q = quant.from_gguf_blocks("Q4_1", data, 64, 128)
    x = torch.randn(1, 128)
    monkeypatch.setattr(quant, "_ext", None)
    monkeypatch.setattr(quant, "_ext_error", "disabled for this test")
    assert torch.allclose(q(x), x @ torch.from_numpy(dense).t(), rtol=1e-5, atol=1e-5)


def test_rows_concatenate_and_permute():
    (a, da), (b, db) = blocks("Q8_0", 32, 64, 1), blocks("Q8_0", 16, 64, 2)
    qa, qb = quant.from_gguf_blocks("Q8_0", a, 32, 64), quant.from_gguf_blocks("Q8_0", b, 16, 64)
    both = quant.concat_rows([qa, qb])
    assert torch.equal(both.dequantize(), torch.from_numpy(np.concatenate([da, db])))
    order = torch.randperm(48)
    assert torch.equal(quant.permute_rows(both, order).dequantize(), both.dequantize()[order])


def test_int4pack_for_bfloat16_matches_dense():
    data, dense = blocks("Q4_1", 96, 256, seed=5)
    q = quant.from_gguf_blocks("Q4_1", data, 96, 256)
    q.to_int4pack()
    w = torch.from_numpy(dense)
    # only the rounding of scale and min to bfloat16 separates the weights
    assert (q.dequantize() - w).abs().max().item() <= 2e-2 * w.abs().max().item()
    x = torch.randn(3, 256).bfloat16()
    expected = x.float() @ w.t()
    got = q(x)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected).abs().max().item() <= 3e-2 * expected.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernels_match_pytorch(dtype):
    ext = quant.kernel()
    if ext is None:
        pytest.skip(f"CPU kernels unavailable: {quant.kernel_error()}")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    x, w = torch.randn(2, 3, 96).to(dtype), torch.randn(96).to(dtype)
    ref = torch.nn.functional.rms_norm(x.float(), (96,), w.float(), 1e-5)
    assert (ext.rms_norm(x, w, 1e-5).float() - ref).abs().max().item() <= tol * ref.abs().max().item()
    B, H, KV, S, hd = 2, 6, 2, 37, 96
    q = torch.randn(B, H, hd).to(dtype)
    k, v = torch.randn(B, KV, 50, hd).to(dtype), torch.randn(B, KV, 50, hd).to(dtype)
    allowed = torch.rand(B, S) > 0.3
    allowed[:, -1] = True
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None], k.float()[:, :, :S], v.float()[:, :, :S], attn_mask=allowed[:, None, None, :],
        enable_gqa=True)[:, :, 0]
    got = ext.attend_one(q, k, v, S, allowed, hd ** -0.5)
    assert got.dtype == dtype
    assert (got.float() - expected).abs().max().item() <= tol * expected.abs().max().item() + 1e-6
