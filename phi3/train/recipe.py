"""Training recipes: one TOML file (or flags) holding everything `phi3 train` needs, checked key by
key before anything runs; the model it names (a resized preset, a Hugging Face folder, a GGUF file
or a previous stage's output); and `--dry-run`'s estimate of what the recipe costs at scale.

A recipe file (see recipes/ at the repository root):

    stage = "pretrain"                     # pretrain | sft | dpo | longctx
    model = "phi-3-mini:layers=4,hidden=256,heads=4,vocab=49152"
    tokenizer = "default"                  # the fetched SmolLM2 GGUF's tokenizer
    out = "runs/tiny"
    seq_len = 256
    [optim]
    lr = 1e-3
    [[phases]]
    name = "web"
    tokens = 2_000_000
    [[phases.sources]]
    path = "data/web.jsonl"
    weight = 1.0

Precedence: the dataclass defaults below, then the file, then the command line's flags (`cli`),
then each `--set key=value` in order. Every path is taken as written, relative to the current
directory (as torchtitan's and litgpt's configs are), so the shipped recipes run from the
repository root.

Batch sizes count rows of seq_len tokens (pretrain, sft, longctx) or preference pairs (dpo: each
pair is a chosen and a rejected row). A phase's budget is exactly one of:
  tokens  steps = ceil(tokens / tokens_per_step), tokens_per_step = global_batch_size * seq_len
          (x2 in dpo);
  steps   optimizer steps;
  epochs  passes over the phase's data (a number: 0.5 and 2 are fine). The steps depend on the
          data, so the trainer counts them once the sources are open (Recipe.resolve_epochs):
          the rows the packed stream produces until every document of every source has been read
          `epochs` times (a mixture repeats its other sources meanwhile, in the weights' shares),
          rounded up to whole optimizer steps; dpo: ceil(epochs * pairs / global_batch_size).
          Until then --dry-run says "N epochs (steps known once the data is read)".
With no budget on any phase, every phase gets 1 epoch, and the trainer prints one line with the
steps that makes. (HF Trainer/TRL's num_train_epochs defaults to 3 and litgpt's fine-tuning scripts
to 5 epochs; one pass is what a pretraining corpus wants, and repeating a fine-tuning set is a
choice to make with --epochs.) `phi3 train --epochs N` / `--steps N` / `--tokens N` set
the budget of a recipe's single phase (a recipe with several phases takes --set phases.K.epochs=N).

Where the checks live: `load_recipe` checks everything the recipe alone decides (keys, types,
ranges, the batch arithmetic for the world size, an empty mixture); `validate(recipe, cfg)` checks
it against the model (seq_len over the model's context, longctx's target); `build_model` and
`dry_run_report` call `validate`.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from phi3.config import PRESETS, ModelConfig, get_preset
from phi3.errors import Phi3Error

STAGES = ("pretrain", "sft", "dpo", "longctx")
SCHEDULES = ("wsd", "cosine")
PRECISIONS = ("float32", "bfloat16")
PARALLEL = ("auto", "none", "ddp", "fsdp")
LORA_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


# --- The recipe --------------------------------------------------------------------------------

@dataclass
class Source:
    path: str
    weight: float = 1.0          # relative sampling weight within the phase's mixture
    text_key: str = "text"       # the text column of .jsonl/.parquet sources


@dataclass
class Phase:
    name: str = ""               # "" -> "phase1", "phase2", ...
    sources: list[Source] = field(default_factory=list)
    tokens: int | None = None    # budget in tokens (rounded up to whole steps) ...
    steps: int | None = None     # ... or in optimizer steps ...
    epochs: float | None = None  # ... or in passes over the data; exactly one of the three (none on
    #                              any phase: 1 epoch each)

    # Not recipe keys (no annotation, so neither TOML nor --set reaches them): the steps an epoch
    # budget comes to, set by Recipe.resolve_epochs once the trainer has read the data.
    epoch_steps = None

    def budget(self) -> str:
        """The budget as written, for messages: '1,000 tokens', '10 steps', '2 epochs'."""
        if self.tokens is not None:
            return f"{self.tokens:,} tokens"
        if self.steps is not None:
            return f"{self.steps:,} steps"
        return f"{self.epochs:g} epoch{'' if self.epochs == 1 else 's'}"


@dataclass
class Optim:
    """AdamW and its learning-rate schedule. Defaults are ours, the usual ones for decoder
    pretraining (GPT-3, Llama 2, nanoGPT, torchtitan): betas (0.9, 0.95), weight decay 0.1, clip
    1.0, min_lr = lr/10."""
    lr: float = 3e-4
    min_lr: float = 3e-5
    schedule: str = "wsd"        # wsd: warmup, constant, then linear decay over the last
    #                              decay_fraction of all steps (20%: Hägele et al. 2024 found it
    #                              matches cosine); cosine: warmup then cosine to min_lr
    warmup_steps: int | None = None  # None: 10% of the run's steps, at most 100 (set by load_recipe)
    decay_fraction: float = 0.2
    weight_decay: float = 0.1    # on matrices only (the trainer's choice of groups)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0       # max global grad norm; 0 = no clipping


@dataclass
class Lora:
    r: int = 0                   # 0 = full fine-tuning; > 0 = LoRA through peft, merged at export
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class Dpo:
    beta: float = 0.1            # TRL's default
    label_smoothing: float = 0.0  # cDPO; 0 = the plain sigmoid loss
    rpo_alpha: float | None = None  # RPO: + rpo_alpha * NLL per token of the chosen answers (TRL's); None/0 = off


@dataclass
class Longctx:
    target_len: int = 0          # the context to extend to (required in the longctx stage)
    original_len: int | None = None  # None: the model's current context
    population: int = 16         # LongRoPE's evolutionary search (the paper uses 64 x 40 at scale)
    iterations: int = 8
    search_documents: int = 4    # long windows the search scores perplexity on (the paper: 5 PG19 samples)
    short_fraction: float = 0.5  # share of rows packed at the original context in the long/short mix


@dataclass
class Recipe:
    stage: str
    model: str
    tokenizer: str | None = None
    out: str = ""
    phases: list[Phase] = field(default_factory=list)
    seq_len: int = 512
    micro_batch_size: int = 4    # rows (dpo: pairs) per micro-batch per process
    global_batch_size: int = 8   # rows (dpo: pairs) per optimizer step over all processes
    optim: Optim = field(default_factory=Optim)
    precision: str = "float32"   # bfloat16: autocast / FSDP2 MixedPrecisionPolicy, float32 master weights
    parallel: str = "auto"       # auto: fsdp when WORLD_SIZE > 1, else none
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    save_every: int = 500        # steps between numbered checkpoints; 0 = only final/
    keep_last: int = 2
    log_every: int = 1
    lora: Lora = field(default_factory=Lora)
    dpo: Dpo = field(default_factory=Dpo)
    longctx: Longctx = field(default_factory=Longctx)
    tensorboard: bool = False

    # Not a recipe key: True when no phase named a budget and load_recipe gave each 1 epoch (the
    # trainer then says so, with the steps it comes to).
    default_budget = False

    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step over all processes (dpo: both rows of every pair, padded)."""
        rows = self.global_batch_size * (2 if self.stage == "dpo" else 1)
        return rows * self.seq_len

    def phase_steps(self) -> list[int]:
        """Optimizer steps of each phase: `steps`, `tokens` rounded up to whole steps, or what
        `epochs` came to (resolve_epochs; before that, a Phi3Error)."""
        per = self.tokens_per_step()
        out = []
        for p in self.phases:
            if p.steps is not None:
                out.append(p.steps)
            elif p.tokens is not None:
                out.append(-(-p.tokens // per))
            elif p.epoch_steps is not None:
                out.append(p.epoch_steps)
            else:
                raise Phi3Error(f"phase {p.name!r} is {p.budget()}: its steps are known once the data is read "
                                f"(the trainer counts them); give steps or tokens to know them beforehand")
        return out

    def total_steps(self) -> int:
        return sum(self.phase_steps())

    def unresolved_epochs(self) -> bool:
        """Whether some phase's budget is in epochs whose steps are not counted yet."""
        return any(p.epochs is not None and p.epoch_steps is None for p in self.phases)

    def resolve_epochs(self, steps: dict[int, int]) -> None:
        """Give epoch-budget phases (by index) the steps the trainer counted from their data, then
        finish what load_recipe left for then: the warmup default (10% of the run's steps, at most
        100) and the check that an explicit warmup fits in the run."""
        for i, n in steps.items():
            p = self.phases[i]
            if p.epochs is None:
                raise ValueError(f"phase {i} has no epoch budget")
            p.epoch_steps = max(1, int(n))
        if not self.unresolved_epochs():
            _finish_warmup(self, None)


def lr_at(optim: Optim, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps` (all phases: one
    schedule spans the whole run, so phase 2 continues where phase 1 left off and the decay comes
    at the end). Linear warmup reaching `lr` at step warmup_steps-1; the last step runs at min_lr."""
    lr, lo, warmup = optim.lr, optim.min_lr, optim.warmup_steps or 0
    if step < warmup:
        return lr * (step + 1) / warmup
    if optim.schedule == "wsd":
        # The decay never eats into the warmup: decay_fraction 1.0 is warmup then linear decay.
        n_decay = min(max(1, round(optim.decay_fraction * total_steps)), total_steps - warmup) \
            if optim.decay_fraction > 0 else 0
        start = total_steps - n_decay
        if n_decay == 0 or step < start:
            return lr
        p = min(1.0, (step - start + 1) / n_decay)
        return lr - p * (lr - lo)
    n = max(1, total_steps - warmup)
    p = min(1.0, (step - warmup + 1) / n)
    return lo + 0.5 * (1 + math.cos(math.pi * p)) * (lr - lo)


# --- Reading a recipe --------------------------------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if type(tp) is types.UnionType or typing.get_origin(tp) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " (or omitted)"
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    if origin is list:
        inner = args[0]
        return "a list of tables" if is_dataclass(inner) else f"a list of {_type_name(inner).removeprefix('a ')}s"
    if is_dataclass(tp):
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]


def _describe(v: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)
    text = repr(v)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({kind})"


class _Reader:
    """Builds the dataclasses from plain TOML values, naming the dotted key and its origin in every
    error."""

    def __init__(self, origins: dict[str, str], default_origin: str) -> None:
        self.origins = origins
        self.default_origin = default_origin

    def where(self, key: str) -> str:
        # The most specific origin recorded for this key or a parent of it.
        parts = key.split(".")
        for i in range(len(parts), 0, -1):
            origin = self.origins.get(".".join(parts[:i]))
            if origin:
                return origin
        return f"{self.default_origin} (a default value)"

    def coerce(self, value: Any, tp: Any, key: str) -> Any:
        bad = Phi3Error(f"{self.where(key)}: {key} is {_describe(value)}, expected {_type_name(tp)}")
        if type(tp) is types.UnionType or typing.get_origin(tp) is typing.Union:
            inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
            if value is None:
                return None
            return self.coerce(value, inner, key)
        origin = typing.get_origin(tp)
        if tp is bool:
            if not isinstance(value, bool):
                raise bad
            return value
        if tp is int:
            # 3.3e12 is a float in TOML; a budget written that way is still a whole number.
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
                return int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise bad
            return value
        if origin is tuple:
            n = len(typing.get_args(tp))
            if not isinstance(value, list) or len(value) != n:
                raise bad
            return tuple(self.coerce(v, a, f"{key}.{i}") for i, (v, a) in enumerate(zip(value, typing.get_args(tp))))
        if origin is list:
            if not isinstance(value, list):
                raise bad
            inner = typing.get_args(tp)[0]
            return [self.coerce(v, inner, f"{key}.{i}") for i, v in enumerate(value)]
        if is_dataclass(tp):
            if not isinstance(value, dict):
                raise bad
            return self.build(tp, value, key)
        raise AssertionError(tp)

    def build(self, cls: type, table: dict[str, Any], prefix: str) -> Any:
        hints = _hints(cls)
        names = [f.name for f in fields(cls)]
        kwargs = {}
        for k, v in table.items():
            key = f"{prefix}.{k}" if prefix else k
            if k not in names:
                raise Phi3Error(f"{self.where(key)}: {_unknown(key, [f'{prefix}.{n}' if prefix else n for n in names])}")
            kwargs[k] = self.coerce(v, hints[k], key)
        for f in fields(cls):
            if f.default is MISSING and f.default_factory is MISSING and f.name not in kwargs:
                key = f"{prefix}.{f.name}" if prefix else f.name
                raise Phi3Error(f"{self.where(prefix) if prefix else self.default_origin}: {key} is missing "
                                f"({_type_name(hints[f.name])})")
        return cls(**kwargs)


# Names other tools use for our keys (HF TrainingArguments, nanoGPT, litgpt, torchtitan): a typo
# suggestion by spelling alone would send `learning_rate` to `min_lr`.
SYNONYMS = {
    "learning_rate": "lr", "max_lr": "lr", "lr_min": "min_lr", "warmup": "warmup_steps",
    "warmup_iters": "warmup_steps", "lr_scheduler": "schedule", "lr_scheduler_type": "schedule",
    "max_grad_norm": "grad_clip", "clip_grad_norm": "grad_clip", "gradient_clipping": "grad_clip",
    "adam_epsilon": "eps", "block_size": "seq_len", "max_seq_length": "seq_len", "seq_length": "seq_len",
    "max_length": "seq_len", "batch_size": "global_batch_size", "micro_batch": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size", "output_dir": "out", "max_steps": "steps",
    "max_tokens": "tokens", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target_modules": "targets", "dtype": "precision", "mixed_precision": "precision",
}


def _unknown(key: str, valid: list[str]) -> str:
    prefix, _, last = key.rpartition(".")
    full = (lambda name: f"{prefix}.{name}" if prefix else name)
    # Candidates: the valid keys and the other tools' names for them (so `learning_rat` finds lr).
    candidates = {v: v for v in valid}
    candidates.update({full(alias): full(target) for alias, target in SYNONYMS.items() if full(target) in valid})
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    if close:
        return f"unknown key {key!r}; did you mean {candidates[close[0]]!r}?"
    return f"unknown key {key!r}; valid keys here: {', '.join(valid)}"


def _schema_at(path: list[str]) -> tuple[Any, bool]:
    """Walk the Recipe's types along a dotted --set key; returns the leaf type and whether it may
    be unset (None). Raises Phi3Error for an unknown part, with the closest valid key."""
    tp: Any = Recipe
    done: list[str] = []
    optional = False
    for part in path:
        origin = typing.get_origin(tp)
        if origin is list or origin is tuple:
            if not part.isdigit():
                raise Phi3Error(f"--set {'.'.join(done + [part])}: {'.'.join(done)} is a list; "
                                f"address an entry by its index, e.g. {'.'.join(done)}.0")
            tp = typing.get_args(tp)[0 if origin is list else min(int(part), len(typing.get_args(tp)) - 1)]
        elif is_dataclass(tp):
            hints = _hints(tp)
            if part not in hints:
                prefix = ".".join(done)
                valid = [f"{prefix}.{n}" if prefix else n for n in hints]
                raise Phi3Error(f"--set: {_unknown('.'.join(done + [part]), valid)}")
            tp = hints[part]
            optional = type(tp) is types.UnionType
            if optional:
                tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        else:
            raise Phi3Error(f"--set {'.'.join(done + [part])}: {'.'.join(done)} is not a table")
        done.append(part)
    return tp, optional


def _parse_value(text: str) -> Any:
    """A --set value as TOML reads it (1e-4, true, [0.9, 0.95], "x"), or the bare text as a string
    (so `--set optim.schedule=cosine` needs no quotes)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_set(raw: dict[str, Any], item: str, origins: dict[str, str]) -> None:
    if "=" not in item:
        raise Phi3Error(f"--set {item!r} has no '='; write --set key=value, e.g. --set optim.lr=1e-4")
    key, _, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise Phi3Error(f"--set {item!r}: the key is empty or has an empty part; write e.g. optim.lr=1e-4")
    _, optional = _schema_at(parts)
    if not text.strip():
        raise Phi3Error(f"--set {key}= has no value; write e.g. --set {key}=VALUE"
                        + (f" (or --set {key}=none to unset it)" if optional else ""))
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            idx = int(part)
            if not node and parts[0] == "phases":
                raise Phi3Error(f"--set {key}: there are no phases to set (empty mixture); give --data PATH... "
                                f"or a recipe with [[phases]]")
            if idx >= len(node):
                raise Phi3Error(f"--set {key}: {'.'.join(parts[:i])} has {len(node)} entries "
                                f"(indices 0..{len(node) - 1}); add the entry in the recipe file")
            node = node[idx]
        else:
            if part not in node:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise Phi3Error(f"--set {key}: {'.'.join(parts[:i + 1])} is {_describe(node)} in the recipe, not a "
                            f"table; fix the recipe file")
    last = parts[-1]
    # `none` unsets a key that may be unset (e.g. a phase's steps, to give it tokens instead).
    value = None if optional and text.strip().lower() in ("none", "null") else _parse_value(text)
    if isinstance(node, list):
        idx = int(last)
        if not node and parts[0] == "phases":
            raise Phi3Error(f"--set {key}: there are no phases to set (empty mixture); give --data PATH... "
                            f"or a recipe with [[phases]]")
        if idx >= len(node):
            raise Phi3Error(f"--set {key}: {'.'.join(parts[:-1])} has {len(node)} entries; add the entry in the recipe file")
        node[idx] = value
    elif value is None:
        node.pop(last, None)
    else:
        node[last] = value
    origins[key] = "--set"


CLI_KEYS = ("data", "dry_run", "world", "epochs", "steps", "tokens")
BUDGETS = ("tokens", "steps", "epochs")


def load_recipe(path: str | Path | None, overrides: list[str] | None = None,
                cli: dict[str, Any] | None = None) -> Recipe:
    """The recipe from a TOML file (or none), the command line's flags (`cli`: any top-level Recipe
    field, e.g. stage/model/tokenizer/out/seq_len, plus `data`: a list of paths that makes one
    phase of equal weights, `epochs` / `steps` / `tokens`: the budget of the single phase (it
    replaces the one the recipe gives), `dry_run`: out is then optional, and `world`: the process
    count, default $WORLD_SIZE or 1), then `--set` overrides ("optim.lr=1e-4", "phases.0.steps=100").
    No budget on any phase: 1 epoch each (recipe.default_budget is then True).
    Raises Phi3Error with one line naming the key for any unknown key, wrong type or bad value."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    origins: dict[str, str] = {}
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        source = path.name
        if not path.is_file():
            raise Phi3Error(f"recipe file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise Phi3Error(f"{path} is not valid TOML ({e}); see recipes/ for examples") from None
        except UnicodeDecodeError:
            raise Phi3Error(f"{path} is not UTF-8 text; a recipe is a TOML file") from None
        origins = {k: path.name for k in raw}

    top = [f.name for f in fields(Recipe)]
    for k, v in cli.items():
        if k in CLI_KEYS:
            continue
        if k not in top:
            raise Phi3Error(f"command line: {_unknown(k, top)}")
        if k == "stage" and "stage" in raw and raw["stage"] != v:
            raise Phi3Error(f"{source} is a {raw['stage']!r} recipe but the command says {v!r}; "
                            f"run `phi3 train {raw['stage']} ...` or use a recipe for {v}")
        raw[k] = v
        origins[k] = f"--{k.replace('_', '-')}"
    data = cli.get("data")
    if data:
        phases = raw.get("phases") or []
        phases = phases if isinstance(phases, list) else []  # a malformed value is replaced by --data
        if len(phases) > 1:
            raise Phi3Error(f"--data makes one phase but {source} has {len(phases)}; drop --data or edit the "
                            f"recipe's [[phases]]")
        phase = dict(phases[0]) if phases and isinstance(phases[0], dict) else {"name": "main"}
        phase["sources"] = [{"path": str(p), "weight": 1.0} for p in data]
        raw["phases"] = [phase]
        origins["phases"] = "--data"
    given = [k for k in BUDGETS if k in cli]
    if len(given) > 1:
        raise Phi3Error(f"--{given[0]} and --{given[1]} both set the budget; give one of --epochs, --steps or --tokens")
    if given:
        key = given[0]
        phases = raw.get("phases")
        if isinstance(phases, list) and len(phases) > 1:
            raise Phi3Error(f"--{key} sets the budget of a single phase but {source} has {len(phases)}; use "
                            f"--set phases.K.{key}=N for phase K (0..{len(phases) - 1}), or edit its [[phases]]")
        if isinstance(phases, list) and phases and isinstance(phases[0], dict):
            phases[0] = {k: v for k, v in phases[0].items() if k not in BUDGETS}
            phases[0][key] = cli[key]
            origins[f"phases.0.{key}"] = f"--{key}"
        # No phase yet (no --data, no [[phases]]): the empty-mixture error below says what to add.
    for item in overrides or []:
        _apply_set(raw, item, origins)

    for k in ("stage", "model"):
        if k not in raw:
            raise Phi3Error(f"{source}: no {k}; pass --{k} or set {k} in the recipe"
                            if k == "model" else f"{source}: no stage; give it as `phi3 train STAGE`")
    recipe = _Reader(origins, source).build(Recipe, raw, "")
    world = int(cli.get("world") or os.environ.get("WORLD_SIZE") or 1)
    _check(recipe, world, need_out=not cli.get("dry_run"), where=lambda key: _Reader(origins, source).where(key))
    return recipe


def _choice(value: str, allowed: tuple[str, ...], key: str, where: str) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(value, allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise Phi3Error(f"{where}: {key} is {value!r}, expected one of {', '.join(allowed)}{hint}")


def check_batch(recipe: Recipe, world: int) -> None:
    """global_batch_size must split into whole micro-batches on every process: a multiple of
    micro_batch_size * world (then accumulation = global / (micro * world))."""
    g, mb = recipe.global_batch_size, recipe.micro_batch_size
    unit = mb * world
    if g % unit:
        lower, upper = (g // unit) * unit, (g // unit + 1) * unit
        options = " or ".join(str(x) for x in (lower, upper) if x > 0)
        procs = f" x {world} processes = {unit}" if world > 1 else ""
        raise Phi3Error(f"global_batch_size {g} is not a multiple of micro_batch_size {mb}{procs}; "
                        f"set global_batch_size to {options} (or change micro_batch_size)")


def _check(r: Recipe, world: int, need_out: bool, where: Any) -> None:
    def fail(key: str, text: str) -> None:
        raise Phi3Error(f"{where(key)}: {key} {text}")

    _choice(r.stage, STAGES, "stage", where("stage"))
    if not r.model.strip():
        fail("model", "is empty; give a preset (e.g. phi-3-mini:layers=4,hidden=256,heads=4), a Hugging Face "
                      "folder, a GGUF file or a previous stage's output folder")
    if need_out and not r.out.strip():
        raise Phi3Error(f"{where('out')}: no output folder; pass --out DIR or set out in the recipe")
    for key in ("seq_len", "micro_batch_size", "global_batch_size", "keep_last", "log_every"):
        if getattr(r, key) < 1:
            fail(key, f"is {getattr(r, key)}; it must be at least 1")
    if r.save_every < 0:
        fail("save_every", f"is {r.save_every}; use 0 for no numbered checkpoints (final/ only)")
    _choice(r.precision, PRECISIONS, "precision", where("precision"))
    _choice(r.parallel, PARALLEL, "parallel", where("parallel"))
    check_batch(r, world)

    if not r.phases:
        raise Phi3Error(f"{where('phases')}: empty mixture: no [[phases]] and no --data; give --data PATH... "
                        f"or a recipe with [[phases]] and [[phases.sources]]")
    names = set()
    for i, p in enumerate(r.phases):
        p.name = p.name or f"phase{i + 1}"
        if p.name in names:
            fail(f"phases.{i}.name", f"{p.name!r} is used twice; phase names must differ")
        names.add(p.name)
        if not p.sources:
            fail(f"phases.{i}.sources", f"is empty: phase {p.name!r} has an empty mixture; add [[phases.sources]] "
                                        f"with a path")
        for j, s in enumerate(p.sources):
            if not s.path.strip():
                fail(f"phases.{i}.sources.{j}.path", "is empty")
            if not s.weight > 0:
                fail(f"phases.{i}.sources.{j}.weight", f"is {s.weight}; weights must be positive")
    # No budget anywhere: 1 epoch per phase (see the module docstring). A budget on some phases
    # only is an error: a forgotten one is more likely than a wish for 1 epoch.
    if all(getattr(p, b) is None for p in r.phases for b in BUDGETS):
        for p in r.phases:
            p.epochs = 1.0
        r.default_budget = True
    for i, p in enumerate(r.phases):
        given = [b for b in BUDGETS if getattr(p, b) is not None]
        if len(given) != 1:
            what = f"sets both {given[0]} and {given[1]}" if len(given) > 1 else "has no budget"
            fix = (f"drop one (--set phases.{i}.{given[0]}=none)" if len(given) > 1
                   else f"e.g. --set phases.{i}.epochs=1")
            fail(f"phases.{i}", f"({p.name!r}) {what}: set exactly one of tokens, steps or epochs; {fix}")
        budget = given[0]
        value = getattr(p, budget)
        if budget == "epochs" and not value > 0:
            fail(f"phases.{i}.epochs", f"is {value:g}; it must be positive (1 = one pass over the data)")
        if budget != "epochs" and value < 1:
            fail(f"phases.{i}.{budget}", f"is {value}; it must be at least 1")

    o = r.optim
    if not o.lr > 0:
        fail("optim.lr", f"is {o.lr}; it must be positive")
    if not 0 <= o.min_lr <= o.lr:
        fail("optim.min_lr", f"is {o.min_lr}; it must be between 0 and optim.lr ({o.lr})")
    _choice(o.schedule, SCHEDULES, "optim.schedule", where("optim.schedule"))
    if o.warmup_steps is not None and o.warmup_steps < 0:
        fail("optim.warmup_steps", f"is {o.warmup_steps}; it must be 0 or more")
    if not r.unresolved_epochs():  # else resolve_epochs does this once the data is counted
        _finish_warmup(r, where)
    if not 0 <= o.decay_fraction <= 1:
        fail("optim.decay_fraction", f"is {o.decay_fraction}; it must be in [0, 1]")
    if o.weight_decay < 0:
        fail("optim.weight_decay", f"is {o.weight_decay}; it must be 0 or more")
    if not all(0 <= b < 1 for b in o.betas):
        fail("optim.betas", f"is {list(o.betas)}; each must be in [0, 1)")
    if not o.eps > 0:
        fail("optim.eps", f"is {o.eps}; it must be positive")
    if o.grad_clip < 0:
        fail("optim.grad_clip", f"is {o.grad_clip}; use 0 for no clipping")

    lo = r.lora
    if lo.r < 0:
        fail("lora.r", f"is {lo.r}; use 0 for full fine-tuning or a rank such as 8")
    if lo.r and r.stage in ("pretrain", "longctx"):
        fail("lora.r", f"is {lo.r}, but LoRA is for the sft and dpo stages; set lora.r = 0 for {r.stage}")
    if not lo.alpha > 0:
        fail("lora.alpha", f"is {lo.alpha}; it must be positive")
    if not 0 <= lo.dropout < 1:
        fail("lora.dropout", f"is {lo.dropout}; it must be in [0, 1)")
    if not lo.targets:
        fail("lora.targets", f"is empty; choose from {', '.join(LORA_TARGETS)}")
    for i, t in enumerate(lo.targets):
        _choice(t, LORA_TARGETS, f"lora.targets.{i}", where("lora.targets"))
    if not r.dpo.beta > 0:
        fail("dpo.beta", f"is {r.dpo.beta}; it must be positive")
    if not 0 <= r.dpo.label_smoothing < 0.5:
        fail("dpo.label_smoothing", f"is {r.dpo.label_smoothing}; it must be in [0, 0.5)")
    if r.dpo.rpo_alpha is not None and not r.dpo.rpo_alpha >= 0:
        fail("dpo.rpo_alpha", f"is {r.dpo.rpo_alpha}; it must be >= 0 (TRL's RPO uses 1.0; 0 turns it off)")
    lc = r.longctx
    if r.stage == "longctx" and lc.target_len < 1:
        fail("longctx.target_len", "is not set; the longctx stage needs the context to extend to "
                                   "(e.g. --set longctx.target_len=256)")
    if lc.original_len is not None and lc.original_len < 1:
        fail("longctx.original_len", f"is {lc.original_len}; it must be positive")
    if lc.population < 2 or lc.iterations < 1 or lc.search_documents < 1:
        key = "population" if lc.population < 2 else "iterations" if lc.iterations < 1 else "search_documents"
        fail(f"longctx.{key}", f"is {getattr(lc, key)}, too small (population >= 2, iterations >= 1, "
                               f"search_documents >= 1)")
    if not 0 <= lc.short_fraction <= 1:
        fail("longctx.short_fraction", f"is {lc.short_fraction}; it must be in [0, 1]")


def _finish_warmup(r: Recipe, where: Any) -> None:
    """The warmup default (10% of the run's steps, at most 100) and the check that it fits, once
    every phase's steps are known."""
    o, total = r.optim, r.total_steps()
    if o.warmup_steps is None:
        o.warmup_steps = min(100, total // 10)
    elif o.warmup_steps > total:
        origin = f"{where('optim.warmup_steps')}: " if where is not None else ""
        epochs = "" if where is not None else " (" + ", ".join(p.budget() for p in r.phases) + ")"
        raise Phi3Error(f"{origin}optim.warmup_steps is {o.warmup_steps}, more than the run's {total} steps{epochs}; "
                        f"lower it")


def validate(recipe: Recipe, cfg: ModelConfig) -> None:
    """Checks of the recipe against the model it trains: seq_len within the model's context (for
    longctx: within target_len, which must exceed the model's context)."""
    context = cfg.max_position_embeddings
    if recipe.stage == "longctx":
        target = recipe.longctx.target_len
        if target <= context:
            raise Phi3Error(f"longctx.target_len {target} does not extend the model's context of {context}; "
                            f"set it above {context}")
        if recipe.longctx.original_len is not None and recipe.longctx.original_len > context:
            raise Phi3Error(f"longctx.original_len {recipe.longctx.original_len} is over the model's context of "
                            f"{context}; leave it unset to use {context}")
        context = target
    if recipe.seq_len > context:
        raise Phi3Error(f"seq_len {recipe.seq_len} is over the model's context of {context} tokens; "
                        f"set seq_len to {context} or less"
                        + (" (or extend the context with the longctx stage)" if recipe.stage != "longctx" else ""))


# --- The model ---------------------------------------------------------------------------------

PRESET_ALIASES = {
    "phi-3-mini": "phi-3-mini-4k-instruct",
    "phi-3-mini-4k": "phi-3-mini-4k-instruct",
    "phi-3-mini-128k": "phi-3-mini-128k-instruct",
    "phi-3.5-mini": "phi-3.5-mini-instruct",
    "phi-3-medium": "phi-3-medium-4k-instruct",
    "phi-3-medium-4k": "phi-3-medium-4k-instruct",
    "phi-3-medium-128k": "phi-3-medium-128k-instruct",
}

FRIENDLY = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate": "intermediate_size",
    "vocab": "vocab_size",
    "context": "max_position_embeddings",
}
# ModelConfig fields a preset may not change from --model (they describe what the preset *is*,
# or are set from the tokenizer, or are bookkeeping).
_FIXED = ("rope_scaling", "model_type", "name", "extra", "torch_dtype", "bos_token_id", "eos_token_id",
          "pad_token_id")


def _preset_name(name: str) -> str | None:
    # "microsoft/Phi-3-mini-4k-instruct" is not a preset here: it names the released weights on
    # the hub (model_source fetches them), and training them from a random init by mistake would
    # waste a run.
    key = name.strip().lower()
    key = PRESET_ALIASES.get(key, key)
    return key if key in PRESETS else None


def _is_preset_spec(spec: str) -> bool:
    return _preset_name(spec.split(":", 1)[0]) is not None


def preset_config(spec: str) -> tuple[ModelConfig, set[str]]:
    """A preset with `name:key=value,...` overrides applied, and the set of ModelConfig fields the
    overrides set. Keys: the friendly names in FRIENDLY or any ModelConfig field (except those in
    _FIXED). When `heads` changes and `kv_heads` is not given, the preset's query heads per KV head
    is kept (mini: 1, medium: 4). `context` also lowers original_max_position_embeddings when it
    would exceed the new context. ModelConfig's own checks then apply."""
    name, _, rest = spec.partition(":")
    key = _preset_name(name)
    if key is None:
        known = sorted(set(PRESETS) | set(PRESET_ALIASES))
        close = difflib.get_close_matches(name.lower(), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise Phi3Error(f"unknown preset {name!r}{hint} (known: {', '.join(known)})")
    base = get_preset(key)
    hints = _hints(ModelConfig)
    settable = [f.name for f in fields(ModelConfig) if f.name not in _FIXED]
    changes: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq or not v.strip():
            raise Phi3Error(f"--model {spec}: {item!r} is not key=value; e.g. {name}:layers=4,hidden=256,heads=4")
        field_name = FRIENDLY.get(k, k)
        if field_name not in settable:
            valid = list(FRIENDLY) + settable
            close = difflib.get_close_matches(k, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise Phi3Error(f"--model {spec}: unknown model setting {k!r}; {hint}valid: {', '.join(valid)}")
        tp = hints[field_name]
        if type(tp) is types.UnionType:
            if v.strip().lower() in ("none", "null"):
                changes[field_name] = None
                continue
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        parsed = _parse_value(v.strip())
        try:
            changes[field_name] = _Reader({}, f"--model {spec}").coerce(parsed, tp, k)
        except Phi3Error as e:
            raise Phi3Error(str(e)) from None
    if "num_attention_heads" in changes and "num_key_value_heads" not in changes:
        group = base.num_attention_heads // base.num_key_value_heads
        heads = changes["num_attention_heads"]
        changes["num_key_value_heads"] = heads // group if heads % group == 0 and heads >= group else heads
    if "max_position_embeddings" in changes and "original_max_position_embeddings" not in changes:
        context = changes["max_position_embeddings"]
        if base.rope_scaling is None or base.original_max_position_embeddings > context:
            changes["original_max_position_embeddings"] = min(context, base.original_max_position_embeddings) \
                if base.rope_scaling is not None else context
    name_str = f"{key}:{rest}" if rest else key
    extra = {"source": f"--model {spec}", "fix": "change the sizes after the ':' in --model",
             "keys": {v: k for k, v in FRIENDLY.items()}}
    return base.with_(**changes, name=name_str, extra=extra), set(changes)


def default_tokenizer_path() -> Path:
    """The fetched SmolLM2 GGUF, whose tokenizer (49,152 tokens, ChatML template) every install has
    after `phi3 fetch`: what `tokenizer = "default"` names."""
    from phi3.checkpoint import default_model_path
    path = default_model_path()
    if not path.exists():
        raise Phi3Error(f"tokenizer 'default' is the fetched SmolLM2 GGUF, not found at {path}; run `phi3 fetch`")
    return path


def load_tokenizer_spec(spec: str) -> tuple[Any, int | None]:
    """(Tokenizer, padding token id or None) from a GGUF file (a vocab-only GGUF is enough), a
    Hugging Face folder, or "default" (the fetched SmolLM2 GGUF)."""
    from phi3.checkpoint import check_gguf_tokenizer, gguf_fields, open_gguf
    from phi3.tokenizer import load_tokenizer, tokenizer_from_gguf

    path = default_tokenizer_path() if spec == "default" else Path(spec).expanduser()
    if path.is_dir():
        tok = load_tokenizer(path)
        pad = tok.special_tokens.get("pad_token")
        return tok, (tok.token_to_id(pad) if pad else None)
    if not path.is_file():
        raise Phi3Error(f"tokenizer not found: {spec} (give a GGUF file, a Hugging Face folder, or 'default' "
                        f"for the fetched SmolLM2 tokenizer)")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise Phi3Error(f"tokenizer {spec} is neither a GGUF file nor a Hugging Face folder")
    reader = open_gguf(path)
    check_gguf_tokenizer(reader)
    meta = gguf_fields(reader)
    tok = tokenizer_from_gguf(meta, meta.get("general.architecture", "llama"))
    return tok, meta.get("tokenizer.ggml.padding_token_id")


def _stage_dir(path: Path) -> Path:
    """A previous `phi3 train` run's folder -> its final/ Hugging Face folder."""
    final = path / "final"
    if (final / "config.json").exists():
        return final
    steps = sorted(p.name for p in path.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    if steps:
        raise Phi3Error(f"{path} holds checkpoints up to {steps[-1]} but no final/ (the run did not finish); "
                        f"finish it with `phi3 train ... --out {path} --resume`, then pass {path}")
    raise Phi3Error(f"{path} is not a Hugging Face folder (no config.json) nor a `phi3 train` output (no final/)")


def model_source(recipe: Recipe) -> tuple[str, Path | None]:
    """('preset', None), ('hf', folder) or ('gguf', file) for recipe.model."""
    spec = recipe.model
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            return "hf", (path if (path / "config.json").exists() else _stage_dir(path))
        return "gguf", path
    if _is_preset_spec(spec):
        return "preset", None
    from phi3.checkpoint import _HUB_ID, resolve_model_path
    if ":" not in spec and _HUB_ID.match(spec) and not spec.endswith(".gguf"):
        try:  # a hub id: the local cache, else a download
            return "hf", resolve_model_path(spec)
        except Phi3Error as e:
            raise Phi3Error(f"model not found: {spec} is no local folder or file, and as a Hugging Face hub id: "
                            f"{e}") from None
    if ":" in spec or "/" not in spec:
        return "preset", None  # preset_config names the unknown preset and the close ones
    raise Phi3Error(f"model not found: {spec} (give a preset such as phi-3-mini:layers=4,hidden=256,heads=4, a "
                    f"Hugging Face folder, a .gguf file, or a previous stage's --out folder)")


def resolve_config(recipe: Recipe) -> ModelConfig:
    """The ModelConfig recipe.model describes, without building weights (for --dry-run). For a
    preset the token ids and (when not given) nothing else come from the tokenizer, which is not
    read here: the vocab is the preset's or the one given."""
    kind, path = model_source(recipe)
    if kind == "preset":
        return preset_config(recipe.model)[0]
    if kind == "hf":
        from phi3.config import load_config
        return load_config(path)
    from phi3.checkpoint import config_from_gguf, gguf_fields, open_gguf
    reader = open_gguf(path)
    return config_from_gguf(gguf_fields(reader), {t.name: t for t in reader.tensors})


def _fit_tokenizer(cfg: ModelConfig, tok: Any, what: str, fix: str) -> None:
    if tok.vocab_size > cfg.vocab_size:
        raise Phi3Error(f"the tokenizer has {tok.vocab_size:,} tokens but {what} has a vocab of {cfg.vocab_size:,}; {fix}")


def build_model(recipe: Recipe) -> tuple[Any, Any, ModelConfig]:
    """(Transformer, Tokenizer, ModelConfig) for recipe.model, as a plain nn.Module in float32 on
    the CPU, in train mode, every parameter requiring grad (the trainer moves, wraps and shards it):

    - a preset, e.g. `phi-3-mini:layers=4,hidden=256,heads=4,vocab=49152`: random weights as the
      reference initialises them (Transformer.init_weights: normal(0, initializer_range), norms 1,
      the padding row 0), drawn after torch.manual_seed(recipe.seed), so every process builds the
      same model. The tokenizer comes from recipe.tokenizer and sets the BOS/EOS/pad ids; a
      tokenizer larger than the vocab is an error (raise vocab=).
    - a Hugging Face folder, or a previous stage's output folder (its final/): weights as stored,
      cast to float32, with phi3's inference-only CPU fast path (fused RMSNorm/decode attention
      classes that checkpoint.load installs) removed again, so FSDP2, activation checkpointing and
      torch.compile see the plain modules.
    - a GGUF file (e.g. the fetched SmolLM2-135M-Instruct): every weight dequantized to float32
      (packed quantized weights cannot be trained).

    Calls validate(recipe, cfg)."""
    from phi3.fastpath import remove_cpu_fast_path
    from phi3.model import Transformer

    kind, path = model_source(recipe)
    if kind == "preset":
        if not recipe.tokenizer:
            raise Phi3Error("a preset model needs a tokenizer: set tokenizer to a GGUF file (a vocab-only GGUF is "
                            "enough), a Hugging Face folder, or 'default' for the fetched SmolLM2 tokenizer")
        cfg, changed = preset_config(recipe.model)
        tok, pad = load_tokenizer_spec(recipe.tokenizer)
        if "vocab_size" in changed:
            fix = f"raise vocab= in --model to {tok.vocab_size} or more"
        else:
            fix = f"add vocab={tok.vocab_size} to --model (e.g. {recipe.model}{',' if ':' in recipe.model else ':'}vocab={tok.vocab_size})"
        _fit_tokenizer(cfg, tok, f"--model {recipe.model}", fix)
        eos = tok.eos_id
        if eos is None:
            raise Phi3Error(f"tokenizer {recipe.tokenizer} has no end-of-text token, which training appends after "
                            f"every document; set eos_token in its tokenizer_config.json or use another tokenizer")
        cfg = cfg.with_(bos_token_id=tok.bos_id, eos_token_id=(eos,), pad_token_id=pad, torch_dtype="float32")
        validate(recipe, cfg)
        torch.manual_seed(recipe.seed)
        # Built on the meta device and materialised once: the constructors' own default inits
        # (kaiming for every Linear) would be drawn and then thrown away by init_weights.
        with torch.device("meta"):
            model = Transformer(cfg)
        model = model.to_empty(device="cpu")
        model.tie_weights()  # to_empty gives each module its own storage, which would untie a tied head
        model.init_weights()
    else:
        from phi3.checkpoint import load_gguf, load_hf_folder
        if kind == "hf":
            lm = load_hf_folder(path, dtype="float32", device="cpu")
        else:
            lm = load_gguf(path, dtype="float32", device="cpu", keep_quantized=False)
        model, tok, cfg = lm.model, lm.tokenizer, lm.config
        if recipe.tokenizer:
            tok, _ = load_tokenizer_spec(recipe.tokenizer)
            _fit_tokenizer(cfg, tok, str(path), "use the model's own tokenizer (drop tokenizer from the recipe)")
        validate(recipe, cfg)
        remove_cpu_fast_path(model)
        model.kv_dtype = None
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model, tok, cfg


# --- Dry run -----------------------------------------------------------------------------------

# The GPU the estimate is for: H100 SXM, dense (no sparsity) tensor-core peak per NVIDIA's
# datasheet: 989 TFLOP/s in bfloat16, 494.7 in TF32 (what float32 matmuls use with TF32 allowed).
GPU_NAME = "H100 SXM"
GPU_PEAK = {"bfloat16": 989e12, "float32": 494.7e12}
GPU_MEMORY = 80 * 2**30
# Our assumption: 40% model FLOPs utilisation, a typical figure for well-tuned dense training at
# this scale (PaLM reported 46%, Llama 3 405B 38-43%, torchtitan's Llama 3 8B on H100 ~40%).
MFU = 0.40


def lora_parameters(cfg: ModelConfig, lora: Lora) -> int:
    """Trainable parameters LoRA adds: r * (in + out) per targeted linear per layer."""
    d, hd, I = cfg.hidden_size, cfg.dim_per_head, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"qkv_proj": (d, q + 2 * kv), "o_proj": (q, d), "gate_up_proj": (d, 2 * I), "down_proj": (I, d)}
    return cfg.num_hidden_layers * sum(lora.r * sum(shapes[t]) for t in lora.targets)


def activation_bytes(cfg: ModelConfig, rows: int, seq_len: int, precision: str, checkpointing: bool) -> int:
    """Activations kept for backward in one micro-batch, counted from the tensors each decoder layer
    saves: its input and two norm outputs (3d), the attention inputs q, k, v after rotary and its
    output (2*q + 2*kv), the o_proj input (q), gate, up, silu(gate) and their product (4I); plus
    the float32 logits and log-probabilities (2V per token, 4 bytes). Assumes a fused attention
    kernel that does not store the T x T scores (SDPA flash/memory-efficient on GPU; PyTorch's
    math path on CPU stores heads*T*T more per layer). With activation checkpointing a layer keeps
    only its input, and one layer at a time holds the full set during its recompute."""
    tokens = rows * seq_len
    b = 2 if precision == "bfloat16" else 4
    hd = cfg.dim_per_head
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_layer = 3 * cfg.hidden_size + 3 * q + 2 * kv + 4 * cfg.intermediate_size
    logits = 2 * cfg.vocab_size * 4
    if checkpointing:
        layers = cfg.num_hidden_layers * cfg.hidden_size * b + per_layer * b
    else:
        layers = cfg.num_hidden_layers * per_layer * b
    return tokens * (layers + logits)


def memory_per_device(recipe: Recipe, cfg: ModelConfig, world: int) -> dict[str, int]:
    """Bytes per device under each sharding: float32 master weights (4 B/param), float32 grads
    (4 B per trainable param) and AdamW's two float32 moments (8 B per trainable param), plus one
    micro-batch's activations. none: everything on one device. ddp: the same plus DDP's gradient
    buckets (another 4 B per trainable param, unless gradient_as_bucket_view). fsdp: weights,
    grads and moments divided by `world`, plus the gathered working set: two layers' unsharded
    weights (the one computing and the one prefetched, in the compute dtype) and one layer's
    unsharded grads before reduce-scatter."""
    n = cfg.num_parameters()
    trainable = lora_parameters(cfg, recipe.lora) if recipe.lora.r else n
    states = 4 * (n + (trainable if recipe.lora.r else 0)) + 4 * trainable + 8 * trainable
    rows = recipe.micro_batch_size * (2 if recipe.stage == "dpo" else 1)
    act = activation_bytes(cfg, rows, recipe.seq_len, recipe.precision, recipe.activation_checkpointing)
    hd = cfg.dim_per_head
    layer = cfg.hidden_size * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd \
        + cfg.num_attention_heads * hd * cfg.hidden_size + 3 * cfg.hidden_size * cfg.intermediate_size
    b = 2 if recipe.precision == "bfloat16" else 4
    gathered = 2 * layer * b + layer * 4
    return {
        "none": states + act,
        "ddp": states + 4 * trainable + act,
        "fsdp": -(-states // world) + gathered + act,
    }


def training_flops(recipe: Recipe, cfg: ModelConfig, tokens: int) -> int:
    """Model FLOPs of training on `tokens` tokens, PaLM's accounting (Chowdhery et al. 2022, app.
    B): 6*N per token for the matmuls' forward and backward, N = every weight used in a matmul (all
    parameters but the input embedding table, whose lookup does no arithmetic; a tied table counts
    once, as the head), plus 12*L*d*T per token for attention's scores and weighted sums
    (d = heads*head_dim, T = seq_len). LoRA skips the frozen weights' gradients: 4*N (attention has
    no weights, so its term stays). DPO adds the
    reference model's one forward (2*N) per token (log-probs computed once and cached).
    Recomputation from activation checkpointing is not model FLOPs and is not counted."""
    n = cfg.num_parameters()
    n_matmul = n - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    per_token = (4 if recipe.lora.r else 6) * n_matmul
    if recipe.stage == "dpo":
        per_token += 2 * n_matmul
    attn = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.dim_per_head * recipe.seq_len
    return tokens * (per_token + attn)


def _gib(x: float) -> str:
    return f"{x / 2**30:,.2f} GiB"


def _count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f}{unit}"
    return f"{x:,.0f}"


def dry_run_report(recipe: Recipe, world: int) -> str:
    """What `phi3 train --dry-run` prints: the model's parameter count, memory per device under
    none/DDP/FSDP, tokens per step, steps per phase and in total, model FLOPs and GPU-hours on
    GPU_NAME at MFU. Reads only the model's config (no weights are built)."""
    check_batch(recipe, world)
    cfg = resolve_config(recipe)
    validate(recipe, cfg)
    n = cfg.num_parameters()
    per_step = recipe.tokens_per_step()
    # An epoch budget's steps depend on the data, which a dry run does not read (tokenizing a corpus
    # or rendering every conversation is a pass over the data): those phases say so, and the
    # totals, FLOPs and time cover the phases whose steps are known.
    steps = _known_steps(recipe)
    unknown = [p for p, s in zip(recipe.phases, steps) if s is None]
    total_steps = sum(s for s in steps if s is not None)
    tokens = total_steps * per_step
    accum = recipe.global_batch_size // (recipe.micro_batch_size * world)
    unit = "pairs" if recipe.stage == "dpo" else "rows"
    mem = memory_per_device(recipe, cfg, world)
    flops = training_flops(recipe, cfg, tokens)
    peak = GPU_PEAK[recipe.precision]
    gpu_hours = flops / (peak * MFU) / 3600
    if gpu_hours >= 10:
        gpu_time = f"{gpu_hours:,.0f} GPU-hours"
    elif gpu_hours * 3600 >= 1:
        gpu_time = f"{gpu_hours:.3g} GPU-hours" if gpu_hours >= 1 else f"{gpu_hours * 3600:,.3g} GPU-seconds"
    else:
        gpu_time = f"{gpu_hours * 3600 * 1000:.3g} GPU-milliseconds"
    wall = gpu_hours / world
    wall_text = f"{wall:,.1f} hours" if wall >= 1 else f"{wall * 3600:,.3g} seconds"
    lines = [
        f"recipe: {recipe.stage}, model {recipe.model}, {world} process{'es' if world > 1 else ''}",
        f"parameters: {n:,} ({_count(n)})"
        + (f"; LoRA r={recipe.lora.r} trains {lora_parameters(cfg, recipe.lora):,}" if recipe.lora.r else ""),
        f"model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads "
        f"({cfg.num_key_value_heads} KV), intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size:,}, "
        f"context {cfg.max_position_embeddings:,}",
        f"batch: {recipe.global_batch_size} {unit} x seq_len {recipe.seq_len} = {per_step:,} tokens per step; "
        f"micro-batch {recipe.micro_batch_size} per process, {accum} accumulation step{'s' if accum > 1 else ''}",
    ]
    for p, s in zip(recipe.phases, steps):
        nsrc = f"{len(p.sources)} source{'s' if len(p.sources) > 1 else ''}"
        if s is None:
            lines.append(f"phase {p.name}: {p.budget()} (steps known once the data is read) ({nsrc})")
        else:
            lines.append(f"phase {p.name}: {p.budget()} -> {s:,} steps, {s * per_step:,} tokens ({nsrc})")
    if unknown:
        names = ", ".join(p.name for p in unknown)
        known = f"{total_steps:,} steps, {tokens:,} tokens ({_count(tokens)}) in the other phases; " if tokens else ""
        lines.append(f"total: {known}phase{'s' if len(unknown) > 1 else ''} {names} in epochs: steps known once the "
                     f"data is read (give steps or tokens for a complete estimate)")
    else:
        lines.append(f"total: {total_steps:,} steps, {tokens:,} tokens ({_count(tokens)})")
    ac = ", activation checkpointing" if recipe.activation_checkpointing else ""
    lines.append(f"memory per device ({recipe.precision}{ac}; fp32 weights + grads + AdamW states + "
                 f"one micro-batch's activations):")
    for name, label in (("none", "single device"), ("ddp", "DDP"), ("fsdp", f"FSDP over {world}")):
        fits = "fits" if mem[name] <= GPU_MEMORY else "does NOT fit"
        lines.append(f"  {label}: {_gib(mem[name])} ({fits} in an {GPU_NAME}'s 80 GiB)")
    if not tokens:
        lines.append("compute and time: known once the data is read (the budget is in epochs)")
        return "\n".join(lines)
    part = " (the phases whose steps are known)" if unknown else ""
    lines.append(f"compute{part}: {flops:.3e} FLOPs (6*N*D + 12*L*d*T*D, model FLOPs)")
    lines.append(f"time{part}: {gpu_time} on {GPU_NAME} ({peak / 1e12:,.1f} TFLOP/s dense "
                 f"{'bf16' if recipe.precision == 'bfloat16' else 'TF32'} at an assumed {MFU:.0%} MFU), "
                 f"{wall_text} on {world} GPU{'s' if world > 1 else ''}")
    # Planning without launching: the same recipe on other cluster sizes its batch splits over.
    others = [w for w in SCALES if w != world and recipe.global_batch_size % (recipe.micro_batch_size * w) == 0]
    if gpu_hours >= 1 and others:
        lines.append("at other sizes (FSDP memory per GPU, wall-clock): " + "; ".join(
            f"{w} GPUs {_gib(memory_per_device(recipe, cfg, w)['fsdp'])}, {_duration(gpu_hours / w)}" for w in others))
    return "\n".join(lines)


SCALES = (8, 64, 256, 1024)


def _known_steps(recipe: Recipe) -> list[int | None]:
    """phase_steps(), with None for an epoch budget not counted yet."""
    per = recipe.tokens_per_step()
    return [p.steps if p.steps is not None else -(-p.tokens // per) if p.tokens is not None else p.epoch_steps
            for p in recipe.phases]


def _duration(hours: float) -> str:
    return f"{hours / 24:,.1f} days" if hours >= 48 else f"{hours:,.1f} hours"
