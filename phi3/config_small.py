"""Phi-3-small's configuration: `SmallConfig` (a ModelConfig, so every consumer that reads the
common fields works unchanged), a reader and writer for its Hugging Face config.json
(model_type "phi3small"), and presets for the 8K and 128K models.

Facts from ../shared/reference/phi3-small.md (the fact sheet; section numbers below are its).
The config.json names differ from Phi-3-mini's: `rope_embedding_base` is the rotary theta,
`ff_intermediate_size` the MLP width, `layer_norm_epsilon` the LayerNorm's eps; the muP and
blocksparse fields have no counterpart in the other architectures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from phi3.config import ModelConfig, RopeScaling, shown
from phi3.errors import Phi3Error

MODEL_TYPE = "phi3small"

# §5.2: ids whose logits are forced to the float32 minimum (the FIM tokens, <|endofprompt|>, the
# dummies that pad cl100k's 100,256 ranks + specials to 100,352, and 100256, which cl100k lacks).
DUMMY_TOKEN_INDICES: tuple[int, ...] = (100256, 100258, 100259, 100260, 100264, 100265) + tuple(range(100267, 100352))
END_OF_TEXT = 100257  # <|endoftext|>: bos = eos = pad
END_OF_TURN = 100266  # <|end|>: the chat template's end of a turn, the other generation eos (§5.2)


@dataclass(frozen=True)
class SmallConfig(ModelConfig):
    # ModelConfig fields, with phi-3-small-8k's values as defaults (§1.1). intermediate_size is HF's
    # ff_intermediate_size; rms_norm_eps is unused (layer_norm_epsilon below).
    vocab_size: int = 100352
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    max_position_embeddings: int = 8192
    original_max_position_embeddings: int = 8192
    rope_theta: float = 1e6
    tie_word_embeddings: bool = True
    model_type: str = MODEL_TYPE
    bos_token_id: int | None = END_OF_TEXT
    eos_token_id: tuple[int, ...] = (END_OF_TEXT, END_OF_TURN)
    pad_token_id: int | None = END_OF_TEXT
    # Phi-3-small's own fields.
    layer_norm_epsilon: float = 1e-5
    gegelu_limit: float | None = 20.0
    mup_embedding_multiplier: float = 10.0
    mup_attn_multiplier: float = 1.0
    mup_use_scaling: bool = True
    mup_width_multiplier: float = 8.0
    blocksparse_block_size: int = 64
    blocksparse_num_local_blocks: int = 16
    blocksparse_vert_stride: int = 8
    blocksparse_homo_head_pattern: bool = False
    dense_attention_every_n_layers: int | None = 2
    dummy_token_indices: tuple[int, ...] = DUMMY_TOKEN_INDICES
    short_mscale: float | None = None  # LongRoPE cos/sin scales (128K); None: the defaults of §4.5
    long_mscale: float | None = None
    rope_position_scale: float = 1.0
    embedding_dropout_prob: float = 0.1  # training only
    ffn_dropout_prob: float = 0.1  # training only

    def __post_init__(self) -> None:
        super().__post_init__()
        where, fix = self.extra.get("source", "config"), self.extra.get("fix", "correct the config")
        key = self._key
        for name in ("blocksparse_block_size", "blocksparse_num_local_blocks", "blocksparse_vert_stride"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise Phi3Error(f"{where}: {key(name)} is {shown(v)}, not a positive integer; {fix}")
        n = self.dense_attention_every_n_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise Phi3Error(f"{where}: {key('dense_attention_every_n_layers')} is {shown(n)}, not a positive "
                            f"integer or null; {fix}")
        for name in ("layer_norm_epsilon", "mup_embedding_multiplier", "mup_attn_multiplier", "mup_width_multiplier",
                     "rope_position_scale", "gegelu_limit", "short_mscale", "long_mscale",
                     "embedding_dropout_prob", "ffn_dropout_prob"):
            v = getattr(self, name)
            if v is None and name in ("gegelu_limit", "short_mscale", "long_mscale"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise Phi3Error(f"{where}: {key(name)} is {shown(v)}, not a finite number >= 0; {fix}")
            if name in ("mup_width_multiplier", "gegelu_limit", "short_mscale", "long_mscale") and v == 0:
                raise Phi3Error(f"{where}: {key(name)} is 0; it must be positive; {fix}")
            if name.endswith("dropout_prob") and v >= 1:
                raise Phi3Error(f"{where}: {key(name)} is {v}, not a probability in [0, 1); {fix}")
        for i in self.dummy_token_indices:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise Phi3Error(f"{where}: {key('dummy_token_indices')} holds {shown(i)}, not a token id; {fix}")

    def is_dense_layer(self, i: int) -> bool:
        """§4.1, HF's rule: dense iff n is set and (i + 1) % n == 0 (n = 2: layers 1, 3, ..., 31).
        mlx writes `i % n == 0 -> sparse`, which agrees only for n = 2."""
        n = self.dense_attention_every_n_layers
        return n is not None and (i + 1) % n == 0

    @property
    def rope_short_mscale(self) -> float:
        """LongRoPE's cos/sin scale within the original context: the config's, else 1.0 (HF)."""
        return 1.0 if self.short_mscale is None else float(self.short_mscale)

    @property
    def rope_long_mscale(self) -> float:
        """Beyond it: the config's, else sqrt(1 + ln(max/original) / ln(original)) (HF, vLLM):
        1.1435437 for 131072 / 8192."""
        if self.long_mscale is not None:
            return float(self.long_mscale)
        s = self.max_position_embeddings / self.original_max_position_embeddings
        return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(self.original_max_position_embeddings))

    @property
    def rope_attention_factor(self) -> float:
        # model.py's single LongRoPE factor does not describe small (its two sets scale differently):
        # SmallTransformer reads rope_short_mscale / rope_long_mscale. Kept for `phi3 info`-like readers.
        return self.rope_short_mscale

    def num_parameters(self) -> int:
        """Biases on all four linears, LayerNorms with weight and bias, a tied head: 7,392,272,384
        for the 8K model (§2.3)."""
        d, hd, ff = self.hidden_size, self.dim_per_head, self.intermediate_size
        qkv_rows = (self.num_attention_heads + 2 * self.num_key_value_heads) * hd
        per_layer = (d * qkv_rows + qkv_rows + self.num_attention_heads * hd * d + d
                     + d * 2 * ff + 2 * ff + ff * d + d + 4 * d)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_hidden_layers * per_layer + self.vocab_size * d + head + 2 * d

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as Hugging Face's Phi3SmallConfig writes it (§1.1, §1.2)."""
        out: dict[str, Any] = {
            "architectures": ["Phi3SmallForCausalLM"],
            "model_type": MODEL_TYPE,
            "auto_map": {
                "AutoConfig": "configuration_phi3_small.Phi3SmallConfig",
                "AutoModelForCausalLM": "modeling_phi3_small.Phi3SmallForCausalLM",
                "AutoTokenizer": "tokenization_phi3_small.Phi3SmallTokenizer",
            },
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "ff_intermediate_size": self.intermediate_size,
            "ff_dim_multiplier": None,
            "gegelu_pad_to_256": True,
            "hidden_act": "gegelu",
            "gegelu_limit": self.gegelu_limit,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_embedding_base": self.rope_theta,
            "rope_position_scale": self.rope_position_scale,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "mup_attn_multiplier": self.mup_attn_multiplier,
            "mup_embedding_multiplier": self.mup_embedding_multiplier,
            "mup_use_scaling": self.mup_use_scaling,
            "mup_width_multiplier": self.mup_width_multiplier,
            "blocksparse_block_size": self.blocksparse_block_size,
            "blocksparse_num_local_blocks": self.blocksparse_num_local_blocks,
            "blocksparse_vert_stride": self.blocksparse_vert_stride,
            "blocksparse_homo_head_pattern": self.blocksparse_homo_head_pattern,
            "blocksparse_triton_kernel_block_size": self.blocksparse_block_size,
            "dense_attention_every_n_layers": self.dense_attention_every_n_layers,
            "embedding_dropout_prob": self.embedding_dropout_prob,
            "ffn_dropout_prob": self.ffn_dropout_prob,
            "attention_dropout_prob": self.attention_dropout,
            "initializer_range": self.initializer_range,
            "pad_sequence_to_multiple_of_64": True,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id,
            "dummy_token_indices": list(self.dummy_token_indices),
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
        }
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        if self.rope_scaling is not None or self.original_max_position_embeddings != self.max_position_embeddings:
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        if self.rope_scaling is not None:
            scaling: dict[str, Any] = {
                "type": "longrope",  # the real file's string is not public (§1.3); HF accepts longrope or su
                "short_factor": list(self.rope_scaling.short_factor),
                "long_factor": list(self.rope_scaling.long_factor),
                "original_max_position_embeddings": self.original_max_position_embeddings,
            }
            if self.short_mscale is not None:
                scaling["short_mscale"] = self.short_mscale
            if self.long_mscale is not None:
                scaling["long_mscale"] = self.long_mscale
            out["rope_scaling"] = scaling
        return out


