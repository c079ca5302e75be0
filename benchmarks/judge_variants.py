"""Which way of asking lets a 135M judge tell educational pages from low-value ones? (issue 16, stage 4)

`make data-demo`'s judge (SmolLM2-135M-Instruct, the G-Eval digit after "Educational score: ")
ranked the demo's sources backwards: manpages 2.99, changelogs 2.95, python-docs 2.89, handbook
2.72; AUC of docs against changelogs + dictionary 0.36. This script scores one fixed, stratified
sample of the demo's ingested pages with several ways of asking, every one an LLM judgment of
educational value on 0-5 read from the endpoint's token log-probabilities, and prints per variant
the AUC of docs (python-docs + English handbook) against low value (changelogs + gcide), the mean
score by source, and the server's CPU seconds.

The sample: from WORK/run/ingest (before the heuristics, which leave the judge only 8 low-value
pages), the pages with the smallest sha1(seed, id) of each source, English handbook pages only.
Each judgment is appended to OUT/variants.jsonl (phi3.judge's records), so a rerun only asks what
is missing. The judge is any OpenAI-compatible endpoint returning logprobs; by default one
`phi3 serve --threads 1` started here (and stopped at the end).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_variants.py [--per-source 10] [--variants a,b]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from phi3.judge import Endpoint, append_record, read_records  # noqa: E402
from phi3.recipe import judge as RJ  # noqa: E402

SOURCES = {"docs.python.org": "python-docs", "debian-handbook.info": "debian-handbook", "gcide.gnu.org.ua": "gcide",
           "manpages.debian.org": "manpages", "metadata.ftp-master.debian.org": "changelogs",
           "sources.debian.org": "changelogs"}
HIGH, LOW = ("python-docs", "debian-handbook"), ("changelogs", "gcide")

# Few-shot examples from neither side of the demo (no Python, Debian, changelog or dictionary text),
# so that they teach the scale, not the sources.
SHOT_HIGH, SHOT_LOW = RJ.SHOT_HIGH, RJ.SHOT_LOW  # the recipe's few-shot examples (`--shots 2`)
QUESTION, CONTRA, CRITERIA = RJ.QUESTION, RJ.CONTRA, RJ.CRITERIA  # the recipe's yes/no methods' questions


def yes_no(question: str, chars: int, sandwich: bool = False, shots: bool = False, positive: bool = True):
    """A yes/no variant: the question after the page (and before it too when `sandwich`), prefill
    "Answer:"; score = 5 P(yes) / (P(yes) + P(no))."""
    def ask(text: str) -> list[dict]:  # the recipe's own prompt (`phi3 data judge --method yesno --ask both ...`)
        return RJ.yes_no_messages(text, question, chars, 2 if shots else 0, positive, "both" if sandwich else "end")[0]
    return ask


def digit(chars: int, shots: bool = False):
    """The recipe's G-Eval digit (brief rubric, prefill "Educational score: "), with few-shot turns."""
    def ask(text: str) -> list[dict]:
        return RJ.messages(text, chars, "brief", "logprobs", 2 if shots else 0)[0]
    return ask


def pairwise(doc_first: bool, chars: int, reference: str = SHOT_LOW):
    """The page against a fixed reference page (the few-shot's sports results), in one order; reader
    "ab" reads P(the page's letter) / (P(A) + P(B)). Both orders average out the position bias."""
    def ask(text: str) -> list[dict]:
        a, b = (text[:chars], reference) if doc_first else (reference, text[:chars])
        return [{"role": "user", "content": f"Page A:\n<extract>\n{a}\n</extract>\n\nPage B:\n<extract>\n{b}\n"
                 "</extract>\n\nWhich page would teach a student more, A or B? Answer A or B."}]
    return ask


