"""Evaluation: the report's benchmarks (`phi3 eval`), and perplexity of a text file.

Benchmarks (tasks in phi3/tasks.py), all at temperature 0:
- choice tasks: every answer's log-likelihood after the few-shot context; accuracy, and accuracy
  with log-likelihoods divided by the answer's length in characters (acc_norm). A pack of up to
  --batch-size examples runs as one forward pass: the context prefix they share (the shots) is
  computed once, and kept in the KV cache for the next pack, each example's own text once, and
  every answer after it with an attention mask that lets it see only its own context
  (`LoglikelihoodScorer`). Only the positions that predict answer tokens go through the head.
- generation tasks: greedy completions through the continuous-batching engine, cut at the
  task's stop strings, then its answer extraction and match (GSM-8K's last number, BBH's
  "the answer is X", TriviaQA's normalised aliases).
- code tasks: greedy completions run against their tests in phi3.sandbox; pass@1.

Every example's result is appended to a records file as soon as it exists, so an interrupted run
resumes where it stopped. Results: JSON (per task and metric, with standard errors and counts),
a markdown table and a bar chart.

Perplexity: chunked windows: the token stream is cut into non-overlapping chunks of `context` tokens (the first
token of each chunk replaced by BOS when the model wants one); within a chunk only the second half
is scored, so every scored token sees at least context/2 tokens before it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from phi3 import tasks as T
from phi3.checkpoint import LoadedModel
from phi3.engine import Prefix
from phi3.errors import Phi3Error
from phi3.model import Transformer
from phi3.tokenizer import Tokenizer


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens_scored: int
    chunks: int
    context: int
    method: str = "chunked (llama.cpp): non-overlapping chunks, second half of each scored"

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(lm: LoadedModel, text: str, context: int = 512, progress: bool = True) -> Perplexity:
    if context < 4:
        raise Phi3Error(f"--context must be at least 4, got {context}")
    if context > lm.config.max_position_embeddings:
        raise Phi3Error(f"--context {context} exceeds the model's context of {lm.config.max_position_embeddings}")
    tokens = lm.tokenizer.encode(text, add_bos=False)
    n_chunks = len(tokens) // context
    if n_chunks < 1:
        raise Phi3Error(f"text has {len(tokens)} tokens; perplexity needs at least --context {context} of them")
    bos = lm.tokenizer.bos_id if lm.tokenizer.add_bos else None
    first = context // 2
    total_nll, scored = 0.0, 0
    chunks = range(n_chunks)
    if progress:
        from tqdm import tqdm
        chunks = tqdm(chunks, desc="perplexity", unit="chunk", file=sys.stderr)
    with torch.inference_mode():
        cache = lm.model.new_cache(1, context)
        for c in chunks:
            ids = tokens[c * context:(c + 1) * context]
            if bos is not None:
                ids = [bos] + ids[1:]
            x = torch.tensor([ids], device=lm.model.device)
            # Through a KV cache, as llama.cpp's perplexity runs: attention then reads the cached
            # keys and values, so the cache's type (--kv-cache) is part of what is measured.
            cache.reset()
            logits = lm.model(x, cache=cache)[0, first:-1]
            targets = x[0, first + 1:]
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
            total_nll += float(nll)
            scored += int(targets.numel())
            if progress:
                chunks.set_postfix(ppl=f"{math.exp(total_nll / scored):.3f}")
    mean = total_nll / scored
    return Perplexity(math.exp(mean), mean, scored, n_chunks, context)


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise Phi3Error(f"no such text file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise Phi3Error(f"{path} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise Phi3Error(f"{path} is empty")
    return text


# --- benchmarks ---------------------------------------------------------------------------------

PACK_TOKENS = 1024  # packed tokens per forward pass at most (beyond the cached prefix): bounds the attention scores' memory
FIRST_CACHE = 2048  # tokens the scorer's KV cache starts with; it grows to what a task needs


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str,
                cache: dict[str, list[int]] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a context and of its continuation, split as lm-evaluation-harness splits them:
    trailing spaces of the context move to the continuation, the continuation's ids are those of
    the whole text after the context's own ids."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if cache is not None and context in cache:
        ctx = cache[context]
    else:
        ctx = tokenizer.encode(context)
        if cache is not None:
            cache.clear()  # one context at a time is what the choices of an example share
            cache[context] = ctx
    whole = tokenizer.encode(context + continuation)
    return ctx, whole[len(ctx):]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LoglikelihoodScorer:
    """Log-likelihoods of continuations after contexts, with shared context computed once.

    A pack of (context, continuation) pairs becomes one sequence: the prefix all its contexts
    share (less what the KV cache still holds from the previous pack), each distinct context's
    remainder, and each continuation but its last token. The attention mask lets a token see its
    ancestors only (prefix -> context -> continuation), and positions restart where each branch
    forks, so every pair is scored exactly as if it ran alone."""

    def __init__(self, model: Transformer, max_len: int | None = None) -> None:
        self.model = model
        self.max_len = max_len or model.config.max_position_embeddings
        # Small at first and grown on demand: a 128K model's full-length cache is tens of GB.
        self.cache = model.new_cache(1, min(self.max_len, FIRST_CACHE))
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds
        self.window = model.config.sliding_window

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood, whether greedy decoding would produce the continuation) per pair."""
        contexts: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx:
                raise Phi3Error("a context must have at least one token")
            if not cont:
                raise Phi3Error("a continuation must have at least one token")
            if len(ctx) + len(cont) > self.max_len:
                raise Phi3Error(f"a prompt of {len(ctx) + len(cont)} tokens exceeds the model's context of "
                                f"{self.max_len}; lower --shots")
            contexts.setdefault(tuple(ctx), []).append(i)
        uniq = [list(c) for c in contexts]
        shared = min(len(u) for u in uniq) - 1  # every context keeps a token of its own: it predicts the first answer token
        for u in uniq[1:]:
            shared = min(shared, _common_prefix(uniq[0], u))
        prefix = uniq[0][:shared]
        reuse = _common_prefix(self.cached, prefix)
        model = self.model
        # The model picks LongRoPE's factor set from the last position + 1 (of a pair: all its tokens but the last).
        long = model.uses_long_rope(torch.tensor([max(len(u) + len(pairs[i][1]) - 1 for u, ix in
                                                      zip(uniq, contexts.values()) for i in ix)],
                                                 device=self.cache.rope_long.device))
        if reuse and bool((self.cache.rope_long != long).any()):
            reuse = 0  # cached keys were rotated with the other LongRoPE factor set
        needed = shared + sum(len(u) - shared for u in uniq) + sum(len(c) - 1 for _, c in pairs)
        if needed > self.max_len:
            raise Phi3Error(f"a pack of {needed} tokens exceeds the model's context of {self.max_len}")
        if needed > self.cache.max_len:
            self.cache = model.new_cache(1, min(self.max_len, max(needed, 2 * self.cache.max_len)))
            reuse = 0
        # Lay out segments: 0 = the new part of the shared prefix; then per context its remainder
        # and after it each of its continuations (last token dropped: nothing to predict after it).
        ids: list[int] = []
        positions: list[int] = []
        segment: list[int] = []
        parent: list[int] = [-1]
        ids += prefix[reuse:]
        positions += list(range(reuse, shared))
        segment += [0] * (shared - reuse)
        rows: list[int] = []  # positions (in ids) whose logits predict the targets below
        targets: list[int] = []
        owner: list[int] = []  # which pair each target belongs to
        for u, members in zip(uniq, contexts.values()):
            seg_ctx = len(parent)
            parent.append(0)
            ids += u[shared:]
            positions += list(range(shared, len(u)))
            segment += [seg_ctx] * (len(u) - shared)
            last_ctx = len(ids) - 1
            for i in members:
                cont = pairs[i][1]
                seg = len(parent)
                parent.append(seg_ctx)
                body = len(ids)
                ids += cont[:-1]
                positions += list(range(len(u), len(u) + len(cont) - 1))
                segment += [seg] * (len(cont) - 1)
                rows += [last_ctx] + list(range(body, body + len(cont) - 1))
                targets += cont
                owner += [i] * len(cont)
        n = len(parent)
        ancestor = torch.eye(n, dtype=torch.bool)
        for s in range(1, n):
            p = parent[s]
            while p >= 0:
                ancestor[s, p] = True
                p = parent[p]
        seg_t = torch.tensor(segment)
        idx = torch.arange(len(ids))
        allowed = ancestor[seg_t[:, None], seg_t[None, :]] & (idx[None, :] <= idx[:, None])
        allowed = torch.cat([torch.ones(len(ids), reuse, dtype=torch.bool), allowed], dim=1)
        pos_t = torch.tensor(positions)
        if self.window is not None and int(pos_t.max()) >= self.window:
            key_pos = torch.cat([torch.arange(reuse), pos_t])
            allowed &= (pos_t[:, None] - key_pos[None, :]) < self.window
        self.cache.reset()
        self.cache.length = reuse
        self.cache.rope_long = long
        device = model.device
        logits = model.forward(torch.tensor([ids], device=device), cache=self.cache,
                               positions=pos_t[None].to(device), allowed=allowed[None].to(device),
                               rows=torch.tensor(rows, device=device))[0]
        self.cached = prefix
        logprobs = torch.log_softmax(logits, dim=-1)
        tgt = torch.tensor(targets, device=device)
        picked = logprobs.gather(1, tgt[:, None])[:, 0]
        greedy = logits.argmax(dim=-1) == tgt
        out_ll = [0.0] * len(pairs)
        out_greedy = [True] * len(pairs)
        for j, i in enumerate(owner):
            out_ll[i] += float(picked[j])
            out_greedy[i] = out_greedy[i] and bool(greedy[j])
        return list(zip(out_ll, out_greedy))