def small_config_from_hf_dict(d: dict[str, Any], name: str = "custom") -> SmallConfig:
    """Read a Phi-3-small config.json (model_type phi3small); one-line Phi3Error for what phi3
    cannot run or what is malformed."""
    if not isinstance(d, dict):
        raise Phi3Error(f"config.json holds a JSON {type(d).__name__}, not an object; correct config.json")
    if d.get("model_type") != MODEL_TYPE:
        raise Phi3Error(f"config.json: model_type is {shown(d.get('model_type'))}, not {MODEL_TYPE!r}")
    fix = "correct config.json"
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if k not in d:
            raise Phi3Error(f"config.json is missing {k!r}")
    if d.get("hidden_act", "gegelu") != "gegelu":
        raise Phi3Error(f"config.json: hidden_act {shown(d.get('hidden_act'))} is not supported for phi3small; "
                        "phi3 implements gegelu")

    def number(k: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Phi3Error(f"config.json: {k} is {shown(value)}, not a number; {fix}")
        return float(value)

    def optional(k: str, default: float | None) -> float | None:
        v = d.get(k, default)
        return None if v is None else number(k, v)

    def size(k: str, default: Any = None) -> Any:
        v = d.get(k)
        if v is None:
            return default
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
            return int(v)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise Phi3Error(f"config.json: {k} is {shown(v)}, not an integer; {fix}")

    ff = size("ff_intermediate_size", size("intermediate_size"))
    if ff is None:
        raise Phi3Error("config.json: ff_intermediate_size is missing (phi3 does not derive it from "
                        "ff_dim_multiplier); set ff_intermediate_size")
    max_pos = size("max_position_embeddings", 8192)
    scaling = d.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise Phi3Error(f"config.json: rope_scaling is {shown(scaling)}, not an object; {fix}")
    original = size("original_max_position_embeddings")
    rope_scaling, short_mscale, long_mscale = None, None, None
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type", "longrope"))
        if kind not in ("longrope", "su"):
            raise Phi3Error(f"config.json: rope_scaling type {shown(kind)} is not supported for phi3small; "
                            "phi3 implements longrope")
        factors = {}
        for which in ("short_factor", "long_factor"):
            values = scaling.get(which)
            if not isinstance(values, (list, tuple)) or not values:
                raise Phi3Error(f"config.json: rope_scaling.{which} is {'missing' if values is None else shown(values)}"
                                f"; a 128K model needs its short and long factor lists (use the checkpoint's own "
                                f"config.json)")
            factors[which] = tuple(number(f"rope_scaling.{which}[{i}]", x) for i, x in enumerate(values))
        rope_scaling = RopeScaling(**factors)
        if original is None and scaling.get("original_max_position_embeddings") is not None:
            v = scaling["original_max_position_embeddings"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer():
                raise Phi3Error(f"config.json: rope_scaling.original_max_position_embeddings is {shown(v)}, "
                                f"not an integer; {fix}")
            original = int(v)
        # HF: a missing or non-positive mscale means "use the default".
        ms = {w: scaling.get(w) for w in ("short_mscale", "long_mscale")}
        short_mscale, long_mscale = (None if v is None or number(f"rope_scaling.{w}", v) <= 0 else float(v)
                                     for w, v in ms.items())
    eos = d.get("eos_token_id", END_OF_TEXT)
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    for e in eos:
        if isinstance(e, bool) or not isinstance(e, int):
            raise Phi3Error(f"config.json: eos_token_id holds {shown(e)}, not a token id; {fix}")
    vocab = size("vocab_size")
    # config.json names only <|endoftext|>; generation_config.json adds <|end|> (§5.2), which ends
    # every chat turn.
    if eos == (END_OF_TEXT,) and isinstance(vocab, int) and vocab > END_OF_TURN:
        eos = (END_OF_TEXT, END_OF_TURN)
    dummy = d.get("dummy_token_indices")
    if dummy is None:
        dummy = DUMMY_TOKEN_INDICES
    elif not isinstance(dummy, (list, tuple)):
        raise Phi3Error(f"config.json: dummy_token_indices is {shown(dummy)}, not a list of ids; {fix}")
    n_dense = d.get("dense_attention_every_n_layers", 2)
    if n_dense is not None:
        n_dense = size("dense_attention_every_n_layers")

    return SmallConfig(
        vocab_size=vocab,
        hidden_size=size("hidden_size"),
        intermediate_size=ff,
        num_hidden_layers=size("num_hidden_layers"),
        num_attention_heads=size("num_attention_heads"),
        num_key_value_heads=size("num_key_value_heads", size("num_attention_heads")),
        head_dim=size("head_dim"),
        max_position_embeddings=max_pos,
        original_max_position_embeddings=original if original is not None else max_pos,
        rope_theta=number("rope_embedding_base", d.get("rope_embedding_base", d.get("rope_theta", 1e6))),
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        bos_token_id=d.get("bos_token_id", END_OF_TEXT),
        eos_token_id=eos,
        pad_token_id=d.get("pad_token_id", END_OF_TEXT),
        torch_dtype=str(d.get("torch_dtype") or "bfloat16"),
        name=name,
        attention_dropout=number("attention_dropout_prob", d.get("attention_dropout_prob") or 0.0),
        initializer_range=number("initializer_range", d.get("initializer_range") or 0.02),
        layer_norm_epsilon=number("layer_norm_epsilon", d.get("layer_norm_epsilon", 1e-5)),
        gegelu_limit=optional("gegelu_limit", 20.0),
        mup_embedding_multiplier=number("mup_embedding_multiplier", d.get("mup_embedding_multiplier", 10.0) or 0.0),
        mup_attn_multiplier=number("mup_attn_multiplier", d.get("mup_attn_multiplier", 1.0)),
        mup_use_scaling=bool(d.get("mup_use_scaling", True)),
        mup_width_multiplier=number("mup_width_multiplier", d.get("mup_width_multiplier", 8.0) or 1.0),
        blocksparse_block_size=size("blocksparse_block_size", 64),
        blocksparse_num_local_blocks=size("blocksparse_num_local_blocks", 16),
        blocksparse_vert_stride=size("blocksparse_vert_stride", 8),
        blocksparse_homo_head_pattern=bool(d.get("blocksparse_homo_head_pattern", False)),
        dense_attention_every_n_layers=n_dense,
        dummy_token_indices=tuple(dummy),
        short_mscale=short_mscale,
        long_mscale=long_mscale,
        rope_position_scale=number("rope_position_scale", d.get("rope_position_scale", 1.0)),
        embedding_dropout_prob=number("embedding_dropout_prob", d.get("embedding_dropout_prob", 0.1) or 0.0),
        ffn_dropout_prob=number("ffn_dropout_prob", d.get("ffn_dropout_prob", 0.1) or 0.0),
        extra={"source": "config.json", "fix": fix},
    )


# The 128K model's real LongRoPE factors and mscales are not public (fact sheet §1.3): this preset
# carries factors of 1.0 and default mscales, good for its shape only (`phi3 bench`); a real 128K
# checkpoint brings its own in config.json.
_UNIT_FACTORS = (1.0,) * 64

SMALL_PRESETS: dict[str, SmallConfig] = {
    "phi-3-small-8k-instruct": SmallConfig(name="phi-3-small-8k-instruct"),
    "phi-3-small-128k-instruct": SmallConfig(
        max_position_embeddings=131072, original_max_position_embeddings=8192,
        rope_scaling=RopeScaling(_UNIT_FACTORS, _UNIT_FACTORS), name="phi-3-small-128k-instruct"),
}
