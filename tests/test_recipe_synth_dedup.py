"""Synthetic text is MinHash-deduplicated against the web data and among itself before it joins
phase 2 (issue 16, stage 7: "Generations are deduplicated among themselves and against the web
data"), on Python-tutorial sections as web text and planted near-copies as generations."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="`phi3 data` needs datatrove: pip install -e '.[data]'")

from phi3.recipe.cli import main  # noqa: E402
from tests.test_recipe_stages import near_duplicate, read_docs, tutorial_sections, write_jsonl  # noqa: E402


def classified(folder: Path, docs: list[dict]) -> Path:
    """What `phi3 data classify` leaves: documents with edu scores, and its summary."""
    (folder / "docs").mkdir(parents=True)
    with gzip.open(folder / "docs" / "00000.jsonl.gz", "wt") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    hist = {str(s): sum(d["metadata"]["edu_int_score"] == s for d in docs) for s in range(6)}
    (folder / "summary.json").write_text(json.dumps({"stage": "classify", "histogram": hist, "documents_out": len(docs)}))
    return folder


def test_synthetic_near_copies_of_web_or_of_each_other_are_dropped_before_phase_2(tmp_path):
    from tests.conftest import need_assets
    vocab = str(need_assets() / "vocab" / "ggml-vocab-phi-3.gguf")
    rng = random.Random(0)
    sections = tutorial_sections()
    web_files = ("classes", "datastructures")  # web: two tutorial pages; synthetic originals: the other two
    web = [{**d, "metadata": {"edu_int_score": 4 if i % 2 else 1, "edu_score": 0.0}}
           for i, d in enumerate(x for x in sections if x["id"].split("-")[0] in web_files)]
    originals = [d for d in sections if d["id"].split("-")[0] not in web_files and len(d["text"].split()) > 150][:3]
    low_web = next(d for d in web if d["metadata"]["edu_int_score"] == 1)  # against all web text, not only phase 2's
    high_web = next(d for d in web if d["metadata"]["edu_int_score"] == 4)
    syn = [{"id": f"syn-{d['id']}", "text": d["text"]} for d in originals]
    syn += [{"id": "syn-copies-low-web", "text": near_duplicate(low_web["text"], rng)},
            {"id": "syn-copies-high-web", "text": near_duplicate(high_web["text"], rng)},
            {"id": "syn-twin", "text": near_duplicate(originals[0]["text"], rng)}]
    src = classified(tmp_path / "classify", web)
    syn_path = write_jsonl(tmp_path / "synthetic.jsonl", syn)
    out = tmp_path / "phases"
    assert main(["phases", str(src), "--out", str(out), "--t1", "1", "--t2", "3", "--synthetic", str(syn_path),
                 "--tokenizer", vocab]) == 0
    kept = [d["id"] for d in read_docs(out / "phase2" / "synthetic" / "docs")]
    removed = {d["id"]: d for d in read_docs(out / "phase2" / "synthetic" / "removed")}
    assert kept == [f"syn-{d['id']}" for d in originals]  # in order, the twin's original kept
    assert set(removed) == {"syn-copies-low-web", "syn-copies-high-web", "syn-twin"}
    assert all("_phi3_web" not in d["metadata"] for d in read_docs(out / "phase2" / "synthetic" / "docs"))
    s = json.loads((out / "summary.json").read_text())
    assert s["synthetic_dedup"] == {"documents_in": 6, "documents_out": 3,
                                    "removed": {"near_web": 2, "near_synthetic": 1}}
    assert s["removed"]["synthetic_near_web"]["dropped"] == 2
    # the web documents are all in phase 1 (t1 = 1): none removed by the synthetic dedup
    assert s["phase_documents"] == {"phase1": len(web), "phase2": sum(d["metadata"]["edu_int_score"] >= 3 for d in web)}
    from phi3.train.data import open_documents
    from phi3.train.recipe import load_tokenizer_spec
    tok, _ = load_tokenizer_spec(vocab)
    assert len(open_documents(str(out / "phase2" / "synthetic" / "tokens"), tok)) == 3


def test_synthetic_that_only_copies_web_text_is_one_line(tmp_path, capsys):
    from tests.conftest import need_assets
    vocab = str(need_assets() / "vocab" / "ggml-vocab-phi-3.gguf")
    web = [{**d, "metadata": {"edu_int_score": 3, "edu_score": 3.0}} for d in tutorial_sections()[:6]]
    src = classified(tmp_path / "classify", web)
    syn = write_jsonl(tmp_path / "syn.jsonl", [{"id": "syn-0", "text": web[2]["text"]}])
    out = tmp_path / "phases"
    assert main(["phases", str(src), "--out", str(out), "--t1", "1", "--t2", "3", "--synthetic", str(syn),
                 "--tokenizer", vocab]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "near-duplicate of web text" in err
    assert not out.exists()
