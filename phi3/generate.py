"""Text generation: greedy and sampled decoding over a static KV cache, batched, streamed.

`stream` yields text pieces for one prompt; `generate` returns completions for a batch. Both run
the same loop: prefill the (left-padded) prompts once, then one token per row per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from phi3.errors import Phi3Error
from phi3.model import KVCache, Transformer
from phi3.tokenizer import StreamDecoder, Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise Phi3Error(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise Phi3Error(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise Phi3Error(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise Phi3Error(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise Phi3Error(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # generated ids, the stop token excluded
    finish_reason: str  # "stop" (stop token or string) or "length"
    prompt_tokens: int


def check_fits(model: Transformer, prompt_len: int, max_new_tokens: int) -> None:
    if prompt_len == 0:
        raise Phi3Error("empty prompt: give at least one token of input")
    ctx = model.config.max_position_embeddings
    if prompt_len + max_new_tokens > ctx:
        raise Phi3Error(
            f"prompt of {prompt_len} tokens plus {max_new_tokens} new tokens exceeds the model's context of "
            f"{ctx} tokens; shorten the prompt or lower max new tokens")


class _Row:
    """One sequence's output: ids, text released so far, and stop-string handling (text that
    could be the start of a stop string is held back until it is known not to be)."""

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str], prompt_tokens: int,
                 incremental: bool = True) -> None:
        self.stop = [s for s in stop if s]
        # Text is decoded token by token only when someone reads it as it comes (streaming) or
        # stop strings need watching; otherwise once at the end.
        self.tokenizer = tokenizer
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None and (incremental or self.stop) else None
        self.prompt_tokens = prompt_tokens
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far
        self.released = 0  # how much of `text` has been handed out
        self.finish_reason: str | None = None

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.decoder is None:
            return ""
        self.text += self.decoder.push(token_id)
        return self._release()

    def end(self, reason: str) -> str:
        self.finish_reason = self.finish_reason or reason
        if self.decoder is None:
            if self.tokenizer is not None:
                self.text = self.tokenizer.decode(self.ids)
                self.released = len(self.text)
            return ""
        if reason != "stop_string":
            self.text += self.decoder.flush()
            return self._release(final=True)
        return ""

    def _release(self, final: bool = False) -> str:
        if self.stop:
            hits = [i for i in (self.text.find(s, max(0, self.released - len(s))) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish_reason = "stop_string"
                out = self.text[self.released:]
                self.released = len(self.text)
                return out
            if not final:
                hold = max((_overlap(self.text, s) for s in self.stop), default=0)
                upto = len(self.text) - hold
                out = self.text[self.released:upto] if upto > self.released else ""
                self.released = max(self.released, upto)
                return out
        out = self.text[self.released:]
        self.released = len(self.text)
        return out

    def completion(self) -> Completion:
        reason = "stop" if self.finish_reason in ("stop", "stop_string") else "length"
        return Completion(self.text, self.ids, reason, self.prompt_tokens)


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class Sampler:
    """Logits processing in transformers' order: repetition penalty, temperature, top-k, top-p."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.p = params
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None) -> torch.Tensor:
        """logits [B, V] float32; history [B, n] ids seen so far (for the repetition penalty)."""
        p = self.p
        if p.temperature > 0:
            # A logit at float32's minimum is a token the model rules out (phi-3-small's dummy ids,
            # HF's value). Dividing it by a temperature or scaling it by a repetition penalty below
            # 1 would turn it into an ordinary, if tiny, logit: -inf keeps it out whatever the
            # settings (a temperature of 1e38 would otherwise give it a share).
            logits = logits.masked_fill(logits == torch.finfo(logits.dtype).min, float("-inf"))
        if p.repetition_penalty != 1.0 and history is not None:
            seen = logits.gather(1, history)
            seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
            logits = logits.scatter(1, history, seen)
        if p.temperature == 0:
            return logits.argmax(dim=-1)
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            before = probs.cumsum(-1) - probs  # probability mass ranked above each token
            drop = before >= p.top_p
            drop[:, 0] = False
            logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)