# --- prompt lengths -----------------------------------------------------------------------------
# Every prompt is checked against the model's context before any model work: first by its length
# in characters (no tokenizing: a prompt longer than the context times the longest token cannot
# fit), then in tokens. The tokenizer costs about 170 bytes per character (16M characters of
# English: 2.7 GB and 15 s), so a long text is counted in pieces and refused as soon as they pass
# the context.

PIECE_CHARS_PER_TOKEN = 8  # a piece of context x 8 characters is ~2 contexts of English (~4 characters a token)
PIECE_SLACK = 16  # tokens a cut between two pieces may add to their sum (a word split in two)
BYTES_SLACK = 8  # tokens beyond one per UTF-8 byte (BOS, SentencePiece's dummy prefix)


def max_chars_per_token(tokenizer: Tokenizer) -> int:
    """The most characters one token can stand for: the longest vocabulary entry (its byte-level
    or SentencePiece spelling is never shorter than its text), or T.MAX_CHARS_PER_TOKEN."""
    vocab = tokenizer.vocab()
    return max(T.MAX_CHARS_PER_TOKEN, max((len(t) for t in vocab), default=0))


def count_tokens(tokenizer: Tokenizer, text: str, limit: int) -> tuple[int, bool]:
    """(tokens, exact): the exact count where it is at most `limit` (or near it); above that
    possibly only a count past `limit`, from tokenizing no more than one piece beyond it."""
    piece = max(limit, 1) * PIECE_CHARS_PER_TOKEN
    if len(text) > piece:
        total = 0
        for i, start in enumerate(range(0, len(text), piece)):
            total += len(tokenizer.encode(text[start:start + piece], add_bos=None if i == 0 else False))
            if total > limit + PIECE_SLACK * (i + 1):
                return total - PIECE_SLACK * (i + 1), False
    return len(tokenizer.encode(text)), True  # short, or close to the limit: counted whole


