"""Writing GGUF files: `phi3 quantize` (and `phi3 bench`'s random models).

The output follows llama.cpp's conventions, so that llama.cpp and ollama run it as phi3 does:
architecture `phi3` (fused attn_qkv and ffn_up = [gate; up], LongRoPE factors as the tensors
rope_factors_long/short) or `llama` (separate q/k/v with q and k rows interleaved the way
llama.cpp's converter does, ffn_gate and ffn_up), tokenizer and chat template in the metadata.
Phi-3-small, which llama.cpp never supported, is written in phi3's own `phi3small` layout
(README "phi-3-small"). Which names and metadata each architecture gets is phi3/arch.py's table.

Tensors are read, quantized and written one at a time (large ones in row chunks), so memory stays
near one float32 tensor whatever the model's size: quantizing phi-3-mini takes about 2 GB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from phi3 import quant
from phi3.arch import SMALL_GGUF_KEYS, Architecture, architecture
from phi3.config import ModelConfig
from phi3.errors import Phi3Error
from phi3.tokenizer import (BYTE, CONTROL, NORMAL, PHI3_CHAT_TEMPLATE, UNKNOWN, TokenizerBase,
                            tokenizer_gguf_metadata)

# GGUF general.file_type (llama.cpp's llama_ftype) of each output type.
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k": 15, "iq4_nl": 25, "iq4_xs": 30}
CHUNK_ROWS = 2048  # rows quantized at once: bounds temporary memory for big matrices


@dataclass
class SourceTensor:
    name: str                           # GGUF name
    shape: tuple[int, ...]              # PyTorch order: (rows, cols) or (n,)
    load: Callable[[], np.ndarray]      # -> float32 array of `shape`


@dataclass
class ModelSource:
    """What a GGUF file is written from: config, tokenizer metadata and lazily loaded tensors."""
    config: ModelConfig
    arch: str
    metadata: list[tuple[str, Any, Any, Any]]  # (key, value, GGUFValueType, array sub-type)
    tensors: list[SourceTensor]


# --- Sources ---------------------------------------------------------------------------------------

def permute_for_llama_cpp(w, n_head: int):
    """llama.cpp's converter interleaves the two rotary halves of each Llama q/k head (numpy
    arrays or torch tensors; checkpoint._unpermute_rope undoes it)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_metadata(cfg: ModelConfig, arch: str) -> list[tuple[str, Any, Any, Any]]:
    import gguf
    V = gguf.GGUFValueType
    hd = cfg.dim_per_head
    meta = [
        ("general.name", cfg.name or "phi3", V.STRING, None),
        (f"{arch}.context_length", cfg.max_position_embeddings, V.UINT32, None),
        (f"{arch}.embedding_length", cfg.hidden_size, V.UINT32, None),
        (f"{arch}.feed_forward_length", cfg.intermediate_size, V.UINT32, None),
        (f"{arch}.block_count", cfg.num_hidden_layers, V.UINT32, None),
        (f"{arch}.attention.head_count", cfg.num_attention_heads, V.UINT32, None),
        (f"{arch}.attention.head_count_kv", cfg.num_key_value_heads, V.UINT32, None),
        (f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps, V.FLOAT32, None),
        (f"{arch}.rope.dimension_count", hd, V.UINT32, None),
        (f"{arch}.rope.freq_base", cfg.rope_theta, V.FLOAT32, None),
        (f"{arch}.vocab_size", cfg.vocab_size, V.UINT32, None),
    ]
    if hd != cfg.hidden_size // cfg.num_attention_heads:
        meta += [(f"{arch}.attention.key_length", hd, V.UINT32, None),
                 (f"{arch}.attention.value_length", hd, V.UINT32, None)]
    if architecture(cfg.model_type).longrope_in_config:  # llama.cpp's phi3 keys
        meta.append((f"{arch}.rope.scaling.original_context_length", cfg.original_max_position_embeddings,
                     V.UINT32, None))
        # llama.cpp's converter writes 0 for "no sliding window" (Phi-4 uses the phi3 architecture)
        meta.append((f"{arch}.attention.sliding_window", cfg.sliding_window or 0, V.UINT32, None))
        if cfg.rope_scaling is not None:
            meta.append((f"{arch}.rope.scaling.attn_factor", cfg.rope_attention_factor, V.FLOAT32, None))
    return meta


