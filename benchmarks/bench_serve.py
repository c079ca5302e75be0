"""Serving throughput: aggregate tokens/s and time to first token with 1, 4 and 16 concurrent
streaming clients against `phi3 serve` (continuous batching), on the default model.

    python benchmarks/bench_serve.py [--model PATH] [--clients 1 4 16] [--max-tokens 128] [--write BENCHMARKS.md]

Each client sends one chat request (its own prompt, temperature 0, streamed, usage included) at
the same moment; aggregate tokens/s is all completion tokens over the wall time from the first
request sent to the last stream closed. Time to first token is per client, from sending the
request to its first content chunk. Best of --runs runs per concurrency (by aggregate tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

import report

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
START_MARK, END_MARK = "<!-- bench_serve:start -->", "<!-- bench_serve:end -->"
TOPICS = ["a dragon", "the sea", "a robot", "a lost city", "winter", "a clockmaker", "the moon", "a forest",
          "a detective", "a violin", "a lighthouse", "a desert", "a library", "a storm", "a garden", "a train"]


def start_server(model: str | None, port: int, threads: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "phi3.cli", "serve", "--port", str(port), "--threads", str(threads)]
    if model:
        args += ["--model", model]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"phi3 serve exited: {proc.stderr.read()[-2000:]}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("phi3 serve did not start")


def one_client(url: str, model: str, topic: str, max_tokens: int, out: dict, go: threading.Barrier) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    go.wait()
    sent = time.perf_counter()
    first = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    out.update(sent=sent, first=first, done=time.perf_counter(), tokens=tokens)


def run(url: str, model: str, clients: int, max_tokens: int) -> dict:
    results = [dict() for _ in range(clients)]
    go = threading.Barrier(clients)
    threads = [threading.Thread(target=one_client, args=(url, model, TOPICS[i % len(TOPICS)], max_tokens, results[i], go))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = min(r["sent"] for r in results)
    wall = max(r["done"] for r in results) - start
    ttft = [r["first"] - r["sent"] for r in results]
    total = sum(r["tokens"] for r in results)
    return {"clients": clients, "tokens": total, "wall_s": wall, "agg_tok_s": total / wall,
            "per_client_tok_s": statistics.mean(r["tokens"] / (r["done"] - r["first"]) for r in results),
            "ttft_mean_s": statistics.mean(ttft), "ttft_max_s": max(ttft)}


def section(command: str, model: str, rows: list[dict], max_tokens: int, threads: int) -> str:
    lines = [START_MARK, "", "## Serving: concurrent streaming clients", "",
             f"Command: `{command}` · {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{threads} threads · model {model} · each client: a different \"Write a long story about ...\" "
             f"prompt, temperature 0, max_tokens {max_tokens}, streamed · all clients start together", "",
             "| clients | completion tokens | wall s | aggregate tok/s | per-client tok/s | TTFT mean s | TTFT max s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['tokens']} | {r['wall_s']:.2f} | **{r['agg_tok_s']:.1f}** | "
                     f"{r['per_client_tok_s']:.1f} | {r['ttft_mean_s']:.3f} | {r['ttft_max_s']:.3f} |")
    lines += ["", END_MARK]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    report.write_section(path, text, START_MARK, END_MARK)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model path (default: the default model)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--write", type=Path, help="update this markdown file's section")
    args = ap.parse_args(argv)
    proc = start_server(args.model, args.port, args.threads)
    url = f"http://127.0.0.1:{args.port}"
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        run(url, model, 1, 8)  # warm-up
        rows = []
        for n in args.clients:
            best = max((run(url, model, n, args.max_tokens) for _ in range(args.runs)), key=lambda r: r["agg_tok_s"])
            print(json.dumps(best), file=sys.stderr)
            rows.append(best)
    finally:
        proc.terminate()
        proc.wait()
    command = "python benchmarks/bench_serve.py" + (f" --write {args.write}" if args.write else "")
    text = section(command, model, rows, args.max_tokens, args.threads)
    print(text)
    if args.write:
        write_section(args.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
