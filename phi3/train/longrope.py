"""Long-context extension: LongRoPE's evolutionary search over per-dimension RoPE rescale factors
(arXiv 2402.13753), and the config that carries them (Phi-3's `rope_scaling: {type: longrope}`).

RoPE rotates frequency pair i of a head at inv_freq_i = 1 / (lambda_i * theta^(2i/d)). Extending a
model trained on C tokens to L tokens needs lambda_i > 1 where the rotation would otherwise reach
angles it never saw. Position interpolation (PI) takes lambda_i = L/C for every pair, which also
blurs the fast pairs that tell neighbouring tokens apart; NTK and YaRN leave the fast pairs alone
and interpolate only the slow ones, by a fixed rule. LongRoPE searches lambda instead:

- a candidate is d/2 factors on a grid (0.01), non-decreasing (lambda_i <= lambda_{i+1}: a slower
  pair is never stretched less than a faster one), each within [1, 2 L/C] (Phi-3-mini-128k's own
  long factors reach 64.8 at L/C = 32);
- the first population is PI, NTK and YaRN factors, ones (no rescaling) and mutations of them;
- each iteration keeps the best `parents`, adds `mutations` children (each factor, with p = 0.3,
  drawn anew on the grid between its neighbours, so monotonicity holds by construction) and
  `crossovers` children (each factor from the other parent with p = 0.5; children that are not
  monotone are drawn again), and keeps the best `population`;
- fitness is the perplexity of the model on documents of L tokens (LongRoPE: 5 PG19 books), run
  with the candidate long factors; a history of every evaluated candidate means none is run twice.

Short-context recovery: Phi-3 switches to `short_factor` for sequences of at most C tokens (phi3's
model and transformers both do), but the attention factor sqrt(1 + ln(L/C) / ln C) scales cos and
sin, hence the attention logits, on short sequences too. `search_longrope_factors` therefore also
searches the short factors at length C with that attention factor in place, starting from ones,
and keeps ones unless a candidate is at least 0.1% lower in perplexity (LongRoPE re-searches 4k/8k
factors on the extended model for the same reason; the long/short mixed training that follows
recovers the rest). Not done: LongRoPE's `dim_piece_mono` variant, which also keeps the first n
positions un-interpolated, since Phi-3's config format (and transformers) has no place for n.

The search runs the plain `phi3.model.Transformer` forward: `rope_override` swaps a config's rotary
tables into the model for the duration of one evaluation and puts the original back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from phi3.config import ModelConfig, RopeScaling
from phi3.errors import Phi3Error
from phi3.model import Transformer, rope_inv_freq

# LongRoPE's published defaults (evolution/default_hyper_params/*.json).
POPULATION, ITERATIONS, PARENTS, MUTATIONS, CROSSOVERS = 64, 40, 32, 16, 16
GRID = 0.01  # factor resolution ("list_step")
P_MUTATE, P_CROSS = 0.3, 0.5

Factors = tuple[float, ...]


# --- Configs ----------------------------------------------------------------------------------------

def original_context(cfg: ModelConfig) -> int:
    """The context C the model was trained at: max_position_embeddings, or, for a model that
    already carries LongRoPE factors, the switch point original_max_position_embeddings."""
    return cfg.original_max_position_embeddings if cfg.rope_scaling is not None else cfg.max_position_embeddings


def _check_lengths(cfg: ModelConfig, target_len: int, original_len: int | None) -> int:
    C = original_len if original_len is not None else original_context(cfg)
    for name, v in (("target_len", target_len), ("original_len", C)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise Phi3Error(f"longctx: {name} is {v!r}, not a positive integer; set longctx.{name}")
    if target_len <= C:
        raise Phi3Error(f"longctx: target_len {target_len} is not beyond the original context {C}; "
                        f"set longctx.target_len above {C}")
    return C


def longrope_config(cfg: ModelConfig, target_len: int, short_factor: Sequence[float], long_factor: Sequence[float],
                    *, original_len: int | None = None, attention_factor: float | None = None,
                    sliding_window: int | None | str = "auto") -> ModelConfig:
    """`cfg` extended from its context C to `target_len` with LongRoPE factors: max_position_embeddings
    = target_len, original_max_position_embeddings = C (the length at which both phi3 and
    transformers switch from short_factor to long_factor). attention_factor None leaves Phi-3's
    derived value sqrt(1 + ln(L/C) / ln C), which config.json then omits, exactly as
    Phi-3-mini-128k's does; transformers derives the same number from the same two lengths.
    sliding_window "auto" drops a window shorter than target_len (phi-3-mini-4k has 2047: no token
    could see further back than that, whatever the factors) as Phi-3-mini-128k's config does (its
    window, 262144, never binds); otherwise it is kept. An int or None sets it."""
    C = _check_lengths(cfg, target_len, original_len)
    half = cfg.dim_per_head // 2
    for name, f in (("short_factor", short_factor), ("long_factor", long_factor)):
        if len(f) != half:
            raise Phi3Error(f"longctx: {name} has {len(f)} values, expected head_dim/2 = {half}")
        if not all(math.isfinite(x) and x > 0 for x in f):
            raise Phi3Error(f"longctx: {name} holds a value that is not a positive finite number")
    scaling = RopeScaling(tuple(float(x) for x in short_factor), tuple(float(x) for x in long_factor),
                          attention_factor=attention_factor)
    if sliding_window == "auto":
        sliding_window = cfg.sliding_window if (cfg.sliding_window or 0) >= target_len else None
    return cfg.with_(max_position_embeddings=target_len, original_max_position_embeddings=C, rope_scaling=scaling,
                     sliding_window=sliding_window)


def position_interpolation_config(cfg: ModelConfig, target_len: int, *, original_len: int | None = None,
                                  attention_factor: float | None = 1.0,
                                  sliding_window: int | None | str = "auto") -> ModelConfig:
    """The baseline: plain position interpolation (Chen et al. 2023), every frequency divided by
    L/C beyond C and none within it, written as a longrope config so that the same code (and
    transformers) runs it. attention_factor 1.0: PI scales no logits; None gives Phi-3's."""
    C = _check_lengths(cfg, target_len, original_len)
    half = cfg.dim_per_head // 2
    return longrope_config(cfg, target_len, [1.0] * half, pi_factors(half, target_len / C),
                           original_len=C, attention_factor=attention_factor, sliding_window=sliding_window)