def prompt_fits(tokenizer: Tokenizer, text: str, limit: int, per_token: int) -> tuple[bool, str]:
    """Whether `text` fits in `limit` tokens, and (when it does not) its size, for a message."""
    if len(text) > limit * per_token:
        return False, f"{len(text):,} characters"
    if len(text.encode("utf-8")) + BYTES_SLACK <= limit:
        return True, ""  # every token covers at least one byte: nothing to count
    n, exact = count_tokens(tokenizer, text, limit)
    return n <= limit, f"{n:,} tokens" if exact else f"over {n:,} tokens"


RECORD_FIX = "shorten or remove this record"


def too_long(task: T.Task, ex: T.Example, shots: int, size: str, limit: int, fix: str,
             alone_fits: bool, record_fix: str = RECORD_FIX) -> Phi3Error:
    """One line: the record (file, number, id), its prompt's size, the room the context leaves, and
    the fix: `fix` (fewer shots) where the record alone fits, else `record_fix`."""
    remedy = fix if shots and alone_fits else record_fix
    with_shots = f" with {shots} shots" if shots else ""
    return Phi3Error(f"{ex.source or task.name + ' example ' + ex.id}: its prompt{with_shots} is {size}, more than "
                     f"the {limit:,} tokens the model's context leaves for it; {remedy}")


def check_prompts(tokenizer: Tokenizer, task: T.Task, data: T.TaskData, examples: list[T.Example], shots: int,
                  limit: int, fix: str, texts: Callable[[T.Example, int], list[str]] | None = None,
                  record_fix: str = RECORD_FIX) -> None:
    """Refuse the first example whose prompt cannot fit in `limit` tokens: by characters, counted
    without building any prompt; then, given `texts` (an example's prompts as built), by tokens."""
    per_token = max_chars_per_token(tokenizer)
    for ex in examples:
        chars = max(T.prompt_chars(ex, data, shots))
        if chars > limit * per_token:
            alone = max(T.prompt_chars(ex, data, 0)) <= limit * per_token
            raise too_long(task, ex, shots, f"{chars:,} characters", limit, fix, alone, record_fix)
    if texts is None:
        return
    for ex in examples:
        for text in texts(ex, shots):
            ok, size = prompt_fits(tokenizer, text, limit, per_token)
            if not ok:
                alone = all(prompt_fits(tokenizer, t, limit, per_token)[0] for t in texts(ex, 0))
                raise too_long(task, ex, shots, size, limit, fix, alone, record_fix)


