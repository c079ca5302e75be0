"""A stand-in judge for the data-quality experiment when no real judge has labelled the corpus: an
OpenAI-compatible server that scores each extract by the SOURCE of the page it comes from (its URL,
looked up from the documents `phi3 data judge` reads), not by reading it. It is an oracle for
"which site is educational", so phases built on its labels are an upper bound on what a real
judge + classifier would give; EXPERIMENTS.md says which judge labelled each result.

    .venv/bin/python recipes/experiment/standin_judge.py DOCS_FOLDER --port 18799 &
    phi3 data judge DOCS_FOLDER --out OUT --url http://127.0.0.1:18799/v1 --model standin --sample 1000

Scores: Python tutorial and howto 4, Python library and the English handbook 3, man pages 2,
dictionary entries 1, changelogs and licences 0, anything else 1.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def score_of(url: str) -> int:
    if re.search(r"docs\.python\.org/3\.11/(tutorial|howto)/", url):
        return 4
    if "docs.python.org" in url or "debian-handbook.info/browse/en-US" in url:
        return 3
    if "manpages.debian.org" in url:
        return 2
    if "changelogs" in url or "sources.debian.org" in url:
        return 0
    return 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("docs", help="a stage's folder (its docs/*.jsonl.gz) or a docs folder")
    ap.add_argument("--port", type=int, default=18799)
    args = ap.parse_args()
    folder = Path(args.docs)
    folder = folder / "docs" if (folder / "docs").is_dir() else folder
    by_text = {}
    for f in sorted(folder.glob("*.jsonl.gz")):
        for line in gzip.open(f, "rt"):
            d = json.loads(line)
            by_text[" ".join(d["text"].split())[:300]] = d.get("metadata", {}).get("url", "")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a) -> None:
            pass

        def do_GET(self) -> None:  # /v1/models
            self._send({"data": [{"id": "standin"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            content = body["messages"][-1]["content"]
            found = re.search(r"<extract>\n(.*)\n</extract>", content, re.S)
            extract = " ".join((found.group(1) if found else content).split())[:300]
            url = next((u for t, u in by_text.items() if t[:200] == extract[:200]), "")
            self._send({"choices": [{"index": 0, "message": {"role": "assistant",
                                                             "content": f"Educational score: {score_of(url)}"}}]})

        def _send(self, obj: dict) -> None:
            raw = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    print(f"standin judge: {len(by_text)} documents, http://127.0.0.1:{args.port}/v1", flush=True)
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
