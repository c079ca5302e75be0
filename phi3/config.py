"""Model configuration: one dataclass, named presets from the official config.json files, and a
reader for any Hugging Face `config.json` of model_type phi3, llama or mistral. Other
architectures (phi3small) have their own config class and reader; phi3/arch.py says which reads
which, and load_config / config_from_hf_dict / get_preset dispatch through it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from phi3.errors import Phi3Error

SUPPORTED_MODEL_TYPES = ("phi3", "llama", "mistral")  # those this module's reader reads (arch.py lists all)

# Bounds on what a config may describe. No real model comes near them: the largest vocabulary is
# ~262k (Gemma 3), the longest context 10M (Llama 4 Scout), the widest hidden/MLP sizes 16,384 and
# 73,728; Llama 3.1 405B is the largest dense model published. Beyond them a config is corrupt or
# crafted, and a size past 2^24 could make a product of sizes overflow the int64 byte counts torch
# and numpy compute (hidden_size 1e9 gave "Storage size calculation overflowed" at load, and
# `phi3 info` printed it as a valid 10^18-parameter model).
MAX_SIZE = 2**24
MAX_PARAMETERS = 2 * 10**12


@dataclass(frozen=True)
class RopeScaling:
    """LongRoPE ("longrope", older configs say "su"): per-frequency rescaling factors, the short
    set for sequences within original_max_position_embeddings and the long set beyond it."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    attention_factor: float | None = None  # None: derived from the context extension ratio


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    model_type: str = "phi3"
    bos_token_id: int | None = 1
    eos_token_id: tuple[int, ...] = (32000,)
    pad_token_id: int | None = 32000
    torch_dtype: str = "bfloat16"
    name: str = "custom"
    # Training only (phi3/model.py applies them in train mode; inference never reads them).
    attention_dropout: float = 0.0
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Checked here, before anything divides by a head count or sizes a tensor, so that a
        # crafted config.json or GGUF header fails with one line instead of a ZeroDivisionError or
        # torch's "Storage size calculation overflowed". Sizes are bounded by MAX_SIZE and the
        # total by MAX_PARAMETERS (see there for why).
        key, where, fix = self._key, self.extra.get("source", "config"), self.extra.get("fix", "correct the config")
        sizes = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "original_max_position_embeddings"]
        for name in sizes + ["head_dim", "sliding_window"]:
            v = getattr(self, name)
            if v is None and name in ("head_dim", "sliding_window"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise Phi3Error(f"{where}: {key(name)} is {shown(v)}, not a positive integer; {fix}")
            if v > MAX_SIZE and name != "sliding_window":  # a window only limits attention: it sizes nothing
                raise Phi3Error(f"{where}: {key(name)} is {v:,}, beyond phi3's bound of {MAX_SIZE:,} "
                                f"(far past any real model's); {fix}")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            least = "positive" if name == "rope_theta" else "non-negative"
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (least == "positive" and v == 0):
                raise Phi3Error(f"{where}: {key(name)} is {shown(v)}, not a {least} finite number; {fix}")
        for name in ("attention_dropout", "resid_pdrop", "embd_pdrop", "initializer_range"):
            v = getattr(self, name)
            bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
            if bad or (name != "initializer_range" and v >= 1):
                span = "a finite number >= 0" if name == "initializer_range" else "a probability in [0, 1)"
                raise Phi3Error(f"{where}: {key(name)} is {shown(v)}, not {span}; {fix}")
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise Phi3Error(
                f"{where}: {key('hidden_size')} {self.hidden_size} is not divisible by "
                f"{key('num_attention_heads')} {self.num_attention_heads}; set {key('head_dim')} explicitly or {fix}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise Phi3Error(
                f"{where}: {key('num_attention_heads')} {self.num_attention_heads} is not a multiple of "
                f"{key('num_key_value_heads')} {self.num_key_value_heads}; {fix}"
            )
        if self.dim_per_head % 2:
            raise Phi3Error(f"{where}: the head dimension {self.dim_per_head} is odd, and rotary embeddings rotate "
                            f"pairs of values; {fix}")
        n = self.num_parameters()
        if n > MAX_PARAMETERS:
            raise Phi3Error(f"{where}: these sizes make {n:,} parameters ({n / 1e12:,.1f} T), beyond phi3's bound of "
                            f"{MAX_PARAMETERS / 1e12:.1f} T (5x the largest dense model published); {fix}")
        if self.rope_scaling is not None:
            a = self.rope_scaling.attention_factor
            if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a)):
                raise Phi3Error(f"{where}: the rope attention factor is {shown(a)}, not a finite number; {fix}")
            half = self.dim_per_head // 2
            for which in ("short_factor", "long_factor"):
                n = len(getattr(self.rope_scaling, which))
                if n != half:
                    raise Phi3Error(
                        f"{where}: rope_scaling.{which} has {n} entries, expected head_dim/2 = {half}"
                    )

    def _key(self, name: str) -> str:
        """How the file this config came from names a field (GGUF names differ from config.json's)."""
        return self.extra.get("keys", {}).get(name, name)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_attention_factor(self) -> float:
        """Scale applied to cos/sin by LongRoPE: sqrt(1 + ln(s)/ln(original)) with
        s = max/original, unless the config names one (as transformers does)."""
        if self.rope_scaling is None:
            return 1.0
        if self.rope_scaling.attention_factor is not None:
            return self.rope_scaling.attention_factor
        s = self.max_position_embeddings / self.original_max_position_embeddings
        if s <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(s) / math.log(self.original_max_position_embeddings))

    def num_parameters(self) -> int:
        d, hd = self.hidden_size, self.dim_per_head
        attn = d * (self.num_attention_heads + 2 * self.num_key_value_heads) * hd
        attn += self.num_attention_heads * hd * d
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        emb = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.num_hidden_layers * per_layer + emb + head + d

    def with_(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers expects for this model (Phi3ForCausalLM or LlamaForCausalLM)."""
        from phi3.arch import architecture
        arch = architecture(self.model_type)
        is_phi3 = arch.longrope_in_config
        out: dict[str, Any] = {
            "architectures": [arch.hf_class],
            "model_type": arch.hf_model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) > 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
            "attention_dropout": self.attention_dropout,
            "initializer_range": self.initializer_range,
        }
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        if is_phi3:
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
            out["sliding_window"] = self.sliding_window
            out["resid_pdrop"], out["embd_pdrop"] = self.resid_pdrop, self.embd_pdrop
            out["rope_scaling"] = None
            if self.rope_scaling is not None:
                out["rope_scaling"] = {
                    "type": "longrope",
                    "short_factor": list(self.rope_scaling.short_factor),
                    "long_factor": list(self.rope_scaling.long_factor),
                }
                if self.rope_scaling.attention_factor is not None:
                    out["rope_scaling"]["attention_factor"] = self.rope_scaling.attention_factor
        return out


def shown(v: Any) -> str:
    """A value for an error line: short, whatever a crafted file put there."""
    if isinstance(v, (list, tuple, dict)):
        return f"{type(v).__name__} of {len(v)} values"
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _eos_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def config_from_hf_dict(d: dict[str, Any], name: str = "custom") -> ModelConfig:
    """Read a Hugging Face config.json, with the reader the architecture table names for its
    model_type (phi3_config_from_hf_dict for phi3, llama and mistral)."""
    from phi3.arch import architecture
    if not isinstance(d, dict):
        raise Phi3Error(f"config.json holds a JSON {type(d).__name__}, not an object; correct config.json")
    return architecture(d.get("model_type")).config_from_hf(d, name)


def phi3_config_from_hf_dict(d: dict[str, Any], name: str = "custom") -> ModelConfig:
    """Read a Hugging Face config.json of model_type phi3, llama or mistral."""
    if not isinstance(d, dict):
        raise Phi3Error(f"config.json holds a JSON {type(d).__name__}, not an object; correct config.json")
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise Phi3Error(
            f"unknown architecture: model_type {shown(model_type)}; this reader reads "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if key not in d:
            raise Phi3Error(f"config.json is missing {key!r}")
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise Phi3Error(f"unsupported hidden_act {shown(d.get('hidden_act'))}: phi3 implements SwiGLU (silu)")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise Phi3Error("unsupported config: attention_bias/mlp_bias are not implemented")

    def number(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Phi3Error(f"config.json: {key} is {shown(value)}, not a number; correct config.json")
        return float(value)

    scaling_dict = d.get("rope_scaling") or d.get("rope_parameters")
    if scaling_dict is not None and not isinstance(scaling_dict, dict):
        raise Phi3Error(f"config.json: rope_scaling is {shown(scaling_dict)}, not an object; correct config.json")
    rope_scaling = None
    rope_theta = number("rope_theta", d.get("rope_theta", (scaling_dict or {}).get("rope_theta", 10000.0)))
    if scaling_dict:
        kind = scaling_dict.get("type", scaling_dict.get("rope_type"))
        if kind in ("longrope", "su"):
            factors = {}
            for which in ("short_factor", "long_factor"):
                values = scaling_dict.get(which)
                if not isinstance(values, (list, tuple)):
                    raise Phi3Error(f"config.json: rope_scaling.{which} is {shown(values)}, not a list of numbers; "
                                    f"correct config.json")
                factors[which] = tuple(number(f"rope_scaling.{which}[{i}]", x) for i, x in enumerate(values))
            attention = scaling_dict.get("attention_factor")
            if attention is not None:
                attention = number("rope_scaling.attention_factor", attention)
            rope_scaling = RopeScaling(**factors, attention_factor=attention)
        elif kind not in (None, "default"):
            raise Phi3Error(f"unsupported rope_scaling type {shown(kind)}: phi3 implements default and longrope")

    def size(key: str, default: Any = None) -> Any:
        """An integer from config.json as it is: 3.0 is 3, but 3.5 or "3" are not silently made 3
        (ModelConfig then checks that it is positive and not absurd)."""
        v = d.get(key)
        if v is None:  # absent or null: the default (0 is not absent: ModelConfig refuses it)
            return default
        if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
            return int(v)
        if isinstance(v, int):
            return v
        raise Phi3Error(f"config.json: {key} is {shown(v)}, not an integer; correct config.json")

    max_pos = size("max_position_embeddings", 4096)
    return ModelConfig(
        vocab_size=size("vocab_size"),
        hidden_size=size("hidden_size"),
        intermediate_size=size("intermediate_size"),
        num_hidden_layers=size("num_hidden_layers"),
        num_attention_heads=size("num_attention_heads"),
        num_key_value_heads=size("num_key_value_heads", size("num_attention_heads")),
        head_dim=size("head_dim"),
        max_position_embeddings=max_pos,
        original_max_position_embeddings=size("original_max_position_embeddings", max_pos),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=number("rms_norm_eps", d.get("rms_norm_eps", 1e-5)),
        sliding_window=size("sliding_window") or None,  # 0 means none, as in GGUF
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        model_type=model_type,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=_eos_tuple(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
        torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
        name=name,
        attention_dropout=number("attention_dropout", d.get("attention_dropout") or 0.0),
        resid_pdrop=number("resid_pdrop", d.get("resid_pdrop") or 0.0),
        embd_pdrop=number("embd_pdrop", d.get("embd_pdrop") or 0.0),
        # transformers falls back to 0.02 when it is 0 too
        initializer_range=number("initializer_range", d.get("initializer_range") or 0.02),
        extra={"source": "config.json", "fix": "correct config.json"},
    )


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists():
        raise Phi3Error(f"no config.json at {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise Phi3Error(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return config_from_hf_dict(d, name=path.parent.name)


# --- Presets: values as published in the official config.json files -----------------------------

# microsoft/Phi-3.5-mini-instruct rope_scaling (48 = head_dim 96 / 2 entries each).
PHI35_MINI_LONG = (
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601,
    1.5899999141693115, 1.600000023841858, 1.6200000047683716, 2.620000123977661,
    3.2300000190734863, 3.2300000190734863, 4.789999961853027, 7.400000095367432,
    7.700000286102295, 9.09000015258789, 12.199999809265137, 17.670000076293945,
    24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992,
    50.340003967285156, 50.45000457763672, 57.55000305175781, 57.93000411987305,
    58.21000289916992, 60.1400032043457, 62.61000442504883, 62.62000274658203,
    62.71000289916992, 63.1400032043457, 63.1400032043457, 63.77000427246094,
    63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938,
    64.4800033569336, 64.51000213623047, 64.52999877929688, 64.83999633789062,
)
PHI35_MINI_SHORT = (
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0699999332427979, 1.0999999046325684, 1.1099998950958252,
    1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083,
    1.8499997854232788, 1.8799997568130493, 1.9099997282028198, 1.9399996995925903,
    1.9899996519088745, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0799996852874756, 2.0899996757507324, 2.189999580383301, 2.2199995517730713,
    2.5899994373321533, 2.729999542236328, 2.749999523162842, 2.8399994373321533,
)

# microsoft/Phi-3-mini-128k-instruct rope_scaling (June 2024 revision, 48 entries each).
PHI3_MINI_128K_LONG = (
    1.0700000524520874, 1.1200000047683716, 1.149999976158142, 1.4199999570846558,
    1.5699999332427979, 1.7999999523162842, 2.129999876022339, 2.129999876022339,
    3.009999990463257, 5.910000324249268, 6.950000286102295, 9.070000648498535,
    9.930000305175781, 10.710000038146973, 11.130000114440918, 14.609999656677246,
    15.409998893737793, 19.809999465942383, 37.279998779296875, 38.279998779296875,
    38.599998474121094, 40.12000274658203, 46.20000457763672, 50.940006256103516,
    53.66000747680664, 54.9373893737793, 56.89738845825195, 57.28738784790039,
    59.98738479614258, 60.86738586425781, 60.887386322021484, 61.71739196777344,
    62.91739273071289, 62.957393646240234, 63.41739273071289, 63.8173942565918,
    63.83739471435547, 63.897396087646484, 63.93739700317383, 64.06739807128906,
    64.11434936523438, 64.12435150146484, 64.15435028076172, 64.19435119628906,
    64.24435424804688, 64.57435607910156, 64.69000244140625, 64.76000213623047,
)
PHI3_MINI_128K_SHORT = (
    1.1, 1.1, 1.1, 1.3000000000000003,
    1.3500000000000003, 1.3500000000000003, 1.4000000000000004, 1.5500000000000005,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.0500000000000007, 2.0500000000000007, 2.0500000000000007,
    2.0500000000000007, 2.0500000000000007, 2.0500000000000007, 2.1000000000000005,
    2.1000000000000005, 2.1500000000000004, 2.25, 2.25,
    2.25, 2.25, 2.25, 2.3999999999999995,
    2.4499999999999993, 2.499999999999999, 2.6999999999999984, 2.6999999999999984,
    2.7499999999999982, 2.799999999999998, 2.8999999999999977, 3.049999999999997,
)
# microsoft/Phi-3-medium-128k-instruct rope_scaling (64 = head_dim 128 / 2 entries each).
PHI3_MEDIUM_128K_LONG = (
    1.0, 1.0, 1.0, 1.0,
    1.0, 1.0, 1.0, 1.0,
    1.0, 1.0, 1.0, 1.0,
    1.0, 1.25, 1.25, 1.5,
    2.0, 2.75, 5.75, 5.75,
    6.5, 9.25, 11.0, 13.25,
    19.25, 19.75, 19.75, 21.25,
    21.5, 26.5, 30.0, 33.75,
    35.25, 38.5, 42.0, 42.25,
    46.0, 47.0, 50.0, 50.5,
    51.0, 52.0, 52.75, 53.75,
    54.75, 57.0, 57.25, 58.5,
    59.25, 59.5, 62.0, 62.5,
    62.75, 63.25, 63.25, 63.25,
    63.75, 64.0, 64.0, 64.25,
    64.5, 64.5, 65.0, 65.0,
)
PHI3_MEDIUM_128K_SHORT = (
    1.0, 1.0, 1.0, 1.0,
    1.0, 1.0, 1.01, 1.02,
    1.02, 1.04, 1.04, 1.07,
    1.07, 1.1, 1.3000000000000003, 1.3000000000000003,
    1.5000000000000004, 1.5700000000000005, 1.9000000000000008, 2.3100000000000014,
    2.759999999999992, 3.3899999999999784, 3.9399999999999666, 4.009999999999965,
    4.289999999999959, 4.349999999999958, 5.349999999999937, 6.659999999999909,
    7.029999999999901, 7.51999999999989, 8.00999999999988, 8.249999999999876,
    8.279999999999875, 9.629999999999846, 9.89999999999984, 10.589999999999826,
    11.049999999999816, 11.7899999999998, 12.189999999999792, 12.889999999999777,
    13.129999999999772, 13.16999999999977, 13.20999999999977, 13.479999999999764,
    13.539999999999763, 13.779999999999758, 13.929999999999755, 14.429999999999744,
    14.759999999999737, 15.149999999999729, 15.419999999999723, 15.53999999999972,
    15.659999999999718, 15.749999999999716, 15.759999999999716, 15.799999999999715,
    16.05999999999971, 16.079999999999714, 16.11999999999972, 16.11999999999972,
    16.18999999999973, 16.31999999999975, 16.539999999999786, 16.799999999999827,
)

_MINI = dict(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=(32000,), pad_token_id=32000, original_max_position_embeddings=4096,
)
_MEDIUM = dict(_MINI, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
               num_attention_heads=40, num_key_value_heads=10)

PRESETS: dict[str, ModelConfig] = {
    "phi-3-mini-4k-instruct": ModelConfig(
        **_MINI, max_position_embeddings=4096, sliding_window=2047, name="phi-3-mini-4k-instruct"),
    "phi-3.5-mini-instruct": ModelConfig(
        **_MINI, max_position_embeddings=131072, sliding_window=262144,
        rope_scaling=RopeScaling(PHI35_MINI_SHORT, PHI35_MINI_LONG), name="phi-3.5-mini-instruct"),
    "phi-3-mini-128k-instruct": ModelConfig(
        **_MINI, max_position_embeddings=131072, sliding_window=262144,
        rope_scaling=RopeScaling(PHI3_MINI_128K_SHORT, PHI3_MINI_128K_LONG), name="phi-3-mini-128k-instruct"),
    "phi-3-medium-128k-instruct": ModelConfig(
        **{**_MEDIUM, "pad_token_id": None}, max_position_embeddings=131072, sliding_window=131072,
        rope_scaling=RopeScaling(PHI3_MEDIUM_128K_SHORT, PHI3_MEDIUM_128K_LONG),
        name="phi-3-medium-128k-instruct"),
    "phi-3-medium-4k-instruct": ModelConfig(
        **_MEDIUM, max_position_embeddings=4096, sliding_window=2047, name="phi-3-medium-4k-instruct"),
}


def get_preset(name: str) -> ModelConfig:
    """A preset by name: PRESETS (the phi3 architecture), then phi3small's (config_small)."""
    key = name.lower().removeprefix("microsoft/")
    if key in PRESETS:
        return PRESETS[key]
    small = _small_presets()
    if key in small:
        return small[key]
    raise Phi3Error(f"unknown preset {name!r}; known: {', '.join(sorted([*PRESETS, *small]))}")


def _small_presets() -> dict[str, ModelConfig]:
    # Imported here: config_small subclasses this module's ModelConfig.
    try:
        from phi3.config_small import SMALL_PRESETS
    except ImportError:  # not in this tree (yet)
        return {}
    return dict(SMALL_PRESETS)
