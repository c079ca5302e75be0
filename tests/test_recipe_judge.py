"""`phi3 data judge` against a small fake OpenAI-compatible server that scores by a hidden rule:
scores recorded exactly, unparsable answers recorded as such, resumable after the endpoint goes down."""

from __future__ import annotations

import gzip
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="`phi3 data` needs datatrove: pip install -e '.[data]'")

import phi3.judge as J  # noqa: E402
from phi3.recipe.cli import main  # noqa: E402
from phi3.recipe.judge import PROMPT, parse_score, sample_ids  # noqa: E402

DATA = Path(__file__).parent / "data" / "recipe"


def hidden_rule(extract: str) -> str:
    """4 for text that talks about classes, 1 otherwise; no score at all for text about exceptions."""
    if "exception" in extract.lower():
        return "This page is hard to judge."
    return f"Some justification.\nEducational score: {4 if 'class' in extract.lower() else 1}"


class FakeJudge:
    """`rule(extract)` -> the answer's text. With `logprobs_rule(extract)` -> [(token, probability)]
    (likeliest first), a request with logprobs: true gets that as the first reply token's top
    alternatives, the likeliest chosen; `refuse_prefill` answers continue_final_message with a 400;
    `whole`: the rules get the whole prompt, not only the extract."""

    def __init__(self, rule=hidden_rule, logprobs_rule=None, refuse_prefill: bool = False, whole: bool = False) -> None:
        self.requests = 0
        self.down = False
        self.down_after: int | None = None  # answer this many, then 503
        self.bodies: list[dict] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if judge.down or (judge.down_after is not None and judge.requests >= judge.down_after):
                    self.send_response(503)
                    self.end_headers()
                    return
                judge.requests += 1
                judge.bodies.append(body)
                content = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]  # after any few-shot turns
                found = re.search(r"<extract>\n(.*)\n</extract>", content, re.S)
                extract = content if whole or not found else found.group(1)  # whole: the rule sees the question too
                answer = {"choices": [{"message": {"role": "assistant", "content": rule(extract)}}]}
                status = 200
                if logprobs_rule is not None and body.get("logprobs"):
                    top = [{"token": t, "logprob": math.log(q), "bytes": list(t.encode())} for t, q in logprobs_rule(extract)]
                    answer = {"choices": [{"message": {"role": "assistant", "content": top[0]["token"]}, "logprobs": {
                        "content": [{**top[0], "top_logprobs": top[:body.get("top_logprobs", 0)]}]}}]}
                    if refuse_prefill and body.get("continue_final_message"):
                        status, answer = 400, {"error": {"message": "continue_final_message: unknown parameter"}}
                raw = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(J, "RETRY_BACKOFF_S", 0.001)
    server = FakeJudge()
    yield server
    server.server.shutdown()


def documents(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    docs = {}
    for p in sorted((DATA / "python-tutorial").glob("*.rst.txt")):
        for i, part in enumerate(re.split(r"\n(?=[^\n]+\n[=\-*~^]{3,}\n)", p.read_text())):
            if len(part.split()) >= 50:
                docs[f"{p.name.split('.')[0]}-{i}"] = part
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()))
    return path, docs


def test_scores_parsed_exactly():
    assert parse_score("blah\nEducational score: 3") == 3
    assert parse_score("Educational score: **5**") == 5
    assert parse_score("Educational score: 2\n...\nEducational score: 4") == 4  # the last one
    assert parse_score("Educational score: 7") is None and parse_score("no score") is None
    assert parse_score("Educational score: 2.5") is None
    assert "{document}" in PROMPT and "sports results" in PROMPT
    # what small judges answer to the brief prompt (SmolLM2-135M in make data-demo)
    assert parse_score("The educational value of the extract is 0.") == 0
    assert parse_score("4") == 4 and parse_score(" 3/5.") == 3
    assert parse_score("The educational value of the extract is:\n\nThe educational") is None
    assert parse_score("educational value is 2.5") is None and parse_score("12") is None


