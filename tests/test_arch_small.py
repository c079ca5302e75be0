"""Phi-3-small files (issue 17): the architecture table, Hugging Face folders as Microsoft ships them
(sharded safetensors, no lm_head, rotary_emb.inv_freq), `phi3 convert` back to that layout, the
`phi3small` GGUF layout at Q4_0/Q8_0 run packed (biased QuantLinear) with the greedy ids of its
dequantized float32 model, and bad input as one line + exit 2.

The tiny model keeps what makes small different (biases, LayerNorm, GEGELU, muP, interleaved qkv,
dense + blocksparse layers with block 4 / 3 local / stride 3) at sizes the Q4_0 blocks divide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_cli import assert_one_line_error

from phi3 import export, quant
from phi3.arch import ARCHITECTURES, architecture, build_model, gguf_architecture
from phi3.checkpoint import describe, gguf_fields, load, load_gguf, open_gguf, save_hf_folder
from phi3.config import RopeScaling, get_preset
from phi3.errors import Phi3Error

config_small = pytest.importorskip("phi3.config_small")
model_small = pytest.importorskip("phi3.model_small")
SmallConfig, SmallTransformer = config_small.SmallConfig, model_small.SmallTransformer

HEAD_DIM = 16
LAYERS = 4  # layers 1 and 3 dense, 0 and 2 blocksparse


def tiny_config(**changes) -> SmallConfig:
    base = dict(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256,
                blocksparse_block_size=4, blocksparse_num_local_blocks=3, blocksparse_vert_stride=3,
                dummy_token_indices=(5, 7, 1000), gegelu_limit=20.0, torch_dtype="float32", name="tiny-small")
    return SmallConfig(**{**base, **changes})


def tiny_model(cfg: SmallConfig, seed: int = 0) -> SmallTransformer:
    torch.manual_seed(seed)
    model = SmallTransformer(cfg).float()
    model.init_weights()
    with torch.no_grad():  # biases and norms away from 0 and 1, so that a dropped one shows
        for name, p in model.named_parameters():
            p.normal_(1.0 if name.endswith("layernorm.weight") else 0.0, 0.1 if "layernorm" in name else 0.05)
    return model.eval()


def tokenizer():
    try:
        from phi3.tokenizer import phi3small_tokenizer
        return phi3small_tokenizer()
    except (ImportError, Phi3Error) as e:
        pytest.skip(f"Phi-3-small tokenizer unavailable: {e}")


def write_hf_folder(folder: Path, model: SmallTransformer, config: dict | None = None) -> Path:
    """As Microsoft's repos ship it: 2 shards + model.safetensors.index.json, no lm_head.weight,
    each layer's rotary_emb.inv_freq, config.json, tokenizer files."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(cfg.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(HEAD_DIM // 2)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / fname), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config or cfg.to_hf_dict()))
    tokenizer().save_pretrained(folder)
    return folder


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids)


def greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Greedy ids by full forwards (no cache: the comparison is about the weights)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(logits(model, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = tiny_config()
    model = tiny_model(cfg)
    return write_hf_folder(tmp_path_factory.mktemp("small") / "hf", model), model


@pytest.fixture(scope="module")
def ids():
    # 40 tokens: 10 blocks of 4, past the 3 local blocks, so the sparse layers drop pairs
    return torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(1))


def test_architecture_table():
    assert set(ARCHITECTURES) >= {"phi3", "llama", "mistral", "phi3small"}
    assert architecture("phi3small").model_class is SmallTransformer
    assert gguf_architecture("phi3small").model_type == "phi3small"
    assert gguf_architecture("llama").model_type == "llama"
    assert isinstance(get_preset("phi-3-small-8k-instruct"), SmallConfig)
    assert get_preset("microsoft/Phi-3-small-128k-instruct").max_position_embeddings == 131072
    assert type(build_model(tiny_config())) is SmallTransformer
    with pytest.raises(Phi3Error, match="phi3small"):
        architecture("gpt_neox")
    # one map per format, both directions: every phi3small tensor has exactly one GGUF name
    cfg = tiny_config()
    plan = architecture("phi3small").gguf_names.plan(cfg)
    with torch.device("meta"):
        ours = set(SmallTransformer(cfg).state_dict()) - {"lm_head.weight"}
    assert {p.ours for p in plan} == ours
    assert len({n for p in plan for n in p.theirs}) == len(plan)


def test_hf_folder_loads_with_the_models_logits(small, ids):
    folder, model = small
    lm = load(folder, dtype="float32")
    assert type(lm.model) is SmallTransformer and lm.source == "safetensors"
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight  # tied: no lm_head in the files
    assert lm.config == model.config.with_(name=lm.config.name)
    assert torch.equal(logits(lm.model, ids), logits(model, ids))


def test_full_shape_random_source_matches_the_parameter_count():
    """`phi3 bench --shape phi-3-small`'s source: the full 7.4B shape (nothing is loaded)."""
    for name in ("phi-3-small-8k-instruct", "phi-3-small-128k-instruct"):
        cfg = get_preset(name)
        src = export.random_source(cfg)
        assert src.arch == "phi3small"
        assert sum(int(np.prod(t.shape)) for t in src.tensors) == cfg.num_parameters() == 7_392_272_384
        assert "output.weight" not in {t.name for t in src.tensors}


def test_random_source_writes_a_runnable_q4_0_file(tmp_path):
    """What `phi3 bench` measures, at a tiny size: random weights, the real vocabulary."""
    cfg = tiny_config()
    out = tmp_path / "random-q4_0.gguf"
    export.write_gguf(export.random_source(cfg), out, "q4_0", pure=True, progress=False)
    lm = load(out)
    assert isinstance(lm.model.model.layers[0].mlp.down_proj, quant.QuantLinear)
    assert lm.tokenizer.encode("hello world") == [15339, 1917]
    assert torch.isfinite(logits(lm.model, torch.tensor([[100, 200, 300]]))[..., :5]).all()


@pytest.fixture(scope="module")
def f32_gguf(small, tmp_path_factory):
    folder, _ = small
    out = tmp_path_factory.mktemp("f32") / "tiny-small-f32.gguf"
    export.write_gguf(export.open_source(folder), out, "f32", progress=False)
    return out


def test_gguf_layout(small, f32_gguf):
    folder, model = small
    cfg = model.config
    reader = open_gguf(f32_gguf)
    fields = gguf_fields(reader)
    assert fields["general.architecture"] == "phi3small"
    assert fields["phi3small.blocksparse.vert_stride"] == 3 and fields["phi3small.attention.dense_every_n_layers"] == 2
    assert fields["phi3small.mup.width_multiplier"] == 8.0 and fields["phi3small.gegelu_limit"] == 20.0
    assert fields["phi3small.dummy_token_ids"] == [5, 7, 1000]
    assert fields["tokenizer.ggml.model"] == "tiktoken"
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and len(tensors) == 3 + 12 * LAYERS
    qkv_rows = (4 + 2 * 2) * HEAD_DIM
    assert list(tensors["blk.0.attn_qkv.weight"].shape) == [64, qkv_rows]
    # kept in Hugging Face's interleaved layouts: the bytes are the folder's rows as they are
    assert np.array_equal(np.asarray(tensors["blk.2.attn_qkv.weight"].data),
                          model.model.layers[2].self_attn.query_key_value.weight.detach().numpy())
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_up.bias"].data), model.model.layers[1].mlp.up_proj.bias.detach().numpy())
    assert list(tensors["blk.1.ffn_up.weight"].shape) == [64, 2 * 96]
    assert tensors["output_norm.bias"].tensor_type.name == "F32"
    back = load_gguf(f32_gguf, dtype="float32").config
    assert back == cfg.with_(name=back.name)  # every field rebuilt from phi3small.* (the name is the folder's)


def test_convert_round_trip(small, f32_gguf, tmp_path, ids):
    """HF folder -> f32 GGUF -> `phi3 convert` -> HF folder (sharded, as shipped): same config, same logits."""
    folder, model = small
    lm = load_gguf(f32_gguf, dtype="float32", keep_quantized=False)
    assert torch.equal(logits(lm.model, ids), logits(model, ids))
    out = tmp_path / "converted"
    save_hf_folder(lm, out, shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert "lm_head.weight" not in index["weight_map"]
    assert "model.layers.0.self_attn.query_key_value.bias" in index["weight_map"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "phi3small" and config["architectures"] == ["Phi3SmallForCausalLM"]
    assert not list(out.glob("*.tmp*"))
    back = load(out, dtype="float32")
    assert back.config == model.config.with_(name=back.config.name)
    assert torch.equal(logits(back.model, ids), logits(model, ids))
    assert back.tokenizer.encode("hello world") == [15339, 1917]


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_quantized_gguf_runs_packed_with_the_greedy_ids_of_its_dequantized_model(small, tmp_path, qtype):
    folder, _ = small
    out = tmp_path / f"tiny-small-{qtype}.gguf"
    summary = export.write_gguf(export.open_source(folder), out, qtype, progress=False)
    assert summary["arch"] == "phi3small" and summary["tensor_types"][qtype] >= 4 * LAYERS
    assert summary["tensor_types"]["f32"] == 8 * LAYERS + 2  # biases and norms stay float32
    packed = load(out, dtype="float32", exact=True)
    for layer in packed.model.model.layers:
        for module in (layer.self_attn.query_key_value, layer.self_attn.dense, layer.mlp.up_proj, layer.mlp.down_proj):
            assert isinstance(module, quant.QuantLinear) and module.kind == qtype and module.bias is not None
    assert isinstance(packed.model.model.embed_tokens, quant.QuantEmbedding)
    assert packed.model.lm_head is packed.model.model.embed_tokens.table  # tied: the same blocks
    dense = load(out, dtype="float32", dequantize=True)
    assert type(dense.model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    prompt = [int(x) for x in torch.randint(0, 1000, (30,), generator=torch.Generator().manual_seed(2))]
    assert greedy(packed.model, prompt, 12) == greedy(dense.model, prompt, 12)
    x = torch.tensor([prompt])
    assert (logits(packed.model, x) - logits(dense.model, x)).abs().max().item() < 1e-3
    info = describe(out)  # what `phi3 info` prints
    assert info["architecture"] == "phi3small" and "2 blocksparse" in info["attention"]
    assert info["tokenizer"].startswith("gguf tiktoken")
    assert any(label.startswith(f"packed {'4' if qtype == 'q4_0' else '8'}-bit") for label in info["kernels"])


def test_128k_longrope_from_config_json(tmp_path, ids):
    half = HEAD_DIM // 2
    short = tuple(1.0 + 0.1 * j for j in range(half))
    long = tuple(1.0 + 2.0 * j for j in range(half))
    cfg = tiny_config(max_position_embeddings=512, original_max_position_embeddings=32,
                      rope_scaling=RopeScaling(short, long), short_mscale=1.05, long_mscale=1.2)
    model = tiny_model(cfg, seed=3)
    folder = write_hf_folder(tmp_path / "hf128k", model)
    lm = load(folder, dtype="float32")
    assert lm.config.rope_scaling.long_factor == long and lm.config.long_mscale == 1.2
    x = torch.randint(0, 1000, (1, 48))  # past the original context of 32: the long factors
    assert torch.equal(logits(lm.model, x), logits(model, x))
    out = tmp_path / "128k.gguf"
    export.write_gguf(export.open_source(folder), out, "f32", progress=False)
    back = load(out, dtype="float32")
    assert back.config == cfg.with_(name=back.config.name)
    assert torch.equal(logits(back.model, x), logits(model, x))


def test_bad_input_is_one_line_and_exit_2(small, tmp_path):
    folder, model = small
    config = model.config.with_(max_position_embeddings=512, original_max_position_embeddings=32,
                                rope_scaling=RopeScaling((1.0,) * 8, (1.0,) * 8)).to_hf_dict()
    del config["rope_scaling"]["long_factor"]
    bad = tmp_path / "no-factors"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    for f in folder.iterdir():
        if f.name != "config.json":
            (bad / f.name).symlink_to(f)
    assert_one_line_error(run_cli("info", str(bad)), "long_factor")
    # config.json with 1 KV head for weights of 2: the qkv rows do not fit the heads
    wrong = tmp_path / "wrong-heads"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps(model.config.with_(num_key_value_heads=1).to_hf_dict()))
    for f in folder.iterdir():
        if f.name != "config.json":
            (wrong / f.name).symlink_to(f)
    with pytest.raises(Phi3Error, match=r"query_key_value.(weight|bias): checkpoint has \(128,( 64)?\), config implies "
                                        r"\(96,( 64)?\) = \(num_attention_heads 4 \+ 2 x num_key_value_heads 1\)"):
        load(wrong)
    assert_one_line_error(run_cli("generate", "--model", str(wrong), "-p", "hi", "--max-tokens", "1"),
                          "query_key_value", "num_key_value_heads 1")
