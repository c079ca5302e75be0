"""Data quality against data quantity at nano scale (issue 16, "Beyond"; EXPERIMENTS.md).

Two tiny Phi-3-shaped models, the same tokenizer, size, seed, steps, tokens per step and LR schedule:
- raw: every document `phi3 data ingest` wrote (DATA_OUT/ingest), tokenized as it is;
- curated: phase 1 then phase 2 as `phi3 data phases` wrote them (DATA_OUT/phases/mixture.toml:
  filtered web, then stricter web plus synthetic), the steps split in the mixture's token ratio.
Each final model is scored on
- held-out educational text: Python 3.11 documentation pages (faq/, reference/, and library pages)
  and English Debian-handbook pages that are not in the crawl (by URL), extracted with trafilatura
  as ingest does, with every paragraph that shares a 13-gram with any training document dropped;
  perplexity by `phi3 perplexity` (non-overlapping chunks of seq_len, second half scored);
- recipes/experiment/quality-mc.jsonl: 40 four-way questions written for this experiment from
  what the Python tutorial and the Debian handbook teach, scored by `phi3 eval` (ARC layout,
  0 shots: log-likelihood of each answer, acc and acc_norm);
- a cloze set made from the held-out pages: the start of a sentence, its true end against the
  ends of three other held-out sentences (`phi3 eval` openbookqa layout, 0 shots).
Results go to WORK/results.json and between the markers of EXPERIMENTS.md (atomically), after
every finished run, so a partial run still leaves what it measured.

    .venv/bin/python benchmarks/data_quality_experiment.py --data-out ~/.cache/phi3/data-demo/run \
        [--work ~/.cache/phi3/quality-exp/NAME] [--seeds 0,1,2] [--steps 150] [--judged-by TEXT]

Training runs one at a time with OMP_NUM_THREADS=1 (--threads); a finished run (its final/) is not
trained again, so rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import re
import resource
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MC = ROOT / "recipes" / "experiment" / "quality-mc.jsonl"
NGRAM = 13


def die(msg: str) -> None:
    print(f"data_quality_experiment: error: {msg}", file=sys.stderr)
    sys.exit(2)


def read_docs(folder: Path) -> list[dict]:
    files = sorted(folder.glob("*.jsonl.gz")) + sorted(folder.glob("*.jsonl"))
    out = []
    for f in files:
        with (gzip.open(f, "rt") if f.suffix == ".gz" else open(f)) as fh:
            out += [json.loads(line) for line in fh if line.strip()]
    return out


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[int]:
    """Hashes of the word n-grams (lower-cased \\w+ runs): a few million of them fit in memory."""
    w = words(text)
    return {hash(" ".join(w[i:i + n])) for i in range(len(w) - n + 1)}


def site(url: str) -> str:
    """The kind of page, from the URLs benchmarks/data_demo.py gives its WARC records."""
    m = re.search(r"debian-handbook\.info/browse/([\w-]+)/", url)
    if m:
        return f"handbook {m.group(1)}"
    for key, name in (("docs.python.org", "Python docs"), ("python-docs-mirror", "mirrors"), ("manpages", "man pages"),
                      ("gcide", "dictionary"), ("changelogs", "changelogs"), ("sources.debian.org", "licences")):
        if key in url:
            return name
    return "other"


def composition(docs: list[dict]) -> dict[str, float]:
    """Share of words per kind of page, largest first."""
    words_by: dict[str, int] = {}
    for d in docs:
        k = site(d.get("metadata", {}).get("url", "")) if d.get("metadata", {}).get("url") else "synthetic"
        words_by[k] = words_by.get(k, 0) + len(d["text"].split())
    total = max(1, sum(words_by.values()))
    return {k: v / total for k, v in sorted(words_by.items(), key=lambda kv: -kv[1])}


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sh(cmd: list[str], threads: int, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([str(c) for c in cmd], env=env, text=True, capture_output=True, **kw)
    if r.returncode:
        die(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return r


# --- held-out text ---------------------------------------------------------------------------------

def extract(html: str) -> str:
    """The text ingest would keep: datatrove's Trafilatura(favour_precision=True), as phi3/recipe/ingest.py."""
    from phi3.recipe.ingest import _check_extractor
    _check_extractor()
    from datatrove.pipeline.extractors import Trafilatura
    return Trafilatura(favour_precision=True, timeout=10.0).extract(html) or ""