def test_brief_prompt_and_shorter_extracts_for_small_judges(tmp_path):
    from phi3.recipe.judge import PROMPT_BRIEF
    server = FakeJudge(rule=lambda extract: f"The educational value of the extract is {len(extract) % 6}.")
    try:
        src, docs = documents(tmp_path)
        out = tmp_path / "judge"
        assert main(["judge", str(src), "--out", str(out), "--url", server.url, "--model", "fake", "--sample", "5",
                     "--prompt", "brief", "--max-chars", "200", "--max-tokens", "12", "--scoring", "text",
                     "--no-progress"]) == 0
    finally:
        server.server.shutdown()
    records = [json.loads(line) for line in (out / "judgments.jsonl").open()]
    assert [r["score"] for r in records] == [min(200, len(docs[r["id"]])) % 6 for r in records]
    assert all(r["chars_cut"] == max(0, len(docs[r["id"]]) - 200) for r in records)
    assert all(b["max_tokens"] == 12 and b["messages"][0]["content"].startswith(PROMPT_BRIEF.split("\n")[0])
               for b in server.bodies)
    assert json.loads((out / "summary.json").read_text())["prompt"] == "brief"


def test_judge_records_every_score_and_resumes_after_the_endpoint_goes_down(fake, tmp_path, capsys):
    src, docs = documents(tmp_path)
    out = tmp_path / "judge"
    argv = ["judge", str(src), "--out", str(out), "--url", fake.url, "--model", "fake", "--sample", "20",
            "--no-progress"]
    fake.down = True
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "HTTP 503" in err and "0 of 20 judged" in err
    assert not out.exists()
    # the endpoint comes back: all 20 are judged, once each, after one request that finds it gives
    # no logprobs (the fake answers without them): scored from the text, with a one-line note
    fake.down = False
    assert main(argv) == 0
    assert fake.requests == 21 and fake.bodies[0]["logprobs"] is True and "logprobs" not in fake.bodies[1]
    err = capsys.readouterr().err
    assert "gives no token log-probabilities (its answer holds no choices[0].logprobs.content); scoring from the " \
           "answer's text instead" in err
    records = [json.loads(line) for line in (out / "judgments.jsonl").open()]
    chosen = sample_ids(list(docs), 20, 0)
    assert sorted(r["id"] for r in records) == sorted(chosen)
    for r in records:
        text = docs[r["id"]][:3000]
        if "exception" in text.lower():
            assert r["score"] is None and r["unparsable"] and r["answer"] == "This page is hard to judge."
        else:
            assert r["score"] == (4 if "class" in text.lower() else 1) and not r["unparsable"]
    assert {r["score"] for r in records} == {1, 4, None}  # the sample holds all three cases
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sample"] == 20 and sum(summary["histogram"].values()) + summary["unparsable"] == 20
    assert summary["scoring"] == "text" and all(r["scoring"] == "text" for r in records)
    # a rerun of a finished stage asks nothing
    assert main(argv) == 0 and fake.requests == 21


def test_killed_judge_rerun_judges_only_what_is_missing(fake, tmp_path):
    src, docs = documents(tmp_path)
    out = tmp_path / "judge"
    argv = ["judge", str(src), "--out", str(out), "--url", fake.url, "--model", "fake", "--sample", "10",
            "--no-progress"]
    assert main(argv) == 0
    whole = sorted((out / "judgments.jsonl").read_text().splitlines())
    # as if killed after 6 judgments, the 7th cut off mid-line
    lines = (out / "judgments.jsonl").read_text().splitlines()
    partial = tmp_path / "judge.partial"
    out.rename(partial)
    (partial / "summary.json").unlink()
    (partial / "judgments.jsonl").write_text("\n".join(lines[:6]) + "\n" + lines[6][:40])
    fake.requests = 0
    assert main(argv) == 0
    assert fake.requests == 4
    assert sorted((out / "judgments.jsonl").read_text().splitlines()) == whole


def long_paragraphs(texts: list[str], sep: str) -> list[str]:
    return [p for t in texts for p in t.split(sep) if len(p.split()) >= 20]


