"""Local and Ray executors give the same kept documents and the same token shards (issue 16,
Done-when 3), on a local Ray cluster this test starts (ray.init(num_cpus=2))."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="`phi3 data` needs datatrove: pip install -e '.[data]'")
ray = pytest.importorskip("ray", reason="the Ray executor needs ray: pip install -e '.[data-ray]'")

from phi3.recipe.cli import main  # noqa: E402

DATA = Path(__file__).parent / "data" / "recipe"


def kept_ids(folder: Path) -> list[str]:
    ids = []
    for f in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            ids += [json.loads(line)["id"] for line in fh]
    return sorted(ids)


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.endswith(".metadata")}


def run_recipe(src: Path, out: Path, vocab: Path, *executor: str) -> tuple[list[str], dict[str, bytes]]:
    common = ["--tasks", "2", *executor]
    assert main(["heuristics", str(src), "--out", str(out / "heur"), "--filters", "gopher_repetition", *common]) == 0
    assert main(["tokenize", str(out / "heur"), "--out", str(out / "tok"), "--tokenizer", str(vocab), *common]) == 0
    return kept_ids(out / "heur" / "docs"), shards(out / "tok" / "tokens")


def test_local_and_ray_keep_the_same_documents_and_tokens(tmp_path):
    from tests.conftest import need_assets
    vocab = need_assets() / "vocab" / "ggml-vocab-phi-3.gguf"
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted((DATA / "python-tutorial").glob("*.rst.txt")):  # 4 files: 2 per task
        parts = re.split(r"\n(?=[^\n]+\n[=\-*~^]{3,}\n)", p.read_text())
        with open(src / f"{p.name.split('.')[0]}.jsonl", "w") as f:
            for i, part in enumerate(parts):
                f.write(json.dumps({"id": f"{p.name}-{i}", "text": part}) + "\n")
    local = run_recipe(src, tmp_path / "local", vocab)  # 2 tasks, one after the other in this process
    try:
        ray_run = run_recipe(src, tmp_path / "ray", vocab, "--executor", "ray", "--workers", "2")
    finally:
        ray.shutdown()
    assert 0 < len(local[0]) < 60 and len(local[1]) == 4  # some sections filtered; 2 shards x (.ds, .index)
    assert ray_run[0] == local[0]
    assert ray_run[1] == local[1]