def heldout_pages(packages: Path, crawl_urls: set[str], seed: int, per_set: int) -> dict[str, list[tuple[str, Path]]]:
    """Educational pages of the unpacked packages whose URL (as benchmarks/data_demo.py names it) is not in the crawl."""
    rng = random.Random(seed)
    py = packages / "usr/share/doc/python3.11/html"
    hb = packages / "usr/share/doc/debian-handbook/html/en-US"
    if not py.is_dir() or not hb.is_dir():
        die(f"--packages {packages}: no python3.11 or debian-handbook HTML under it; run `make data-demo` once "
            "(it unpacks them into ~/.cache/phi3/data-demo/root)")
    sets: dict[str, list[tuple[str, Path]]] = {}
    cand = [f for d in ("faq", "reference", "library") for f in sorted((py / d).glob("*.html"))
            if f.stat().st_size > 8_000 and f.name not in ("index.html",)]
    cand = [(f"https://docs.python.org/3.11/{f.relative_to(py)}", f) for f in cand]
    cand = [c for c in cand if c[0] not in crawl_urls]
    sets["python-docs"] = sorted(rng.sample(cand, min(per_set, len(cand))))
    cand = [(f"https://debian-handbook.info/browse/en-US/stable/{f.name}", f) for f in sorted(hb.glob("*.html"))
            if f.stat().st_size > 3_000 and f.name not in ("index.html",)]
    cand = [c for c in cand if c[0] not in crawl_urls]
    sets["debian-handbook"] = sorted(rng.sample(cand, min(per_set, len(cand))))
    return sets


def build_heldout(work: Path, packages: Path, train_texts: list[str], crawl_urls: set[str], seed: int,
                  per_set: int, max_words: int) -> dict:
    """WORK/heldout/<set>.txt, paragraphs sharing no 13-gram with any training text; returns counts."""
    train = set()
    for t in train_texts:
        train |= ngrams(t)
    info = {}
    for name, pages in heldout_pages(packages, crawl_urls, seed, per_set).items():
        kept, dropped, n_words = [], 0, 0
        per_page = max_words // max(1, len(pages))  # every page contributes, not the first few
        for url, f in pages:
            text = extract(f.read_text(errors="replace"))
            page_words = 0
            for para in text.split("\n"):
                if len(words(para)) < 8:
                    continue
                if ngrams(para) & train:
                    dropped += 1
                    continue
                if page_words >= per_page:
                    break
                kept.append(para)
                page_words += len(words(para))
            n_words += page_words
        atomic_write(work / "heldout" / f"{name}.txt", "\n".join(kept) + "\n")
        info[name] = {"pages": len(pages), "urls": [u for u, _ in pages], "paragraphs": len(kept),
                      "paragraphs_dropped_13gram": dropped, "words": n_words}
    return info


def build_cloze(work: Path, n: int, seed: int) -> Path:
    """n items from the held-out text: 'sentence start' -> its end vs three other sentences' ends."""
    rng = random.Random(seed)
    sents = []
    for f in sorted((work / "heldout").glob("*.txt")):
        text = " ".join(f.read_text().split())  # lines of a <pre> or a wrapped paragraph rejoined
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            w = s.split()
            # whole prose sentences: a capital first, a full stop last, no code
            if 12 <= len(w) <= 40 and s[0].isupper() and s.endswith(".") and not re.search(r"[{}<>=()\[\]_]|\.\w", s[:-1]):
                sents.append(w)
    rng.shuffle(sents)
    items = []
    ends = [s[len(s) // 2:] for s in sents]
    for i, s in enumerate(sents[:n]):
        cut = len(s) // 2
        others = rng.sample([e for j, e in enumerate(ends) if j != i], 3)
        choices = [" ".join(s[cut:])] + [" ".join(e) for e in others]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"id": f"cloze{i + 1:02d}", "question": {
            "stem": " ".join(s[:cut]), "choices": [{"text": choices[k], "label": "ABCD"[j]} for j, k in enumerate(order)]},
            "answerKey": "ABCD"[order.index(0)]})
    path = work / "mc" / "heldout-cloze.jsonl"
    atomic_write(path, "".join(json.dumps(x) + "\n" for x in items))
    return path