def small_config_metadata(cfg: ModelConfig, arch: str = "phi3small") -> list[tuple[str, Any, Any, Any]]:
    """phi3small.* from a SmallConfig, by arch.SMALL_GGUF_KEYS (checkpoint.small_config_from_gguf
    reads the same list back)."""
    import gguf
    V = gguf.GGUFValueType
    meta: list[tuple[str, Any, Any, Any]] = [("general.name", cfg.name or "phi3small", V.STRING, None)]
    for name, suffix, kind in SMALL_GGUF_KEYS:
        v = getattr(cfg, name)
        key = f"{arch}.{suffix}"
        if kind == "u32_opt0":
            meta.append((key, v or 0, V.UINT32, None))
        elif v is None or (kind.endswith("s") and not v):
            continue
        elif kind.startswith("u32s"):
            meta.append((key, [int(x) for x in v], V.ARRAY, V.UINT32))
        elif kind.startswith("u32"):
            meta.append((key, int(v), V.UINT32, None))
        elif kind.startswith("f64"):
            meta.append((key, float(v), V.FLOAT64, None))
        else:
            meta.append((key, bool(v), V.BOOL, None))
    if cfg.rope_scaling is not None:
        meta += [(f"{arch}.rope.scaling.short_factor", [float(x) for x in cfg.rope_scaling.short_factor], V.ARRAY,
                  V.FLOAT64),
                 (f"{arch}.rope.scaling.long_factor", [float(x) for x in cfg.rope_scaling.long_factor], V.ARRAY,
                  V.FLOAT64)]
        if cfg.rope_scaling.attention_factor is not None:
            meta.append((f"{arch}.rope.scaling.attn_factor", float(cfg.rope_scaling.attention_factor), V.FLOAT64,
                         None))
    return meta


def tokenizer_metadata(tok: TokenizerBase, cfg: ModelConfig, arch: str) -> list[tuple[str, Any, Any, Any]]:
    """tokenizer.ggml.* for `tok` (phi3.tokenizer.tokenizer_gguf_metadata, sized for `cfg`)."""
    return tokenizer_gguf_metadata(tok, cfg.vocab_size, cfg.pad_token_id, arch)


class _Stacked:
    """One phi3 tensor whose rows are one or more file tensors stacked (Llama's q, k, v are phi3's
    qkv_proj): loads the rows lo:hi reading only the parts they overlap."""

    def __init__(self, parts: list[tuple[str, int]], cols: tuple[int, ...], get: Callable[[str], np.ndarray]) -> None:
        self.parts, self.get = parts, get
        self.shape = (sum(n for _, n in parts), *cols) if cols else (sum(n for _, n in parts),)

    def load(self, lo: int = 0, hi: int | None = None) -> np.ndarray:
        hi = self.shape[0] if hi is None else hi
        out, at = [], 0
        for name, n in self.parts:
            if at < hi and at + n > lo:
                a = self.get(name)
                out.append(a if (lo <= at and at + n <= hi) else a[max(lo - at, 0):min(hi - at, n)])
            at += n
        return np.concatenate(out) if len(out) > 1 else out[0]


def _phi3_tensors(arch: Architecture, cfg: ModelConfig, get: Callable[[str], np.ndarray],
                  shapes: dict[str, tuple[int, ...]]) -> dict[str, _Stacked]:
    """The folder's tensors under phi3's names (arch.hf_names), loaded lazily."""
    groups = arch.hf_names.grouped(cfg)
    out: dict[str, _Stacked] = {}
    for p in {id(p): p for p in groups.values()}.values():
        if all(n in shapes for n in p.theirs):
            out[p.ours] = _Stacked([(n, shapes[n][0]) for n in p.theirs], shapes[p.theirs[0]][1:], get)
    for name, shape in shapes.items():
        if name not in groups and not name.endswith("rotary_emb.inv_freq"):
            out[name] = _Stacked([(name, shape[0])], shape[1:], get)
    return out


