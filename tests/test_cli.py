"""The command line: chat on the real model, and one-line errors with exit code 2 for bad input."""

from __future__ import annotations

import json
import struct

import pytest

from tests.conftest import hf_reference, run_cli, save_hf_model, tiny_config, write_tiny_gguf


def assert_one_line_error(r, *fragments: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if not line.startswith("phi3: using the default model")]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("phi3: error: ")
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


# "What is the capital of France?" is a near tie for SmolLM2's first token ("The" vs "L'Étoile…":
# +0.08 logits in exact float maths, -0.04 to +0.016 with int8 activations, and llama.cpp's AVX2
# build answers "L'Étoile" too); this prompt's margin is +1.4 to +1.8 on every kernel build.
ROBUST_FRANCE = "Name the capital of France."


def test_chat_answers_from_stdin(smollm_gguf):
    r = run_cli("chat", stdin=ROBUST_FRANCE + "\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "using the default model" in r.stderr


def test_chat_is_multi_turn_with_commands(smollm_gguf):
    script = "/system You answer in one word.\nWhat is the capital of France?\n/reset\nWhat is 2 + 2?\n/quit\nnever read\n"
    r = run_cli("chat", "--model", str(smollm_gguf), "--max-tokens", "24", stdin=script)
    assert r.returncode == 0, r.stderr
    assert "system prompt set" in r.stderr and "conversation reset" in r.stderr
    answers = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2 and "Paris" in answers[0]


def test_generate_json_and_stop_string(smollm_gguf):
    r = run_cli("generate", "--model", str(smollm_gguf), "--prompt", ROBUST_FRANCE, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Paris" in out["text"] and out["finish_reason"] == "stop"
    assert 2 not in out["token_ids"]  # the stop token is not part of the output
    r = run_cli("generate", "--model", str(smollm_gguf), "--prompt", ROBUST_FRANCE, "--json",
                "--stop", "France")
    out2 = json.loads(r.stdout)
    assert "France" not in out2["text"] and out2["finish_reason"] == "stop"
    assert out["text"].startswith(out2["text"])


def test_info_describes_gguf(smollm_gguf):
    r = run_cli("info", str(smollm_gguf), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["layers"] == 30 and info["context_length"] == 8192
    assert info["weights"] == {"Q8_0": 1, "F32": 61, "Q4_1": 210}
    assert info["file_bytes"] == smollm_gguf.stat().st_size
    assert "byte-level BPE" in info["tokenizer"]
    assert sum(n for k, n in info["kernels"].items() if k.startswith("packed 4-bit")) == 210


# --- bad input ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    cfg = tiny_config("mini-4k")
    return save_hf_model(hf_reference(cfg), cfg, tmp_path_factory.mktemp("tiny")), cfg


def copy_of(folder, dst):
    dst.mkdir()
    for f in folder.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_path():
    assert_one_line_error(run_cli("generate", "--model", "/no/such/model", "-p", "hi"), "model not found")
    assert_one_line_error(run_cli("info", "/no/such/file.gguf"), "no such file")


def test_hub_id_without_network_says_how_to_pass_a_local_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    r = run_cli("generate", "--model", "microsoft/Phi-3-mini-4k-instruct", "-p", "hi", timeout=120)
    assert_one_line_error(r, "microsoft/Phi-3-mini-4k-instruct", "--model /path/to/folder")


def test_truncated_safetensors(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    bad = copy_of(folder, tmp_path / "trunc")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("generate", "--model", str(bad), "-p", "hi"), "truncated")


def test_corrupt_safetensors(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    bad = copy_of(folder, tmp_path / "corrupt")
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8:20] = b"not json!!!!"
    (bad / "model.safetensors").write_bytes(bytes(data))
    assert_one_line_error(run_cli("generate", "--model", str(bad), "-p", "hi"), "corrupt")


def test_truncated_and_corrupt_gguf(tmp_path):
    cfg = tiny_config("mini-4k")
    good = write_tiny_gguf(tmp_path / "good.gguf", cfg, hf_reference(cfg).state_dict(), "phi3")
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) - 1000])
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "trunc.gguf"), "-p", "hi"), "truncated")
    (tmp_path / "header.gguf").write_bytes(data[:200])
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "header.gguf"), "-p", "hi"), "GGUF")
    (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 64)
    assert_one_line_error(run_cli("info", str(tmp_path / "garbage.gguf")), "GGUF")
    (tmp_path / "notgguf.bin").write_bytes(b"hello world")
    assert_one_line_error(run_cli("info", str(tmp_path / "notgguf.bin")), "neither")


def test_unknown_architecture(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    bad = copy_of(folder, tmp_path / "neox")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("generate", "--model", str(bad), "-p", "hi"), "unknown architecture", "gpt_neox")

    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "falcon.gguf"), "-p", "hi"),
                          "unknown architecture", "falcon")


def test_unknown_quantization_type(tmp_path):
    cfg = tiny_config("medium").with_(model_type="llama", hidden_size=256, intermediate_size=256)
    state = hf_reference(cfg).state_dict()
    # IQ2_XXS: a real llama.cpp type phi3 does not load (66 bytes per 256 values)
    raw = {"blk.0.ffn_down.weight": (bytes(256 * 66), "IQ2_XXS")}
    path = write_tiny_gguf(tmp_path / "iq.gguf", cfg, state, "llama", raw_blocks=raw)
    assert_one_line_error(run_cli("generate", "--model", str(path), "-p", "hi"),
                          "unsupported GGUF quantization type IQ2_XXS")


def test_shape_mismatch(tiny_folder, tmp_path):
    folder, _ = tiny_folder
    bad = copy_of(folder, tmp_path / "shape")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("generate", "--model", str(bad), "-p", "hi"), "shape mismatch", "config implies")


def test_empty_prompt(tiny_folder):
    folder, _ = tiny_folder
    assert_one_line_error(run_cli("generate", "--model", str(folder), "-p", "   "), "empty prompt")
    assert_one_line_error(run_cli("generate", "--model", str(folder), "-p", "-", "--raw"), "empty prompt")


def test_prompt_over_context(tiny_folder):
    folder, cfg = tiny_folder
    long_prompt = "x" * (cfg.max_position_embeddings - 10)
    r = run_cli("generate", "--model", str(folder), "-p", long_prompt, "--raw", "--max-tokens", "20")
    assert_one_line_error(r, "exceeds the model's context of 128 tokens")
    r = run_cli("generate", "--model", str(folder), "-p", "x" * 500, "--raw", "--max-tokens", "1")
    assert_one_line_error(r, "prompt of 500 tokens")


def test_bad_options(tiny_folder):
    folder, _ = tiny_folder
    assert_one_line_error(run_cli("generate", "--model", str(folder), "-p", "hi", "--max-tokens", "0"),
                          "max new tokens")
    assert_one_line_error(run_cli("generate", "--model", str(folder), "-p", "hi", "--top-p", "1.5"), "top_p")
    assert_one_line_error(run_cli("generate", "-p", "hi", "--dtype", "int3"), "--dtype")
    assert_one_line_error(run_cli("generate", "--model", str(folder)), "--prompt")
    assert_one_line_error(run_cli("generate", "--model", str(folder), "-p", "hi", "--threads", "0"),
                          "--threads 0 is out of range")
    assert_one_line_error(run_cli("generate", "--model", str(folder), "-p", "hi", "--threads", "999"),
                          "--threads 999 is out of range")
