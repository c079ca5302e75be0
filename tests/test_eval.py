"""Perplexity: the chunked method against a direct computation with transformers, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from phi3.checkpoint import load
from phi3.eval import perplexity
from tests.conftest import hf_reference, run_cli, save_hf_model, tiny_config
from tests.test_cli import assert_one_line_error

TEXT = ("The quick brown fox jumps over the lazy dog. " * 8 + "Pack my box with five dozen liquor jugs. " * 6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_config("medium")
    hf = hf_reference(cfg)
    folder = save_hf_model(hf, cfg, tmp_path_factory.mktemp("ppl"))
    return hf, folder, load(folder, dtype="float32")


def test_perplexity_matches_transformers(tiny):
    hf, _, lm = tiny
    context = 64
    got = perplexity(lm, TEXT, context=context, progress=False)
    ids = lm.tokenizer.encode(TEXT, add_bos=False)
    n = len(ids) // context
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(n):
            x = torch.tensor([ids[c * context:(c + 1) * context]])
            logp = hf(x).logits[0].log_softmax(-1)
            for j in range(context // 2, context - 1):
                nll -= float(logp[j, x[0, j + 1]])
                count += 1
    assert got.chunks == n and got.tokens_scored == count
    assert got.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_perplexity_cli(tiny, tmp_path):
    _, folder, _ = tiny
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    r = run_cli("perplexity", str(folder), str(text), "--context", "64", "--json", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["context"] == 64 and out["tokens_scored"] > 0 and out["perplexity"] > 1
    assert_one_line_error(run_cli("perplexity", str(folder), str(tmp_path / "missing.txt")), "no such text file")
    (tmp_path / "empty.txt").write_text("  \n")
    assert_one_line_error(run_cli("perplexity", str(folder), str(tmp_path / "empty.txt")), "is empty")
    (tmp_path / "short.txt").write_text("too short")
    assert_one_line_error(run_cli("perplexity", str(folder), str(tmp_path / "short.txt"), "--context", "64"),
                          "needs at least --context 64")