def _layer_tensors(cfg: ModelConfig, arch: str, get: Callable[[str], np.ndarray],
                   shapes: dict[str, tuple[int, ...]]) -> list[SourceTensor]:
    """GGUF tensors from Hugging Face-named ones: phi3 names by the architecture table's hf_names,
    then GGUF names by its gguf_names (split by rows, Llama's q and k rows interleaved)."""
    table = architecture(cfg.model_type)
    ours = _phi3_tensors(table, cfg, get, shapes)
    out: list[SourceTensor] = []
    plans = table.gguf_names.plan(cfg)
    for p in plans:
        if p.ours not in ours:
            where = getattr(shapes, "where", "the model")
            raise Phi3Error(f"{where} is missing tensor {p.ours}")
        src = ours[p.ours]
        if p.rows is None:
            out.append(SourceTensor(p.theirs[0], src.shape, src.load))
        else:
            lo = 0
            for name, n, heads in zip(p.theirs, p.rows, p.heads):
                load = (lambda src=src, lo=lo, hi=lo + n: src.load(lo, hi))
                if heads is not None:
                    load = (lambda load=load, h=heads: permute_for_llama_cpp(load(), h))
                out.append(SourceTensor(name, (n, *src.shape[1:]), load))
                lo += n
    if table.rope_factor_tensors and cfg.rope_scaling is not None:
        long_f = np.array(cfg.rope_scaling.long_factor, np.float32)
        short_f = np.array(cfg.rope_scaling.short_factor, np.float32)
        n_global = sum(1 for t in out if not t.name.startswith("blk."))
        out[n_global:n_global] = [SourceTensor("rope_factors_long.weight", long_f.shape, lambda: long_f),
                                  SourceTensor("rope_factors_short.weight", short_f.shape, lambda: short_f)]
    return out


def source_from_hf_folder(folder: Path) -> ModelSource:
    from safetensors import safe_open

    from phi3.checkpoint import _check_safetensors_header, _safetensors_files
    from phi3.config import load_config
    from phi3.tokenizer import load_tokenizer
    cfg = load_config(folder)
    table = architecture(cfg.model_type)
    arch = table.gguf_arch
    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for f in _safetensors_files(folder):
        _check_safetensors_header(f)
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                where[name] = f
                shapes[name] = tuple(st.get_slice(name).get_shape())

    def get(name: str) -> np.ndarray:
        if name not in where:
            raise Phi3Error(f"{folder} is missing tensor {name}")
        with safe_open(str(where[name]), framework="pt") as st:
            return st.get_tensor(name).float().numpy()

    class _Shapes(dict):
        where = str(folder)

        def __missing__(self, key: str):
            raise Phi3Error(f"{folder} is missing tensor {key}")

    tok = load_tokenizer(folder, eos_ids=cfg.eos_token_id)
    meta = table.gguf_metadata(cfg, arch) + tokenizer_metadata(tok, cfg, arch)
    return ModelSource(cfg, arch, meta, _layer_tensors(cfg, arch, get, _Shapes(shapes)))


def source_from_gguf(path: Path) -> ModelSource:
    """Every tensor of a GGUF file, dequantized on demand, and its metadata as it is (bar the file type)."""
    from phi3.checkpoint import _tensor_numpy, config_from_gguf, gguf_fields, open_gguf
    reader = open_gguf(path)
    fields = gguf_fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(fields, tensors)
    meta = []
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type",
                                               "general.quantization_version"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if len(field.types) > 1 else None
        meta.append((key, field.contents(), vtype, sub))
    out = [SourceTensor(t.name, tuple(int(x) for x in reversed(t.shape)), lambda t=t: _tensor_numpy(t))
           for t in reader.tensors]
    return ModelSource(cfg, architecture(cfg.model_type).gguf_arch, meta, out)


def random_source(cfg: ModelConfig, seed: int = 0) -> ModelSource:
    """A model of `cfg`'s exact shape with random weights (N(0, 0.02), norms 1, biases 0) and a
    tokenizer: speed does not depend on weight values. The phi3 family gets a byte-level stub;
    phi3small its real tiktoken vocabulary (cl100k_base, offline), as its GGUF layout has no other."""
    import gguf
    import torch
    V = gguf.GGUFValueType
    table = architecture(cfg.model_type)
    arch = table.gguf_arch
    with torch.device("meta"):  # the model's own parameter shapes, without memory
        shapes = {k: tuple(v.shape) for k, v in table.model_class(cfg).state_dict().items()}
    counter = iter(range(1 << 30))

    def get(name: str) -> np.ndarray:
        shape = shapes[name]
        if len(shape) == 1:
            return (np.zeros if name.endswith(".bias") else np.ones)(shape, np.float32)
        g = torch.Generator().manual_seed(seed * 100003 + next(counter))
        return (torch.randn(shape, generator=g) * 0.02).numpy()

    # Phi-3's special tokens (llama.cpp looks <|endoftext|> up for models named phi-3), a space
    # piece, then distinct filler pieces.
    specials = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + specials + ["\u2581"]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [CONTROL] * len(specials) + [NORMAL]
    tokens += [f"\u2581t{i}" for i in range(len(tokens), cfg.vocab_size)]
    types += [NORMAL] * (cfg.vocab_size - len(types))
    if table.tokenizer is not None:  # the architecture's own vocabulary (phi3small: cl100k_base, offline)
        from phi3.arch import _resolve
        meta = table.gguf_metadata(cfg, arch) + tokenizer_metadata(_resolve(table.tokenizer)(), cfg, arch)
        return ModelSource(cfg, arch, meta, _layer_tensors(cfg, arch, get, shapes))
    meta = table.gguf_metadata(cfg, arch) + [
        ("tokenizer.ggml.model", "llama", V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.scores", [-float(i) for i in range(len(tokens))], V.ARRAY, V.FLOAT32),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.bos_token_id", 1, V.UINT32, None),
        ("tokenizer.ggml.eos_token_id", 2, V.UINT32, None),
        ("tokenizer.chat_template", PHI3_CHAT_TEMPLATE, V.STRING, None),
    ]
    return ModelSource(cfg, arch, meta, _layer_tensors(cfg, arch, get, shapes))