# --- training ---------------------------------------------------------------------------------------

def recipe(args, out: Path, seed: int, phases: list[tuple[str, int, list[tuple[str, float]]]]) -> str:
    lines = ['stage = "pretrain"', f'model = "{args.model}"', 'tokenizer = "default"', f'out = "{out}"',
             f"seq_len = {args.seq_len}", f"micro_batch_size = {args.batch}", f"global_batch_size = {args.batch}",
             'precision = "float32"', f"seed = {seed}", "save_every = 0", "log_every = 1", "",
             "[optim]", f"lr = {args.lr}", f"min_lr = {args.lr / 10}", 'schedule = "wsd"',
             f"warmup_steps = {max(1, args.steps // 20)}", "decay_fraction = 0.2", "weight_decay = 0.1",
             "betas = [0.9, 0.95]", "grad_clip = 1.0"]
    for name, steps, sources in phases:
        lines += ["", "[[phases]]", f'name = "{name}"', f"steps = {steps}"]
        for path, w in sources:
            lines += ["[[phases.sources]]", f'path = "{path}"', f"weight = {w}"]
    return "\n".join(lines) + "\n"


def phases_path(data_out: Path, path: str) -> str:
    """A mixture.toml source under DATA_OUT/phases, wherever the pipeline wrote it (a copied output
    keeps its original absolute paths in mixture.toml)."""
    parts = Path(path).parts
    if "phases" in parts:
        moved = data_out.joinpath(*parts[len(parts) - 1 - parts[::-1].index("phases"):])
        if moved.exists():
            return str(moved)
    return path


def arms(args, data_out: Path, raw_tokens: Path) -> dict[str, list]:
    mix = tomllib.loads((data_out / "phases" / "mixture.toml").read_text())["phases"]
    total = sum(p["tokens"] for p in mix)
    plan, left = [], args.steps
    for i, p in enumerate(mix):
        steps = left if i == len(mix) - 1 else max(1, round(args.steps * p["tokens"] / total))
        left -= steps
        plan.append((p["name"], steps, [(phases_path(data_out, s["path"]), s["weight"]) for s in p["sources"]]))
    return {"raw": [("raw", args.steps, [(str(raw_tokens), 1.0)])], "curated": plan}


def final_loss(run: Path, last: int = 10) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    return sum(r["loss"] for r in rows[-last:]) / len(rows[-last:])


def evaluate(args, run: Path, work: Path, tag: str, sets: list[str], cloze: Path) -> dict:
    res = {}
    for name in sets:
        r = sh([BIN / "phi3", "perplexity", run / "final", work / "heldout" / f"{name}.txt", "--context", args.seq_len,
                "--threads", args.threads, "--json", "--device", "cpu"], args.threads)
        p = json.loads(r.stdout.strip().splitlines()[-1])
        res[f"ppl_{name}"] = p["perplexity"]
        res[f"tokens_{name}"] = p["tokens_scored"]
    out = work / "eval" / f"{tag}.json"
    sh([BIN / "phi3", "eval", "-m", run / "final", "--tasks", f"arc_easy={MC},openbookqa={cloze}", "--shots", "0",
        "--threads", args.threads, "--device", "cpu", "--output", out], args.threads)
    tasks = json.loads(out.read_text())["tasks"]
    for key, task in (("mc", "arc_easy"), ("cloze", "openbookqa")):
        t = next(v for k, v in tasks.items() if k.split("=")[0] == task)
        m = t["metrics"]
        res[f"{key}_n"] = t["n"]
        for metric in ("acc", "acc_norm"):
            res[f"{key}_{metric}"] = m[metric]["value"]
            res[f"{key}_{metric}_stderr"] = m[metric]["stderr"]
    return res


# --- report ------------------------------------------------------------------------------------------

def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{m:.1f}"
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{m:.1f} ± {sd:.1f}"


def markers(block: str) -> tuple[str, str]:
    return f"<!-- results:{block}:begin -->", f"<!-- results:{block}:end -->"


