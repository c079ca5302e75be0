"""`make data-demo`: the data recipe end to end on real offline text, written up in DATA.md.

1. `apt-get download` Debian documentation packages (python3.11-doc, debian-handbook, dict-gcide,
   manpages) and unpack them with `dpkg-deb -x`; this machine's /usr/share/doc changelogs and
   copyright files add low-value text.
2. Pack their pages into WARC files (warcio) as a crawler would have fetched them: Python docs and
   the English handbook (educational), the handbook in other languages (for the language filter),
   dictionary entries, man pages, changelogs and licences (low value), 5 near-duplicate mirrors of
   Python pages (for MinHash) and one page holding a GSM-8K test question (for decontamination).
3. Start `phi3 serve` (SmolLM2-135M-Instruct, fetched by `phi3 fetch`) as judge and generator, and
   run `phi3 data run RECIPE.toml` one stage at a time (each run skips the stages already done),
   timing each (wall, CPU of `phi3 data` and of the server, load average).
4. Compare the classifier's embedders on the judge's labels (held-out F1, embedding docs/CPU-s),
   write `phi3 data report`, and DATA.md: the report with the numbers, the machine and the command.

    .venv/bin/python benchmarks/data_demo.py [--work ~/.cache/phi3/data-demo] [--write DATA.md]
"""

from __future__ import annotations

import argparse
import gzip
import html
import io
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PACKAGES = ("python3.11-doc", "debian-handbook", "dict-gcide", "manpages")
STAGES = ("ingest", "heuristics", "dedup", "decontaminate", "synthetic", "judge", "classify", "phases")
TOPICS = ["fractions", "the water cycle", "photosynthesis", "Newton's laws of motion", "prime numbers",
          "binary search", "recursion in Python", "the French Revolution", "probability with dice",
          "how vaccines work", "the Pythagorean theorem", "supply and demand"]


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def fetch_packages(work: Path) -> Path:
    debs, root = work / "debs", work / "root"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        print(f"data-demo: apt-get download {' '.join(missing)}", flush=True)
        sh(["apt-get", "download", *missing], cwd=debs, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not root.is_dir():
        tmp = work / "root.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for deb in sorted(debs.glob("*.deb")):
            sh(["dpkg-deb", "-x", str(deb), str(tmp)])
        tmp.rename(root)
    return root


def _roff_to_text(roff: str) -> str:
    """Enough of man(7) for a crawler-like text: requests dropped, font escapes removed."""
    out = []
    for line in roff.splitlines():
        if line.startswith((".\\\"", "'\\\"")):
            continue
        if line.startswith("."):
            words = line.split(None, 1)
            if words[0] in (".SH", ".SS") and len(words) > 1:
                out.append("\n" + words[1].strip('"'))
            elif words[0] in (".B", ".I", ".BR", ".IR", ".BI", ".RB") and len(words) > 1:
                out.append(words[1].replace('"', ""))
            elif words[0] in (".PP", ".P", ".LP", ".TP", ".IP"):
                out.append("")
            continue
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"\\f[BIRPC]|\\f\(..|\\\(..|\\[&-]|\\e", "", text)
    return text.replace("\\-", "-")


def _page(title: str, body: str, pre: bool = False) -> str:
    inner = f"<pre>{html.escape(body)}</pre>" if pre else "".join(f"<p>{html.escape(p)}</p>" for p in body.split("\n\n") if p.strip())
    return f"<!DOCTYPE html><html><head><title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>{inner}</body></html>"


