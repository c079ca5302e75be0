"""`phi3 data judge` against a small fake OpenAI-compatible server that scores by a hidden rule:
scores recorded exactly, unparsable answers recorded as such, resumable after the endpoint goes down."""

from __future__ import annotations

import json
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
    def __init__(self) -> None:
        self.requests = 0
        self.down = False
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if judge.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                judge.requests += 1
                extract = re.search(r"<extract>\n(.*)\n</extract>", body["messages"][0]["content"], re.S).group(1)
                answer = {"choices": [{"message": {"role": "assistant", "content": hidden_rule(extract)}}]}
                raw = json.dumps(answer).encode()
                self.send_response(200)
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
    # the endpoint comes back: all 20 are judged, once each
    fake.down = False
    assert main(argv) == 0
    assert fake.requests == 20
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
    # a rerun of a finished stage asks nothing
    assert main(argv) == 0 and fake.requests == 20


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