def static_embedder(folder: Path) -> Path:
    """A model2vec static model over Phi-3's vocabulary with seeded random 256-d vectors: a stand-in
    for a distilled MiniLM that needs nothing downloaded (a real one separates topics better still)."""
    import numpy as np
    from model2vec import StaticModel

    from tests.conftest import need_assets
    from phi3.train.recipe import load_tokenizer_spec
    tok, _ = load_tokenizer_spec(str(need_assets() / "vocab" / "ggml-vocab-phi-3.gguf"))
    vectors = np.random.default_rng(0).standard_normal((tok.tk.get_vocab_size(), 256)).astype(np.float32)
    StaticModel(vectors=vectors, tokenizer=tok.tk, normalize=True).save_pretrained(str(folder))
    return folder


def test_fractional_thresholds_compare_the_classifiers_score_whole_ones_fineweb_edus_int_score():
    from datatrove.data import Document

    from phi3.recipe.phases import ScoreFilter, threshold
    assert threshold(3.0) == 3 and isinstance(threshold(3.0), int) and threshold(2.85) == 2.85
    doc = Document(text="x", id="a", metadata={"edu_score": 2.6, "edu_int_score": 3})
    assert ScoreFilter(3).filter(doc) is True  # FineWeb-Edu: the rounded score
    assert ScoreFilter(2.85).filter(doc) == (False, "below_2.85") and ScoreFilter(2.6).filter(doc) is True