def results_block(state: dict, block: str) -> str:
    BEGIN, END = markers(block)
    runs = state["runs"]
    sets = state["heldout_sets"]
    L = [BEGIN, "", f"_Written by `benchmarks/data_quality_experiment.py` at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
         f"{len(runs)} of {state['planned_runs']} runs finished._", "",
         f"**What judged the data:** {state['judged_by']}", "",
         "Command:", "", "```", state["command"], "```", "",
         "| | raw | curated |", "|---|---|---|"]
    c = state["corpus"]
    L += [f"| documents | {c['raw_documents']} (all ingested pages) | {c['curated_documents']} |",
          f"| distinct tokens on disk | {c['raw_tokens']:,} | {c['curated_tokens']:,} ("
          + ", ".join(f"{k} {v:,}" for k, v in c["curated_parts"].items()) + ") |",
          f"| steps (phases) | {state['arms']['raw']} | {state['arms']['curated']} |",
          f"| tokens seen per run | {state['tokens_per_run']:,} | {state['tokens_per_run']:,} |", ""]
    if "composition" in state:
        for arm, comp in state["composition"].items():
            L.append(f"Words by kind of page, {arm}: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in comp.items() if v >= 0.005) + ".")
        L.append("")
    h = state["heldout"]
    L += ["Held-out text (" + "; ".join(f"{k}: {v['pages']} pages not in the crawl, {v['paragraphs']} paragraphs, "
                                         f"{v['words']:,} words, {v['paragraphs_dropped_13gram']} paragraphs dropped for a "
                                         f"13-gram shared with training text" for k, v in h.items()) + ").", "",
          f"Multiple choice: {state['mc_items']} hand-written questions (recipes/experiment/quality-mc.jsonl, "
          f"{state['mc_13gram_hits']} share a 13-gram with training text); cloze: {state['cloze_items']} held-out "
          "sentences, true end against three other sentences' ends. Chance is 25 %.", ""]
    head = ["arm", "seed", "final loss (last 10 steps)"] + [f"ppl {s}" for s in sets] + \
           ["MC acc", "MC acc_norm", "cloze acc", "cloze acc_norm", "train CPU s", "load avg"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        L.append("| " + " | ".join([r["arm"], str(r["seed"]), f"{r['final_loss']:.3f}"]
                                   + [f"{r[f'ppl_{s}']:.1f}" for s in sets]
                                   + [f"{100 * r['mc_acc']:.1f} ± {100 * (r['mc_acc_stderr'] or 0):.1f}",
                                      f"{100 * r['mc_acc_norm']:.1f} ± {100 * (r['mc_acc_norm_stderr'] or 0):.1f}",
                                      f"{100 * r['cloze_acc']:.1f} ± {100 * (r['cloze_acc_stderr'] or 0):.1f}",
                                      f"{100 * r['cloze_acc_norm']:.1f} ± {100 * (r['cloze_acc_norm_stderr'] or 0):.1f}",
                                      "-" if r["train_cpu_s"] is None else f"{r['train_cpu_s']:.0f}", r["load"]]) + " |")
    L += ["", "Mean ± sample standard deviation over seeds:", "",
          "| arm | seeds | " + " | ".join(f"ppl {s}" for s in sets) + " | MC acc % | MC acc_norm % | cloze acc % | cloze acc_norm % |",
          "|" + "---|" * (6 + len(sets))]
    for arm in ("raw", "curated"):
        rs = [r for r in runs if r["arm"] == arm]
        if rs:
            L.append(f"| {arm} | {len(rs)} | " + " | ".join(mean_sd([r[f"ppl_{s}"] for r in rs]) for s in sets) + " | "
                     + " | ".join(mean_sd([100 * r[k] for r in rs]) for k in ("mc_acc", "mc_acc_norm", "cloze_acc", "cloze_acc_norm"))
                     + " |")
    pairs = [(a, b) for a in runs for b in runs if a["arm"] == "raw" and b["arm"] == "curated" and a["seed"] == b["seed"]]
    if pairs:
        L += ["", "Curated minus raw, paired by seed: " + "; ".join(
            f"ppl {s}: " + ", ".join(f"{b[f'ppl_{s}'] - a[f'ppl_{s}']:+.1f}" for a, b in pairs) for s in sets)
            + "; MC acc_norm (points): " + ", ".join(f"{100 * (b['mc_acc_norm'] - a['mc_acc_norm']):+.1f}" for a, b in pairs)
            + "; cloze acc_norm (points): " + ", ".join(f"{100 * (b['cloze_acc_norm'] - a['cloze_acc_norm']):+.1f}" for a, b in pairs)
            + "."]
    L += ["", END]
    return "\n".join(L)


def write_results(path: Path, state: dict, name: str) -> None:
    """Replace the block between this run's markers (appended under ## Results when absent)."""
    BEGIN, END = markers(name)
    text = path.read_text() if path.is_file() else "# EXPERIMENTS.md\n"
    block = results_block(state, name)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Results\n\n" + block + "\n"
    atomic_write(path, text)


# --- main --------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-out", required=True, help="a `phi3 data` pipeline output folder (with ingest/ and phases/)")
    ap.add_argument("--work", help="where runs and held-out files go (default ~/.cache/phi3/quality-exp/<data-out's parent name>)")
    ap.add_argument("--packages", default=str(Path.home() / ".cache/phi3/data-demo/root"),
                    help="the unpacked Debian packages `make data-demo` made (held-out pages come from them)")
    ap.add_argument("--judged-by", help="what scored the documents (written beside the results; kept from the last run when not given)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated; each seed trains both arms (raw first)")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per run (the token budget = steps x batch x seq_len)")
    ap.add_argument("--model", default="phi-3-mini:layers=2,hidden=128,heads=4,intermediate=256,vocab=49152,context=128")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heldout-pages", type=int, default=40, help="pages per held-out set")
    ap.add_argument("--heldout-words", type=int, default=12_000, help="words per held-out set at most")
    ap.add_argument("--cloze", type=int, default=40, help="cloze items from the held-out text")
    ap.add_argument("--no-train", action="store_true",
                    help="only evaluate runs whose final/ exists (trained by hand from WORK/recipes/, e.g. two at once)")
    ap.add_argument("--recipes-only", action="store_true", help="write WORK/recipes/*.toml and stop")
    ap.add_argument("--write", default=str(ROOT / "EXPERIMENTS.md"), help="the page whose results block is replaced")
    ap.add_argument("--block", default="main", help="which results block of --write (<!-- results:BLOCK:begin/end -->)")
    args = ap.parse_args()
    data_out = Path(args.data_out).expanduser().resolve()
    for need in ("ingest/summary.json", "phases/summary.json", "phases/mixture.toml"):
        if not (data_out / need).is_file():
            die(f"--data-out {data_out}: no {need}; give a `phi3 data run` output whose recipe ran ingest ... phases")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        die(f"--seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    work = Path(args.work).expanduser() if args.work else Path.home() / ".cache/phi3/quality-exp" / data_out.parent.name
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))

    # corpus: raw tokens (all ingested documents), and what the phases hold
    raw_docs = read_docs(data_out / "ingest" / "docs")
    raw_tok = work / "raw"
    if not (raw_tok / "summary.json").is_file():
        print(f"quality: phi3 data tokenize {data_out / 'ingest'} -> {raw_tok}", flush=True)
        sh([BIN / "phi3", "data", "tokenize", data_out / "ingest", "--out", raw_tok, "--tokenizer", "default"], args.threads)
    ps = json.loads((data_out / "phases" / "summary.json").read_text())
    curated = read_docs(data_out / "phases" / "phase1" / "docs") + read_docs(data_out / "phases" / "phase2" / "synthetic" / "docs")
    train_texts = [d["text"] for d in raw_docs] + [d["text"] for d in curated]
    crawl_urls = {d.get("metadata", {}).get("url") for d in raw_docs}

    # held-out text and the multiple-choice sets
    hinfo_path = work / "heldout" / "info.json"
    if not hinfo_path.is_file():
        print("quality: building held-out text (13-gram check against every training document) ...", flush=True)
        hinfo = build_heldout(work, Path(args.packages).expanduser(), train_texts, crawl_urls, 0, args.heldout_pages,
                              args.heldout_words)
        atomic_write(hinfo_path, json.dumps(hinfo, indent=1))
    hinfo = json.loads(hinfo_path.read_text())
    sets = [s for s, v in hinfo.items() if v["words"] >= 4 * args.seq_len]
    cloze = work / "mc" / "heldout-cloze.jsonl"
    if not cloze.is_file():
        build_cloze(work, args.cloze, 0)
    train_ngrams = set()
    for t in train_texts:
        train_ngrams |= ngrams(t)
    mc_items = [json.loads(line) for line in MC.open()]
    mc_hits = sum(bool(ngrams(q["question"]["stem"] + " " + c["text"]) & train_ngrams)
                  for q in mc_items for c in q["question"]["choices"] if c["label"] == q["answerKey"])

    plans = arms(args, data_out, raw_tok / "tokens")
    if args.recipes_only:
        for seed in seeds:
            for arm in ("raw", "curated"):
                atomic_write(work / "recipes" / f"{arm}-s{seed}.toml", recipe(args, work / "runs" / f"{arm}-s{seed}", seed, plans[arm]))
        print(f"quality: wrote {work / 'recipes'}", flush=True)
        return 0
    raw_tokens = json.loads((raw_tok / "summary.json").read_text())["tokens"]
    state_path = work / "results.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"runs": []}
    state.update({
        "judged_by": args.judged_by or state.get("judged_by", "not stated"), "data_out": str(data_out), "heldout_sets": sets, "heldout": hinfo,
        "command": f".venv/bin/python benchmarks/data_quality_experiment.py --data-out {data_out} --work {work} "
                   f"--seeds {args.seeds} --steps {args.steps} --judged-by '...' --block {args.block}",
        "planned_runs": 2 * len(seeds), "tokens_per_run": args.steps * args.batch * args.seq_len,
        "arms": {k: ", ".join(f"{n} {s}" for n, s, _ in v) for k, v in plans.items()},
        "mc_items": len(mc_items), "mc_13gram_hits": mc_hits,
        "cloze_items": sum(1 for _ in cloze.open()),
        "corpus": {"raw_documents": len(raw_docs), "raw_tokens": raw_tokens,
                   # phase 2's web documents are a subset of phase 1's
                   "curated_documents": ps["phase_documents"]["phase1"] + ps.get("synthetic_dedup", {}).get("documents_out", 0),
                   "curated_tokens": sum(ps["tokens"].values()), "curated_parts": ps["tokens"]},
        "composition": {"raw": composition(raw_docs),
                        "curated phase 1": composition(read_docs(data_out / "phases" / "phase1" / "docs")),
                        "curated phase 2": composition(read_docs(data_out / "phases" / "phase2" / "web" / "docs")
                                                       + read_docs(data_out / "phases" / "phase2" / "synthetic" / "docs"))},
        "settings": {k: getattr(args, k) for k in ("model", "seq_len", "batch", "lr", "steps", "threads")},
    })
    atomic_write(state_path, json.dumps(state, indent=1))
    write_results(Path(args.write), state, args.block)
    for seed in seeds:
        for arm in ("raw", "curated"):
            tag = f"{arm}-s{seed}"
            if any(r["arm"] == arm and r["seed"] == seed for r in state["runs"]):
                continue
            run = work / "runs" / tag
            rec = work / "recipes" / f"{tag}.toml"
            atomic_write(rec, recipe(args, run, seed, plans[arm]))
            c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            load = "/".join(f"{x:.1f}" for x in os.getloadavg())
            cpu_file = run / "train_cpu_s.txt"  # written by a training run started outside this script
            if not (run / "final" / "config.json").is_file():
                if args.no_train:
                    continue
                print(f"quality: training {tag} ({args.steps} steps) ...", flush=True)
                sh([BIN / "phi3", "train", "pretrain", "--recipe", rec, "--no-progress"], args.threads)
                atomic_write(cpu_file, f"{sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]) - c0.ru_utime - c0.ru_stime:.1f}\n")
            load += " -> " + "/".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"quality: evaluating {tag} ...", flush=True)
            res = evaluate(args, run, work, tag, sets, cloze)
            row = {"arm": arm, "seed": seed, "final_loss": final_loss(run), "load": load,
                   "train_cpu_s": float(cpu_file.read_text()) if cpu_file.is_file() else None, **res}
            state["runs"].append(row)
            atomic_write(state_path, json.dumps(state, indent=1))
            write_results(Path(args.write), state, args.block)
            print(f"quality: {tag}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in row.items() if k not in ("arm", "seed")), flush=True)
    print(f"quality: wrote {args.write} and {state_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