def apply_rope_config(model: Transformer, cfg: ModelConfig) -> None:
    """Give `model` (weights unchanged) the rotary tables of `cfg`, in place: what a Transformer
    built from `cfg` would have. The trainer calls this after the search, before wrapping."""
    if cfg.dim_per_head != model.config.dim_per_head:
        raise Phi3Error("longctx: the new config's head dimension differs from the model's")
    with torch.device("cpu"):
        short, long = rope_inv_freq(cfg)
    model.config = cfg
    model.inv_freq_short.copy_(short)
    model.inv_freq_long.copy_(long)
    model.rope_scale = cfg.rope_attention_factor


@contextmanager
def rope_override(model: Transformer, cfg: ModelConfig) -> Iterator[Transformer]:
    """`model` with the rotary tables of `cfg` inside the block, its own afterwards (and in eval
    mode inside: dropout would make the fitness noisy)."""
    saved = (model.config, model.inv_freq_short.clone(), model.inv_freq_long.clone(), model.rope_scale)
    training = model.training
    try:
        model.eval()
        apply_rope_config(model, cfg)
        yield model
    finally:
        model.config, model.rope_scale = saved[0], saved[3]
        model.inv_freq_short.copy_(saved[1])
        model.inv_freq_long.copy_(saved[2])
        model.train(training)


# --- The classic rules, as factors (the first population) -------------------------------------------

def pi_factors(half: int, scale: float) -> Factors:
    """Position interpolation: every pair slowed by the extension ratio."""
    return (float(scale),) * half


def ntk_factors(half: int, scale: float) -> Factors:
    """NTK-aware scaling (theta' = theta * s^(d/(d-2))) as factors: lambda_i = s^(2i/(d-2)), 1 for
    the fastest pair and s for the slowest."""
    d = 2 * half
    return tuple(float(scale ** (2 * i / (d - 2))) if d > 2 else float(scale) for i in range(half))


def yarn_factors(half: int, scale: float, original_len: int, theta: float,
                 alpha: float = 1.0, beta: float = 32.0) -> Factors:
    """YaRN's "NTK-by-parts" ramp as factors: a pair that turns more than beta times within the
    original context keeps its frequency, one that turns less than alpha times is interpolated by s,
    and in between its inverse frequency is blended linearly (YaRN's defaults alpha 1, beta 32)."""
    d = 2 * half
    out = []
    for i in range(half):
        turns = original_len / (2 * math.pi * theta ** (2 * i / d))
        keep = min(max((turns - alpha) / (beta - alpha), 0.0), 1.0)
        out.append(1.0 / ((1 - keep) / scale + keep))
    return tuple(out)


# --- The evolutionary search ------------------------------------------------------------------------