def test_classifier_learns_the_judges_hidden_rule_then_phases_feed_phi3_train(monkeypatch, tmp_path, capsys):
    """Done-when 2: the judge scores Python-tutorial paragraphs 4 and Debian-handbook paragraphs 1 (a
    rule it does not state); the head trained on its labels reaches F1 >= 0.8 on held-out documents.
    Then the phases stage splits the scored documents by threshold, the report describes them, and
    `phi3 train pretrain` trains on the two phases (Done-when 5); one test, since judging and
    classifying once is most of its cost."""
    pytest.importorskip("model2vec", reason="the edu classifier needs model2vec: pip install -e '.[data]'")
    pytest.importorskip("sklearn", reason="the edu classifier needs scikit-learn: pip install -e '.[data]'")
    monkeypatch.setattr(J, "RETRY_BACKOFF_S", 0.001)
    py = long_paragraphs([f.read_text() for f in sorted((DATA / "python-tutorial").glob("*.rst.txt"))], "\n\n")
    handbook_dir = tmp_path / "hb"
    assert main(["ingest", str(DATA / "handbook"), "--out", str(handbook_dir)]) == 0
    hb = long_paragraphs([d["text"] for f in sorted((handbook_dir / "docs").glob("*.gz"))
                          for d in map(json.loads, gzip.open(f, "rt"))], "\n")
    assert (len(py), len(hb)) == (277, 70)  # handbook paragraphs in 4 languages
    tutorial = set(py)
    server = FakeJudge(rule=lambda text: f"Hidden reasons.\nEducational score: {4 if text in tutorial else 1}")
    try:
        docs = [{"id": f"py-{i}", "text": t} for i, t in enumerate(py)] + \
               [{"id": f"hb-{i}", "text": t} for i, t in enumerate(hb)]
        src = tmp_path / "docs.jsonl"
        src.write_text("".join(json.dumps(d) + "\n" for d in docs))
        assert main(["judge", str(src), "--out", str(tmp_path / "judge"), "--url", server.url, "--model", "fake",
                     "--sample", "200", "--no-progress"]) == 0
    finally:
        server.server.shutdown()
    emb = static_embedder(tmp_path / "emb")
    out = tmp_path / "scored"
    assert main(["classify", str(src), "--judgments", str(tmp_path / "judge"), "--embedder", str(emb),
                 "--out", str(out)]) == 0
    head = json.loads((out / "head.json").read_text())
    assert head["heldout"] == 40 and head["train"] == 160
    assert head["heldout_f1"] >= 0.8, head["heldout_f1"]  # measured: 0.95 (P 1.0, R 0.91; the issue asks 0.8)
    judged = {json.loads(line)["id"] for line in (tmp_path / "judge" / "judgments.jsonl").open()}
    assert set(head["heldout_ids"]) <= judged
    # every document scored, the held-out ones too; FineWeb-Edu's int_score from the regression output
    scored = {}
    for f in sorted((out / "docs").glob("*.gz")):
        scored.update({d["id"]: d["metadata"] for d in map(json.loads, gzip.open(f, "rt"))})
    assert len(scored) == len(docs)
    assert all(m["edu_int_score"] == int(round(min(5, max(0, m["edu_score"])))) for m in scored.values())
    right = sum((m["edu_int_score"] >= 3) == i.startswith("py-") for i, m in scored.items())
    assert right / len(scored) >= 0.9
    s = json.loads((out / "summary.json").read_text())
    assert sum(s["histogram"].values()) == len(docs) and s["heldout_f1"] == head["heldout_f1"]

    # phases (stage 6): phase 1 = score >= 1 (everything), phase 2 = score >= 3 plus synthetic text
    import tomllib

    from phi3.train.data import open_documents
    from phi3.train.recipe import load_tokenizer_spec
    from tests.conftest import need_assets
    vocab = str(need_assets() / "vocab" / "ggml-vocab-phi-3.gguf")
    syn = tmp_path / "synthetic.jsonl"
    answers = [json.loads(line)["answer"] for line in (DATA / "benchmarks" / "gsm8k" / "train.jsonl").open()]
    syn.write_text("".join(json.dumps({"id": f"syn-{i}", "text": a}) + "\n" for i, a in enumerate(answers)))
    phases = tmp_path / "phases"
    top = max(int(k) for k, v in s["histogram"].items() if v)
    assert main(["phases", str(out), "--out", str(phases), "--t1", "1", "--t2", str(top + 1), "--tokenizer", vocab]) == 2
    assert not phases.exists() and not (tmp_path / "phases.partial").exists()
    # a fractional threshold compares edu_score itself: one above the highest score leaves nothing
    highest = max(m["edu_score"] for m in scored.values())
    assert main(["phases", str(out), "--out", str(phases), "--t1", "1", "--t2", str(round(highest + 0.01, 3)),
                 "--tokenizer", vocab]) == 2
    assert f"highest edu_score {highest:.3f}" in capsys.readouterr().err and not phases.exists()
    assert main(["phases", str(out), "--out", str(phases), "--t1", "1", "--t2", "3", "--synthetic", str(syn),
                 "--tokenizer", vocab]) == 0
    tok, _ = load_tokenizer_spec(vocab)
    mixture = tomllib.loads((phases / "mixture.toml").read_text())["phases"]
    assert [p["name"] for p in mixture] == ["phase1", "phase2"]
    n_docs = {p["path"]: len(open_documents(p["path"], tok)) for m in mixture for p in m["sources"]}
    high = sum(m["edu_int_score"] >= 3 for m in scored.values())
    assert sorted(n_docs.values()) == sorted([sum(m["edu_int_score"] >= 1 for m in scored.values()), high, 5])
    ps = json.loads((phases / "summary.json").read_text())
    # the report: histograms PNG, held-out metrics, examples either side of each threshold
    assert main(["report", str(tmp_path / "judge"), str(out), str(phases), "--out", str(tmp_path / "DATA.md")]) == 0
    page = (tmp_path / "DATA.md").read_text()
    assert f"F1 {head['heldout_f1']:.3f}" in page and "### threshold 3:" in page and "![score histograms](DATA.png)" in page
    assert (tmp_path / "DATA.png").read_bytes()[:4] == b"\x89PNG"
    for m in mixture:  # tokens per phase: what the shards hold
        on_disk = sum(f.stat().st_size // 2 for src in m["sources"] for f in Path(src["path"]).glob("*.ds"))
        assert m["tokens"] == on_disk == sum(v for k, v in ps["tokens"].items() if k.startswith(m["name"]))

    # Done-when 5: `phi3 train pretrain` runs a tiny model on the two phases (256-token budgets here)
    from phi3.train.trainer import main as train_main
    recipe = tmp_path / "pretrain.toml"
    recipe.write_text(f'''stage = "pretrain"
model = "phi-3-mini:layers=1,hidden=64,heads=2,intermediate=128,vocab=32064,context=64"
tokenizer = "{vocab}"
out = "{tmp_path / 'run'}"
seq_len = 64
micro_batch_size = 2
global_batch_size = 2
save_every = 0
[optim]
lr = 1e-3
warmup_steps = 1
''' + re.sub(r"tokens = \d+", "tokens = 256", (phases / "mixture.toml").read_text()))
    assert train_main(["pretrain", "--recipe", str(recipe), "--no-progress"]) == 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [s["phase"] for s in steps] == ["phase1", "phase1", "phase2", "phase2"]
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_synthetic_generations_keep_provenance_resume_and_drop_duplicates(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(J, "RETRY_BACKOFF_S", 0.001)

    def writer(prompt: str) -> str:
        topic = re.search(r'"([^"]+)"', prompt).group(1)
        if topic == "the same thing":  # every seed of this topic gets the same text: duplicates
            return "A passage that the model writes whatever it is asked."
        return f"A worked passage about {topic}.\nStep 1: think. Step 2: answer {prompt}"

    server = FakeJudge(rule=writer)
    topics = tmp_path / "topics.txt"
    topics.write_text("fractions\nphotosynthesis\nthe same thing\n")
    out = tmp_path / "syn"
    argv = ["synthetic", "--out", str(out), "--url", server.url, "--model", "fake", "--topics", str(topics),
            "--audiences", "children,students", "--n", "12", "--temperature", "0.7", "--seed", "3",
            "--batch", "4", "--no-progress"]
    try:
        server.down_after = 5  # the endpoint goes away mid-run: 4 kept (one whole batch), one line, exit 2
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "HTTP 503" in err and "4 of 12 generated" in err
        assert not out.exists()
        server.down, server.down_after = False, None
        asked = server.requests
        assert main(argv) == 0
        assert server.requests - asked == 8  # only the missing ones
    finally:
        server.server.shutdown()
    assert {b["temperature"] for b in server.bodies} == {0.7}
    records = [json.loads(line) for line in (out / "generations.jsonl").open()]
    assert len(records) == 12 and len({r["key"] for r in records}) == 12
    seeds = {(r["seed"]["topic"], r["seed"]["audience"], r["seed"]["style"]) for r in records}
    assert len(seeds) == 12  # 3 topics x 2 audiences x 2 styles, all of them
    with gzip.open(out / "docs" / "synthetic.jsonl.gz", "rt") as f:
        docs = [json.loads(line) for line in f]
    same = [r for r in records if r["seed"]["topic"] == "the same thing"]
    assert len(docs) == 12 - len(same) + 1  # one copy of the duplicated text kept
    d = docs[0]["metadata"]
    assert set(d) == {"source", "seed", "prompt", "model", "params"}
    assert d["model"] == "fake" and d["params"] == {"temperature": 0.7, "max_tokens": 1024}
    assert d["prompt"] == next(r["prompt"] for r in records if r["seed"] == d["seed"])
    s = json.loads((out / "summary.json").read_text())
    assert s["removed"]["exact_duplicate"]["dropped"] == len(same) - 1



def test_endpoint_answering_junk_is_one_line(fake, tmp_path, capsys):
    src, _ = documents(tmp_path)

    class Junk(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>not an API</html>")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Junk)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert main(["judge", str(src), "--out", str(tmp_path / "j"), "--url", f"http://127.0.0.1:{server.server_port}/v1",
                     "--model", "m", "--sample", "3", "--no-progress"]) == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not an OpenAI chat completion" in err and "0 of 3 judged" in err
    assert not (tmp_path / "j").exists()


def test_scores_from_logprobs_exactly():
    """G-Eval: the expected digit under P(0..5) renormalised, at the first reply token that is a
    digit, else the first whose alternatives hold one; no digit at all is recorded, never raised."""
    from phi3.recipe.judge import score_from_logprobs

    def tok(token, p, top=()):
        return {"token": token, "logprob": math.log(p), "top_logprobs": [{"token": t, "logprob": math.log(q)} for t, q in top]}

    r = score_from_logprobs([tok("4", 0.5, [("4", 0.5), (" 4", 0.1), ("2", 0.2), ("The", 0.1), ("9", 0.05)])])
    assert r["distribution"] == {"0": 0.0, "1": 0.0, "2": 0.25, "3": 0.0, "4": 0.75, "5": 0.0}
    assert r["score"] == 3.5 and r["argmax"] == 4 and r["digit_mass"] == 0.8 and r["position"] == 0
    assert r["digit_chosen"] and not r["unparsable"]
    # the chosen digit wins over an earlier token whose alternatives merely hold digits
    r = score_from_logprobs([tok(" ", 0.9, [(" ", 0.9), ("1", 0.05)]), tok("3", 0.6, [("3", 0.6), ("5", 0.2)])])
    assert (r["position"], r["score"], r["argmax"]) == (1, 3.5, 3)
    r = score_from_logprobs([tok("The", 0.6, [("The", 0.6), ("0", 0.1), ("2", 0.1)])])
    assert (r["position"], r["score"], r["digit_chosen"]) == (0, 1.0, False)
    for content, reason in (([tok("Hi", 0.9, [("Hi", 0.9), ("7", 0.1)])], "no digit 0-5"), ([], "no tokens"),
                            (None, "no tokens")):
        r = score_from_logprobs(content)
        assert r["score"] is None and r["unparsable"] and reason in r["reason"]
    assert score_from_logprobs([tok("2", 1.0)])["score"] == 2.0  # top_logprobs 0: the chosen token alone


def graded(extract: str) -> list[tuple[str, float]]:
    """A judge unsure of itself: P(1) highest everywhere, more weight on 4 and 5 for classes."""
    if "exception" in extract.lower():
        return [("The", 0.7), ("This", 0.2)]
    if "class" in extract.lower():
        return [("1", 0.3), ("4", 0.25), ("5", 0.2), ("The", 0.15), ("0", 0.1)]
    return [("1", 0.6), ("0", 0.2), ("2", 0.1), ("The", 0.1)]


@pytest.mark.parametrize("refuse_prefill", [False, True])
def test_judge_scores_from_logprobs_by_default_with_a_prefill_where_the_endpoint_takes_one(
        monkeypatch, tmp_path, refuse_prefill):
    from phi3.recipe.judge import DIGIT_ASK, PREFILL
    monkeypatch.setattr(J, "RETRY_BACKOFF_S", 0.001)
    server = FakeJudge(logprobs_rule=graded, refuse_prefill=refuse_prefill)
    try:
        src, docs = documents(tmp_path)
        out = tmp_path / "judge"
        assert main(["judge", str(src), "--out", str(out), "--url", server.url, "--model", "fake", "--sample", "12",
                     "--no-progress"]) == 0
    finally:
        server.server.shutdown()
    body = server.bodies[-1]
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["max_tokens"] == 4
    assert body["messages"][0]["content"].endswith(DIGIT_ASK)
    if refuse_prefill:  # two probes (with the prefill: refused; without), then no prefill
        assert server.requests == 12 + 2 and "continue_final_message" not in body and len(body["messages"]) == 1
    else:
        assert server.requests == 12 + 1 and body["continue_final_message"] is True
        assert body["messages"][1] == {"role": "assistant", "content": PREFILL}
    records = {r["id"]: r for r in map(json.loads, (out / "judgments.jsonl").open())}
    for i, r in records.items():
        text = docs[i][:3000].lower()
        assert r["scoring"] == "logprobs" and r["prefill"] == (None if refuse_prefill else PREFILL)
        if "exception" in text:
            assert r["score"] is None and r["unparsable"] and "no digit 0-5" in r["reason"]
        elif "class" in text:
            assert r["score"] == pytest.approx((0.3 + 4 * 0.25 + 5 * 0.2) / 0.85, abs=1e-4) and r["argmax"] == 1
            assert r["digit_mass"] == 0.85 and r["distribution"]["4"] == round(0.25 / 0.85, 4)
        else:
            assert r["score"] == pytest.approx((0.6 + 0.2) / 0.9, abs=1e-4) and r["argmax"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scoring"] == "logprobs" and summary["sample"] == 12
    assert {r["score"] is None for r in records.values()} == {True, False}  # the sample holds unparsable ones too
    assert summary["histogram"]["3"] == sum(1 for r in records.values() if r["score"] and r["score"] > 2.5)


def yes_no_rule(prompt: str) -> list[tuple[str, float]]:
    """A yes/no judge: says yes to everything more often for classes (its bias), and only the
    contrast with the second question shows whether a page teaches."""
    if "exception" in prompt.lower():
        return [("The", 0.7), ("This", 0.2)]
    cls, contra = "class" in prompt.split("</extract>")[0].lower(), "only a log" in prompt
    table = {(True, False): [(" Yes", 0.6), ("No", 0.1), (" No", 0.1)], (True, True): [(" No", 0.7), ("yes", 0.1)],
             (False, False): [(" Yes", 0.7), (" No", 0.2)], (False, True): [(" Yes", 0.8), (" No", 0.1)]}
    return table[cls, contra]


def test_yes_no_methods_with_few_shot_read_p_yes_per_question_and_combine_them_exactly(monkeypatch, tmp_path):
    from phi3.recipe.judge import CONTRA, QUESTION, SHOT_HIGH, SHOT_LOW, YES_PREFILL, yes_from_text, yes_no_score
    monkeypatch.setattr(J, "RETRY_BACKOFF_S", 0.001)
    server = FakeJudge(logprobs_rule=yes_no_rule, whole=True)
    try:
        src, docs = documents(tmp_path)
        out = tmp_path / "judge"
        assert main(["judge", str(src), "--out", str(out), "--url", server.url, "--model", "fake", "--sample", "8",
                     "--method", "contrast", "--shots", "2", "--ask", "both", "--max-chars", "1500", "--no-progress"]) == 0
    finally:
        server.server.shutdown()
    assert server.requests == 1 + 8 * 2  # the probe, then both questions for every document
    body = server.bodies[-1]  # two answered examples (few-shot), the page, the prefill
    assert body["max_tokens"] == 1 and body["messages"][5] == {"role": "assistant", "content": YES_PREFILL}
    assert SHOT_HIGH in body["messages"][0]["content"] and SHOT_LOW in body["messages"][2]["content"]
    asked = {b["messages"][4]["content"].split("</extract>\n\n")[1]: (b["messages"][1]["content"], b["messages"][3]["content"])
             for b in server.bodies[1:]}  # the examples' answers flip for the contrast's negative question
    assert asked == {f"{QUESTION} Answer Yes or No.": ("Answer: Yes", "Answer: No"),
                     f"{CONTRA} Answer Yes or No.": ("Answer: No", "Answer: Yes")}
    assert {b["messages"][4]["content"].split("\n\n<extract>")[0] for b in server.bodies[1:]} == {QUESTION, CONTRA}  # ask both
    records = {r["id"]: r for r in map(json.loads, (out / "judgments.jsonl").open())}
    for i, r in records.items():
        text = docs[i][:1500].lower()
        assert r["method"] == "contrast" and r["scoring"] == "logprobs" and len(r["answer"]) == 2
        if "exception" in text:
            assert r["score"] is None and r["unparsable"] and "neither yes nor no" in r["reason"]
        elif "class" in text:  # 2.5 + 2.5 (3/4 - 1/8): yes to teaching, no to "only a log" (" No" and "No" added)
            assert r["p_yes"] == [0.75, 0.125] and r["mass"] == [0.8, 0.8] and r["score"] == 4.0625
        else:  # yes to both questions: the contrast cancels the bias, below the middle
            assert r["score"] == pytest.approx(2.5 + 2.5 * (0.7 / 0.9 - 0.8 / 0.9), abs=1e-3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "contrast" and summary["shots"] == 2 and summary["ask"] == "both"
    assert summary["questions"] == [QUESTION, CONTRA]
    assert 0 < summary["expected_score"]["mean_answer_mass"] <= 1 and "argmax_histogram" not in summary
    assert {r["score"] is None for r in records.values()} == {True, False}
    # additive: a point per criterion, P(yes) each; text mode reads the answer's first word
    assert yes_no_score("additive", [1, 0.5, 0.25, 0, 0]) == 1.75 and yes_no_score("additive", [1, None, 0, 0, 0]) is None
    assert yes_no_score("yesno", [0.3]) == 1.5 and yes_no_score("contrast", [0, 1]) == 0.0
    assert [yes_from_text(a)["p"] for a in ("Yes.", "Answer: no", " NO, it is a log", "Maybe")] == [1.0, 0.0, 0.0, None]
