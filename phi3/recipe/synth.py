"""synthetic: textbook-style passages and exercises with worked solutions, generated through an
OpenAI-compatible endpoint (issue 16, stage 7).

Seeds are topic x audience x style, as phi-1 ("textbooks", constrained topics and audiences) and
Cosmopedia (style templates x seed topics x audiences) make them; every seed is one prompt, and the
seed list is fixed by --seed (a seeded shuffle of the product, the first --n taken), so a rerun asks
for the same things. Requests go out --batch at a time (a server such as `phi3 serve` batches them),
at --temperature. Each generation is appended to OUT.partial/generations.jsonl as it arrives with
its provenance: the seed (topic, audience, style), the prompt, the model and the sampling
parameters; a rerun generates only the seeds not yet there. Exact duplicates among the generations
(same normalized text) are dropped; near-duplicates, among themselves and against the web data,
are MinHash's job: run `phi3 data dedup` over a folder holding both (web first, so web is kept).

OUT/docs/synthetic.jsonl.gz holds the kept generations as documents (id "syn-<n>", metadata as above).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from phi3.errors import Phi3Error

AUDIENCES = ("young children", "high school students", "college students", "professionals")
STYLES = ("textbook", "exercises")
TEMPLATES = {
    "textbook": ("Write a section of a textbook for {audience} about \"{topic}\". Explain the key ideas step by "
                 "step, with reasoning and a worked example. Do not add a title or an introduction; start with the "
                 "content. Do not refer to images."),
    "exercises": ("Write three exercises about \"{topic}\" for {audience}, each followed by a worked solution that "
                  "shows every step of the reasoning. Start directly with the first exercise."),
}


def seeds(topics: list[str], audiences: list[str], styles: list[str], n: int, seed: int) -> list[dict]:
    unknown = [s for s in styles if s not in TEMPLATES]
    if unknown:
        raise Phi3Error(f"unknown style {unknown[0]!r}; styles are {', '.join(TEMPLATES)}")
    if not topics:
        raise Phi3Error("no topics: give --topics (a file with one topic a line)")
    product = [{"topic": t, "audience": a, "style": s} for t, a, s in itertools.product(topics, audiences, styles)]
    random.Random(seed).shuffle(product)
    if n > len(product):
        raise Phi3Error(f"--n {n} is more than the {len(product)} topic x audience x style seeds; add topics or lower --n")
    return product[:n]


def prompt(s: dict) -> str:
    return TEMPLATES[s["style"]].format(topic=s["topic"], audience=s["audience"])


def _key(s: dict) -> str:
    return hashlib.sha1(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16]


def _normalized(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def run_synthetic(out: Path, endpoint, topics: list[str], audiences: list[str], styles: list[str], n: int,
                  seed: int = 0, batch: int = 8, progress: bool = True) -> dict:
    from phi3.judge import EndpointError, append_record, progress_bar, read_records
    from phi3.recipe.pipeline import _write_json

    out = Path(out)
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        summary["skipped"] = f"{out} exists (delete it to run synthetic again)"
        return summary
    if out.exists():
        raise Phi3Error(f"{out} exists but is not a finished `phi3 data` stage folder; delete it or pick another --out")
    if batch < 1:
        raise Phi3Error(f"--batch {batch} must be at least 1")
    chosen = seeds(topics, audiences, styles, n, seed)
    params = {"temperature": endpoint.temperature, "max_tokens": endpoint.max_tokens}
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    path = work / "generations.jsonl"
    for rec in read_records(path):
        if rec.get("model") != endpoint.model or rec.get("params") != params:
            raise Phi3Error(f"{path} holds generations by {rec.get('model')!r} with {rec.get('params')}; "
                            f"delete {work} to start over with {endpoint.model!r} and {params}")
    done = {r["key"] for r in read_records(path)}
    todo = [s for s in chosen if _key(s) not in done]

    def generate(s: dict) -> tuple[dict, str]:
        # One sampling seed per prompt, from --seed and the prompt's own key: a rerun (or a resumed
        # run) asks each prompt with the same seed, whatever batch it lands in.
        sampling_seed = int(hashlib.sha1(f"{seed}:{_key(s)}".encode()).hexdigest()[:15], 16)
        return s, endpoint.chat([{"role": "user", "content": prompt(s)}], seed=sampling_seed)

    bar = progress_bar(None, len(todo), "generating", progress)
    with ThreadPoolExecutor(max_workers=batch) as pool:
        for i in range(0, len(todo), batch):
            try:
                results = list(pool.map(generate, todo[i:i + batch]))
            except EndpointError as e:
                raise Phi3Error(f"synthetic: {e} ({len(read_records(path))} of {len(chosen)} generated and kept "
                                f"in {work}; rerun the same command to go on)") from None
            for s, text in results:  # in seed order, whatever order the answers came in
                append_record(path, {"key": _key(s), "seed": s, "prompt": prompt(s), "text": text,
                                     "model": endpoint.model, "params": params})
            bar.update(len(results))
    bar.close()
    by_key = {r["key"]: r for r in read_records(path)}
    seen, kept, dup, empty = set(), [], 0, 0
    for n_, s in enumerate(chosen):
        r = by_key[_key(s)]
        norm = _normalized(r["text"])
        if not norm:
            empty += 1
            continue
        if norm in seen:
            dup += 1
            continue
        seen.add(norm)
        kept.append({"id": f"syn-{n_}", "text": r["text"].strip(),
                     "metadata": {"source": "synthetic", "seed": s, "prompt": r["prompt"], "model": r["model"],
                                  "params": r["params"]}})
    (work / "docs").mkdir(exist_ok=True)
    with gzip.open(work / "docs" / "synthetic.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in kept:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    summary = {"stage": "synthetic", "documents_in": len(chosen), "documents_out": len(kept), "model": endpoint.model,
               "params": params, "removed": {"exact_duplicate": {"dropped": dup}, "empty": {"dropped": empty}}}
    if not kept:
        raise Phi3Error(f"synthetic: every one of the {len(chosen)} generations was empty or a duplicate; "
                        f"see {path}")
    _write_json(work / "summary.json", summary)
    os.replace(work, out)
    return summary