@dataclass
class SearchResult:
    best: Factors
    best_fitness: float
    evaluations: int
    history: dict[tuple[int, ...], float] = field(repr=False)
    seeds: dict[str, float] = field(default_factory=dict)  # fitness of each named starting candidate


def _proportions(population: int, parents: int | None, mutations: int | None,
                 crossovers: int | None) -> tuple[int, int, int]:
    scale = population / POPULATION
    return (parents if parents is not None else max(1, round(PARENTS * scale)),
            mutations if mutations is not None else max(1, round(MUTATIONS * scale)),
            crossovers if crossovers is not None else max(1, round(CROSSOVERS * scale)))


def _snap(factors: Sequence[float], lo: int, hi: int) -> tuple[int, ...]:
    """Factors -> grid indices within [lo, hi], made non-decreasing."""
    out, last = [], lo
    for f in factors:
        k = min(max(int(round(f / GRID)), lo, last), hi)
        out.append(k)
        last = k
    return tuple(out)


def _factors(genes: tuple[int, ...]) -> Factors:
    return tuple(round(k * GRID, 6) for k in genes)


def mutate(genes: tuple[int, ...], rng: np.random.Generator, lo: int, hi: int, p: float = P_MUTATE) -> tuple[int, ...]:
    """Each gene with probability p drawn uniformly on the grid between its neighbours' values
    (lo/hi at the ends): the child stays non-decreasing."""
    g = list(genes)
    for i in range(len(g)):
        if rng.random() < p:
            left = g[i - 1] if i > 0 else lo
            right = g[i + 1] if i + 1 < len(g) else hi
            g[i] = int(rng.integers(left, right + 1))
    return tuple(g)


def crossover(a: tuple[int, ...], b: tuple[int, ...], rng: np.random.Generator,
              p: float = P_CROSS, tries: int = 10) -> tuple[int, ...] | None:
    """Each gene from b with probability p, else from a; None if no monotone child came out of
    `tries` draws."""
    for _ in range(tries):
        take = rng.random(len(a)) < p
        child = tuple(int(y if t else x) for x, y, t in zip(a, b, take))
        if all(child[i] <= child[i + 1] for i in range(len(child) - 1)):
            return child
    return None


