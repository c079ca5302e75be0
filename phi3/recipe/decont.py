"""decontaminate: drop every document that shares an n-gram (13 words by default, as GPT-3 and
lm-eval's Janitor use) with a benchmark's test set.

The benchmarks are the ones `phi3 eval` reads, from the same --data-dir layout (phi3.tasks): every
task whose folder exists there is loaded with its own loader, and each evaluated example's text
(question, then its gold answer or choice) is indexed. datatrove's NGramsDecontIndexer needs lighteval
and the Hugging Face hub, so the index is built here with datatrove's own tokenizer, normalization
and hash (the same functions its NGramsDecontFilter applies to documents), written as
`<task>.index.hashes`, and datatrove's NGramsDecontFilter does the filtering. A side table
(`<task>.where.json`) maps each hash to the example it came from, so hits are reported with the
benchmark file and record they match.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import create_hash_func
from datatrove.utils.text import ngrams, simplify_text
from datatrove.utils.word_tokenizers import load_word_tokenizer

from phi3.errors import Phi3Error
from phi3.recipe.ingest import docs_reader
from phi3.recipe.pipeline import Step, step_stats


def example_text(ex) -> str:
    """What of an evaluated example may leak into training text: its question and its gold answer."""
    gold = ex.target or (ex.choices[ex.gold] if ex.choices else "") or (ex.answers[0] if ex.answers else "")
    queries = ex.contexts if ex.contexts is not None else [ex.query]
    return "\n".join([*queries, gold])


def build_index(data_dir: Path, index_dir: Path, config: NGramsDecontConfig, only: list[str] | None = None) -> dict:
    """Write `<task>.index.hashes` (+ `.where.json`) for every task under data_dir; returns
    {task: {"examples": n, "ngrams": n, "files": [...]}}."""
    from phi3.tasks import TASKS, load_task
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise Phi3Error(f"--data-dir {data_dir}: no such folder (it is laid out as `phi3 eval` reads it)")
    names = only or [t for t, task in TASKS.items() if (data_dir / task.folder).is_dir()]
    for n in names:
        if n not in TASKS:
            raise Phi3Error(f"unknown task {n!r}; tasks are: {', '.join(TASKS)}")
    if not names:
        raise Phi3Error(f"--data-dir {data_dir}: no benchmark folders in it (expected e.g. "
                        f"{data_dir}/gsm8k/test.jsonl; `phi3 eval --list-tasks` lists the layouts)")
    tok = load_word_tokenizer("en")
    h = create_hash_func(config.hash_config)
    index_dir.mkdir(parents=True, exist_ok=True)
    report = {}
    for name in names:
        task = TASKS[name]
        data = load_task(task, data_dir, [])
        where: dict[int, str] = {}
        for ex in data.examples:
            words = tok.word_tokenize(simplify_text(example_text(ex), config.norm_config))
            for g in ngrams(words, config.n_grams):
                where.setdefault(int(h(" ".join(g))), ex.source or f"{name} example {ex.id}")
        hashes = np.array(sorted(where), dtype=config.hash_config.np_descr)
        hashes.tofile(index_dir / f"{name}.index.hashes")
        (index_dir / f"{name}.where.json").write_text(json.dumps({str(k): v for k, v in where.items()}))
        report[name] = {"examples": len(data.examples), "ngrams": len(hashes), "files": [str(f) for f in data.files]}
    return report


def decont_steps(src: Path, data_dir: Path, n_grams: int = 13, tasks_only: list[str] | None = None) -> tuple[list[Step], NGramsDecontConfig, Path]:
    """The stage's steps, its config, and the index built in a temporary folder (the caller removes it)."""
    if n_grams < 1:
        raise Phi3Error(f"--ngrams {n_grams} must be at least 1")
    docs_reader(src)
    config = NGramsDecontConfig(n_grams=n_grams)
    data_dir = Path(data_dir)
    # The index is built now, before any stage folder exists: a malformed benchmark file fails
    # with nothing written (the stage moves it into OUT.partial/index when it starts).
    import tempfile
    built = Path(tempfile.mkdtemp(prefix="phi3-decont-index-"))
    try:
        info = build_index(data_dir, built, config, tasks_only)
    except BaseException:
        shutil_rm(built)
        raise
    (built / "tasks.json").write_text(json.dumps(info, indent=1))

    def index(work: Path) -> list:
        idx = work / "index"
        if not (idx / "tasks.json").is_file():
            import shutil
            shutil.rmtree(idx, ignore_errors=True)
            shutil.copytree(built, idx)
        return [docs_reader(src),
                NGramsDecontFilter(index_folder=str(idx), config=config,
                                   exclusion_writer=JsonlWriter(str(work / "removed" / "decontaminate"))),
                JsonlWriter(str(work / "docs"))]
    return [Step("decontaminate", index)], config, built


def shutil_rm(path: Path) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def summarize_decont(work: Path, config: NGramsDecontConfig) -> dict:
    """Documents in/out and every hit: the document, the benchmark, the shared n-gram and the
    benchmark record it came from."""
    import gzip
    blocks = step_stats(work, "decontaminate")
    reader = next((b["stats"] for b in blocks if "documents" in b["stats"]), {})
    h = create_hash_func(config.hash_config)
    where = {}
    for f in sorted((work / "index").glob("*.where.json")):
        where[f.name.removesuffix(".where.json")] = json.loads(f.read_text())
    hits = []
    for f in sorted((work / "removed" / "decontaminate").glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                d = json.loads(line)
                m = d.get("metadata", {})
                task, gram = m.get("contaminated_task"), m.get("contaminated_ngram")
                hits.append({"id": d["id"], "source": m.get("source"), "url": m.get("url"), "task": task,
                             "ngram": gram, "benchmark_record": where.get(task, {}).get(str(int(h(gram))))})
    hits.sort(key=lambda x: str(x["id"]))
    index = json.loads((work / "index" / "tasks.json").read_text())
    return {"documents_in": reader.get("documents", 0), "documents_out": blocks[-1]["stats"].get("total", 0) if blocks else 0,
            "n_grams": config.n_grams, "benchmarks": index, "removed": {"decontaminate": {"dropped": len(hits)}},
            "hits": hits}
