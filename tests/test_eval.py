"""Perplexity (the chunked method against a direct computation with transformers, and the CLI), and
`phi3 eval` on the real SmolLM2: shared-context scoring equals scoring each answer alone, results
do not depend on --batch-size, interrupted runs resume from their records, outputs are written,
and generation and code tasks go end to end. Parity with lm-evaluation-harness on a small sample
is in test_eval_parity.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from phi3 import tasks as T
from phi3.checkpoint import load
from phi3.errors import Phi3Error
from phi3.eval import perplexity
from tests.conftest import BENCHDATA, ROOT, hf_reference, run_cli, save_hf_model, tiny_config
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


# --- benchmarks ---

ARC = ROOT / "tests" / "data" / "arc_phi3" / "ARC-Phi3-Test.jsonl"


@pytest.fixture(scope="module")
def lm(smollm_gguf):
    return load(str(smollm_gguf), exact=True)


def test_the_arc_layout_set_kept_with_the_tests():
    data = T.load_task(T.TASKS["arc_challenge"], ROOT, [], ARC)
    assert len(data.examples) >= 200 and len(data.shots) >= 10
    assert len({e.id for e in data.examples}) == len(data.examples)


def test_packed_scoring_equals_scoring_each_answer_alone(lm):
    from phi3.eval import LoglikelihoodScorer, encode_pair
    data = T.load_task(T.TASKS["arc_challenge"], ROOT, [], ARC)
    pairs = [encode_pair(lm.tokenizer, c, x) for ex in data.examples[:3] for c, x in T.requests(ex, data, 3)]
    scorer = LoglikelihoodScorer(lm.model)
    with torch.inference_mode():
        packed = scorer.score(pairs[:5]) + scorer.score(pairs[5:])  # the second reuses the cached shots
        for (ctx, cont), (ll, greedy) in zip(pairs, packed):
            logits = lm.model(torch.tensor([ctx + cont]))[0, len(ctx) - 1:-1]
            alone = torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum()
            assert ll == pytest.approx(float(alone), abs=2e-4)
            assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())
    assert scorer.cached == pairs[5][0][:len(scorer.cached)] and len(scorer.cached) > 50


def test_winogrande_style_pairs_share_only_what_they_share(lm):
    """Two contexts and one continuation each (WinoGrande): a pack of contexts that fork."""
    from phi3.eval import LoglikelihoodScorer
    tok = lm.tokenizer
    a, b = tok.encode("The trophy did not fit in the case because the trophy"), tok.encode("Paris is in France")
    cont = tok.encode(" was too big.")
    scorer = LoglikelihoodScorer(lm.model)
    with torch.inference_mode():
        got = scorer.score([(a, cont), (b, cont), (a, cont[:1])])
        for (ctx, c), (ll, _) in zip([(a, cont), (b, cont), (a, cont[:1])], got):
            logits = lm.model(torch.tensor([ctx + c]))[0, len(ctx) - 1:-1]
            assert ll == pytest.approx(float(torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None]).sum()),
                                       abs=2e-4)


def test_scores_do_not_depend_on_batch_size_and_runs_resume(lm, tmp_path):
    from phi3.eval import EvalSettings, evaluate_task
    task = T.TASKS["arc_challenge"]
    one = evaluate_task(lm, task, [], ARC, ROOT, EvalSettings(limit=12, batch_size=1), tmp_path / "a", "m", False)
    many = evaluate_task(lm, task, [], ARC, ROOT, EvalSettings(limit=12, batch_size=8), tmp_path / "b", "m", False)
    assert one.metrics == many.metrics and one.n == 12
    recs_a = [json.loads(x) for x in (tmp_path / "a/arc_challenge-ARC-Phi3-Test.jsonl").read_text().splitlines()[1:]]
    recs_b = [json.loads(x) for x in (tmp_path / "b/arc_challenge-ARC-Phi3-Test.jsonl").read_text().splitlines()[1:]]
    for x, y in zip(recs_a, recs_b):
        assert x["lls"] == pytest.approx(y["lls"], abs=2e-4)
    # An interrupted run: the last record cut in half. Resuming recomputes only what is missing.
    path = tmp_path / "a/arc_challenge-ARC-Phi3-Test.jsonl"
    text = path.read_text()
    path.write_text(text[:-40])
    more = evaluate_task(lm, task, [], ARC, ROOT, EvalSettings(limit=15, batch_size=4), tmp_path / "a", "m", False)
    lines = path.read_text().splitlines()
    assert len(lines) == 1 + 12 + 4  # header, 12 old (one broken), the broken one again and 3 new
    assert more.n == 15
    with pytest.raises(Phi3Error, match="holds records made with other settings"):
        evaluate_task(lm, task, [], ARC, ROOT, EvalSettings(limit=3, shots=2), tmp_path / "a", "m", False)


def test_fast_runs_record_their_float16_cache_and_do_not_reuse_exact_records(lm, smollm_gguf, tmp_path):
    from phi3.eval import EvalSettings, evaluate_task
    task = T.TASKS["arc_challenge"]
    evaluate_task(lm, task, [], ARC, ROOT, EvalSettings(limit=2), tmp_path, "m", False)
    path = tmp_path / "arc_challenge-ARC-Phi3-Test.jsonl"
    assert "kv_cache" not in json.loads(path.read_text().splitlines()[0])["settings"]
    fast = load(str(smollm_gguf))
    assert fast.model.kv_dtype == torch.float16
    with pytest.raises(Phi3Error, match=r"int8_activations: False -> True, kv_cache: None -> 'torch.float16'"):
        evaluate_task(fast, task, [], ARC, ROOT, EvalSettings(limit=2), tmp_path, "m", False)
    evaluate_task(fast, task, [], ARC, ROOT, EvalSettings(limit=2), tmp_path / "fast", "m", False)
    header = json.loads((tmp_path / "fast" / path.name).read_text().splitlines()[0])["settings"]
    assert header["kv_cache"] == "torch.float16" and header["int8_activations"] is True


@pytest.mark.skipif(not (BENCHDATA / "gsm8k").is_dir(), reason="../shared/benchdata is absent")
def test_cli_runs_choice_and_generation_tasks_and_writes_every_output(smollm_gguf, tmp_path):
    out = tmp_path / "res.json"
    r = run_cli("eval", "--model", str(smollm_gguf), "--tasks", f"arc_challenge={ARC},gsm8k,bbh:navigate",
                "--data-dir", str(BENCHDATA), "--limit", "2", "--max-tokens", "48", "--output", str(out),
                "--threads", "2")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert set(doc["tasks"]) == {"arc_challenge=ARC-Phi3-Test", "gsm8k", "bbh:navigate"}
    arc = doc["tasks"]["arc_challenge=ARC-Phi3-Test"]
    assert arc["n"] == 2 and arc["shots"] == 10 and set(arc["metrics"]) == {"acc", "acc_norm"}
    assert set(arc["metrics"]["acc"]) == {"value", "stderr"}
    assert doc["tasks"]["gsm8k"]["shots"] == 8 and "exact_match" in doc["tasks"]["gsm8k"]["metrics"]
    assert doc["tasks"]["bbh:navigate"]["groups"]["navigate"]["n"] == 2
    table = out.with_suffix(".md").read_text()
    assert "| ARC-Challenge (ARC-Phi3-Test.jsonl) | 10 | 2 | acc_norm |" in table and "| GSM-8K | 8 | 2 | exact_match |" in table
    assert table in r.stdout
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gsm = [json.loads(x) for x in (out.with_suffix(".records") / "gsm8k.jsonl").read_text().splitlines()]
    assert gsm[0]["settings"]["shots"] == 8 and len(gsm) == 3
    for rec in gsm[1:]:
        assert rec["answer"] == T.last_number(rec["completion"]) and "Question:" not in rec["completion"]
    assert "ex/s" in r.stderr  # the progress bar
    # A second run reuses every record: nothing to compute, same results.
    again = run_cli("eval", "--model", str(smollm_gguf), "--tasks", f"arc_challenge={ARC},gsm8k,bbh:navigate",
                    "--data-dir", str(BENCHDATA), "--limit", "2", "--max-tokens", "48", "--output", str(out))
    assert again.returncode == 0 and json.loads(out.read_text())["tasks"]["gsm8k"]["metrics"] == \
        doc["tasks"]["gsm8k"]["metrics"]
    assert len((out.with_suffix(".records") / "gsm8k.jsonl").read_text().splitlines()) == 3


@pytest.mark.skipif(not (BENCHDATA / "humaneval").is_dir(), reason="../shared/benchdata is absent")
def test_code_task_runs_completions_in_the_sandbox(lm, tmp_path):
    from phi3.eval import EvalSettings, evaluate_task
    res = evaluate_task(lm, T.TASKS["humaneval"], [], None, BENCHDATA,
                        EvalSettings(limit=2, max_tokens=64, timeout_s=5), tmp_path, "m", False)
    recs = {}
    for line in (tmp_path / "humaneval.jsonl").read_text().splitlines()[1:]:
        rec = json.loads(line)
        recs.setdefault(rec["id"], {}).update(rec)
    assert res.n == 2 and set(res.metrics) == {"pass@1"}
    for rec in recs.values():
        assert rec["status"] in ("passed", "failed", "timeout", "memory") and "completion" in rec
    assert res.metrics["pass@1"]["value"] == sum(r["passed"] for r in recs.values()) / 2
    # The result names the sandbox layers that held (SECURITY.md): here, the kernel's.
    from phi3 import sandbox
    assert res.sandbox == sandbox.active_layers()
    if "user-ns" in res.sandbox:
        assert {"private-root", "pid-ns", "seccomp"} <= set(res.sandbox)
    from phi3.eval import write_outputs
    write_outputs(tmp_path / "out.json", "m", EvalSettings(limit=2), [res])
    assert json.loads((tmp_path / "out.json").read_text())["tasks"]["humaneval"]["sandbox"] == list(res.sandbox)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    cases = [
        (["eval"], "no tasks given"),
        (["eval", "--tasks", "nope"], "unknown task 'nope'"),
        (["eval", "--tasks", "gsm8k", "--data-dir", str(tmp_path)], "no folder"),
        (["eval", "--tasks", f"arc_challenge={tmp_path / 'x.jsonl'}"], "x.jsonl: no such file"),
        (["eval", "--tasks", "gsm8k", "--limit", "0", "--data-dir", str(BENCHDATA)], "--limit must be at least 1"),
        (["eval", "--tasks", "gsm8k", "--batch-size", "0", "--data-dir", str(BENCHDATA)], "--batch-size must be"),
    ]
    for args, message in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    listed = run_cli("eval", "--list-tasks")
    assert listed.returncode == 0 and "gsm8k" in listed.stdout and "github.com/openai/grade-school-math" in listed.stdout


@pytest.mark.parametrize("kind", ["mini-128k", "mini-4k"])
def test_packed_scoring_with_longrope_and_a_sliding_window(kind, tmp_path):
    """LongRoPE (original context 32 here) and a sliding window (7 here): pairs on both sides of
    the boundary, scored in one call, each equal to its own full forward."""
    from phi3.eval import LoglikelihoodScorer, _score_in_pieces
    cfg = tiny_config(kind)
    model = load(save_hf_model(hf_reference(cfg), cfg, tmp_path), dtype="float32").model
    g = torch.Generator().manual_seed(0)
    shots = torch.randint(0, 250, (20,), generator=g).tolist()
    pairs = []
    for extra, cont in ((3, 4), (9, 3), (14, 2), (2, 1)):  # 20+extra+cont-1 tokens: 26, 31, 35, 22
        ctx = shots + torch.randint(0, 250, (extra,), generator=g).tolist()
        pairs.append((ctx, torch.randint(0, 250, (cont,), generator=g).tolist()))
    scorer = LoglikelihoodScorer(model)
    with torch.inference_mode():
        got = _score_in_pieces(scorer, pairs)
        for (ctx, cont), (ll, _) in zip(pairs, got):
            logits = model(torch.tensor([ctx + cont]))[0, len(ctx) - 1:-1]
            alone = torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None]).sum()
            assert ll == pytest.approx(float(alone), abs=1e-4)


# --- hostile data: oversized records fail with one line, before any model work ---

def _arc_file(path, stems: list[str]):
    """An ARC-layout file of one record per question stem (ids t0, t1, ...)."""
    choices = [{"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}]
    path.write_text("".join(json.dumps({"id": f"t{i}", "question": {"stem": s, "choices": choices}, "answerKey": "B"})
                            + "\n" for i, s in enumerate(stems)))
    return path


def test_prompts_too_long_for_the_context_fail_before_any_scoring(tiny, tmp_path, monkeypatch):
    """The tiny model's context is 128 tokens (its byte-level tokenizer: about one a character)."""
    from phi3.eval import EvalSettings, evaluate_task
    lm = tiny[2]
    task = T.TASKS["arc_challenge"]
    longest = []
    encode = lm.tokenizer.encode
    monkeypatch.setattr(lm.tokenizer, "encode", lambda text, *a, **k: longest.append(len(text)) or encode(text, *a, **k))
    tail = " Which one?"
    cases = [  # (questions, --shots, the error's size, its fix)
        (["Is ice a gas?", "q" * 400], 0, "its prompt is 422 tokens", "shorten or remove this record"),
        (["Is ice a gas?", "q" * 20_000], 0, "its prompt is 20,024 characters", "shorten or remove this record"),
        ([f"Question number {i} of many.{tail * 3}" for i in range(6)], 3, "its prompt with 3 shots is",
         "lower --shots (now 3)"),
    ]
    for n, (stems, shots, size, fix) in enumerate(cases):
        path = _arc_file(tmp_path / f"ARC-{n}-Test.jsonl", stems)
        longest.clear()
        with pytest.raises(Phi3Error) as e:
            evaluate_task(lm, task, [], path, ROOT, EvalSettings(shots=shots, limit=2), tmp_path / f"r{n}", "m", False)
        message = str(e.value)
        assert message.startswith(f"{path}: record ") and f"(id t" in message and size in message, message
        assert message.endswith(f", more than the 128 tokens the model's context leaves for it; {fix}"), message
        records = (tmp_path / f"r{n}" / f"arc_challenge-ARC-{n}-Test.jsonl").read_text().splitlines()
        assert len(records) == 1  # the settings line only: nothing was scored
        assert max(longest, default=0) < 2000  # the 20,000-character prompt never reached the tokenizer
    # Generation: the room is the context less --max-tokens.
    d = tmp_path / "data"
    rows = [{"question": f"Tom has {i} apples and buys two more apples. How many apples does he have?",
             "answer": f"#### {i + 2}"} for i in range(4)]
    (d / "gsm8k").mkdir(parents=True)
    (d / "gsm8k/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (d / "gsm8k/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(Phi3Error, match=r"gsm8k/test.jsonl: record 1: its prompt with 2 shots is \d+ tokens, more than "
                                        r"the 112 tokens the model's context leaves for it; lower --shots \(now 2\) "
                                        r"or --max-tokens \(now 16\)$"):
        evaluate_task(lm, T.TASKS["gsm8k"], [], None, d, EvalSettings(shots=2, limit=2, max_tokens=16),
                      tmp_path / "g", "m", False)


# The CLI in a fresh process, then its peak RSS in MB: VmHWM, which starts afresh at exec (ru_maxrss
# would carry over the forking pytest's own).
MEASURE_RSS = ("import re, sys\nfrom phi3.cli import main\nrc = main(sys.argv[1:])\n"
               "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) // 1024)\n"
               "sys.exit(rc)\n")


def test_cli_oversized_records_are_one_line_and_exit_2_with_memory_bounded(tiny, tmp_path):
    """Through `phi3 eval`, at the real bounds: a line over 64 MiB, a record over 16 Mi characters
    (a line that once made the tokenizer panic), and a prompt over the model's context. Each: one
    line naming file and record, exit 2; the first two before the model loads, with the process's
    peak RSS within ~350 MB of an idle `import phi3.cli` (~230 MB)."""
    import subprocess
    import sys
    _, folder, _ = tiny
    cases = [
        ("q" * (64 * 2**20), ["line 2 is longer than 64 MiB", "remove or shorten that line"]),
        ("q" * 17_000_000, ["record 2 (id t1): 17,000,024 characters, more than any model's context holds",
                            "shorten or remove this record"]),
        ("q" * 400, ["record 2 (id t1): its prompt is 422 tokens, more than the 128 tokens the model's context "
                     "leaves for it; shorten or remove this record"]),
    ]
    for n, (stem, fragments) in enumerate(cases):
        path = _arc_file(tmp_path / f"ARC-{n}-Test.jsonl", ["Is ice a gas?", stem])
        del stem
        out = tmp_path / f"res{n}.json"
        r = subprocess.run([sys.executable, "-c", MEASURE_RSS, "eval", "--model", str(folder), "--tasks",
                            f"arc_challenge={path}", "--limit", "2", "--shots", "0", "--output", str(out)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        # (Lines about building the CPU kernels, when a test is their first use, are not errors.)
        r.stderr = "".join(line for line in r.stderr.splitlines(True) if not line.startswith("phi3: compiling"))
        assert_one_line_error(r, str(path), *fragments)
        if n < 2:  # measured: 355 MB for the 64 MiB line, 276 MB for the 17 M-character record
            assert int(r.stdout.split()[-1]) < 600, r.stdout  # MB
        path.unlink()
    records = out.with_suffix(".records") / "arc_challenge-ARC-2-Test.jsonl"
    assert len(records.read_text().splitlines()) == 1  # nothing scored


def test_a_model_retrained_in_place_does_not_resume_the_old_records(lm, tmp_path):
    # `phi3 train` writes final/ under the same name (often the same size) on every run: the weights files'
    # size and mtime are in the records header, so the old records are refused, with the fix, not reused.
    import dataclasses
    import os
    from phi3.eval import EvalSettings, evaluate_task, weights_fingerprint
    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    (folder / "config.json").write_text("{}")
    assert weights_fingerprint(folder) == [["model.safetensors", 10, (folder / "model.safetensors").stat().st_mtime_ns]]
    assert weights_fingerprint(folder / "model.safetensors") == weights_fingerprint(folder)
    here = dataclasses.replace(lm, path=folder)
    task = T.TASKS["arc_challenge"]
    evaluate_task(here, task, [], ARC, ROOT, EvalSettings(limit=1), tmp_path / "r", "final", False)
    evaluate_task(here, task, [], ARC, ROOT, EvalSettings(limit=1), tmp_path / "r", "final", False)  # resumes
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(Phi3Error, match="weights_files"):
        evaluate_task(here, task, [], ARC, ROOT, EvalSettings(limit=1), tmp_path / "r", "final", False)