def build_pages(root: Path, seed: int, scale: float) -> dict[str, list[tuple[str, str]]]:
    """source -> [(url, html)] from the unpacked packages; `scale` multiplies every count."""
    rng = random.Random(seed)
    n = lambda k: max(1, int(round(k * scale)))  # noqa: E731
    pick = lambda xs, k: sorted(rng.sample(sorted(xs), min(k, len(xs))))  # noqa: E731
    pages: dict[str, list[tuple[str, str]]] = {}
    py = root / "usr/share/doc/python3.11/html"
    files = sorted((py / "tutorial").glob("*.html")) + sorted((py / "howto").glob("*.html"))
    files += pick([f for f in (py / "library").glob("*.html") if f.stat().st_size > 20_000], n(50))
    files = files[:n(len(files))]
    pages["python-docs"] = [(f"https://docs.python.org/3.11/{f.relative_to(py)}", f.read_text(errors="replace")) for f in files]
    hb = root / "usr/share/doc/debian-handbook/html"
    pages["debian-handbook"] = []
    for lang, k in (("en-US", 60), ("fr-FR", 12), ("de-DE", 12), ("ja-JP", 6)):
        for f in pick([f for f in (hb / lang).glob("*.html") if f.stat().st_size > 8_000], n(k)):
            pages["debian-handbook"].append((f"https://debian-handbook.info/browse/{lang}/stable/{f.name}",
                                             f.read_text(errors="replace")))
    gcide = gzip.open(root / "usr/share/dictd/gcide.dict.dz", "rt", errors="replace").read()
    entries = re.split(r"\n\n(?=\S)", gcide)  # an entry starts at column 0 after a blank line
    pages["gcide"] = []
    for i in pick(range(200, len(entries) - 40), n(40)):
        chunk = "\n\n".join(entries[i:i + 12])
        pages["gcide"].append((f"https://gcide.gnu.org.ua/?q={i}", _page(chunk.split()[0] if chunk.split() else "entry", chunk, pre=True)))
    man = sorted((root / "usr/share/man").glob("man[2357]/*.gz"))
    pages["manpages"] = [(f"https://manpages.debian.org/bookworm/{f.parent.name}/{f.name[:-3]}",
                          _page(f.name[:-3], _roff_to_text(gzip.open(f, "rt", errors="replace").read()), pre=True))
                         for f in pick([f for f in man if f.stat().st_size > 3_000], n(40))]
    docs = [d for d in Path("/usr/share/doc").iterdir() if (d / "changelog.Debian.gz").is_file() and (d / "copyright").is_file()]
    pages["changelogs"] = []
    for d in pick(docs, n(40)):
        if len(pages["changelogs"]) % 2:
            text = gzip.open(d / "changelog.Debian.gz", "rt", errors="replace").read()[:20_000]
            pages["changelogs"].append((f"https://metadata.ftp-master.debian.org/changelogs/{d.name}/changelog", _page(d.name, text, pre=True)))
        else:
            pages["changelogs"].append((f"https://sources.debian.org/{d.name}/copyright", _page(d.name, (d / "copyright").read_text(errors="replace")[:20_000], pre=True)))
    # planted: 5 mirrors of Python pages with 1 % of words changed, and a GSM-8K test question
    mirrors = []
    for url, page in rng.sample(pages["python-docs"][:n(37)], 5):
        words = page.split(" ")
        for i in rng.sample(range(len(words)), max(1, len(words) // 100)):
            if "<" not in words[i] and ">" not in words[i]:
                words[i] = rng.choice(["lorem", "ipsum", "dolor"])
        mirrors.append((url.replace("docs.python.org", "python-docs-mirror.example.org"), " ".join(words)))
    pages["mirrors"] = mirrors
    gsm = json.loads((ROOT / "tests/data/recipe/benchmarks/gsm8k/test.jsonl").read_text().splitlines()[3])
    pages["forum"] = [("https://homework-forum.example.org/t/4242", _page(
        "Can someone check my answer?",
        "I am stuck on this one from my worksheet and I would like to understand the method, not only the number.\n\n"
        f"{gsm['question']}\n\nMy attempt: I added everything and then multiplied, but my teacher says the "
        "order matters. Could someone explain the steps one at a time? Thanks a lot to anyone who answers, "
        "I have been trying for an hour and I think I am missing something simple about the problem."))]
    return pages


def write_warcs(pages: dict[str, list[tuple[str, str]]], crawl: Path) -> int:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter
    tmp = crawl.with_name(crawl.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    total = 0
    for source, items in pages.items():
        with open(tmp / f"{source}.warc.gz", "wb") as f:
            w = WARCWriter(f, gzip=True)
            for url, page in items:
                body = page.encode("utf-8")
                headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                                      ("Content-Length", str(len(body)))], protocol="HTTP/1.1")
                # Common Crawl's payload type: without it datatrove sniffs the bytes, and the handbook's
                # XHTML (an <?xml ...?> prologue) reads as text/xml and is skipped
                w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers,
                                                    warc_headers_dict={"WARC-Identified-Payload-Type": "text/html"}))
                total += 1
    shutil.rmtree(crawl, ignore_errors=True)
    tmp.rename(crawl)
    return total