# --- Writing ---------------------------------------------------------------------------------------

def tensor_type(name: str, shape: tuple[int, ...], qtype: str, pure: bool) -> str:
    """Storage type of one tensor: 1-D ones (norms, rope factors) stay float32; the embedding and
    output matrices get 8 bits under a 4-bit type (llama.cpp gives them Q6_K) unless `pure`; a
    row length the type's block does not divide falls back to q4_1 for q4_k (llama.cpp picks
    Q5_0, which phi3 does not write) and to iq4_nl for iq4_xs (as llama.cpp does), else to q8_0,
    then f16."""
    if len(shape) < 2:
        return "f32"
    kind = qtype
    if not pure and qtype.startswith(("q4", "iq4")) and name in ("token_embd.weight", "output.weight"):
        kind = "q8_0"
    cols = shape[-1]
    if cols % quant.block_size(kind):
        fallback = {"q4_k": "q4_1", "iq4_xs": "iq4_nl"}.get(kind, "q8_0")
        kind = fallback if cols % quant.BLOCK == 0 else "f16"
    return kind


def _ggml_type(kind: str):
    import gguf
    return gguf.GGMLQuantizationType[kind.upper()]


def _nbytes(shape: tuple[int, ...], kind: str) -> int:
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[_ggml_type(kind)]
    return math.prod(shape) // block * size


def _quantize_chunks(arr: np.ndarray, kind: str) -> np.ndarray:
    if arr.ndim < 2:
        return quant.quantize_blocks(arr, kind)
    parts = [quant.quantize_blocks(arr[r:r + CHUNK_ROWS], kind) for r in range(0, arr.shape[0], CHUNK_ROWS)]
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def write_gguf(source: ModelSource, out: Path, qtype: str, pure: bool = False, progress: bool = True) -> dict[str, Any]:
    """Quantize `source` tensor by tensor into a GGUF file at `out`. Returns a summary."""
    import gguf
    if qtype not in quant.WRITE_TYPES:
        raise Phi3Error(f"unsupported quantization type {qtype!r}; choose one of {', '.join(quant.WRITE_TYPES)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")  # never leave a half-written file under the real name
    writer = gguf.GGUFWriter(str(tmp), source.arch)
    for key, value, vtype, sub in source.metadata:
        writer.add_key_value(key, value, vtype, sub)
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kinds = []
    for t in source.tensors:
        kind = tensor_type(t.name, t.shape, qtype, pure)
        kinds.append(kind)
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, kind), _ggml_type(kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    counts: dict[str, int] = {}
    items: Iterator = zip(source.tensors, kinds)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(source.tensors), desc=f"quantizing to {qtype}", unit="tensor")
    try:
        for t, kind in items:
            arr = t.load()
            if tuple(arr.shape) != tuple(t.shape):
                raise Phi3Error(f"tensor {t.name} has shape {tuple(arr.shape)}, expected {t.shape}")
            data = _quantize_chunks(np.ascontiguousarray(arr, dtype=np.float32), kind)
            writer.write_tensor_data(data)
            counts[kind] = counts.get(kind, 0) + 1
            if bar is not None:
                bar.update(1)
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    tmp.replace(out)
    return {"path": str(out), "type": qtype, "tensor_types": counts, "file_bytes": out.stat().st_size,
            "arch": source.arch, "parameters": source.config.num_parameters()}


def open_source(path: Path) -> ModelSource:
    from phi3.checkpoint import _is_gguf, resolve_model_path
    path = resolve_model_path(str(path))
    if path.is_dir():
        return source_from_hf_folder(path)
    if path.suffix == ".gguf" or _is_gguf(path):
        return source_from_gguf(path)
    raise Phi3Error(f"{path} is neither a Hugging Face folder nor a GGUF file")
