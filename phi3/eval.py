"""Evaluation. For now: perplexity of a text file, computed the way llama.cpp's `perplexity` tool
computes it so that numbers from both can be compared on the same file.

Chunked windows: the token stream is cut into non-overlapping chunks of `context` tokens (the first
token of each chunk replaced by BOS when the model wants one); within a chunk only the second half
is scored, so every scored token sees at least context/2 tokens before it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from phi3.checkpoint import LoadedModel
from phi3.errors import Phi3Error


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
        for c in chunks:
            ids = tokens[c * context:(c + 1) * context]
            if bos is not None:
                ids = [bos] + ids[1:]
            x = torch.tensor([ids], device=lm.model.device)
            logits = lm.model(x)[0, first:-1]
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
