"""Block-format weights: repacking from GGUF bytes, our quantizers, and the CPU kernels against
plain-PyTorch references (dense float32, and the int8-activation scheme computed exactly)."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from phi3 import cpu_kernels, quant
from tests.test_quant_formats import random_blocks

# (rows, cols) per kind: odd numbers of blocks exercise the kernels' tails; K-quants and IQ4_XS
# need 256s.
SHAPES = {"Q4_0": (200, 352), "Q4_1": (200, 320), "Q8_0": (200, 352), "Q4_K": (72, 768), "Q5_0": (200, 352),
          "Q5_1": (200, 320), "Q5_K": (72, 768), "Q6_K": (72, 768), "IQ4_NL": (200, 352), "IQ4_XS": (72, 768)}


def blocks(kind: str, rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """GGUF bytes of a random weight (random bytes for the types we do not quantize to), and
    gguf-py's dequantization of them."""
    if kind not in quant.QUANT_KINDS:
        return random_blocks(kind, rows, cols, seed)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    data = quant.quantize_blocks(w, kind.lower())
    return data, gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind])


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Inputs drawn from a fixed seed: the int8 rounding bounds below hold with a margin for these
    draws, not for every draw (an unseeded run once came to 1.09% of the output scale against 1%)."""
    torch.manual_seed(0)


@pytest.fixture(params=cpu_kernels.supported_builds() or ["none"])
def ext(request, monkeypatch):
    """Each kernel build this CPU runs (avx512, avx2, neon), in turn, as the one that QuantLinear
    and quant.kernel() use."""
    if request.param == "none":
        pytest.skip("this CPU runs none of phi3's kernel builds")
    try:
        module = cpu_kernels.load_build(request.param)
    except RuntimeError as e:
        pytest.skip(str(e))
    monkeypatch.setattr(cpu_kernels, "_ext", module)
    return module


def int8_reference(q: quant.QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's int8-activation product in plain PyTorch: x rounded per block of 32 with scale
    amax/127 (stored as half), integer dot products with the codes, float block scales."""
    n, k = q.out_features, q.in_features
    # The rounding itself in float32 as the kernel does it (x * (1/d), half to even): in double,
    # a value within a float ulp of .5 can round the other way.
    xb = x.reshape(-1, k // 32, 32).float()
    d = xb.abs().amax(-1) / 127
    x8 = torch.round(xb * torch.where(d > 0, 1 / d, 0)[..., None]).double()
    d = d.half().double()
    # In halves of blocks (q6_k has a scale per 16 codes), each with its block's activation scale.
    x8, d = x8.view(-1, k // 16, 16), d.repeat_interleave(2, -1)
    codes = q.codes().double().view(n, k // 16, 16) - (32 if q.kind == "q6_k" else 0)
    scale, minimum = (t.double() for t in q.block_scales())
    if scale.shape[1] != k // 16:
        scale, minimum = scale.repeat_interleave(2, -1), minimum.repeat_interleave(2, -1)
    dots = torch.einsum("mbj,nbj->mnb", x8, codes)
    y = (dots * scale[None] * d[:, None]).sum(-1) + (minimum[None] * (d * x8.sum(-1))[:, None]).sum(-1)
    return y.float().view(*x.shape[:-1], n)


@pytest.mark.parametrize("kind", quant.QUANT_KINDS)
def test_repacked_blocks_dequantize_exactly(kind):
    rows, cols = SHAPES[kind]
    data, dense = blocks(kind, rows, cols)
    q = quant.from_gguf_blocks(kind, data, rows, cols)
    assert torch.equal(q.dequantize(), torch.from_numpy(dense))


@pytest.mark.parametrize("kind", quant.PACKED_KINDS)
@pytest.mark.parametrize("m", [1, 3, 17])
def test_kernels_match_references(ext, kind, m):
    rows, cols = SHAPES[kind]
    data, dense = blocks(kind, rows, cols, seed=m)
    q = quant.from_gguf_blocks(kind, data, rows, cols)
    x = torch.randn(2, m, cols)
    exact = x @ torch.from_numpy(dense).t()
    q.int8_activations = False
    got = q(x)
    assert got.shape == (2, m, rows)
    assert (got - exact).abs().max().item() <= 1e-4 * exact.abs().max().item()
    q.int8_activations = True
    got = q(x)
    if m < quant.PROMPT_ROWS:  # fewer tokens per sequence than PROMPT_ROWS: the int8 kernel ran
        ref = int8_reference(q, x)
        assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    # rounding activations to 8 bits costs well under a percent of the output scale
    assert (got - exact).abs().max().item() <= 1e-2 * exact.abs().max().item()
    got16 = q(x.bfloat16())
    assert got16.dtype == torch.bfloat16
    assert (got16.float() - exact).abs().max().item() <= 3e-2 * exact.abs().max().item()


@pytest.mark.parametrize("kind", quant.PACKED_KINDS)
@pytest.mark.parametrize("int8", [True, False])
def test_a_row_gives_the_same_bits_in_any_batch(ext, kind, int8):
    """Batched decoding (a server's requests in one step) must give each row exactly what it
    gets alone: the many-row kernels sum in the one-row kernel's order, and decode-shaped
    batches ([rows, 1, in]) never switch to the dense prompt path, however many rows."""
    rows, cols = SHAPES[kind]
    for c in ((cols, cols + 256) if kind != "Q4_K" else (cols,)):
        data, _ = blocks(kind, rows, c, seed=7)
        q = quant.from_gguf_blocks(kind, data, rows, c)
        q.int8_activations = int8
        x = torch.randn(quant.PROMPT_ROWS + 3, 1, c)
        batched = q(x)
        for i in (0, 5, quant.PROMPT_ROWS + 2):
            assert torch.equal(batched[i], q(x[i:i + 1])[0])


@pytest.mark.parametrize("kind", quant.PACKED_KINDS)
def test_prompt_path_dequantizes_exactly(ext, kind):
    data, dense = blocks(kind, 40, 512, seed=3)
    q = quant.from_gguf_blocks(kind, data, 40, 512)
    w = ext.block_dequantize(q.fmt, q.qs, q.qh, q.a, q.b, q.c, torch.float32)
    assert torch.equal(w, torch.from_numpy(dense)) and torch.equal(w, q.dequantize())
    w16 = ext.block_dequantize(q.fmt, q.qs, q.qh, q.a, q.b, q.c, torch.bfloat16)
    assert torch.equal(w16, torch.from_numpy(dense).bfloat16())


def test_fallback_without_kernel_gives_the_same_numbers(monkeypatch):
    data, dense = blocks("Q4_1", 64, 128)
    q = quant.from_gguf_blocks("Q4_1", data, 64, 128)
    x = torch.randn(1, 128)
    monkeypatch.setattr(cpu_kernels, "_ext", None)
    monkeypatch.setattr(cpu_kernels, "_ext_error", "disabled for this test")
    assert torch.allclose(q(x), x @ torch.from_numpy(dense).t(), rtol=1e-5, atol=1e-5)


def test_rows_concatenate_and_permute():
    (a, da), (b, db) = blocks("Q4_K", 32, 256, 1), blocks("Q4_K", 16, 256, 2)
    qa, qb = quant.from_gguf_blocks("Q4_K", a, 32, 256), quant.from_gguf_blocks("Q4_K", b, 16, 256)
    both = quant.concat_rows([qa, qb])
    assert torch.equal(both.dequantize(), torch.from_numpy(np.concatenate([da, db])))
    order = torch.randperm(48)
    assert torch.equal(quant.permute_rows(both, order).dequantize(), both.dequantize()[order])


def test_quantizers_write_gguf_layouts():
    """Our bytes decode with gguf-py; Q4_K's scale search beats the plain 4-bit formats."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    errors = {}
    for kind in ("q4_0", "q4_1", "q4_k", "q8_0"):
        data = quant.quantize_blocks(w, kind)
        back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind.upper()])
        errors[kind] = float(np.sqrt(((back - w) ** 2).mean()))
    assert errors["q8_0"] < 0.01 < errors["q4_k"] < errors["q4_1"] < errors["q4_0"] < 0.15
    assert quant.quantize_blocks(w, "f16").dtype == np.float16
    zeros = quant.quantize_blocks(np.zeros((2, 256), np.float32), "q4_k")
    assert not gguf.quants.dequantize(zeros, gguf.GGMLQuantizationType.Q4_K).any()



def _make_qkx2_quants_scalar(x: list[float], w: list[float]) -> tuple[np.float32, np.float32]:
    """llama.cpp's make_qkx2_quants(32, 15, x, w, ..., -1.f, 0.1f, 20, false), one float32 operation
    at a time in the C code's order: the reference our vectorised version must equal bit for bit."""
    f = np.float32
    mn = mx = f(x[0])
    sum_w, sum_x = f(w[0]), f(w[0]) * f(x[0])
    for xi, wi in zip(x[1:], w[1:]):
        mn, mx = min(mn, f(xi)), max(mx, f(xi))
        sum_w += f(wi)
        sum_x += f(wi) * f(xi)
    mn = min(mn, f(0))
    if mx == mn:
        return f(0), -mn
    iscale = f(15) / (mx - mn)
    scale = f(1) / iscale
    codes = [min(15, max(0, int(np.rint(iscale * (f(xi) - mn))))) for xi in x]
    best = f(0)
    for xi, wi, q in zip(x, w, codes):
        best += f(wi) * (scale * f(q) + mn - f(xi)) ** 2
    for step in range(21):
        isc = (f(-1) + f(0.1) * f(step) + f(15)) / (mx - mn)
        laux = [min(15, max(0, int(np.rint(isc * (f(xi) - mn))))) for xi in x]
        sl = sl2 = sxl = f(0)
        for xi, wi, q in zip(x, w, laux):
            wl = f(wi) * f(q)
            sl, sl2, sxl = sl + wl, sl2 + wl * f(q), sxl + wl * f(xi)
        det = sum_w * sl2 - sl * sl
        if det > 0:
            this_scale = (sum_w * sxl - sum_x * sl) / det
            this_min = (sl2 * sum_x - sl * sxl) / det
            if this_min > 0:
                this_scale, this_min = sxl / sl2, f(0)
            cur = f(0)
            for xi, wi, q in zip(x, w, laux):
                cur += f(wi) * (this_scale * f(q) + this_min - f(xi)) ** 2
            if cur < best:
                best, scale, mn = cur, this_scale, this_min
    return scale, -mn


def test_q4_k_scale_search_equals_llama_cpp_bit_for_bit():
    """Same scales and mins as llama.cpp's scalar loops, not just close: a last-bit difference can
    move a block's half-precision scale, and then phi3 and llama.cpp write different Q4_K files."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((96, 32)) * rng.uniform(0.01, 2, (96, 1))).astype(np.float32)
    x[:8] = np.abs(x[:8])  # all-positive blocks: the least-squares min comes out positive
    w = np.sqrt((x * x).mean(1, keepdims=True)) + np.abs(x)
    _, scales, mins = quant._make_qkx2_quants(x, w)
    want = np.array([_make_qkx2_quants_scalar(list(a), list(b)) for a, b in zip(x, w)], np.float32)
    np.testing.assert_array_equal(scales, want[:, 0])
    np.testing.assert_array_equal(mins, want[:, 1])

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernels_match_pytorch(ext, dtype):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_with_a_float16_cache(ext, dtype):
    """Float16 caches under float32/bfloat16 activations: the new token's key and value are
    stored with PyTorch's rounding (the prompt path's copy), and attention reads them widened."""
    from phi3.model import apply_rotary
    torch.manual_seed(6)
    B, H, KV, hd, Smax, start = 1, 4, 2, 32, 20, 11
    qkv = torch.randn(B, (H + 2 * KV) * hd).to(dtype)
    angles = torch.rand(B, hd // 2) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    kc = torch.randn(B, KV, Smax, hd).half()
    vc = torch.randn(B, KV, Smax, hd).half()
    out = ext.decode_attention(qkv, cos, sin, kc, vc, start, torch.empty(0, dtype=torch.bool), hd ** -0.5, H)
    parts = qkv.view(B, H + 2 * KV, hd)
    rotated = apply_rotary(parts[:, :H + KV], cos[:, None], sin[:, None])
    assert torch.equal(kc[:, :, start], rotated[:, H:].half())
    assert torch.equal(vc[:, :, start], parts[:, H + KV:].half())
    expected = torch.nn.functional.scaled_dot_product_attention(
        rotated[:, :H, None].float(), kc[:, :, :start + 1].float(), vc[:, :, :start + 1].float(),
        enable_gqa=True)[:, :, 0]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype
    assert (out.float().view(B, H, hd) - expected).abs().max().item() <= tol * expected.abs().max().item()
    many = ext.decode_attention_many(qkv, cos, sin, [kc[None].clone()], [vc[None].clone()], 0, [start],
                                     [torch.empty(0, dtype=torch.bool)], hd ** -0.5, H)
    assert torch.equal(many.view_as(out), out)


def test_a_lock_left_by_a_killed_build_does_not_hang_later_runs(ext, tmp_path):
    """torch's cpp_extension waits for ever on a lock file that a process killed mid-build left
    behind; a built kernel must load regardless, without compiling again."""
    import shutil
    import subprocess
    import sys
    built = Path(ext.__file__).parent
    cache = tmp_path / "cache"
    shutil.copytree(built, cache / "kernels" / built.name)
    (cache / "kernels" / built.name / "lock").touch()
    isa = cpu_kernels.kernel_isa()
    r = subprocess.run([sys.executable, "-c", "from phi3 import cpu_kernels; print(cpu_kernels.kernel_isa())"],
                       env=dict(os.environ, PHI3_CACHE=str(cache), PHI3_KERNELS=isa), capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.strip() == isa, r.stderr
    assert "compiling" not in r.stderr


def test_phi3_kernels_picks_the_build(monkeypatch):
    """PHI3_KERNELS forces a build, `portable` (or PHI3_NO_KERNELS=1) none; unset, the best this
    CPU runs; a build the CPU cannot run or an unknown name leaves no kernel and says why."""
    supported = cpu_kernels.supported_builds()

    def select(value: str | None, no_kernels: str | None = None) -> tuple[object, str | None]:
        for name, v in (("PHI3_KERNELS", value), ("PHI3_NO_KERNELS", no_kernels)):
            if v is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, v)
        monkeypatch.setattr(cpu_kernels, "_ext", None)
        monkeypatch.setattr(cpu_kernels, "_ext_error", None)
        return cpu_kernels.kernel(), cpu_kernels.kernel_error()

    assert select("portable") == (None, "PHI3_KERNELS=portable")
    assert cpu_kernels.kernel_isa() is None
    assert select(None, no_kernels="1")[0] is None
    ext, error = select("bogus")
    assert ext is None and all(name in error for name in ("avx512", "avx2", "neon", "portable")), error
    unavailable = next(b for b in ("neon", "avx512", "avx2") if b not in supported)
    ext, error = select(unavailable)
    assert ext is None and unavailable in error, error
    if supported:  # (a machine without a compiler says so instead)
        ext, error = select(None)
        assert cpu_kernels.kernel_isa() == supported[0] or "did not build" in error, error
    if "avx2" in supported:
        ext, error = select("avx2")
        assert cpu_kernels.kernel_isa() == "avx2" or "did not build" in error, error
        # A CPU without AVX-512 VNNI: avx512 is refused, naming the flag, and avx2 is the default.
        monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"avx2", "fma", "f16c", "avx512f"})
        monkeypatch.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
        ext, error = select("avx512")
        assert ext is None and "avx512_vnni" in error and "avx512f," not in error, error
        assert cpu_kernels.supported_builds() == ["avx2"]
