"""The architecture table: for each Hugging Face model_type, its config reader, its model class,
the GGUF architecture it is written as, and one weight-name map per file format (Hugging Face
safetensors, GGUF), each used in both directions (loading and writing).

checkpoint.py, export.py and config.py ask this table instead of testing model_type themselves,
so that an architecture is added here, in one place.

A name map is a list of rules. A rule ties one phi3 state-dict name (`ours`, "{i}" standing for
the layer index) to the tensors that hold it in the file (`theirs`), stacked by rows in that order:
Llama's q, k, v are phi3's one qkv_proj, llama.cpp's ffn_gate and ffn_up are phi3's gate_up_proj.
A rule may carry alternative spellings for the same tensor (llama.cpp writes a phi3 qkv fused,
older converters separately): writing uses the first, loading the one whose tensors are all
present, the one with the most parts when several are.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from phi3.errors import Phi3Error

if TYPE_CHECKING:
    from torch import nn

    from phi3.config import ModelConfig


# --- Name maps ---------------------------------------------------------------------------------------

def _q_rows(cfg: ModelConfig) -> int:
    return cfg.num_attention_heads * cfg.dim_per_head


def _kv_rows(cfg: ModelConfig) -> int:
    return cfg.num_key_value_heads * cfg.dim_per_head


@dataclass(frozen=True)
class Spelling:
    """One way a file spells a phi3 tensor: its names, stacked by rows, and for each part the head
    count by which llama.cpp interleaved its rotary halves (Llama's q and k), or None."""
    names: tuple[str, ...]
    rows: Callable[[ModelConfig], tuple[int, ...]] | None = None  # None: one part
    permute: tuple[str | None, ...] = ()  # per part: "q" (query heads), "k" (key/value heads) or None

    def heads(self, cfg: ModelConfig) -> list[int | None]:
        count = {"q": cfg.num_attention_heads, "k": cfg.num_key_value_heads, None: None}
        return [count[p] for p in (self.permute or (None,) * len(self.names))]

    def part_rows(self, cfg: ModelConfig) -> tuple[int, ...] | None:
        return self.rows(cfg) if self.rows is not None else None


@dataclass(frozen=True)
class Rule:
    ours: str
    spellings: tuple[Spelling, ...]
    when: Callable[[ModelConfig], bool] | None = None  # e.g. output.weight only for an untied head


def rule(ours: str, *spellings: str | Spelling, when: Callable[[ModelConfig], bool] | None = None) -> Rule:
    return Rule(ours, tuple(s if isinstance(s, Spelling) else Spelling((s,)) for s in spellings), when)


@dataclass(frozen=True)
class Planned:
    """One tensor of one model: phi3's name, the file's names and how to join them."""
    ours: str
    theirs: tuple[str, ...]
    rows: tuple[int, ...] | None
    heads: list[int | None]
    layer: int | None


@dataclass(frozen=True)
class NameMap:
    """Rules for one format. `identity`: names no rule covers are the same in the file and in
    phi3 (Hugging Face folders); otherwise every tensor has a rule (GGUF)."""
    rules: tuple[Rule, ...]
    identity: bool = False

    def plan(self, cfg: ModelConfig, present: set[str] | dict[str, Any] | None = None) -> list[Planned]:
        """Every tensor the rules cover for `cfg`, in file order (globals first, then layer by
        layer). `present`: the file's tensor names, to pick among spellings when loading;
        None: the first spelling (writing)."""
        out: list[Planned] = []
        layered = [r for r in self.rules if "{i}" in r.ours]
        for layer, rules in [(None, [r for r in self.rules if "{i}" not in r.ours])] + [
                (i, layered) for i in range(cfg.num_hidden_layers)]:
            for r in rules:
                if r.when is not None and not r.when(cfg):
                    continue
                sp = self._choose(r, layer, present)
                names = tuple(n.format(i=layer) for n in sp.names)
                out.append(Planned(r.ours.format(i=layer), names, sp.part_rows(cfg), sp.heads(cfg), layer))
        return out

    @staticmethod
    def _choose(r: Rule, layer: int | None, present: set[str] | dict[str, Any] | None) -> Spelling:
        if present is None:
            return r.spellings[0]
        found = [s for s in r.spellings if all(n.format(i=layer) in present for n in s.names)]
        return max(found, key=lambda s: len(s.names)) if found else r.spellings[0]

    def grouped(self, cfg: ModelConfig) -> dict[str, Planned]:
        """File name -> the plan it is a part of (loading Hugging Face folders tensor by tensor)."""
        return {name: p for p in self.plan(cfg) for name in p.theirs}


# Llama / Mistral Hugging Face folders keep q, k, v and gate, up apart; phi3 holds them fused.
_HF_LLAMA = NameMap((
    rule("model.layers.{i}.self_attn.qkv_proj.weight",
         Spelling(tuple(f"model.layers.{{i}}.self_attn.{x}_proj.weight" for x in "qkv"),
                  lambda c: (_q_rows(c), _kv_rows(c), _kv_rows(c)))),
    rule("model.layers.{i}.mlp.gate_up_proj.weight",
         Spelling(("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
                  lambda c: (c.intermediate_size, c.intermediate_size))),
), identity=True)
_HF_SAME = NameMap((), identity=True)


def _untied(cfg: ModelConfig) -> bool:
    return not cfg.tie_word_embeddings


def _phi3_gguf(llama: bool) -> NameMap:
    """llama.cpp's names for the phi3 and llama architectures. Llama's q/k rows are interleaved
    (llama.cpp's converter does it; loading undoes it)."""
    qkv_split = Spelling(("blk.{i}.attn_q.weight", "blk.{i}.attn_k.weight", "blk.{i}.attn_v.weight"),
                         lambda c: (_q_rows(c), _kv_rows(c), _kv_rows(c)), ("q", "k", None) if llama else ())
    qkv_fused = Spelling(("blk.{i}.attn_qkv.weight",))
    gate_up_split = Spelling(("blk.{i}.ffn_gate.weight", "blk.{i}.ffn_up.weight"),
                             lambda c: (c.intermediate_size, c.intermediate_size))
    gate_up_fused = Spelling(("blk.{i}.ffn_up.weight",))
    return NameMap((
        rule("model.embed_tokens.weight", "token_embd.weight"),
        rule("model.norm.weight", "output_norm.weight"),
        rule("lm_head.weight", "output.weight", when=_untied),
        rule("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
        rule("model.layers.{i}.self_attn.qkv_proj.weight", *((qkv_split, qkv_fused) if llama else (qkv_fused, qkv_split))),
        rule("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
        rule("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
        rule("model.layers.{i}.mlp.gate_up_proj.weight",
             *((gate_up_split, gate_up_fused) if llama else (gate_up_fused, gate_up_split))),
        rule("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ))


def _small_gguf() -> NameMap:
    """phi3's own GGUF layout for Phi-3-small (no GGUF convention exists; README "phi-3-small").
    Every tensor keeps Hugging Face's layout: qkv rows interleaved per KV group, ffn_up's GEGELU
    channels interleaved (even rows gelu, odd rows linear), so files and folders convert by name."""
    rules = [rule("model.embed_tokens.weight", "token_embd.weight"),
             rule("lm_head.weight", "output.weight", when=_untied)]
    for suffix in ("weight", "bias"):
        rules.append(rule(f"model.final_layernorm.{suffix}", f"output_norm.{suffix}"))
    for ours, theirs in (("input_layernorm", "attn_norm"), ("self_attn.query_key_value", "attn_qkv"),
                         ("self_attn.dense", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
                         ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
        for suffix in ("weight", "bias"):
            rules.append(rule(f"model.layers.{{i}}.{ours}.{suffix}", f"blk.{{i}}.{theirs}.{suffix}"))
    return NameMap(tuple(rules))


# --- The table ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    model_type: str                     # config.json's model_type
    gguf_arch: str                      # general.architecture written and read
    hf_class: str                       # config.json "architectures" written by `phi3 convert`
    hf_model_type: str                  # config.json "model_type" written (mistral is written as llama)
    config_reader: str                  # "module:function" (dict, name) -> ModelConfig
    model: str                          # "module:Class"
    hf_names: NameMap
    gguf_names: NameMap
    gguf_config_reader: str = "phi3.checkpoint:phi3_config_from_gguf"  # (fields, tensors) -> ModelConfig
    gguf_config_writer: str = "phi3.export:config_metadata"           # (cfg, gguf_arch) -> metadata entries
    rope_factor_tensors: bool = False   # LongRoPE factors as the tensors rope_factors_long/short (llama.cpp's phi3)
    longrope_in_config: bool = False    # config.json carries original context, sliding window, rope_scaling
    shard_hf: bool = False              # `phi3 convert` writes sharded safetensors + index (as HF ships it)
    tokenizer: str | None = None        # "module:function" () -> the architecture's own tokenizer, if it has one

    @property
    def config_from_hf(self) -> Callable[[dict[str, Any], str], ModelConfig]:
        return _resolve(self.config_reader)

    @property
    def config_from_gguf(self) -> Callable[[dict[str, Any], dict[str, Any]], ModelConfig]:
        return _resolve(self.gguf_config_reader)

    @property
    def gguf_metadata(self) -> Callable[[ModelConfig, str], list[tuple[str, Any, Any, Any]]]:
        return _resolve(self.gguf_config_writer)

    @property
    def model_class(self) -> type[nn.Module]:
        # Imported on first use: the phi3 architectures keep working whatever another model file does.
        return _resolve(self.model)


def _resolve(spec: str) -> Any:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


_PHI3_READER = "phi3.config:phi3_config_from_hf_dict"
ARCHITECTURES: dict[str, Architecture] = {
    "phi3": Architecture("phi3", "phi3", "Phi3ForCausalLM", "phi3", _PHI3_READER, "phi3.model:Transformer",
                         _HF_SAME, _phi3_gguf(llama=False), rope_factor_tensors=True, longrope_in_config=True),
    "llama": Architecture("llama", "llama", "LlamaForCausalLM", "llama", _PHI3_READER, "phi3.model:Transformer",
                          _HF_LLAMA, _phi3_gguf(llama=True)),
    "mistral": Architecture("mistral", "llama", "LlamaForCausalLM", "llama", _PHI3_READER, "phi3.model:Transformer",
                            _HF_LLAMA, _phi3_gguf(llama=True)),
    "phi3small": Architecture("phi3small", "phi3small", "Phi3SmallForCausalLM", "phi3small",
                              "phi3.config_small:small_config_from_hf_dict", "phi3.model_small:SmallTransformer",
                              _HF_SAME, _small_gguf(), "phi3.checkpoint:small_config_from_gguf",
                              "phi3.export:small_config_metadata", shard_hf=True,
                              tokenizer="phi3.tokenizer:phi3small_tokenizer"),
}
# GGUF general.architecture -> the model_type a file loads as.
GGUF_ARCHITECTURES: dict[str, str] = {"phi3": "phi3", "llama": "llama", "phi3small": "phi3small"}


def architecture(model_type: Any) -> Architecture:
    """The table's entry for a config.json model_type; a Phi3Error naming the supported ones."""
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        from phi3.config import shown
        raise Phi3Error(f"unknown architecture: model_type {shown(model_type)}; phi3 supports "
                        f"{', '.join(ARCHITECTURES)}")
    return arch


def gguf_architecture(name: Any) -> Architecture:
    """The entry for a GGUF general.architecture."""
    if not isinstance(name, str) or name not in GGUF_ARCHITECTURES:
        raise Phi3Error(f"unknown architecture {name!r} in GGUF; phi3 loads "
                        f"{', '.join(repr(a) for a in GGUF_ARCHITECTURES)}")
    return ARCHITECTURES[GGUF_ARCHITECTURES[name]]


def build_model(cfg: ModelConfig) -> nn.Module:
    return architecture(cfg.model_type).model_class(cfg)


# --- GGUF hyper-parameters of phi3small ------------------------------------------------------------
# (SmallConfig field, key under "phi3small.", kind), read and written from this one list:
# u32 / f64 / bool scalars; "opt" kinds are absent when the field is None (u32_opt0: 0 means None,
# as llama.cpp writes "no sliding window"); arrays: i32s / u32s / f64s (absent when empty: GGUF
# cannot hold an empty array). Floats are FLOAT64 so that a file rebuilds the config.json's values
# bit for bit (no GGUF convention to follow for this architecture).
SMALL_GGUF_KEYS: tuple[tuple[str, str, str], ...] = (
    ("vocab_size", "vocab_size", "u32"),
    ("hidden_size", "embedding_length", "u32"),
    ("intermediate_size", "feed_forward_length", "u32"),
    ("num_hidden_layers", "block_count", "u32"),
    ("num_attention_heads", "attention.head_count", "u32"),
    ("num_key_value_heads", "attention.head_count_kv", "u32"),
    ("head_dim", "attention.key_length", "u32_opt"),
    ("max_position_embeddings", "context_length", "u32"),
    ("original_max_position_embeddings", "rope.scaling.original_context_length", "u32"),
    ("rope_theta", "rope.freq_base", "f64"),
    ("rope_position_scale", "rope.position_scale", "f64"),
    ("short_mscale", "rope.scaling.short_mscale", "f64_opt"),
    ("long_mscale", "rope.scaling.long_mscale", "f64_opt"),
    ("layer_norm_epsilon", "attention.layer_norm_epsilon", "f64"),
    ("gegelu_limit", "gegelu_limit", "f64_opt"),
    ("mup_embedding_multiplier", "mup.embedding_multiplier", "f64"),
    ("mup_attn_multiplier", "mup.attn_multiplier", "f64"),
    ("mup_use_scaling", "mup.use_scaling", "bool"),
    ("mup_width_multiplier", "mup.width_multiplier", "f64"),
    ("blocksparse_block_size", "blocksparse.block_size", "u32"),
    ("blocksparse_num_local_blocks", "blocksparse.num_local_blocks", "u32"),
    ("blocksparse_vert_stride", "blocksparse.vert_stride", "u32"),
    ("blocksparse_homo_head_pattern", "blocksparse.homo_head_pattern", "bool"),
    ("dense_attention_every_n_layers", "attention.dense_every_n_layers", "u32_opt0"),
    ("dummy_token_indices", "dummy_token_ids", "u32s"),
    ("bos_token_id", "bos_token_id", "u32_opt"),
    ("eos_token_id", "eos_token_ids", "u32s"),
    ("pad_token_id", "pad_token_id", "u32_opt"),
    ("embedding_dropout_prob", "training.embedding_dropout", "f64"),
    ("ffn_dropout_prob", "training.ffn_dropout", "f64"),
    ("initializer_range", "training.initializer_range", "f64"),
)
# LongRoPE (128K): rope.scaling.short_factor / long_factor (FLOAT64 arrays of head_dim/2), and
# rope.scaling.attn_factor when the config names one; absent for the 8K model.