# name -> list of (part, ask, prefill, reader); the score combines the parts (see score()). A part is
# one request per page, named so that variants asking the same thing share it (contrast's "yes").
VARIANTS = {
    "digit": [("digit", digit(1000), RJ.PREFILL, "digit")],
    "yesno": [("yes", yes_no(QUESTION, 1000), "Answer:", "yes")],
    "contrast": [("yes", yes_no(QUESTION, 1000), "Answer:", "yes"), ("contra", yes_no(CONTRA, 1000), "Answer:", "yes")],
    "yesno-fewshot": [("yes-fewshot", yes_no(QUESTION, 1000, shots=True), "Answer:", "yes")],
    "digit-fewshot": [("digit-fewshot", digit(1000, shots=True), RJ.PREFILL, "digit")],
    "additive": [(f"c{i}", yes_no(q, 1000), "Answer:", "yes") for i, q in enumerate(CRITERIA)],
    "yesno-short": [("yes-short", yes_no(QUESTION, 500), "Answer:", "yes")],
    "yesno-sandwich": [("yes-sandwich", yes_no(QUESTION, 1000, sandwich=True), "Answer:", "yes")],
    "digit-short": [("digit-short", digit(500), RJ.PREFILL, "digit")],
    "contrast-fewshot": [("yes-fewshot", yes_no(QUESTION, 1000, shots=True), "Answer:", "yes"),
                         ("contra-fewshot", yes_no(CONTRA, 1000, shots=True, positive=False), "Answer:", "yes")],
    "additive-fewshot": [(f"c{i}-fewshot", yes_no(q, 1000, shots=True), "Answer:", "yes") for i, q in enumerate(CRITERIA)],
    "yesno-fewshot-short": [("yes-fewshot-short", yes_no(QUESTION, 500, shots=True), "Answer:", "yes")],
    "yesno-sandwich-fewshot": [("yes-sandwich-fewshot", yes_no(QUESTION, 1000, sandwich=True, shots=True), "Answer:", "yes")],
    "contrast-sandwich": [("yes-sandwich", yes_no(QUESTION, 1000, sandwich=True), "Answer:", "yes"),
                          ("contra-sandwich", yes_no(CONTRA, 1000, sandwich=True), "Answer:", "yes")],
    "pairwise": [("pair-first", pairwise(True, 1000), "Answer:", "a"), ("pair-second", pairwise(False, 1000), "Answer:", "b")],
}


def letter(content: list[dict] | None, mine: str) -> dict:
    """P(mine) / (P(A) + P(B)) at the first reply token (" A", "a", ... added together)."""
    top = (content or [{}])[0].get("top_logprobs") or []
    p = {"a": 0.0, "b": 0.0}
    for t in top:
        w = t["token"].strip().lower()
        if w in p:
            p[w] += math.exp(t["logprob"])
    mass = p["a"] + p["b"]
    return {"p": p[mine] / mass if mass > 0 else None, "mass": mass}


def score(name: str, parts: dict[str, float | None]) -> float | None:
    if any(v is None for v in parts.values()):
        return None
    if name == "pairwise":  # P(the page beats the sports results), averaged over both orders
        return 2.5 * (parts["pair-first"] + parts["pair-second"])
    method = name.split("-")[0]
    if method in RJ.YES_NO:  # the recipe's score: offset + sum(weight * P(yes)) (contrast: 2.5 + 2.5 (yes - contra))
        return RJ.yes_no_score(method, list(parts.values()))
    (part, value), = parts.items()
    return value if part.startswith("digit") else 5 * value


def sample(ingest: Path, per_source: int, seed: int) -> list[dict]:
    docs = RJ.read_documents(*_docs_input(ingest))
    by: dict[str, list[dict]] = {}
    for i, d in docs.items():
        url = d.get("metadata", {}).get("url") or ""
        src = SOURCES.get(re.sub(r"^https?://([^/]+)/.*$", r"\1", url))
        if src and not (src == "debian-handbook" and "/en-US/" not in url):
            by.setdefault(src, []).append({"id": i, "source": src, "url": url, "text": d["text"]})
    key = lambda d: hashlib.sha1(f"{seed}\x00{d['id']}".encode()).digest()  # noqa: E731
    # round-robin over the sources: a variant stopped halfway has judged them all alike
    chosen = [sorted(by[src], key=key)[:per_source] for src in sorted(by)]
    return [group[i] for i in range(per_source) for group in chosen if i < len(group)]


def _docs_input(ingest: Path) -> tuple[str, str | None]:
    return str(ingest / "docs"), "**/*.jsonl.gz"