def evolve(fitness: Callable[[Factors], float], seeds: dict[str, Sequence[float]], lo: float, hi: float, *,
           population: int = POPULATION, iterations: int = ITERATIONS, parents: int | None = None,
           mutations: int | None = None, crossovers: int | None = None, seed: int = 0,
           progress: bool = True, desc: str = "LongRoPE search") -> SearchResult:
    """Minimise `fitness` over non-decreasing factor vectors on the grid within [lo, hi], starting
    from the named `seeds` and mutations of them. Deterministic for a seed (numpy's PCG64; ties
    keep the earlier candidate); no candidate is evaluated twice. parents, mutations and
    crossovers default to LongRoPE's proportions of the population (32, 16, 16 of 64), so a small
    population is a proportionally small search: population + iterations x population/2 runs."""
    from tqdm.auto import tqdm

    parents, mutations, crossovers = _proportions(population, parents, mutations, crossovers)
    if min(population, parents, iterations) < 1 or min(mutations, crossovers) < 0:
        raise Phi3Error("longctx search: population, parents and iterations must be >= 1, "
                        "mutations and crossovers >= 0")
    rng = np.random.default_rng(seed)
    klo, khi = int(round(lo / GRID)), int(round(hi / GRID))
    history: dict[tuple[int, ...], float] = {}
    order: dict[tuple[int, ...], int] = {}

    def score(genes: tuple[int, ...]) -> float:
        if genes not in history:
            order[genes] = len(order)
            value = float(fitness(_factors(genes)))
            history[genes] = value if math.isfinite(value) else math.inf
            bar.update(1)
            bar.set_postfix(best=f"{min(history.values()):.4g}")
        return history[genes]

    def rank(pool: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        return sorted(set(pool), key=lambda g: (history[g], order[g]))

    total = population + iterations * (mutations + crossovers)
    bar = tqdm(total=total, desc=desc, unit="cand", disable=not progress, leave=False)
    try:
        start = [_snap(f, klo, khi) for f in seeds.values()]
        named = {name: score(g) for name, g in zip(seeds, start)}
        pool = list(dict.fromkeys(start))
        attempts = 0
        while len(pool) < population and attempts < 50 * population:
            attempts += 1
            child = mutate(start[attempts % len(start)], rng, klo, khi)
            if child not in history:
                score(child)
                pool.append(child)
        pool = rank(pool)[:population]
        for _ in range(iterations):
            chosen = pool[:parents]
            children: list[tuple[int, ...]] = []
            for kind, count in (("mutate", mutations), ("cross", crossovers)):
                made = tries = 0
                while made < count and tries < 20 * max(count, 1):
                    tries += 1
                    if kind == "cross" and len(chosen) > 1:
                        i, j = rng.choice(len(chosen), size=2, replace=False)
                        child = crossover(chosen[int(i)], chosen[int(j)], rng)
                    else:
                        child = mutate(chosen[int(rng.integers(len(chosen)))], rng, klo, khi)
                    if child is None or child in history:
                        continue
                    score(child)
                    children.append(child)
                    made += 1
            pool = rank(pool + children)[:population]
    finally:
        bar.close()
    best = pool[0]
    return SearchResult(_factors(best), history[best], len(history), history, named)


# --- Fitness: perplexity of the model itself ----------------------------------------------------------

def _as_rows(documents: Sequence[torch.Tensor | Sequence[int] | np.ndarray], length: int) -> torch.Tensor:
    """The first `length` tokens of each document, [N, length] int64. Every document must have
    that many: the search measures perplexity at exactly this length."""
    if not documents:
        raise Phi3Error("longctx search: no documents to measure perplexity on; give long documents")
    rows = []
    for i, d in enumerate(documents):
        t = torch.as_tensor(np.asarray(d) if not isinstance(d, torch.Tensor) else d).long().flatten()
        if t.numel() < length:
            raise Phi3Error(f"longctx search: document {i} has {t.numel()} tokens, fewer than the {length} "
                            f"measured; give documents of at least {length} tokens")
        rows.append(t[:length])
    return torch.stack(rows)


@torch.no_grad()
def perplexity(model: Transformer, rows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token cross-entropy) over every position of rows [N, T], in eval mode."""
    training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for start in range(0, rows.shape[0], batch_size):
            ids = rows[start:start + batch_size].to(model.device)
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    finally:
        model.train(training)
    return math.exp(total / count)


def search_longrope_factors(model: Transformer, documents: Sequence[torch.Tensor | Sequence[int]], target_len: int,
                            *, original_len: int | None = None, population: int = POPULATION,
                            iterations: int = ITERATIONS, parents: int | None = None, mutations: int | None = None,
                            crossovers: int | None = None, short_iterations: int | None = None,
                            min_short_gain: float = 1e-3, batch_size: int | None = None, seed: int = 0,
                            progress: bool = True, report: dict | None = None) -> tuple[list[float], list[float]]:
    """(short_factor, long_factor) for extending `model` from its context C to `target_len`.

    long_factor: the evolutionary search above, fitness = perplexity on the first target_len tokens
    of each document with the candidate as long factors (short factors ones, Phi-3's attention
    factor). short_factor: the same search at length C (short_iterations, default iterations // 2)
    from ones; ones are kept unless a candidate measures at least `min_short_gain` (relative) lower:
    a gain smaller than that is within what a few documents can tell apart (on the test's model the
    search's best was 3e-6 below ones). `report`, if given, receives the perplexities measured: at
    target_len the starting rules (with Phi-3's attention factor), plain PI, the model as it is and
    the chosen factors; at C the model as it is, ones and the chosen short factors."""
    cfg = model.config
    C = _check_lengths(cfg, target_len, original_len)
    half = cfg.dim_per_head // 2
    # rows per forward (None: 4, fewer past 2048 tokens, one past 8192: the logits alone are
    # rows x target_len x vocab floats, 4 GiB for one row of 32k tokens of Phi-3's vocabulary)
    batch_size = batch_size or max(1, min(4, 8192 // target_len))
    s = target_len / C
    long_rows = _as_rows(documents, target_len)
    short_rows = long_rows[:, :C]
    ones = [1.0] * half
    hi = max(2.0 * s, 1.0 + GRID)
    kw = dict(population=population, parents=parents, mutations=mutations, crossovers=crossovers, progress=progress)

    def long_fitness_of(c: ModelConfig) -> float:
        with rope_override(model, c) as m:
            return perplexity(m, long_rows, batch_size)

    def long_fitness(f: Factors) -> float:
        return long_fitness_of(longrope_config(cfg, target_len, ones, f, original_len=C))

    seeds = {"pi": pi_factors(half, s), "ntk": ntk_factors(half, s),
             "yarn": yarn_factors(half, s, C, cfg.rope_theta), "ones": tuple(ones)}
    found = evolve(long_fitness, seeds, 1.0, hi, iterations=iterations, seed=seed, desc="LongRoPE long factors", **kw)
    long_factor = list(found.best)

    def short_fitness(f: Factors) -> float:
        with rope_override(model, longrope_config(cfg, target_len, f, long_factor, original_len=C)) as m:
            return perplexity(m, short_rows, batch_size)

    short_iterations = iterations // 2 if short_iterations is None else short_iterations
    short_factor = list(ones)
    short = None
    if short_iterations > 0:
        short = evolve(short_fitness, {"ones": tuple(ones)}, 1.0, max(s, 1.0 + GRID), iterations=short_iterations,
                       seed=seed + 1, desc="LongRoPE short factors", **kw)
        if short.best_fitness < short.seeds["ones"] * (1 - min_short_gain):
            short_factor = list(short.best)
    if report is not None:
        report.update(
            original_len=C, target_len=target_len, evaluations=found.evaluations,
            long_ppl={**found.seeds, "longrope": found.best_fitness,
                      "pi_plain": long_fitness_of(position_interpolation_config(cfg, target_len, original_len=C)),
                      "unchanged": perplexity(model, long_rows, batch_size)},
            short_ppl_base=perplexity(model, short_rows, batch_size),
            short_ppl_ones=short.seeds["ones"] if short else short_fitness(tuple(ones)),
            short_ppl_chosen=short_fitness(tuple(short_factor)))
    return short_factor, long_factor


def long_windows(source: Sequence, length: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` windows of `length` tokens for the search from a document source (len() and
    [i] -> tokens, e.g. phi3.train.data's DocumentSource): the first `length` tokens of documents
    that long, in a seeded order; when too few documents are that long, the rest are cut from the
    other documents laid end to end (each already ends with EOS), as LongRoPE's fine-tuning chunks
    RedPajama. Reading stops once `count` long documents are found, or once at least 8 x count
    documents are read and the short ones make up the difference: a large corpus is not read
    whole for a handful of windows."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    rest: list[np.ndarray] = []
    spare = 0  # tokens in `rest`
    for n, i in enumerate(rng.permutation(len(source))):
        doc = np.asarray(source[int(i)], dtype=np.int64).ravel()
        if doc.size >= length:
            out.append(doc[:length])
        elif doc.size:
            rest.append(doc)
            spare += doc.size
        if len(out) == count or (n + 1 >= 8 * count and len(out) + spare // length >= count):
            break
    if len(out) < count and rest:
        stream = np.concatenate(rest)
        for start in range(0, stream.size - length + 1, length):
            if len(out) == count:
                break
            out.append(stream[start:start + length])
    if len(out) < count:
        raise Phi3Error(f"longctx: the data holds {len(out)} windows of {length} tokens, fewer than the {count} "
                        f"the search measures; add data or lower longctx.search_documents")
    return out


def run_longctx_search(model: Transformer, documents: Sequence, target_len: int, *, original_len: int | None = None,
                       seed: int = 0, progress: bool = True, apply: bool = True,
                       device: str | torch.device | None = None, **search: int | float) -> tuple[ModelConfig, dict]:
    """The `longctx` stage's first step: search factors on `model` (documents: token windows of at
    least target_len, see long_windows), build the longrope config and (apply=True) put its rotary
    tables into the model in place, ready for long/short mixed training: phi3's forward with
    document_ids gives each packed document the long factors only when it is longer than C.

    Under torch.distributed, rank 0 searches and broadcasts the factors, so every rank trains the
    same config whatever its hardware's rounding. `device`: where the search runs (None: where
    the model is); a model built on the CPU before wrapping is moved there for the search and back
    after (phi-3-mini at 128K tokens is hours per candidate on a CPU, seconds on a GPU).
    `search`: search_longrope_factors's settings (population, iterations, parents, mutations,
    crossovers, short_iterations, batch_size, min_short_gain). Returns (config, report of
    perplexities)."""
    import torch.distributed as dist

    report: dict = {}
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        home = model.device
        moved = device is not None and torch.device(device) != home
        try:
            if moved:
                model.to(device)
            short, long = search_longrope_factors(model, documents, target_len, original_len=original_len,
                                                  seed=seed, progress=progress, report=report, **search)
        finally:
            if moved:
                model.to(home)
        payload = [(short, long, report)]
    else:
        payload = [None]
    if distributed:
        dist.broadcast_object_list(payload, src=0)
    short, long, report = payload[0]
    cfg = longrope_config(model.config, target_len, short, long, original_len=original_len)
    if apply:
        apply_rope_config(model, cfg)
    return cfg, report
