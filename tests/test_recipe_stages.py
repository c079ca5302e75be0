"""`phi3 data` heuristics, dedup, decontaminate and tokenize on small real inputs
(tests/data/recipe: Debian handbook pages in four languages, Python tutorial sections, a GSM-8K slice)."""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="`phi3 data` needs datatrove: pip install -e '.[data]'")

from phi3.recipe.cli import main  # noqa: E402

DATA = Path(__file__).parent / "data" / "recipe"
HANDBOOK = DATA / "handbook"
LANGS = ("de-DE", "en-US", "es-ES", "fr-FR")


def read_docs(folder: Path) -> list[dict]:
    docs = []
    for f in sorted(folder.rglob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            docs += [json.loads(line) for line in fh]
    return docs


def tutorial_sections() -> list[dict]:
    """The tutorial's rst split at its section headings: 50 documents of 50 words or more."""
    docs = []
    for p in sorted((DATA / "python-tutorial").glob("*.rst.txt")):
        parts = re.split(r"\n(?=[^\n]+\n[=\-*~^]{3,}\n)", p.read_text())
        for i, part in enumerate(parts):
            if len(part.split()) >= 50:
                docs.append({"id": f"{p.name.split('.')[0]}-{i}", "text": part})
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    return path


@pytest.fixture(scope="module")
def handbook(tmp_path_factory) -> Path:
    """The 12 handbook pages (3 pages x 4 languages) ingested from their HTML folders."""
    out = tmp_path_factory.mktemp("handbook") / "ingest"
    assert main(["ingest", str(HANDBOOK), "--out", str(out)]) == 0
    return out


def test_language_filter_keeps_english_pages_only(handbook, tmp_path):
    out = tmp_path / "lang"
    assert main(["heuristics", str(handbook), "--out", str(out), "--filters", "language"]) == 0
    kept = {d["id"] for d in read_docs(out / "docs")}
    dropped = {d["id"] for d in read_docs(out / "removed" / "language")}
    pages = {d["id"] for d in read_docs(handbook / "docs")}
    assert len(pages) == 12
    assert kept == {p for p in pages if p.startswith("en-US/")}
    assert dropped == pages - kept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["documents_in"] == 12 and summary["documents_out"] == 3
    assert summary["removed"] == {"language": {"dropped": 9, "kept": 3}}


def test_all_heuristics_count_what_each_filter_removes(handbook, tmp_path):
    out = tmp_path / "heur"
    assert main(["heuristics", str(handbook), "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert list(s["removed"]) == ["language", "gopher_repetition", "gopher_quality", "c4", "fineweb"]
    # each filter sees what the one before kept; the removed/ folders hold exactly what was counted
    seen = s["documents_in"]
    for name, r in s["removed"].items():
        assert r["dropped"] + r["kept"] == seen
        assert len(read_docs(out / "removed" / name)) == r["dropped"]
        assert sum((r.get("reasons") or {}).values()) in (0, r["dropped"])
        seen = r["kept"]
    assert seen == s["documents_out"] == len(read_docs(out / "docs"))
    assert s["removed"]["language"]["dropped"] == 9


def near_duplicate(text: str, rng: random.Random, frac: float = 0.01) -> str:
    """`text` with 1 % of its words replaced: each breaks up to 5 shingles, so the Jaccard similarity
    of 5-gram shingles is about 0.9, which MinHash's 14 x 8 bands catch with probability 0.9998
    (3 % gave about 0.75 and 0.6: two of five planted copies were missed)."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(len(words) * frac))):
        words[i] = rng.choice(["lorem", "ipsum", "dolor", "amet"])
    return " ".join(words)


def test_minhash_removes_planted_near_duplicates_and_nothing_else(tmp_path):
    rng = random.Random(0)
    docs = tutorial_sections()
    originals = rng.sample(docs, 5)
    planted = [{"id": f"dup-of-{d['id']}", "text": near_duplicate(d["text"], rng)} for d in originals]
    src = write_jsonl(tmp_path / "docs.jsonl", docs + planted)  # originals first: the first of a cluster is kept
    out = tmp_path / "dedup"
    assert main(["dedup", str(src), "--out", str(out)]) == 0
    removed = {d["id"] for d in read_docs(out / "removed" / "minhash")}
    kept = {d["id"] for d in read_docs(out / "docs")}
    assert removed == {d["id"] for d in planted}
    assert kept == {d["id"] for d in docs}
    s = json.loads((out / "summary.json").read_text())
    assert (s["documents_in"], s["documents_out"], s["removed"]["minhash"]["dropped"]) == (len(docs) + 5, len(docs), 5)


def test_decontamination_removes_the_planted_gsm8k_question_only(tmp_path):
    test_q = [json.loads(line)["question"] for line in (DATA / "benchmarks" / "gsm8k" / "test.jsonl").open()]
    train_q = [json.loads(line)["question"] for line in (DATA / "benchmarks" / "gsm8k" / "train.jsonl").open()]
    docs = tutorial_sections()[:20]
    docs[3] = {"id": "planted", "text": docs[3]["text"] + "\n\nA reader asked: " + test_q[6] + " Solve it with Python."}
    # a training-split question and 10 words of a test question (11 word tokens) are not contamination
    docs[4] = {"id": "train-question", "text": docs[4]["text"] + "\n\n" + train_q[0]}
    docs[5] = {"id": "short-overlap", "text": docs[5]["text"] + "\n\n" + " ".join(test_q[9].split()[:10])}
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "decont"
    assert main(["decontaminate", str(src), "--out", str(out), "--data-dir", str(DATA / "benchmarks")]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert [h["id"] for h in s["hits"]] == ["planted"]
    hit = s["hits"][0]
    assert hit["task"] == "gsm8k" and hit["benchmark_record"].endswith("test.jsonl: record 7")
    # the shared 13-gram, normalized as datatrove does (lowercase, no punctuation, numbers -> 0)
    assert len(hit["ngram"].split()) == 13 and set(hit["ngram"].split()) - {"0"} <= set(re.findall(r"\w+", test_q[6].lower()))
    assert {d["id"] for d in read_docs(out / "docs")} == {d["id"] for d in docs} - {"planted"}
    assert s["benchmarks"]["gsm8k"]["examples"] == 30 and s["n_grams"] == 13


def test_decontamination_bad_data_dir(tmp_path, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", tutorial_sections()[:2])
    assert main(["decontaminate", str(src), "--out", str(tmp_path / "o"), "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such folder" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.fixture(scope="module")
def phi3_vocab() -> Path:
    from tests.conftest import need_assets
    return need_assets() / "vocab" / "ggml-vocab-phi-3.gguf"


def test_tokenize_writes_shards_that_phi3_train_reads(phi3_vocab, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    from phi3.train.data import open_documents
    from phi3.train.recipe import load_tokenizer_spec
    tok, _ = load_tokenizer_spec(str(phi3_vocab))
    docs = tutorial_sections()[:30]
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    # a bare tokenizer.json that truncates at 16 tokens: the stage must turn truncation off
    truncating = HFTokenizer.from_str(tok.tk.to_str())
    truncating.enable_truncation(16)
    truncating.save(str(tmp_path / "tokenizer.json"))
    out = tmp_path / "tok"
    assert main(["tokenize", str(src), "--out", str(out), "--tokenizer", str(tmp_path / "tokenizer.json"),
                 "--eos", "<|endoftext|>"]) == 0
    source = open_documents(out / "tokens", tok)
    got = sorted(tuple(int(t) for t in d) for d in source.get_many(range(len(source))))
    want = sorted(tuple(tok.encode(d["text"], add_bos=False) + [tok.eos_id]) for d in docs)
    assert got == want  # every document whole, EOS after each, shuffled within the shard
    s = json.loads((out / "summary.json").read_text())
    assert s["tokens"] == sum(map(len, want)) and s["documents_in"] == 30
    assert (out / "tokens" / s["shards"][0]).stat().st_size == 2 * s["tokens"]  # uint16: Phi-3's 32,064 ids
    meta = (out / "tokens" / (s["shards"][0] + ".metadata")).read_text().splitlines()
    assert meta[:2] == [f"{out / 'tokenizer.json'}|2", str(s["tokens"])]  # the published path, not OUT.partial's


def test_tokenize_needs_eos_for_a_bare_tokenizer_json(phi3_vocab, tmp_path, capsys):
    from phi3.train.recipe import load_tokenizer_spec
    tok, _ = load_tokenizer_spec(str(phi3_vocab))
    tok.tk.save(str(tmp_path / "tokenizer.json"))
    src = write_jsonl(tmp_path / "docs.jsonl", tutorial_sections()[:2])
    assert main(["tokenize", str(src), "--out", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "tokenizer.json")]) == 2
    assert "--eos" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_settings_that_keep_nothing_are_an_error(handbook, tmp_path, capsys):
    out = tmp_path / "none"
    assert main(["heuristics", str(handbook), "--out", str(out), "--filters", "language",
                 "--language-threshold", "1.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "kept none of its 12 documents (removed: language 12)" in err
    assert not out.exists() and not (tmp_path / "none.partial").exists()


def test_unfinished_stage_resumes_only_its_unfinished_tasks(tmp_path):
    """A stage killed after one of its two tasks: OUT is not published; the rerun redoes only the
    other task (datatrove's completions) and publishes the same shards as an uninterrupted run."""
    docs = tutorial_sections()
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", docs[:25])
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[25:])
    out = tmp_path / "dd"
    assert main(["dedup", str(tmp_path / "in"), "--out", str(out), "--tasks", "2"]) == 0
    whole = {p.name: gzip.decompress(p.read_bytes()) for p in (out / "docs").iterdir()}
    # what a kill after task 0 of the last step leaves: OUT.partial, task 1 unmarked, its output cut short
    partial = tmp_path / "dd.partial"
    out.rename(partial)
    (partial / "summary.json").unlink()
    (partial / "logs" / "4-filter" / "completions" / "00001").unlink()
    (partial / "docs" / "00001.jsonl.gz").write_bytes(b"\x1f\x8b half")
    task0 = (partial / "docs" / "00000.jsonl.gz").stat().st_mtime_ns
    assert main(["dedup", str(tmp_path / "in"), "--out", str(out), "--tasks", "2"]) == 0
    assert not partial.exists()
    assert (out / "docs" / "00000.jsonl.gz").stat().st_mtime_ns == task0  # not redone
    assert {p.name: gzip.decompress(p.read_bytes()) for p in (out / "docs").iterdir()} == whole


def test_recipe_file_runs_every_stage_in_order(phi3_vocab, tmp_path):
    from phi3.train.data import open_documents
    from phi3.train.recipe import load_tokenizer_spec
    out = tmp_path / "work"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'''
out = "{out}"
[executor]
tasks = 1
[ingest]
inputs = ["{HANDBOOK / 'en-US'}", "{HANDBOOK / 'fr-FR'}"]
[heuristics]
languages = ["en"]
filters = ["language"]
[dedup]
ngrams = 5
[decontaminate]
data_dir = "{DATA / 'benchmarks'}"
ngrams = 13
[tokenize]
tokenizer = "{phi3_vocab}"
''')
    assert main(["run", str(recipe)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["decontaminate", "dedup", "heuristics", "ingest", "tokenize"]
    counts = [json.loads((out / s / "summary.json").read_text()).get("documents_out")
              for s in ("ingest", "heuristics", "dedup", "decontaminate")]
    assert counts == [6, 3, 3, 3]
    tok, _ = load_tokenizer_spec(str(phi3_vocab))
    assert len(open_documents(out / "tokenize" / "tokens", tok)) == 3
    # the report over all of them
    assert main(["report", str(out), "--out", str(tmp_path / "report" / "DATA.md")]) == 0
    page = (tmp_path / "report" / "DATA.md").read_text()
    tokens = json.loads((out / "tokenize" / "summary.json").read_text())["tokens"]
    assert f"| ingest |  | 6 |  | `{out / 'ingest'}` |" in page
    assert f"| heuristics | 6 | 3 |  | `{out / 'heuristics'}` |" in page
    assert f"| tokenize | 3 |  | {tokens:,} | `{out / 'tokenize'}` |" in page
    assert "| language | 3 | 3 |  |" in page and "Removed by language, e.g. `sect." in page


@pytest.mark.parametrize("body, words", [
    ('out = "w"\n[heuristic]\nlanguages = ["en"]\n', ["unknown key 'heuristic'", "did you mean 'heuristics'"]),
    ('out = "w"\ninput = "x"\n[heuristics]\nlangauges = ["en"]\n', ["heuristics.langauges", "did you mean 'languages'"]),
    ('out = "w"\ninput = "x"\n[dedup]\nngrams = "five"\n', ["dedup.ngrams must be an integer"]),
    ('out = "w"\n[executor]\nworkres = 2\n[ingest]\ninputs = ["x"]\n', ["executor.workres", "did you mean 'workers'"]),
    ('out = "w"\n[dedup]\n', ["starts at [dedup] with no ingest"]),
])
def test_recipe_typos_are_one_line_and_run_nothing(tmp_path, capsys, body, words):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(body.replace('"w"', f'"{tmp_path / "w"}"'))
    assert main(["run", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(recipe) in err, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "w").exists()


def test_stage_failing_mid_way_resumes_after_the_fix(tmp_path, capsys):
    """Task 2 of 4 meets a record without text: exit 2, nothing published, tasks 0 and 1 kept. Once the
    file is fixed, the rerun runs tasks 2 and 3 only and publishes what an uninterrupted run does."""
    docs = tutorial_sections()
    fixed, broken = tmp_path / "fixed", tmp_path / "in"
    for folder in (fixed, broken):
        folder.mkdir()
        for i in range(4):
            write_jsonl(folder / f"part{i}.jsonl", docs[i::4])
    with open(broken / "part2.jsonl", "a") as f:
        f.write(json.dumps({"id": "bad", "body": "no text"}) + "\n")
    assert main(["heuristics", str(fixed), "--out", str(tmp_path / "whole"), "--filters", "gopher_repetition",
                 "--tasks", "4"]) == 0
    out = tmp_path / "heur"
    argv = ["heuristics", str(broken), "--out", str(out), "--filters", "gopher_repetition", "--tasks", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "part2.jsonl: record" in err and "'text'" in err
    done = tmp_path / "heur.partial" / "logs" / "heuristics" / "completions"
    assert not out.exists() and sorted(p.name for p in done.iterdir()) == ["00000", "00001"]
    kept = {n: (tmp_path / "heur.partial" / "docs" / n).stat().st_mtime_ns for n in ("00000.jsonl.gz", "00001.jsonl.gz")}
    (broken / "part2.jsonl").write_text((fixed / "part2.jsonl").read_text())
    assert main(argv) == 0
    assert {n: (out / "docs" / n).stat().st_mtime_ns for n in kept} == kept  # not redone

    def written(folder: Path) -> dict:  # file_path (datatrove's provenance) names the two input folders
        return {p.name: [(d["id"], d["text"]) for d in read_docs_file(p)] for p in sorted(folder.iterdir())}
    assert written(out / "docs") == written(tmp_path / "whole" / "docs")


def read_docs_file(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_killed_stage_resumes_to_the_same_output(phi3_vocab, tmp_path):
    """SIGKILL `phi3 data tokenize` once its first task is marked done (or whenever it is, if it
    finishes first: the check holds either way), rerun it: the shards equal an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time
    docs = tutorial_sections()
    (tmp_path / "in").mkdir()
    for i in range(6):
        write_jsonl(tmp_path / "in" / f"part{i}.jsonl", docs[i::6])
    base = [sys.executable, "-m", "phi3.recipe.cli", "tokenize", str(tmp_path / "in"), "--tokenizer", str(phi3_vocab),
            "--tasks", "6"]
    assert main(base[3:] + ["--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "tok"
    proc = subprocess.Popen(base + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = tmp_path / "tok.partial" / "logs" / "tokenize" / "completions" / "00000"
    deadline = time.monotonic() + 120
    while proc.poll() is None and not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if killed:  # what a kill leaves: no OUT, some tasks marked done and not all (measured here: 1 of 6)
        assert not out.exists() and 0 < len(list(marker.parent.iterdir())) < 6
    assert main(base[3:] + ["--out", str(out)]) == 0
    assert not (tmp_path / "tok.partial").exists()
    shards = lambda d: {p.name: p.read_bytes() for p in sorted((d / "tokens").iterdir()) if not p.name.endswith(".metadata")}  # noqa: E731
    assert shards(out) == shards(tmp_path / "whole") and len(shards(out)) == 12


def test_recipe_wires_the_llm_stages(tmp_path):
    from phi3.recipe.cli import load_recipe
    recipe = tmp_path / "r.toml"
    recipe.write_text('''
out = "w"
[executor]
tasks = 2
[ingest]
inputs = ["crawl"]
[decontaminate]
data_dir = "bench"
[synthetic]
url = "http://127.0.0.1:8000/v1"
model = "smollm2"
topics = "topics.txt"
styles = ["textbook"]
[judge]
url = "http://127.0.0.1:8000/v1"
model = "smollm2"
sample = 50
[classify]
embedder = "static"
[phases]
t1 = 2
t2 = 3
tokenizer = "default"
[tokenize]
tokenizer = "default"
''')
    info, argvs = load_recipe(recipe)
    assert info["stages"] == ["ingest", "decontaminate", "synthetic", "judge", "classify", "phases", "tokenize"]
    ex = ["--tasks", "2"]
    assert argvs == [
        ["ingest", "crawl", "--out", "w/ingest", *ex],
        ["decontaminate", "--data-dir", "bench", "w/ingest", "--out", "w/decontaminate", *ex],
        ["synthetic", "--url", "http://127.0.0.1:8000/v1", "--model", "smollm2", "--topics", "topics.txt",
         "--styles", "textbook", "--out", "w/synthetic"],
        ["judge", "--url", "http://127.0.0.1:8000/v1", "--model", "smollm2", "--sample", "50", "w/decontaminate",
         "--out", "w/judge"],
        ["classify", "--embedder", "static", "--judgments", "w/judge", "w/decontaminate", "--out", "w/classify", *ex],
        ["phases", "--t1", "2", "--t2", "3", "--tokenizer", "default", "--synthetic", "w/synthetic", "w/classify",
         "--out", "w/phases", *ex],
        ["tokenize", "--tokenizer", "default", "w/decontaminate", "--out", "w/tokenize", *ex],
    ]
    recipe.write_text('out = "w"\ninput = "docs"\n[judge]\nmodel = "m"\n')
    with pytest.raises(Exception, match=r"\[judge\] needs url"):
        load_recipe(recipe)
    recipe.write_text('out = "w"\ninput = "docs"\n[classify]\nembedder = "e"\n')
    with pytest.raises(Exception, match=r"add a \[judge\] table"):
        load_recipe(recipe)


FAKE_SBATCH = """#!{python}
# A one-machine stand-in for Slurm's sbatch: runs every array task of the script now, in order.
import os, re, subprocess, sys
script = sys.argv[-1]
text = open(script).read()
if "merge_stats" in text:  # datatrove's stats-merging job: not needed here (each task wrote its own)
    print("Submitted batch job 43")
    sys.exit(0)
m = re.search(r"#SBATCH --array=(\\d+)-(\\d+)", text)
for i in range(int(m.group(1)), int(m.group(2)) + 1) if m else [0]:
    env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(i), SLURM_JOB_ID="42", SLURM_ARRAY_JOB_ID="42",
               SLURM_NODELIST="localhost", SLURM_NODEID="0")
    subprocess.run(["bash", script], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print("Submitted batch job 42")
"""


def test_slurm_executor_through_sbatch_gives_the_local_result(tmp_path, monkeypatch):
    """--executor slurm writes datatrove's sbatch array script and submits it (here to a fake sbatch
    that runs the array tasks at once, an srun that runs its command and an scontrol that names this
    host): the same kept documents as the local executor, MinHash's four dependent steps included."""
    import os
    import sys
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable))
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do [[ "$1" == -n ]] && shift; shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho localhost\n')  # `scontrol show hostnames NODELIST`
    for f in ("sbatch", "srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    rng = random.Random(1)
    docs = tutorial_sections()
    dups = [{"id": f"dup-{d['id']}", "text": near_duplicate(d["text"], rng)} for d in docs[:3]]
    src = write_jsonl(tmp_path / "docs.jsonl", docs + dups)
    # 2 buckets instead of 14: each array task is a fresh Python process (about 2 s of imports here)
    assert main(["dedup", str(src), "--out", str(tmp_path / "local"), "--buckets", "2", "--hashes-per-bucket", "4"]) == 0
    assert main(["dedup", str(src), "--out", str(tmp_path / "slurm"), "--buckets", "2", "--hashes-per-bucket", "4",
                 "--executor", "slurm", "--slurm-partition", "cpu"]) == 0
    ids = lambda d: sorted(x["id"] for x in read_docs(d / "docs"))  # noqa: E731
    assert ids(tmp_path / "slurm") == ids(tmp_path / "local") == sorted(d["id"] for d in docs)
    script = (tmp_path / "slurm" / "logs" / "2-buckets" / "launch_script.slurm").read_text()
    assert "#SBATCH --partition=cpu" in script and "#SBATCH --array=0-1" in script  # one task per bucket