@dataclass
class EvalSettings:
    shots: int | None = None  # None: each task's default (the report's k)
    limit: int | None = None  # examples per task (per subject/subtask where a task has them)
    batch_size: int = 8
    max_tokens: int | None = None  # generation tasks: override the task's
    timeout_s: float = 10.0  # code tasks: per program
    memory_mb: int = 1024

    def validate(self) -> None:
        if self.batch_size < 1:
            raise Phi3Error(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise Phi3Error(f"--limit must be at least 1, got {self.limit}")
        if self.shots is not None and self.shots < 0:
            raise Phi3Error(f"--shots must be 0 or more, got {self.shots}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise Phi3Error(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if not self.timeout_s > 0 or self.memory_mb < 64:
            raise Phi3Error("--timeout must be above 0 seconds and --memory-mb at least 64")


@dataclass
class TaskResult:
    name: str
    title: str
    kind: str
    shots: int
    n: int
    metrics: dict[str, dict[str, float]]  # metric -> {"value", "stderr"}
    groups: dict[str, dict[str, float]]  # group -> metric -> mean
    seconds: float
    examples_per_s: float
    files: list[str]
    sandbox: tuple[str, ...] = ()  # code tasks: the sandbox layers that were active (phi3.sandbox)

    @property
    def primary(self) -> str:
        """The headline metric: listed first."""
        return next(iter(self.metrics))


def mean_stderr(values: list[float]) -> dict[str, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports."""
    n = len(values)
    if n == 0:
        return {"value": float("nan"), "stderr": float("nan")}
    mean = sum(values) / n
    if n < 2:
        return {"value": mean, "stderr": float("nan")}
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"value": mean, "stderr": math.sqrt(var / n)}


def select(examples: list[T.Example], limit: int | None) -> list[T.Example]:
    """The first `limit` examples of each group (a fixed sample, the same on every run)."""
    if limit is None:
        return examples
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        if seen.get(ex.group, 0) < limit:
            seen[ex.group] = seen.get(ex.group, 0) + 1
            out.append(ex)
    return out


def _sha(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:16]


class Records:
    """Per-example results of one task, appended as they come (jsonl). The first line records the
    settings; a later run with the same settings reuses every example whose prompt is unchanged."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path = path
        self.done: dict[str, dict] = {}
        self.added = 0  # examples recorded by this run (not resumed)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.stat().st_size > 0:
            lines = path.read_text(encoding="utf-8").splitlines()
            try:
                first = json.loads(lines[0])
            except json.JSONDecodeError:
                first = None
            if not isinstance(first, dict) or not isinstance(first.get("settings"), dict):
                raise Phi3Error(f"{path} is not a records file of phi3 eval; delete it or choose another --output")
            old = first["settings"]
            if old != header:
                changed = ", ".join(f"{k}: {old.get(k)!r} -> {header.get(k)!r}"
                                    for k in sorted(set(old) | set(header)) if old.get(k) != header.get(k))
                raise Phi3Error(f"{path} holds records made with other settings ({changed}); "
                                "delete it or choose another --output")
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interruption: that example runs again
                if isinstance(rec, dict) and isinstance(rec.get("key"), str):
                    self.done.setdefault(rec["key"], {}).update(rec)
            self.file = open(path, "a", encoding="utf-8")
            if not lines[-1:] or not path.read_bytes().endswith(b"\n"):
                self.file.write("\n")
        else:
            self.file = open(path, "w", encoding="utf-8")
            self.file.write(json.dumps({"settings": header}, ensure_ascii=False) + "\n")
            self.file.flush()

    def add(self, record: dict) -> None:
        if record["key"] not in self.done:
            self.added += 1
        self.done.setdefault(record["key"], {}).update(record)
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="ex", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)


def run_choice(model: Transformer, tokenizer: Tokenizer, task: T.Task, data: T.TaskData,
               examples: list[T.Example], shots: int, records: Records, batch_size: int,
               progress: bool) -> dict[str, str]:
    """Score every example not yet recorded; returns each example's record key."""
    keys: dict[str, str] = {}
    metrics = task.choice_metrics or T.accuracy
    limit = model.config.max_position_embeddings
    check_prompts(tokenizer, task, data, examples, shots, limit, f"lower --shots (now {shots})")
    todo = []
    for ex in examples:
        reqs = T.requests(ex, data, shots)
        key = keys[ex.id] = _sha(ex.id, reqs)
        if key not in records.done or "lls" not in records.done[key]:
            todo.append((ex, reqs, key))
    # Tokens too, for what is left to score: a long record fails now, not after hours of scoring.
    check_prompts(tokenizer, task, data, [ex for ex, _, _ in todo], shots, limit, f"lower --shots (now {shots})",
                  lambda ex, k: [c + x for c, x in T.requests(ex, data, k)])
    scorer = LoglikelihoodScorer(model)
    bar = _progress(len(examples), task.name, progress, initial=len(examples) - len(todo))
    ctx_cache: dict[str, list[int]] = {}
    with torch.inference_mode():
        i = 0
        while i < len(todo):
            pack: list[tuple[T.Example, str, list[tuple[list[int], list[int]]]]] = []
            for ex, reqs, key in todo[i:i + batch_size]:
                pack.append((ex, key, [encode_pair(tokenizer, c, x, ctx_cache) for c, x in reqs]))
            i += len(pack)
            flat = [p for _, _, pairs in pack for p in pairs]
            scores = _score_in_pieces(scorer, flat)
            at = 0
            for ex, key, pairs in pack:
                lls = [s[0] for s in scores[at:at + len(pairs)]]
                greedy = [s[1] for s in scores[at:at + len(pairs)]]
                at += len(pairs)
                records.add({"key": key, "id": ex.id, "group": ex.group, "gold": ex.gold, "lls": lls,
                             "greedy": greedy, **metrics(ex, lls)})
            bar.update(len(pack))
    bar.close()
    return keys


def _score_in_pieces(scorer: LoglikelihoodScorer, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """Score a pack in as few forward passes as PACK_TOKENS of new tokens each allow (the
    attention scores of a pass grow with its tokens times the context's)."""
    out: list[tuple[float, bool]] = []
    piece: list[tuple[list[int], list[int]]] = []
    model = scorer.model

    def long(pair: tuple[list[int], list[int]]) -> bool:
        return bool(model.uses_long_rope(torch.tensor([len(pair[0]) + len(pair[1]) - 1]))[0])

    for pair in pairs:
        if piece:
            candidate = piece + [pair]
            new = _new_tokens(candidate)
            # A pack is scored with one LongRoPE factor set: pairs on both sides of the original
            # context would not be scored as they are alone.
            if new > PACK_TOKENS or new + _shared(candidate) > scorer.max_len or long(pair) != long(piece[0]):
                out += scorer.score(piece)
                piece = []
        piece.append(pair)
    return out + scorer.score(piece)


def _shared(pairs: list[tuple[list[int], list[int]]]) -> int:
    """Tokens all the pack's contexts begin with."""
    distinct = list({tuple(c): c for c, _ in pairs}.values())
    shared = min(len(c) for c in distinct)
    for c in distinct[1:]:
        shared = min(shared, _common_prefix(distinct[0], c))
    return shared


def _new_tokens(pairs: list[tuple[list[int], list[int]]]) -> int:
    """Tokens a pack adds after the prefix its contexts share."""
    shared = _shared(pairs)
    distinct = list({tuple(c): c for c, _ in pairs}.values())
    return sum(len(c) - shared for c in distinct) + sum(len(x) for _, x in pairs)


def run_generation(model: Transformer, tokenizer: Tokenizer, task: T.Task, data: T.TaskData,
                   examples: list[T.Example], shots: int, records: Records, max_tokens: int,
                   progress: bool, batch_size: int,
                   on_done: Callable[[T.Example, str, str], dict] | None = None) -> dict[str, str]:
    """Greedy completions of every example not yet recorded, `batch_size` decoding together;
    returns each example's record key."""
    from phi3.engine import Engine, Request
    from phi3.generate import SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop=task.stop)
    limit = model.config.max_position_embeddings - max_tokens
    fix = f"lower --shots (now {shots}) or --max-tokens (now {max_tokens})"
    record_fix = f"{RECORD_FIX}, or lower --max-tokens (now {max_tokens})"
    if limit < 1:
        raise Phi3Error(f"--max-tokens {max_tokens} leaves no room in the model's context of "
                        f"{model.config.max_position_embeddings}; lower --max-tokens")
    check_prompts(tokenizer, task, data, examples, shots, limit, fix, record_fix=record_fix)  # by characters
    per_token = max_chars_per_token(tokenizer)
    todo = []
    keys: dict[str, str] = {}
    for ex in examples:
        prompt = T.context(ex, data, shots)
        key = keys[ex.id] = _sha(ex.id, prompt, max_tokens, task.stop)
        if key not in records.done or "completion" not in records.done[key]:
            todo.append((ex, prompt, key))
    bar = _progress(len(examples), task.name, progress, initial=len(examples) - len(todo))
    engine = Engine(model, tokenizer, max_batch=max(1, batch_size), max_queue=len(todo) + 1)
    failures: list[str] = []

    def finisher(ex: T.Example, key: str) -> Callable[[str, object], None]:
        def on_event(kind: str, value: object) -> None:
            if kind == "error":
                failures.append(f"{ex.id}: {value}")
            elif kind == "done":
                text = value.text  # type: ignore[attr-defined]
                record = {"key": key, "id": ex.id, "group": ex.group, "completion": text,
                          "finish_reason": value.finish_reason}  # type: ignore[attr-defined]
                if on_done is not None:
                    record.update(on_done(ex, key, text))
                records.add(record)
                bar.update(1)
        return on_event

    encoded = []
    for ex, prompt, key in todo:
        ok, size = prompt_fits(tokenizer, prompt, limit, per_token)
        ids = tokenizer.encode(prompt) if ok else []
        if not ok or len(ids) > limit:
            alone = prompt_fits(tokenizer, T.context(ex, data, 0), limit, per_token)[0]
            raise too_long(task, ex, shots, size or f"{len(ids):,} tokens", limit, fix, alone, record_fix)
        encoded.append(ids)
    # Group by group (BBH's subtasks, ...): one group's prefix in memory at a time.
    for group in dict.fromkeys(ex.group for ex, _, _ in todo):
        members = [(ex, key, ids) for (ex, _, key), ids in zip(todo, encoded) if ex.group == group]
        prefix = shared_prefix(model, [ids for _, _, ids in members])
        for ex, key, ids in members:
            engine.submit(Request(ids, params, finisher(ex, key), prefix=prefix))
        engine.run_until_idle()
    bar.close()
    if failures:
        raise Phi3Error(f"{task.name}: generation failed for {len(failures)} examples, e.g. {failures[0]}")
    return keys


MIN_SHARED_PREFIX = 32  # tokens: below this, copying a prefix's cache saves nothing worth having


def shared_prefix(model: Transformer, prompts: list[list[int]]) -> Prefix | None:
    """The keys and values of the tokens most prompts begin with (the shots), computed once: the
    engine copies them into each request's cache and prefills only the rest. Most, not all: where
    shots come from the eval set itself, the first k examples have other shots."""
    if len(prompts) < 2:
        return None
    reference = prompts[len(prompts) // 2][:-1]  # a prompt keeps a token of its own: its logits start the answer
    lengths = sorted(_common_prefix(reference, p[:-1]) for p in prompts)
    common = lengths[len(lengths) // 4]  # shared by at least three quarters of the prompts
    return Prefix.build(model, reference[:common]) if common >= MIN_SHARED_PREFIX else None


def score_generation(task: T.Task, ex: T.Example, text: str) -> dict:
    answer = task.extract(text) if task.extract else text
    return {"answer": answer, "gold": ex.answers[0] if ex.answers else "",
            "exact_match": float(task.match(answer, ex)) if task.match else float(answer == ex.answers[0])}


def code_program(task: T.Task, ex: T.Example, completion: str) -> str:
    from phi3 import sandbox
    if task.name == "humaneval":
        return sandbox.humaneval_program(ex.query, completion, ex.extra["test"], ex.extra["entry_point"])
    return sandbox.mbpp_program(completion, ex.extra["tests"], ex.extra.get("setup", ""))


def run_code(task: T.Task, examples: list[T.Example], records: Records, keys: dict[str, str],
             settings: EvalSettings, progress: bool) -> tuple[str, ...]:
    """Run every recorded completion not yet tested in the sandbox; pass@1 (greedy, one sample).
    Returns the sandbox layers that were active, and warns when the kernel ones are missing."""
    from phi3 import sandbox
    todo = [ex for ex in examples if "passed" not in records.done.get(keys[ex.id], {})]
    programs = [code_program(task, ex, records.done[keys[ex.id]]["completion"]) for ex in todo]
    results = sandbox.run_programs(programs, timeout_s=settings.timeout_s, memory_mb=settings.memory_mb,
                                   workers=min(2, os.cpu_count() or 1), progress=progress) if todo else []
    # Not in the records header: a header must match exactly to resume, and the layers are a
    # property of this machine, not of the results.
    layers = tuple(results[0].layers) if results else tuple(sandbox.active_layers())
    if "private-root" not in layers:
        print(f"phi3: warning: the code sandbox runs without its kernel layers here ({' '.join(layers)}): "
              "model-written code can read and write what this user can; see SECURITY.md", file=sys.stderr)
    for ex, res in zip(todo, results):
        records.add({"key": keys[ex.id], "id": ex.id, "status": res.status, "passed": res.status == "passed",
                     "pass@1": float(res.status == "passed"), "output": res.output[-2000:]})
    return layers


def weights_fingerprint(path: Path) -> list[list]:
    """[name, bytes, mtime_ns] of the model's weights file, or of each weights file in its folder: a model
    retrained or re-exported in place (the same folder name, often the same size: `phi3 train`'s final/)
    must not resume records made with the old weights. Found in the fine-tuning demo: a DPO model exported
    again to the same folder reused the previous model's ARC records."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.glob("*") if p.suffix in (".safetensors", ".gguf", ".bin", ".pt"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()]


def evaluate_task(lm: LoadedModel, task: T.Task, subsets: list[str], file: Path | None, data_dir: Path,
                  settings: EvalSettings, records_dir: Path, model_id: str, progress: bool = True,
                  data: T.TaskData | None = None) -> TaskResult:
    """One task (`data`: its files, when already loaded). Its records go to records_dir/NAME.jsonl."""
    data = data if data is not None else T.load_task(task, data_dir, subsets, file)
    settings.validate()
    shots = task.shots if settings.shots is None else settings.shots
    if task.name == "bbh" and shots > 3:
        raise Phi3Error("bbh's published chain-of-thought prompts have 3 examples; use --shots 3 or fewer")
    examples = select(data.examples, settings.limit)
    max_tokens = settings.max_tokens or task.max_tokens
    # The file's size and weight types too: a model re-quantized under the same name must not reuse records.
    header = {"task": task.name, "model": model_id, "model_bytes": lm.file_bytes,
              "weights_files": weights_fingerprint(lm.path),
              "weights": dict(sorted(lm.weight_types.items())), "dtype": str(lm.model.dtype),
              "int8_activations": any(getattr(m, "int8_activations", False) for m in lm.model.modules()),
              "shots": shots, "subsets": subsets,
              "max_tokens": max_tokens if task.kind != "choice" else None}
    if lm.model.kv_dtype not in (None, lm.model.dtype):
        # Only when it differs, so that records from before caches could be float16 stay valid.
        header["kv_cache"] = str(lm.model.kv_dtype)
    if task.kind == "code":
        header |= {"timeout_s": settings.timeout_s, "memory_mb": settings.memory_mb}
    name = task.name + (":" + "+".join(subsets) if subsets else "") + (f"={file.stem}" if file is not None else "")
    records = Records(records_dir / records_name(name), header)
    started = time.perf_counter()
    layers: tuple[str, ...] = ()
    try:
        if task.kind == "choice":
            keys = run_choice(lm.model, lm.tokenizer, task, data, examples, shots, records, settings.batch_size,
                              progress)
        else:
            on_done = (lambda ex, key, text: score_generation(task, ex, text)) if task.kind == "generate" else None
            keys = run_generation(lm.model, lm.tokenizer, task, data, examples, shots, records, max_tokens,
                                  progress, settings.batch_size, on_done)
            if task.kind == "code":
                layers = run_code(task, examples, records, keys, settings, progress)
    finally:
        records.close()
    seconds = time.perf_counter() - started
    recs = [records.done[keys[ex.id]] for ex in examples]
    names = {"choice": ["acc", "acc_norm"], "generate": ["exact_match"], "code": ["pass@1"]}[task.kind]
    if task.choice_metrics is not None:
        names = [k for k in recs[0] if k in ("mc1", "mc2")] if recs else ["mc1", "mc2"]
        names = sorted(names, key=lambda k: k != "mc2")
    if task.headline in names:
        names.sort(key=lambda m: m != task.headline)
    metrics = {m: mean_stderr([float(r[m]) for r in recs]) for m in names}
    groups: dict[str, dict[str, float]] = {}
    for g in sorted({ex.group for ex in examples if ex.group}):
        rs = [r for ex, r in zip(examples, recs) if ex.group == g]
        groups[g] = {m: sum(float(r[m]) for r in rs) / len(rs) for m in names}
        groups[g]["n"] = len(rs)
    title = f"{task.title} ({file.name})" if file is not None else task.title
    # Examples/s of what this run computed: resumed records took no time now.
    rate = records.added / seconds if records.added and seconds > 0 else float("nan")
    return TaskResult(name, title, task.kind, shots, len(examples), metrics, groups, seconds, rate,
                      [str(p) for p in data.files], layers)


def records_name(name: str) -> str:
    """A task's records file: 'bbh:navigate+snarks' -> 'bbh-navigate_snarks.jsonl'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name.replace(":", "-").replace("+", "_").replace("=", "-")) + ".jsonl"


def load_tasks(spec: str, data_dir: Path) -> list[tuple[T.Task, list[str], Path | None, T.TaskData]]:
    """Parse --tasks and read every task's files: bad data fails here, before any model time."""
    loaded = [(task, subsets, file, T.load_task(task, data_dir, subsets, file))
              for task, subsets, file in T.parse_tasks(spec)]
    names = [t.name + ":" + "+".join(s) + "=" + str(f) for t, s, f, _ in loaded]
    if len(set(names)) != len(names):
        raise Phi3Error("--tasks names the same task twice")
    return loaded


def evaluate(lm: LoadedModel, spec: str, data_dir: Path, settings: EvalSettings, output: Path,
             model_id: str, progress: bool = True,
             loaded: list[tuple[T.Task, list[str], Path | None, T.TaskData]] | None = None) -> dict:
    """Run the tasks of `spec` (`loaded`: from load_tasks) and write output (.json), its .md table,
    .png chart and .records/."""
    settings.validate()
    loaded = loaded if loaded is not None else load_tasks(spec, data_dir)
    output = output if output.suffix == ".json" else output.with_suffix(".json")
    records_dir = output.with_suffix(".records")
    results = []
    for task, subsets, file, data in loaded:
        results.append(evaluate_task(lm, task, subsets, file, data_dir, settings, records_dir, model_id, progress,
                                     data))
        write_outputs(output, model_id, settings, results)
    return json.loads(output.read_text())


def write_outputs(output: Path, model_id: str, settings: EvalSettings, results: list[TaskResult]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    doc = {"model": model_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "settings": asdict(settings),
           "tasks": {r.name: {"title": r.title, "kind": r.kind, "shots": r.shots, "n": r.n,
                              "metrics": _no_nan(r.metrics), "groups": r.groups, "seconds": round(r.seconds, 2),
                              "examples_per_s": _no_nan(round(r.examples_per_s, 3)), "files": r.files}
                             | ({"sandbox": list(r.sandbox)} if r.sandbox else {})
                     for r in results},
           "records": str(output.with_suffix(".records"))}
    tmp = output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(output)
    output.with_suffix(".md").write_text(markdown_table(model_id, results))
    try:
        bar_chart(output.with_suffix(".png"), model_id, results)
    except ImportError:
        print("phi3: matplotlib is not installed; no bar chart written (pip install matplotlib)", file=sys.stderr)


def _no_nan(value: Any) -> Any:
    """NaN (a standard error of one example, the speed of a run that computed nothing) as JSON null."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def markdown_table(model_id: str, results: list[TaskResult]) -> str:
    lines = [f"Model: `{model_id}`", "", "| task | k | n | metric | value | ± stderr | examples/s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for i, (m, v) in enumerate(r.metrics.items()):
            head = f"| {r.title} | {r.shots} | {r.n} |" if i == 0 else "| | | |"
            err = "" if math.isnan(v["stderr"]) else f"{100 * v['stderr']:.2f}"
            rate = f"{r.examples_per_s:.2f}" if i == 0 and not math.isnan(r.examples_per_s) else ""
            lines.append(f"{head} {m} | {100 * v['value']:.2f} | {err} | {rate} |")
    return "\n".join(lines) + "\n"


def bar_chart(path: Path, model_id: str, results: list[TaskResult]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r.title for r in results]
    values = [100 * r.metrics[r.primary]["value"] for r in results]
    errors = [0 if math.isnan(r.metrics[r.primary]["stderr"]) else 100 * r.metrics[r.primary]["stderr"]
              for r in results]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(results) + 2), 4))
    ax.bar(range(len(results)), values, yerr=errors, color="#4c72b0", capsize=3)
    ax.set_xticks(range(len(results)))
    ax.set_xticklabels([f"{n}\n({r.primary}, {r.shots}-shot)" for n, r in zip(names, results)], fontsize=7)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title(model_id, fontsize=9)
    for i, (v, e) in enumerate(zip(values, errors)):
        ax.text(i, min(v + e + 1.5, 95), f"{v:.1f}", ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
