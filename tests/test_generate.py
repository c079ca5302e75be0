"""Sampling, stop handling, streaming and context checks (tiny random model, byte-level tokenizer)."""

from __future__ import annotations

import pytest
import torch

from phi3.checkpoint import load
from phi3.errors import Phi3Error
from phi3.generate import SamplingParams, Sampler, _overlap, generate, stream
from tests.conftest import hf_reference, save_hf_model, tiny_config


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    cfg = tiny_config("medium")
    return load(save_hf_model(hf_reference(cfg), cfg, tmp_path_factory.mktemp("gen")), dtype="float32")


def ids_of(lm, params, prompt="Once upon a time"):
    return generate(lm.model, lm.tokenizer, [lm.tokenizer.encode(prompt)], params, stop_ids=set())[0].token_ids


def test_greedy_is_deterministic_and_top_k_1_is_greedy(lm):
    greedy = ids_of(lm, SamplingParams(max_new_tokens=20))
    assert greedy == ids_of(lm, SamplingParams(max_new_tokens=20))
    assert greedy == ids_of(lm, SamplingParams(max_new_tokens=20, temperature=1.0, top_k=1, seed=3))
    assert greedy == ids_of(lm, SamplingParams(max_new_tokens=20, temperature=0.7, top_p=1e-6, seed=4))


def test_seed_reproduces_sampling(lm):
    a = ids_of(lm, SamplingParams(max_new_tokens=30, temperature=1.5, seed=11))
    b = ids_of(lm, SamplingParams(max_new_tokens=30, temperature=1.5, seed=11))
    c = ids_of(lm, SamplingParams(max_new_tokens=30, temperature=1.5, seed=12))
    assert a == b and a != c


def test_sampler_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    top2 = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=0))
    assert {int(top2(logits, None)) for _ in range(200)} == {0, 1}
    probs = logits.softmax(-1)[0]  # ~[0.64, 0.24, 0.09, 0.03, 0.01]
    nucleus = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=0))
    assert {int(nucleus(logits, None)) for _ in range(300)} == {0, 1}
    assert probs[0] < 0.8 < probs[0] + probs[1]
    penalised = Sampler(SamplingParams(repetition_penalty=100.0))
    assert int(penalised(logits, torch.tensor([[0]]))) == 1  # the seen token is pushed down


def test_max_tokens_and_finish_reason(lm):
    out = generate(lm.model, lm.tokenizer, [lm.tokenizer.encode("abc")], SamplingParams(max_new_tokens=7),
                   stop_ids=set())[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length" and out.prompt_tokens == 3
    first = out.token_ids[2]
    stopped = generate(lm.model, lm.tokenizer, [lm.tokenizer.encode("abc")], SamplingParams(max_new_tokens=7),
                       stop_ids={first})[0]
    assert stopped.token_ids == out.token_ids[:2] and stopped.finish_reason == "stop"


def test_stop_strings_are_cut_and_never_streamed(lm):
    full = generate(lm.model, lm.tokenizer, [lm.tokenizer.encode("Hello")], SamplingParams(max_new_tokens=24),
                    stop_ids=set())[0].text
    stop = full[5:8]
    assert len(stop) == 3
    s = stream(lm.model, lm.tokenizer, lm.tokenizer.encode("Hello"),
               SamplingParams(max_new_tokens=24, stop=[stop]), stop_ids=set())
    pieces = list(s)
    assert "".join(pieces) == full[: full.index(stop)]
    assert s.completion.finish_reason == "stop"


def test_overlap_holds_back_possible_stop_prefix():
    assert _overlap("abc<|e", "<|end|>") == 3
    assert _overlap("abc", "<|end|>") == 0


def test_stream_equals_generate(lm):
    params = SamplingParams(max_new_tokens=16)
    ids = lm.tokenizer.encode("stream me")
    s = stream(lm.model, lm.tokenizer, ids, params, stop_ids=set())
    text = "".join(s)
    assert text == generate(lm.model, lm.tokenizer, [ids], params, stop_ids=set())[0].text == s.completion.text


def test_context_overflow_is_an_error_not_a_cut(lm):
    ctx = lm.config.max_position_embeddings
    with pytest.raises(Phi3Error, match=f"exceeds the model's context of {ctx}"):
        generate(lm.model, lm.tokenizer, [[1] * (ctx - 5)], SamplingParams(max_new_tokens=6))
    generate(lm.model, lm.tokenizer, [[1] * (ctx - 5)], SamplingParams(max_new_tokens=5))  # fits exactly
    with pytest.raises(Phi3Error, match="empty prompt"):
        stream(lm.model, lm.tokenizer, [], SamplingParams())
