"""phi3.engine: requests decoded together give each exactly what it gets alone; bounded queue;
cancellation. Transformer.decode_step against the one-sequence forward."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tests.conftest import hf_reference, save_hf_model, tiny_config
from phi3.checkpoint import load
from phi3.engine import Engine, QueueFull, Request, run_alone
from phi3.errors import Phi3Error
from phi3.generate import SamplingParams, generate

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three colors.",
           "Explain what a hash table is in two sentences.", "What is 2+2?", "Tell me a joke."]


@pytest.fixture(scope="module")
def smollm(smollm_gguf):
    return load(smollm_gguf)


def test_decode_step_equals_forward_on_a_dense_model(tmp_path):
    cfg = tiny_config("medium")  # grouped-query heads
    model = load(save_hf_model(hf_reference(cfg), cfg, tmp_path), dtype="float32").model
    seqs = [[1, 5, 9, 2], [7, 3], [4, 4, 4, 4, 4, 4, 8]]
    with torch.inference_mode():
        caches, expect = [], []
        for s in seqs:
            c = model.new_cache(1, 16)
            model(torch.tensor([s[:-1]]), c)
            caches.append(c)
            ref = model.new_cache(1, 16)
            expect.append(model(torch.tensor([s]), ref)[0, -1])
        got = model.decode_step(torch.tensor([s[-1] for s in seqs]), caches)
    for i in range(len(seqs)):
        assert torch.allclose(got[i], expect[i], atol=1e-5)
        assert caches[i].length == len(seqs[i])


def _run_together(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list:
    results: dict[int, object] = {}
    done = threading.Semaphore(0)

    def handler(i: int):
        def on_event(kind: str, value: object) -> None:
            if kind in ("done", "error"):
                results[i] = value
                done.release()
        return on_event

    for i, p in enumerate(prompts):
        engine.submit(Request(p, params, handler(i)))
    for _ in prompts:
        done.acquire()
    return [results[i] for i in range(len(prompts))]


def test_requests_decoded_together_equal_generate_alone(smollm):
    tok = smollm.tokenizer
    ids = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=24)
    alone = [generate(smollm.model, tok, [x], params)[0] for x in ids]
    engine = Engine(smollm.model, tok, max_batch=16).start()
    try:
        together = _run_together(engine, ids * 3, params)  # 18 requests: more rows than PROMPT_ROWS
    finally:
        engine.stop()
    for i, c in enumerate(together):
        a = alone[i % len(ids)]
        assert (c.token_ids, c.text, c.finish_reason) == (a.token_ids, a.text, a.finish_reason)


def test_seeded_sampling_and_stop_strings_are_per_request(smollm):
    tok = smollm.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "Write a poem about rain."}])
    sampled = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=123)
    stopped = SamplingParams(max_new_tokens=40, stop=("rain",))
    alone = [generate(smollm.model, tok, [ids], p)[0] for p in (sampled, stopped)]
    engine = Engine(smollm.model, tok).start()
    try:
        a = run_alone(engine, ids, sampled)
        results = []
        threads = [threading.Thread(target=lambda p=p: results.append((p, run_alone(engine, ids, p))))
                   for p in (sampled, stopped, sampled)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.stop()
    assert a.token_ids == alone[0].token_ids
    for p, c in results:
        expect = alone[0] if p is sampled else alone[1]
        assert (c.text, c.finish_reason) == (expect.text, expect.finish_reason)


def test_bounded_queue_and_cancellation(smollm):
    tok = smollm.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "Tell me a very long story."}])
    long = SamplingParams(max_new_tokens=2000)
    engine = Engine(smollm.model, tok, max_batch=1, max_queue=1).start()
    events: list[tuple[str, object]] = []
    first_text = threading.Event()
    finished = threading.Event()

    def on_event(kind: str, value: object) -> None:
        events.append((kind, value))
        if kind == "text":
            first_text.set()
        if kind in ("done", "error"):
            finished.set()

    try:
        running = Request(ids, long, on_event)
        engine.submit(running)
        assert first_text.wait(30)
        waiting = Request(ids, long, lambda k, v: None)
        engine.submit(waiting)  # the one allowed to wait
        with pytest.raises(QueueFull, match="max queue 1"):
            engine.submit(Request(ids, long, lambda k, v: None))
        waiting.cancel()
        running.cancel()
        assert finished.wait(10)
        kind, completion = events[-1]
        assert kind == "done" and 0 < len(completion.token_ids) < 2000
        # both cancelled requests are gone: a new one runs at once
        assert run_alone(engine, ids, SamplingParams(max_new_tokens=3)).token_ids
        # "done" is delivered inside the worker's step, just before it drops the request from its
        # running list: wait for that step to end rather than race it.
        deadline = time.monotonic() + 30
        while engine.counts() != {"running": 0, "waiting": 0} and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.counts() == {"running": 0, "waiting": 0}
        with pytest.raises(Phi3Error, match="exceeds the model's context"):
            engine.submit(Request(ids, SamplingParams(max_new_tokens=10 ** 6), lambda k, v: None))
    finally:
        engine.stop()


def test_a_shared_prefix_is_copied_not_recomputed_and_changes_nothing(smollm_gguf):
    """Requests that begin with a Prefix start from its keys and values (what phi3 eval does for
    few-shot prompts); with exact float activations (as phi3 eval runs) their logits equal a full
    prefill's to float rounding, their greedy text too; a prompt that does not begin with the
    prefix ignores it."""
    from phi3.engine import Prefix
    smollm = load(smollm_gguf, exact=True)
    tok = smollm.tokenizer
    shots = tok.encode("Q: What is 1+1?\nA: 2\n\nQ: What is 2+3?\nA: 5\n\nQ: What is 4+4?\nA: 8\n\n")
    prompts = [shots + tok.encode(f"Q: What is {a}+{b}?\nA:") for a, b in ((3, 4), (6, 1), (9, 9))]
    other = tok.encode("Name three colors.")
    prefix = Prefix.build(smollm.model, shots)
    with torch.inference_mode():
        cache = smollm.model.new_cache(1, 64)
        prefix.fill(cache, prompts[0])
        assert cache.length == len(shots)
        fast = smollm.model(torch.tensor([prompts[0][len(shots):]]), cache, last_only=True)[0, -1]
        full = smollm.model(torch.tensor([prompts[0]]), last_only=True)[0, -1]
        assert torch.allclose(fast, full, atol=1e-3)
        untouched = smollm.model.new_cache(1, 64)
        prefix.fill(untouched, other)
        assert untouched.length == 0
    params = SamplingParams(max_new_tokens=8)
    engine = Engine(smollm.model, tok, max_batch=4)
    results: dict[int, object] = {}
    for i, p in enumerate(prompts[:2] + [other]):
        engine.submit(Request(p, params, lambda kind, value, i=i: results.__setitem__(i, value)
                              if kind in ("done", "error") else None, prefix=prefix))
    engine.run_until_idle()  # the evaluator's way: submit everything, drain in this thread
    for i, p in enumerate(prompts[:2] + [other]):
        assert results[i].token_ids == generate(smollm.model, tok, [p], params)[0].token_ids


class _Gate:
    """Stands in for a Prefix: holds the engine inside a request's prefill until released, so a
    test can look at the engine while a request is being prefilled (no timing involved)."""

    def __init__(self) -> None:
        self.entered, self.release = threading.Event(), threading.Event()

    def fill(self, cache, prompt) -> None:
        self.entered.set()
        assert self.release.wait(60)


def test_a_request_in_prefill_counts_as_running_and_the_burst_bound_is_batch_plus_queue(smollm):
    """Issue 14 item 10: with max_batch 2 and max_queue 2 a burst gets 4 requests in, not 3, and
    the one being prefilled shows as running (it was in neither count)."""
    tok = smollm.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "Name three colors."}])
    params = SamplingParams(max_new_tokens=2)
    idle = Engine(smollm.model, tok, max_batch=2, max_queue=2)  # not started: nothing leaves the queue
    for _ in range(4):
        idle.submit(Request(ids, params, lambda k, v: None))
    assert idle.counts() == {"running": 0, "waiting": 4}
    with pytest.raises(QueueFull, match="max queue 2"):
        idle.submit(Request(ids, params, lambda k, v: None))

    engine = Engine(smollm.model, tok, max_batch=2, max_queue=2).start()
    gate = _Gate()
    done = threading.Semaphore(0)
    finished = lambda k, v: done.release() if k in ("done", "error") else None  # noqa: E731
    try:
        engine.submit(Request(ids, params, finished, prefix=gate))
        assert gate.entered.wait(60)
        assert engine.counts() == {"running": 1, "waiting": 0}  # in prefill: it holds a slot
        for _ in range(3):
            engine.submit(Request(ids, params, finished))
        with pytest.raises(QueueFull):
            engine.submit(Request(ids, params, finished))
        assert engine.counts() == {"running": 1, "waiting": 3}
        gate.release.set()
        for _ in range(4):
            assert done.acquire(timeout=60)
    finally:
        gate.release.set()
        engine.stop()


def test_logprobs_are_the_log_softmax_of_the_raw_logits_and_cost_nothing_when_off(tmp_path):
    """Each generated token's logprob and its top-k equal log_softmax of the model's own logits at
    that position (a one-sequence forward over prompt + tokens so far), greedy and sampled alike:
    temperature and top-p change which token is drawn, not the reported numbers (OpenAI's and
    vLLM's convention). Without `logprobs` no such event is sent."""
    import json

    from phi3.engine import TokenLogprobs
    from phi3.model import Transformer
    from phi3.tokenizer import load_tokenizer
    from tests.conftest import tiny_tokenizer_json
    cfg = tiny_config("medium")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()  # random weights: no transformers import (4 CPU-s) needed here
    (tmp_path / "tokenizer.json").write_text(tiny_tokenizer_json(cfg.vocab_size))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tokenizer = load_tokenizer(tmp_path)
    engine = Engine(model, tokenizer).start()
    prompt = [1, 5, 9, 2, 7]

    def run(params: SamplingParams, logprobs: int | None) -> tuple[object, list]:
        events: list = []
        done = threading.Event()

        def on_event(kind: str, value: object) -> None:
            events.append((kind, value))
            if kind in ("done", "error"):
                done.set()
        engine.submit(Request(prompt, params, on_event, stop_ids=set(), logprobs=logprobs))
        done.wait()
        return events[-1][1], [v for k, v in events if k == "logprobs"]

    try:
        for params in (SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, temperature=1.7, top_p=0.9, seed=3)):
            completion, entries = run(params, 5)
            assert [e.token_id for e in entries] == completion.token_ids and len(entries) == 6
            assert all(isinstance(e, TokenLogprobs) and len(e.top) == 5 for e in entries)
            with torch.inference_mode():
                logits = model(torch.tensor([prompt + completion.token_ids[:-1]]), model.new_cache(1, 16))[0]
            expect = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1:]
            assert float(expect.max(dim=-1).values.min()) < -0.5  # not a degenerate one-token model
            for e, row in zip(entries, expect):
                assert e.logprob == pytest.approx(float(row[e.token_id]), abs=1e-5)
                values, ids = row.topk(5)
                assert [i for i, _ in e.top] == ids.tolist()
                assert [lp for _, lp in e.top] == pytest.approx(values.tolist(), abs=1e-5)
            if params.temperature == 0:
                assert all(e.top[0][0] == e.token_id for e in entries)  # greedy: the chosen token is the top one
        completion0, entries0 = run(SamplingParams(max_new_tokens=3), 0)
        assert [e.top for e in entries0] == [[], [], []] and len(entries0) == 3
        completion_off, entries_off = run(SamplingParams(max_new_tokens=3), None)
        assert entries_off == [] and completion_off.token_ids == completion0.token_ids
        with pytest.raises(Phi3Error, match="top logprobs must be in 0..20"):
            engine.submit(Request(prompt, SamplingParams(), lambda k, v: None, logprobs=21))
    finally:
        engine.stop()
