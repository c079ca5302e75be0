"""The block types a llama-quantize *_K_M / *_K_S / IQ4 file mixes in (Q5_0, Q5_1, Q5_K, Q6_K,
IQ4_NL, IQ4_XS): repacked at load into QuantLinear, unpacked bit for bit as gguf-py unpacks them,
and multiplied without ever unpacking a whole model."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from phi3 import quant

NEW_KINDS = ["Q5_0", "Q5_1", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def random_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random GGUF bytes of `kind` whose half-precision scales are small and finite, and gguf-py's
    float32 dequantization of them [rows, cols]."""
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    halves = {"Q5_0": [0], "Q5_1": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}[kind]
    for at in halves:
        raw[:, at:at + 2] = rng.uniform(0.001, 0.01, (len(raw), 1)).astype(np.float16).view(np.uint8)
    dense = gguf.quants.dequantize(raw.reshape(-1), qtype).reshape(rows, cols)
    return raw.reshape(-1), dense


@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("rows,cols", [(5, 256), (3, 768)])
def test_repacked_blocks_unpack_as_gguf_py_does(kind, rows, cols):
    data, dense = random_blocks(kind, rows, cols)
    q = quant.from_gguf_blocks(kind, data, rows, cols)
    assert q.kind == kind.lower() and (q.out_features, q.in_features) == (rows, cols)
    assert torch.equal(q.dequantize(), torch.from_numpy(dense))
    assert torch.equal(q.dequantize(1, 3), torch.from_numpy(dense[1:3]))
    # The file's bytes, give or take unpacked 6-bit sub-block scales (Q5_K +2.3%, IQ4_XS +1.5%).
    assert data.size <= q.weight_bytes <= 1.025 * data.size


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_multiplying_unpacks_slices_with_the_dequantized_numbers(kind):
    data, dense = random_blocks(kind, 40, 512, seed=1)
    q = quant.from_gguf_blocks(kind, data, 40, 512)
    q.int8_activations = False  # exact: float32 products (the fast mode may multiply in bfloat16)
    for x in (torch.randn(1, 512), torch.randn(2, quant.PROMPT_ROWS + 1, 512)):
        ref = x @ torch.from_numpy(dense).t()
        assert torch.allclose(q(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_rows_of_mixed_types_join_into_one_projection():
    """A Q4_K_M file's q and k (Q4_K) and v (Q6_K) become one qkv module without unpacking."""
    (dq, wq), (dk, wk), (dv, wv) = (random_blocks(k, r, 256, s) for k, r, s in
                                    (("IQ4_XS", 8, 1), ("IQ4_XS", 4, 2), ("Q6_K", 4, 3)))
    parts = [quant.from_gguf_blocks(k, d, r, 256) for k, d, r in (("IQ4_XS", dq, 8), ("IQ4_XS", dk, 4), ("Q6_K", dv, 4))]
    for p in parts:
        p.int8_activations = False
    joined = quant.join_rows(parts)
    assert isinstance(joined, quant.ConcatLinear) and [p.kind for p in joined.parts] == ["iq4_xs", "q6_k"]
    assert joined.out_features == 16 and joined.weight_bytes == sum(p.weight_bytes for p in parts)
    x = torch.randn(3, 256)
    ref = x @ torch.from_numpy(np.concatenate([wq, wk, wv])).t()
    assert torch.allclose(joined(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    same = quant.join_rows(parts[:2])
    assert isinstance(same, quant.QuantLinear) and same.out_features == 12


def test_block_sizes_and_what_stays_packed():
    assert [quant.block_size(k) for k in ("Q4_0", "q5_1", "IQ4_NL", "Q5_K", "q6_k", "IQ4_XS", "F16")] == \
        [32, 32, 32, 256, 256, 256, 1]
    assert quant.keeps_packed("IQ4_XS", (512, 8)) and not quant.keeps_packed("IQ4_XS", (544, 8))
    assert not quant.keeps_packed("Q2_K", (512, 8)) and not quant.keeps_packed("Q6_K", (512,))


@pytest.mark.parametrize("kind,digest", [
    ("iq4_nl", "d42ee20cccbe1f67aef94b5ae5f678bfa8956a0446b83a463d793459b4cdec28"),
    ("iq4_xs", "e2bb0ed181978da7f3b1ec6d6d334a23ce3bf2d8aa1891e91f11c854e283062f")])
def test_iq4_quantizers_write_llama_quantize_bytes(smollm_gguf, kind, digest):
    """SmolLM2's blk.0.ffn_down (from its Q4_1 file, rounded to float16) quantized by phi3: the
    SHA-256 of the bytes llama.cpp's llama_model_quantize wrote for that tensor (llama-cpp-python
    0.3.36; `make bench` compares whole files)."""
    import hashlib
    t = next(t for t in gguf.GGUFReader(str(smollm_gguf)).tensors if t.name == "blk.0.ffn_down.weight")
    a = gguf.quants.dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
    ours = quant.quantize_blocks(a.astype(np.float16).astype(np.float32), kind)
    assert hashlib.sha256(ours.tobytes()).hexdigest() == digest
    back = gguf.quants.dequantize(ours.reshape(-1), gguf.GGMLQuantizationType[kind.upper()]).reshape(a.shape)
    q4 = gguf.quants.dequantize(quant.quantize_blocks(a, "q4_0").reshape(-1), gguf.GGMLQuantizationType.Q4_0)
    assert np.abs(back - a).mean() < np.abs(q4.reshape(a.shape) - a).mean()  # non-linear levels beat Q4_0