def advance(model: Transformer, cache: KVCache, tokens: torch.Tensor,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Feed the tokens the cache has not seen yet (tokens [B, n] is the whole sequence so far)
    and return the last position's logits.

    LongRoPE switches to its long factors once the sequence passes the original context; keys
    rotated with the short ones are then stale, so the whole sequence is re-encoded, which is what
    transformers' generate does for Phi-3 and makes every step equal a full forward."""
    if cache.length and model.config.rope_scaling is not None:
        fed = tokens.shape[1] - cache.length
        if bool((model.uses_long_rope(cache.next_position + fed) != cache.rope_long).any()):
            cache.reset()
    start = cache.length
    return model(tokens[:, start:], cache, mask[:, start:] if mask is not None else None, last_only=True)


def _decode_loop(model: Transformer, prompts: list[list[int]], params: SamplingParams,
                 stop_ids: set[int], rows: list[_Row]) -> Iterator[list[tuple[int, str]]]:
    """Run the batched decode; after each step yield (row index, new text) for every row that
    produced text. Rows finish on a stop id, a stop string or max_new_tokens."""
    device = model.device
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    total = longest + params.max_new_tokens
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    pad = pad if 0 <= pad < model.config.vocab_size else 0
    tokens = torch.full((B, total), pad, dtype=torch.long, device=device)
    mask = torch.zeros((B, total), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, longest - len(p):longest] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p):longest] = 1
    padded = bool((mask[:, :longest] == 0).any())
    cache = model.new_cache(B, total)
    sampler = Sampler(params, device)
    alive = [True] * B
    length = longest

    with torch.inference_mode():
        logits = advance(model, cache, tokens[:, :length], mask[:, :length] if padded else None)
        for step in range(params.max_new_tokens):
            history = tokens[:, :length] if params.repetition_penalty != 1.0 else None
            # Rows are few: decide on plain Python ints rather than many tiny tensor ops per step.
            next_ids = [t if a else pad for t, a in zip(sampler(logits[:, -1], history).tolist(), alive)]
            tokens[:, length] = torch.tensor(next_ids, dtype=torch.long)
            mask[:, length] = 1
            length += 1
            last = step == params.max_new_tokens - 1
            events = []
            for i, tid in enumerate(next_ids):
                if not alive[i]:
                    continue
                if tid in stop_ids:
                    text = rows[i].end("stop")
                else:
                    text = rows[i].add(tid)
                    if rows[i].finish_reason is None and last:
                        text += rows[i].end("length")
                if rows[i].finish_reason is not None:
                    alive[i] = False
                if text:
                    events.append((i, text))
            yield events
            if not any(alive) or last:
                break
            logits = advance(model, cache, tokens[:, :length], mask[:, :length] if padded else None)


def _validate(model: Transformer, prompts: list[list[int]], params: SamplingParams) -> None:
    if not prompts:
        raise Phi3Error("no prompts given")
    params.validate()
    for p in prompts:
        check_fits(model, len(p), params.max_new_tokens)


def generate(model: Transformer, tokenizer: Tokenizer | None, prompts: list[list[int]],
             params: SamplingParams, stop_ids: set[int] | None = None) -> list[Completion]:
    """Complete a batch of tokenized prompts. Rows of different lengths are left-padded."""
    _validate(model, prompts, params)
    stops = stop_ids if stop_ids is not None else (tokenizer.stop_ids if tokenizer else set())
    rows = [_Row(tokenizer, params.stop, len(p), incremental=False) for p in prompts]
    for _ in _decode_loop(model, prompts, params, stops, rows):
        pass
    return [r.completion() for r in rows]


@dataclass
class Stream:
    """Iterate for text pieces; afterwards `completion` holds the whole result."""

    pieces: Iterator[str]
    row: _Row = field(repr=False)

    def __iter__(self) -> Iterator[str]:
        return self.pieces

    @property
    def completion(self) -> Completion:
        return self.row.completion()


def stream(model: Transformer, tokenizer: Tokenizer, prompt: list[int], params: SamplingParams,
           stop_ids: set[int] | None = None) -> Stream:
    _validate(model, [prompt], params)
    stops = stop_ids if stop_ids is not None else tokenizer.stop_ids
    row = _Row(tokenizer, params.stop, len(prompt))

    def pieces() -> Iterator[str]:
        for events in _decode_loop(model, [prompt], params, stops, [row]):
            for _, text in events:
                yield text

    return Stream(pieces(), row)