def auc(pos: list[float], neg: list[float]) -> float:
    """P(a docs page scores above a low-value page), ties half: the Mann-Whitney AUC."""
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def auc_interval(pos: list[float], neg: list[float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """The AUC's 95 % bootstrap interval (pages resampled within each side): how much 20 against 20
    pages can say."""
    import random
    rng = random.Random(seed)
    values = sorted(auc(rng.choices(pos, k=len(pos)), rng.choices(neg, k=len(neg))) for _ in range(n))
    return round(values[int(0.025 * n)], 2), round(values[int(0.975 * n) - 1], 2)


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="~/.cache/phi3/data-demo", help="make data-demo's folder (its run/ingest is read)")
    ap.add_argument("--out", default="~/.cache/phi3/judge-variants")
    ap.add_argument("--per-source", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--table-only", action="store_true", help="only what OUT/variants.jsonl already holds; ask nothing")
    ap.add_argument("--url", help="an endpoint serving the judge as 'smollm2' (default: start phi3 serve --threads 1)")
    ap.add_argument("--server-pid", type=int, help="that endpoint's process, for its CPU seconds")
    ap.add_argument("--port", type=int, default=18732)
    args = ap.parse_args()
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    docs = sample(Path(args.work).expanduser() / "run" / "ingest", args.per_source, args.seed)
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"judge_variants: unknown variant {unknown[0]!r}; variants are {', '.join(VARIANTS)}")
    server, url, pid = None, args.url or ("http://127.0.0.1:1/v1" if args.table_only else None), args.server_pid
    if not url:
        server = subprocess.Popen([str(Path(sys.executable).parent / "phi3"), "serve", "--port", str(args.port),
                                   "--name", "smollm2", "--threads", "1"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        url, pid = f"http://127.0.0.1:{args.port}/v1", server.pid
        import urllib.request
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/v1/models", timeout=2)
                break
            except OSError:
                time.sleep(1)
    endpoint = Endpoint(url, "smollm2", max_tokens=1)
    path = out / "variants.jsonl"
    try:
        from tqdm import tqdm
        done = {(r["part"], r["id"]): r for r in read_records(path)}
        rows = []
        for name in names:
            if args.table_only and any((p, d["id"]) not in done for d in docs for p, *_ in VARIANTS[name]):
                continue
            for d in tqdm(docs, desc=name, file=sys.stderr):
                for part, ask, prefill, reader in VARIANTS[name]:
                    if (part, d["id"]) in done:
                        continue
                    c1 = cpu_of(pid) if pid else 0.0
                    r = endpoint.chat_logprobs(ask(d["text"]), RJ.TOP_LOGPROBS, max_tokens=1, prefill=prefill)
                    c2 = cpu_of(pid) if pid else None
                    got = (RJ.yes_from_logprobs(r.logprobs) if reader == "yes" else letter(r.logprobs, reader)
                           if reader in "ab" else
                           {"p": (g := RJ.score_from_logprobs(r.logprobs))["score"], "mass": g.get("digit_mass", 0.0)})
                    value, mass = got["p"], got["mass"]
                    rec = {"part": part, "id": d["id"], "source": d["source"], "value": value,
                           "mass": round(mass, 4), "answer": r.text,
                           "server_cpu_s": round(c2 - c1, 2) if c2 is not None else None}
                    append_record(path, rec)
                    done[(part, d["id"])] = rec
            cpus = [done[(p, d["id"])].get("server_cpu_s") for d in docs for p, *_ in VARIANTS[name]]
            scores = {d["id"]: score(name, {p: done[(p, d["id"])]["value"] for p, *_ in VARIANTS[name]})
                      for d in docs}
            by: dict[str, list[float]] = {}
            for d in docs:
                if scores[d["id"]] is not None:
                    by.setdefault(d["source"], []).append(scores[d["id"]])
            hi = [x for s in HIGH for x in by.get(s, [])]
            lo = [x for s in LOW for x in by.get(s, [])]
            mass = [done[(p, d["id"])]["mass"] for d in docs for p, *_ in VARIANTS[name]]
            rows.append({"variant": name, "auc": round(auc(hi, lo), 3) if hi and lo else None,
                         "auc_95": auc_interval(hi, lo) if hi and lo else None,
                         **{f"auc_vs_{s}": round(auc(hi, by[s]), 3) for s in LOW if hi and by.get(s)},
                         "means": {s: round(sum(v) / len(v), 2) for s, v in sorted(by.items())},
                         "unscored": sum(1 for v in scores.values() if v is None),
                         "mean_mass": round(sum(mass) / len(mass), 3),
                         "server_cpu_s_per_doc": round(sum(cpus) / len(docs), 2) if None not in cpus else None,
                         "requests_per_doc": len(VARIANTS[name])})
            print(json.dumps(rows[-1]), flush=True)
        srcs = sorted({s for r in rows for s in r["means"]})
        print(f"\n{len(docs)} documents ({args.per_source} per source, seed {args.seed}); AUC = docs "
              f"({' + '.join(HIGH)}) above low value ({' + '.join(LOW)})\n")
        table = ["| variant | requests per doc | AUC (95 % bootstrap) | " + " | ".join(f"AUC vs {s}" for s in LOW) + " | "
                 + " | ".join(srcs) + " | answer mass | server CPU s/doc |",
                 "|---|---|---|" + "---|" * (len(LOW) + len(srcs)) + "---|---|"]
        for r in rows:
            table.append(f"| {r['variant']} | {r['requests_per_doc']} | {r['auc']} ({r['auc_95'][0]}-{r['auc_95'][1]}) | "
                         + " | ".join(str(r.get(f"auc_vs_{s}", "")) for s in LOW) + " | "
                         + " | ".join(f"{r['means'].get(s, float('nan')):.2f}" for s in srcs)
                         + f" | {r['mean_mass']} | {'' if r['server_cpu_s_per_doc'] is None else r['server_cpu_s_per_doc']} |")
        print("\n".join(table))
        for name, text in (("summary.json", json.dumps(rows, indent=1)), ("table.md", "\n".join(table) + "\n")):
            (out / (name + ".tmp")).write_text(text)
            os.replace(out / (name + ".tmp"), out / name)
    finally:
        if server:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()


if __name__ == "__main__":
    main()