def start_server(port: int, log: Path) -> subprocess.Popen:
    import urllib.request
    # one thread: the machine is shared, and a 135M model's prefill gains little from a second core
    proc = subprocess.Popen([str(BIN / "phi3"), "serve", "--port", str(port), "--name", "smollm2", "--threads", "1"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(900):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"data-demo: phi3 serve exited ({log.read_text()[-400:]})")
            time.sleep(1)
    raise SystemExit("data-demo: phi3 serve did not answer within 15 minutes")


def cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def choose_thresholds(classify: Path) -> tuple[float, float, str]:
    """FineWeb-Edu's whole-number thresholds (phase 1 >= 2, phase 2 >= 3 on the rounded score) when
    they make two nested, non-empty, different phases that filter something; otherwise thresholds
    on the classifier's score itself at its median (phase 1: the better half) and 80th percentile
    (phase 2: the best fifth), for a judge whose scores crowd into one unit."""
    hist = json.loads((classify / "summary.json").read_text())["histogram"]
    at = lambda t: sum(v for k, v in hist.items() if int(k) >= t)  # noqa: E731
    total = at(0)
    if 0 < at(3) < at(2) < total:
        return 2, 3, "FineWeb-Edu's: the classifier's rounded scores split the corpus at 2 and at 3"
    sys.path.insert(0, str(ROOT))
    from phi3.recipe.ingest import docs_input
    from phi3.recipe.judge import read_documents
    scores = sorted(d["metadata"]["edu_score"] for d in read_documents(*docs_input(classify)).values())
    q = lambda f: scores[min(len(scores) - 1, int(f * len(scores)))]  # noqa: E731
    t1, t2 = q(0.5), q(0.8)
    return t1, t2, (f"the classifier's rounded scores are {', '.join(f'{k}: {v}' for k, v in hist.items() if v)}, so "
                    "whole-number thresholds cannot split them; t1 and t2 are the median and the 80th percentile of "
                    f"its scores ({scores[0]:.3f}-{scores[-1]:.3f} over {len(scores)} documents)")


def classify_threshold(judge: Path) -> float:
    """FineWeb-Edu's 3 when at least a fifth of the judged documents fall on each side of it; else
    the judge's median score. The yes/no judge's 5 P(yes) rarely reaches 3 (SmolLM2-135M's P(yes)
    stays under 0.6: 0 of 115 documents at 3 in the first run with it), and a classifier needs both
    sides to learn and to be scored."""
    scores = sorted(json.loads(line)["score"] for line in (judge / "judgments.jsonl").open()
                    if line.strip() and json.loads(line).get("score") is not None)
    above = sum(1 for x in scores if x >= 3)
    if scores and min(above, len(scores) - above) >= len(scores) / 5:
        return 3
    return round(scores[len(scores) // 2], 4) if scores else 3


def recipe_text(work: Path, url: str, upto: list[str], t1: int, t2: int, args) -> str:
    tables = {
        "executor": 'tasks = 2\nworkers = 1',
        "ingest": f'inputs = ["{work / "crawl"}"]',
        # gopher_quality left out: its alpha-ratio rule (80 % of words alphabetic) removed 120 of 211
        # pages in a first run, most Python pages (code) among them, leaving the judge 19 documents
        "heuristics": 'languages = ["en"]\nfilters = ["language", "gopher_repetition", "c4", "fineweb"]',
        "dedup": "ngrams = 5\nbuckets = 14\nhashes_per_bucket = 8",
        "decontaminate": f'data_dir = "{ROOT / "tests/data/recipe/benchmarks"}"\nngrams = 13',
        "synthetic": f'url = "{url}"\nmodel = "smollm2"\ntopics = "{work / "topics.txt"}"\nn = {args.synthetic}\n'
                     f'max_tokens = {args.gen_tokens}\ntemperature = 0.8\nbatch = 4\nseed = 0',
        "judge": f'url = "{url}"\nmodel = "smollm2"\nsample = {args.sample}\nmax_tokens = {args.judge_tokens}\n'
                 f'max_chars = {args.judge_chars}\nmethod = "{args.judge_method}"\nask = "{args.judge_ask}"\nshots = {args.judge_shots}\nprompt = "{args.judge_prompt}"\n'
                 f'scoring = "{args.judge_scoring}"\nseed = 0',
        "classify": f'embedder = "{args.embedder}"\nthreshold = {getattr(args, "classify_threshold", 3)}',
        "phases": f'tokenizer = "default"\nt1 = {t1}\nt2 = {t2}',
    }
    body = [f'out = "{work / "run"}"']
    for name in ["executor", *upto]:
        body += ["", f"[{name}]", tables[name]]
    return "\n".join(body) + "\n"


def compare_embedders(run: Path, embedders: list[str], threshold: float = 3) -> list[dict]:
    """Held-out F1 of the head on the judge's labels with each embedder, and its embedding speed
    over every classified document (CPU seconds of this process: torch's threads included)."""
    sys.path.insert(0, str(ROOT))
    from phi3.recipe.classify import embed, load_embedder, train_head
    from phi3.recipe.judge import read_documents
    from phi3.recipe.ingest import docs_input
    texts = [d["text"] for d in read_documents(*docs_input(run / "decontaminate")).values()]
    rows = []
    for spec in embedders:
        try:
            model = load_embedder(spec)
        except Exception as e:  # noqa: BLE001 - a missing optional package: say so in the table
            rows.append({"embedder": spec, "error": str(e)})
            continue
        c0, t0 = time.process_time(), time.time()
        X = embed(model, texts)
        cpu, wall = time.process_time() - c0, time.time() - t0
        head = train_head(run / "decontaminate", run / "judge", spec, threshold=threshold)
        rows.append({"embedder": spec, "dims": int(X.shape[1]), "docs": len(texts), "cpu_s": cpu, "wall_s": wall,
                     "docs_per_cpu_s": len(texts) / max(cpu, 1e-9), **{k: head[k] for k in (
                         "heldout", "heldout_precision", "heldout_recall", "heldout_f1", "heldout_mse")}})
        del X, model
    return rows


def standin_embedder(folder: Path) -> str:
    """The tests' stand-in: a model2vec static model over SmolLM2's vocabulary with seeded random vectors."""
    import numpy as np
    from model2vec import StaticModel

    from phi3.train.recipe import load_tokenizer_spec
    if not (folder / "config.json").is_file():
        tok, _ = load_tokenizer_spec("default")
        vectors = np.random.default_rng(0).standard_normal((tok.tk.get_vocab_size(), 256)).astype(np.float32)
        StaticModel(vectors=vectors, tokenizer=tok.tk, normalize=True).save_pretrained(str(folder))
    return str(folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "phi3" / "data-demo"))
    ap.add_argument("--write", default=str(ROOT / "DATA.md"), help="the page to write")
    ap.add_argument("--scale", type=float, default=2.0,
                    help="multiplies the number of pages of each source (2: 530 pages, 115 left for the judge)")
    ap.add_argument("--sample", type=int, default=120, help="documents the judge scores (all of them, in logprobs mode: ~5 s each on 1 thread)")
    ap.add_argument("--synthetic", type=int, default=4, help="synthetic generations")
    ap.add_argument("--judge-tokens", type=int, default=16)
    # yesno, its question before and after the page, two answered examples first: SmolLM2-135M's best
    # way of asking in benchmarks/judge_variants.py (AUC of docs against changelogs + dictionary 0.93
    # and 1.00 on two samples of 50 pages; the digit 0.69 and 0.68, 0.49 against changelogs; DATA.md)
    ap.add_argument("--judge-method", default="yesno", choices=("digit", "yesno", "contrast", "additive"),
                    help="how the judge is asked (phi3/recipe/judge.py, `phi3 data judge --method`)")
    ap.add_argument("--judge-ask", default="both", choices=("end", "both"), help="the yes/no question after the page, or before and after it")
    ap.add_argument("--judge-shots", type=int, default=2, choices=(0, 2), help="few-shot examples before the page")
    ap.add_argument("--judge-prompt", default="brief", help="the digit method's rubric: full or brief (see phi3/recipe/judge.py)")
    ap.add_argument("--judge-chars", type=int, default=1000, help="characters of each document the judge reads")
    ap.add_argument("--judge-scoring", default="auto", choices=("auto", "logprobs", "text"),
                    help="auto: the expected score from the digits' probabilities when the endpoint gives logprobs")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--embedder", default="minilm-static")
    ap.add_argument("--port", type=int, default=18716)
    ap.add_argument("--url", help="an OpenAI-compatible endpoint serving the model as 'smollm2' (default: start phi3 serve)")
    ap.add_argument("--server-pid", type=int, help="that endpoint's process, to count its CPU seconds")
    ap.add_argument("--fresh", action="store_true", help="delete the previous run's stages first")
    ap.add_argument("--until", choices=STAGES, help="stop after this stage (a later run goes on from there)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: stop the server too
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        shutil.rmtree(work / "run", ignore_errors=True)
        (work / "timings.json").unlink(missing_ok=True)
    started = time.time()
    root = fetch_packages(work)
    pages = build_pages(root, seed=0, scale=args.scale)
    n_pages = write_warcs(pages, work / "crawl")
    (work / "topics.txt").write_text("\n".join(TOPICS) + "\n")
    print(f"data-demo: {n_pages} pages in {len(pages)} WARC files under {work / 'crawl'}", flush=True)
    sh([str(BIN / "phi3"), "fetch"], stdout=subprocess.DEVNULL)
    server = None
    url = args.url
    server_pid = args.server_pid
    if not url:
        print("data-demo: starting phi3 serve (SmolLM2-135M-Instruct) ...", flush=True)
        server = start_server(args.port, work / "serve.log")
        server_pid = server.pid
        url = f"http://127.0.0.1:{args.port}/v1"
    order = list(STAGES[:STAGES.index(args.until) + 1] if args.until else STAGES)
    # each stage's timing as measured when it ran: a resumed demo skips finished stages, and keeps their numbers
    timings_file = work / "timings.json"
    earlier = {t["stage"]: t for t in json.loads(timings_file.read_text())} if timings_file.is_file() else {}
    timings = []
    failed = None
    recipe = work / "recipe.toml"
    try:
        for i, stage in enumerate(order):
            t1, t2 = 2, 3
            if stage == "classify" and (work / "run" / "judge" / "summary.json").is_file():
                args.classify_threshold = classify_threshold(work / "run" / "judge")
            if stage == "phases":
                t1, t2, why = choose_thresholds(work / "run" / "classify")
                (work / "thresholds.json").write_text(json.dumps({"t1": t1, "t2": t2, "why": why}))
                print(f"data-demo: phases t1 {t1}, t2 {t2}: {why}", flush=True)
            recipe.write_text(recipe_text(work, url, order[:i + 1], t1, t2, args))
            if stage in earlier and (work / "run" / stage / "summary.json").is_file():
                timings.append(earlier[stage])
                continue
            load0, c0, s0, w0 = os.getloadavg(), resource.getrusage(resource.RUSAGE_CHILDREN), cpu_of(server_pid) if server_pid else 0, time.time()
            print(f"data-demo: phi3 data run {recipe}  (through {stage})", flush=True)
            r = subprocess.run([str(BIN / "phi3"), "data", "run", str(recipe)], stderr=subprocess.PIPE, text=True)
            sys.stderr.write(r.stderr[-2000:])
            c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            timings.append({"stage": stage, "wall_s": time.time() - w0,
                            "cpu_s": c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime,
                            "server_cpu_s": (cpu_of(server_pid) - s0) if server_pid else None,
                            "load": [round(x, 1) for x in (*load0, *os.getloadavg())]})
            tmp = timings_file.with_name("timings.json.tmp")
            tmp.write_text(json.dumps(timings + [t for s, t in earlier.items() if s not in {x["stage"] for x in timings}]))
            os.replace(tmp, timings_file)
            if r.returncode:
                failed = (stage, (r.stderr.strip().splitlines() or ["?"])[-1])
                print(f"data-demo: {stage} failed: {failed[1]}", flush=True)
                break
    finally:
        if server:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
    pipeline_s = sum(t["wall_s"] for t in timings)
    compare = []
    if (work / "run" / "classify" / "summary.json").is_file():
        print("data-demo: comparing embedders on the judge's labels ...", flush=True)
        embedders = ["minilm", "minilm-static", standin_embedder(work / "standin-random-static")]
        compare = compare_embedders(work / "run", embedders,
                                    json.loads((work / "run" / "classify" / "summary.json").read_text())["threshold"])
    sh([str(BIN / "phi3"), "data", "report", str(work / "run"), "--out", str(work / "report" / "DATA.md")])
    write_page(Path(args.write), work, recipe, timings, compare, n_pages, pages, pipeline_s, time.time() - started, args,
               failed)
    print(f"data-demo: wrote {args.write}", flush=True)
    return 0


SOURCES = {"docs.python.org": "python-docs", "debian-handbook.info": "debian-handbook", "gcide.gnu.org.ua": "gcide",
           "manpages.debian.org": "manpages", "metadata.ftp-master.debian.org": "changelogs",
           "sources.debian.org": "changelogs", "python-docs-mirror.example.org": "mirrors",
           "homework-forum.example.org": "forum"}


VARIANT_NAMES = ("Names: digit = the recipe's G-Eval digit (brief rubric, 1,000 characters); yesno = `--method yesno`;"
                 ' -sandwich = `--ask both`; -fewshot = `--shots 2`; -short = 500 characters; contrast, additive = '
                 'those methods; pairwise = the page against a sports-results page, "A or B?", both orders (in the '
                 'script only).')


def judge_lines(j: dict, judgments: Path) -> list[str]:
    """The judge's numbers: in logprobs mode the expected scores' spread, a histogram in quarter
    points, and the mean expected score of each source (does the judge tell the sources apart?)."""
    if j.get("scoring") != "logprobs":
        return ["", f"Judge: {j['sample']} documents scored by SmolLM2-135M-Instruct from its answer's text, "
                f"{j['unparsable']} unparsable; scores " + ", ".join(f"{k}: {v}" for k, v in j["histogram"].items()) + "."]
    records = [json.loads(line) for line in judgments.open() if line.strip()]
    e = j["expected_score"]
    if j.get("method", "digit") == "digit":
        lines = ["", "## The judge's scores (G-Eval: the expected digit under SmolLM2's token probabilities)", "",
                 f"{j['sample']} documents judged, {j['unparsable']} unparsable. The reply is prefilled with "
                 f"{j.get('prefill')!r}; at the next token P(\"0\")..P(\"5\") (top 20 log-probabilities) are renormalised.",
                 f"- expected score: min {e['min']:.2f}, median {e['median']:.2f}, mean {e['mean']:.2f}, max {e['max']:.2f}; "
                 f"the digits 0-5 held {100 * e['mean_digit_mass']:.0f} % of the probability at that token on average;",
                 "- by nearest whole score: " + ", ".join(f"{k}: {v}" for k, v in j["histogram"].items()) + ";",
                 "- the likeliest digit (the greedy answer): " + ", ".join(f"{k}: {v}" for k, v in j["argmax_histogram"].items()) + "."]
    else:
        qs = " / ".join(f'"{q}"' for q in j["questions"])
        lines = ["", f"## The judge's scores (method `{j['method']}`: P(yes) under SmolLM2's token probabilities)", "",
                 f"{j['sample']} documents judged, {j['unparsable']} unparsable. Each question ({qs}) follows the extract; "
                 f"the reply is prefilled with {j.get('prefill')!r} and p = P(yes) / (P(yes) + P(no)) is read at the next "
                 "token (top 20 log-probabilities); the score combines the questions' p (phi3/recipe/judge.py, YES_NO).",
                 f"- score: min {e['min']:.2f}, median {e['median']:.2f}, mean {e['mean']:.2f}, max {e['max']:.2f}; "
                 f"yes and no held {100 * e['mean_answer_mass']:.0f} % of the probability at that token on average;",
                 "- by nearest whole score: " + ", ".join(f"{k}: {v}" for k, v in j["histogram"].items()) + "."]
    lines += ["", "| expected score | documents |", "|---|---|"]
    scores = [r["score"] for r in records if r.get("score") is not None]
    lo = int(min(scores) * 4) / 4 if scores else 0
    while scores and lo <= max(scores):
        lines.append(f"| {lo:.2f}-{lo + 0.25:.2f} | {sum(1 for x in scores if lo <= x < lo + 0.25)} |")
        lo += 0.25
    by: dict[str, list[float]] = {}
    for r in records:
        if r.get("score") is not None:
            host = re.sub(r"^https?://([^/]+)/.*$", r"\1", r.get("url") or "")
            by.setdefault(SOURCES.get(host, host or "?"), []).append(r["score"])
    lines += ["", "| source | judged | mean expected score | min | max | at or above 3 |", "|---|---|---|---|---|---|"]
    for src, xs in sorted(by.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
        lines.append(f"| {src} | {len(xs)} | {sum(xs) / len(xs):.2f} | {min(xs):.2f} | {max(xs):.2f} | "
                     f"{sum(1 for x in xs if x >= 3)} |")
    return lines


def write_page(out: Path, work: Path, recipe: Path, timings: list[dict], compare: list[dict], n_pages: int,
               pages: dict, pipeline_s: float, total_s: float, args, failed: tuple[str, str] | None = None) -> None:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    run = work / "run"
    s = {d.name: json.loads((d / "summary.json").read_text()) for d in run.iterdir() if (d / "summary.json").is_file()}
    lines = ["# DATA.md: the data recipe on real offline text (`make data-demo`)", "",
             "Generated by `benchmarks/data_demo.py` (`make data-demo`); every number below is from that run.",
             f"Machine: {cpu}, {os.cpu_count()} cores, shared with other jobs: the load average is given per stage, and "
             "CPU seconds (of `phi3 data` and of the judge server) are the numbers to compare, not wall time.", "",
             "Command (what the demo runs, one stage at a time so that each is timed; a whole run is the last line):", "",
             "```", f"make data-demo   # = .venv/bin/python benchmarks/data_demo.py {' '.join(sys.argv[1:])}".rstrip(),
             f"phi3 serve --port {args.port} --name smollm2 --threads 1 &   # SmolLM2-135M-Instruct Q4_1, judge and generator"
             + ("" if not args.url else f" (this run: an already running one at {args.url})"),
             f"phi3 data run {recipe}", "```", "", "The recipe:", "", "```toml", recipe.read_text().replace(str(work), "WORK").rstrip(), "```", "",
             "## Input: Debian documentation packed as WARC", "",
             f"`apt-get download {' '.join(PACKAGES)}` + this machine's /usr/share/doc changelogs and licences: "
             f"{n_pages} pages in {len(pages)} WARC files (warcio):", "",
             "| source | pages | what |", "|---|---|---|"]
    what = {"python-docs": "python3.11-doc HTML: tutorial, howtos, library pages (educational)",
            "debian-handbook": "debian-handbook HTML: en-US, fr-FR, de-DE and ja-JP pages, 10:2:2:1",
            "gcide": "dict-gcide: runs of 12 dictionary entries (low value)",
            "manpages": "manpages sections 2, 3, 5, 7, roff turned to text (reference)",
            "changelogs": "Debian changelogs and copyright files (low value)",
            "mirrors": "planted: 5 Python pages with 1 % of words changed (near-duplicates)",
            "forum": "planted: a homework-forum post quoting a GSM-8K test question"}
    lines += [f"| {k} | {len(v)} | {what.get(k, '')} |" for k, v in pages.items()]
    lines += ["", "## Stages: documents, time, load", "",
              "| stage | documents in | documents out | wall s | CPU s (phi3 data) | CPU s (judge server) | load before -> after (1/5/15 min) |",
              "|---|---|---|---|---|---|---|"]
    for t in timings:
        st = s.get(t["stage"], {})
        din = st.get("documents_in", st.get("sample", ""))
        dout = st.get("documents_out", "")
        srv = f"{t['server_cpu_s']:.0f}" if t["server_cpu_s"] else ""
        lo = t["load"]
        lines.append(f"| {t['stage']} | {din} | {dout} | {t['wall_s']:.0f} | {t['cpu_s']:.0f} | {srv} | "
                     f"{lo[0]}/{lo[1]}/{lo[2]} -> {lo[3]}/{lo[4]}/{lo[5]} |")
    if failed:
        lines += ["", f"**The run stopped at {failed[0]}**: `{failed[1]}`"]
    lines += ["", f"Pipeline wall time {pipeline_s / 60:.1f} min; the whole demo (download, WARC, embedder comparison, "
              f"report) {total_s / 60:.1f} min."]
    d = s.get("dedup", {})
    if d:
        lines += ["", f"Dedup rate: {d['removed']['minhash']['dropped']} of {d['documents_in']} documents "
                  f"({100 * d['removed']['minhash']['dropped'] / max(d['documents_in'], 1):.1f} %) removed by MinHash "
                  "(5-gram shingles, 14 bands x 8 hashes)."]
    j = s.get("judge", {})
    if j:
        lines += judge_lines(j, run / "judge" / "judgments.jsonl")
    c = s.get("classify", {})
    if c:
        lines += [f"Classifier ({args.embedder}): scores of all {c['documents_in']} documents "
                  + ", ".join(f"{k}: {v}" for k, v in c["histogram"].items())
                  + f"; held out ({c['heldout']} judged documents) at score >= {c['threshold']}: precision {c['heldout_precision']:.3f}, "
                  f"recall {c['heldout_recall']:.3f}, F1 {c['heldout_f1']:.3f}."]
    p = s.get("phases", {})
    if p:
        lines += ["", f"Phases: phase 1 = score >= {p['t1']} ({p['phase_documents']['phase1']} web documents), phase 2 = "
                  f"score >= {p['t2']} ({p['phase_documents']['phase2']} web documents) + synthetic; tokens (SmolLM2 tokenizer): "
                  + ", ".join(f"{k} {v:,}" for k, v in p["tokens"].items()) + "."]
        if p.get("synthetic_dedup"):
            sd = p["synthetic_dedup"]
            lines += [f"Synthetic against web (MinHash): {sd['documents_in']} generations in, {sd['documents_out']} kept, "
                      f"{sd['removed']['near_web']} near web text, {sd['removed']['near_synthetic']} near another generation."]
    # benchmarks/judge_variants.py's last tables, if run: the sample it chose on (seed 0), and a second one
    for seed, folder in ((0, "judge-variants"), (1, "judge-variants-seed1")):
        variants = work.parent / folder / "table.md"
        if variants.is_file():
            lines += ["", f"## Ways of asking the judge (benchmarks/judge_variants.py, sample seed {seed})", "",
                      "50 ingested pages (10 per source, English handbook only) judged by SmolLM2-135M-Instruct in each "
                      "way; AUC: a docs page (python-docs, handbook) scores above a low-value one (changelogs, gcide). "
                      f"`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/judge_variants.py --seed {seed} --out "
                      f"~/.cache/phi3/{folder}`", "", VARIANT_NAMES, "", variants.read_text().rstrip()]
    if compare:
        lines += ["", "## The classifier's embedder, on the judge's labels", "",
              "The same Ridge head and held-out split (20 % of the judged documents), three embedders; speed is embedding every "
              "classified document once in this process (CPU seconds count all its threads).", "",
              f"| embedder | dims | held out | precision | recall | F1 at {s.get('classify', {}).get('threshold', 3)} | MSE | docs | CPU s | docs per CPU s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in compare:
        name = r["embedder"] if r["embedder"] in ("minilm", "minilm-static") else "stand-in (random static, tests)"
        if "error" in r:
            lines.append(f"| {name} | not run: {r['error']} |||||||||")
            continue
        lines.append(f"| {name} | {r['dims']} | {r['heldout']} | {r['heldout_precision']:.3f} | {r['heldout_recall']:.3f} | "
                     f"{r['heldout_f1']:.3f} | {r['heldout_mse']:.2f} | {r['docs']} | {r['cpu_s']:.1f} | {r['docs_per_cpu_s']:.1f} |")
    report = (work / "report" / "DATA.md").read_text()
    report = report.replace("# Data recipe report", "## `phi3 data report`").replace(str(work), "WORK")
    report = re.sub(r"!\[score histograms\]\(DATA.png\)", "(score histograms: WORK/report/DATA.png)", report)
    lines += ["", report.rstrip()]
    text = "\n".join(lines).replace(str(work), "WORK").replace(str(ROOT) + "/", "") + "\n"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)


if __name__ == "__main__":
    sys.exit(main())
