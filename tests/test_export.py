"""`phi3 quantize` / GGUF export: files read back by gguf-py and phi3 with the right numbers, llama.cpp's
names and metadata for phi3 (LongRoPE included) and llama, tokenizers exported, `phi3 bench`, and
bad input."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
import torch
from conftest import hf_reference, need_assets, run_cli, save_hf_model, tiny_config, write_tiny_gguf
from test_cli import assert_one_line_error

from phi3 import quant
from phi3.checkpoint import gguf_fields, load, open_gguf
from phi3.export import tokenizer_metadata
from phi3.tokenizer import tokenizer_from_gguf


@pytest.fixture(scope="module")
def phi3_folder(tmp_path_factory):
    """A tiny phi-3-mini-128k-like model (LongRoPE, the real factor lists) as a Hugging Face folder."""
    cfg = tiny_config("mini-128k")
    hf = hf_reference(cfg)
    return save_hf_model(hf, cfg, tmp_path_factory.mktemp("phi3") / "folder"), cfg


def quantize(src, out, *args: str) -> dict:
    r = run_cli("quantize", str(src), str(out), *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def logits(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(ids)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))


def test_phi3_export_follows_llama_cpp_layout(phi3_folder, tmp_path, ids):
    folder, cfg = phi3_folder
    out = tmp_path / "tiny-f32.gguf"
    summary = quantize(folder, out, "--type", "f32")
    assert summary["arch"] == "phi3"
    reader = gguf.GGUFReader(str(out))
    fields = gguf_fields(reader)
    assert fields["general.architecture"] == "phi3"
    assert fields["general.file_type"] == 0
    assert fields["phi3.block_count"] == cfg.num_hidden_layers
    assert fields["phi3.context_length"] == cfg.max_position_embeddings
    assert fields["phi3.rope.scaling.original_context_length"] == cfg.original_max_position_embeddings
    assert fields["phi3.rope.dimension_count"] == cfg.dim_per_head
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert "<|user|>" in fields["tokenizer.chat_template"]
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 4 + 1 + 6 * cfg.num_hidden_layers  # embd, norm, output, 2 factor lists + layers
    ff, hd = cfg.intermediate_size, cfg.dim_per_head
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    assert list(tensors["blk.0.attn_qkv.weight"].shape) == [cfg.hidden_size, qkv_rows]
    assert list(tensors["blk.1.ffn_up.weight"].shape) == [cfg.hidden_size, 2 * ff]  # [gate; up], fused
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [ff, cfg.hidden_size]
    assert np.allclose(tensors["rope_factors_long.weight"].data, cfg.rope_scaling.long_factor)
    assert np.allclose(tensors["rope_factors_short.weight"].data, cfg.rope_scaling.short_factor)
    # float32 is lossless: the file reloads with the folder's logits exactly
    ours, ref = load(out, dtype="float32"), load(folder, dtype="float32")
    assert np.allclose(ours.config.rope_scaling.short_factor, ref.config.rope_scaling.short_factor)
    assert ours.config.rope_attention_factor == pytest.approx(ref.config.rope_attention_factor, rel=1e-6)
    long_ids = torch.randint(0, 256, (1, 60))  # past the original context: long factors
    for x in (ids, long_ids):
        assert (logits(ours, x) - logits(ref, x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "iq4_nl", "q8_0", "f16"])
def test_written_gguf_reloads_with_identical_logits(phi3_folder, tmp_path, ids, qtype):
    """Read back with gguf-py's reader: the tensors it dequantizes, put into the model by hand,
    give exactly the logits phi3 computes from the file (exact mode)."""
    folder, cfg = phi3_folder
    out = tmp_path / f"tiny-{qtype}.gguf"
    summary = quantize(folder, out, "--type", qtype)
    assert summary["tensor_types"][qtype] >= 4 * cfg.num_hidden_layers
    ours = load(out, dtype="float32", exact=True)
    reader = gguf.GGUFReader(str(out))
    dense = {t.name: torch.from_numpy(np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
                                      .reshape([int(x) for x in reversed(t.shape)])) for t in reader.tensors}
    ref = load(folder, dtype="float32")
    sd = ref.model.state_dict()
    sd["model.embed_tokens.weight"] = dense["token_embd.weight"]
    sd["lm_head.weight"] = dense["output.weight"]
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        sd[p + "self_attn.qkv_proj.weight"] = dense[b + "attn_qkv.weight"]
        sd[p + "self_attn.o_proj.weight"] = dense[b + "attn_output.weight"]
        sd[p + "mlp.gate_up_proj.weight"] = dense[b + "ffn_up.weight"]
        sd[p + "mlp.down_proj.weight"] = dense[b + "ffn_down.weight"]
    ref.model.load_state_dict(sd)
    diff = (logits(ours, ids) - logits(ref, ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_llama_export_round_trips(tmp_path, ids):
    """Llama layout: q/k rows interleaved as llama.cpp's converter does, separate gate/up; loading
    undoes it."""
    cfg = tiny_config("medium").with_(model_type="llama", rope_theta=100000.0)
    folder = save_hf_model(hf_reference(cfg), cfg, tmp_path / "llama")
    out = tmp_path / "llama.gguf"
    assert quantize(folder, out, "--type", "f32")["arch"] == "llama"
    names = {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.ffn_gate.weight"} <= names
    assert torch.equal(logits(load(out, dtype="float32"), ids), logits(load(folder, dtype="float32"), ids))


def test_gguf_to_gguf_keeps_tokenizer_and_template(smollm_gguf, tmp_path):
    out = tmp_path / "smollm-q4_0.gguf"
    summary = quantize(smollm_gguf, out, "--type", "q4_0")
    assert summary["tensor_types"]["q4_0"] > 0 and summary["tensor_types"]["q8_0"] == 1  # embedding at 8 bits
    src, dst = gguf_fields(open_gguf(smollm_gguf)), gguf_fields(open_gguf(out))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template", "llama.block_count"):
        assert src[key] == dst[key], key
    assert dst["general.file_type"] == 2
    lm = load(out)
    assert lm.tokenizer.encode("Hello world") == load(smollm_gguf).tokenizer.encode("Hello world")
    r = run_cli("generate", "--model", str(out), "--prompt", "What is the capital of France?", "--max-tokens", "16")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stdout + r.stderr


def test_q4_k_is_kept_packed(tmp_path):
    """Q4_K weights stay packed (rows of 256), with or without a compiled kernel."""
    cfg = tiny_config("medium").with_(hidden_size=256, intermediate_size=256)
    folder = save_hf_model(hf_reference(cfg), cfg, tmp_path / "k")
    out = tmp_path / "k.gguf"
    assert quantize(folder, out, "--type", "q4_k")["tensor_types"]["q4_k"] > 0
    lm = load(out, dtype="float32", exact=True)
    assert isinstance(lm.model.model.layers[0].mlp.gate_up_proj, quant.QuantLinear)
    assert lm.model.model.layers[0].mlp.gate_up_proj.kind == "q4_k"
    reader = gguf.GGUFReader(str(out))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    dense = gguf.quants.dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
    assert torch.equal(lm.model.model.layers[0].mlp.gate_up_proj.dequantize(), torch.from_numpy(dense))
    info = json.loads(run_cli("info", str(out), "--json").stdout)
    assert any(label.startswith("packed 4-bit Q4_K") for label in info["kernels"])


def test_spm_tokenizer_exports_and_round_trips():
    """Phi-3's SentencePiece vocabulary written as GGUF metadata tokenizes llama.cpp's vectors alike."""
    from test_tokenizer import gguf_tokenizer, vocab_cases
    need_assets()
    tok = gguf_tokenizer("phi-3")
    cfg = tiny_config("mini-4k").with_(vocab_size=tok.vocab_size)
    fields = {k: v for k, v, _, _ in tokenizer_metadata(tok, cfg, "phi3")}
    assert fields["tokenizer.ggml.model"] == "llama"
    again = tokenizer_from_gguf(fields, "phi3")
    for text, want in vocab_cases("phi-3"):
        assert again.encode(text, add_bos=False) == want, text


def test_bench_json(phi3_folder, tmp_path):
    folder, _ = phi3_folder
    saved = tmp_path / "bench.gguf"
    r = run_cli("bench", "--shape", str(folder), "--prompt-tokens", "20", "--new-tokens", "4", "--json",
                "--save-gguf", str(saved))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    for key in ("load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "file_mb"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert saved.exists() and result["file_mb"] == round(saved.stat().st_size / 1e6, 1)


def test_bad_quantize_and_bench_input(phi3_folder, tmp_path):
    folder, _ = phi3_folder
    assert_one_line_error(run_cli("quantize", str(folder), str(tmp_path / "x.gguf"), "--type", "q3_k"),
                          "unsupported quantization type")
    assert not (tmp_path / "x.gguf").exists()
    assert_one_line_error(run_cli("bench", "--threads", "0"), "out of range")
    assert_one_line_error(run_cli("bench", "--shape", "phi-3-mini", "--layers", "99"), "out of range")
    assert_one_line_error(run_cli("bench", "--shape", "no-such-model"), "neither")
    assert_one_line_error(run_cli("bench", "--shape", "phi-3-mini", "--head-aware-cache"), "applies to phi-3-small")


def _tensor_count_offset() -> int:
    return 8  # magic (4) + version (4), then the tensor count (u64) and the metadata count (u64)


def test_gguf_header_disagreements(tmp_path):
    """Tensor count, shape or size that disagree with the header: one-line errors."""
    cfg = tiny_config("mini-4k")
    good = write_tiny_gguf(tmp_path / "good.gguf", cfg, hf_reference(cfg).state_dict(), "phi3")
    data = bytearray(good.read_bytes())
    (count,) = struct.unpack_from("<Q", data, _tensor_count_offset())
    more = bytearray(data)
    struct.pack_into("<Q", more, _tensor_count_offset(), count + 5)
    (tmp_path / "count.gguf").write_bytes(more)
    assert_one_line_error(run_cli("info", str(tmp_path / "count.gguf")), "GGUF")
    fewer = bytearray(data)
    struct.pack_into("<Q", fewer, _tensor_count_offset(), count - 1)
    (tmp_path / "fewer.gguf").write_bytes(fewer)
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "fewer.gguf"), "-p", "hi"), "")
    # a shape the metadata contradicts: feed_forward_length says more than the tensors hold
    reader = gguf.GGUFReader(str(good))
    ff = reader.fields["phi3.feed_forward_length"]
    wrong = bytearray(data)
    struct.pack_into("<I", wrong, int(ff.parts[ff.data[0]].ctypes.data - reader.data.ctypes.data), cfg.intermediate_size * 2)
    (tmp_path / "shape.gguf").write_bytes(wrong)
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "shape.gguf"), "-p", "hi"), "shape")
