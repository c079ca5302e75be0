"""`phi3 data ingest` on real pages (tests/data/recipe: Debian handbook HTML, Python tutorial rst):
a WARC archive built from them, a folder of HTML files and a jsonl file; and bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

pytest.importorskip("datatrove", reason="`phi3 data` needs datatrove: pip install -e '.[data]'")

from phi3.recipe.cli import main  # noqa: E402

DATA = Path(__file__).parent / "data" / "recipe"
HANDBOOK = DATA / "handbook"
PAGES = ("sect.apt-cache.html", "sect.automatic-upgrades.html", "sect.backup.html")


def write_warc(path: Path, pages: list[tuple[str, bytes]]) -> list[str]:
    """A Common Crawl-style WARC (gzipped response records with HTTP headers); returns the record ids."""
    from io import BytesIO

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter
    ids = []
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        for url, body in pages:
            http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            rec = w.create_warc_record(url, "response", payload=BytesIO(body), http_headers=http,
                                       warc_headers_dict={"WARC-Identified-Payload-Type": "text/html"})
            ids.append(rec.rec_headers.get_header("WARC-Record-ID"))
            w.write_record(rec)
    return ids


def read_docs(folder: Path) -> list[dict]:
    docs = []
    for f in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            docs += [json.loads(line) for line in fh]
    return docs


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingest")
    url = "https://debian-handbook.info/browse/en-US/stable/{}"
    warc_ids = write_warc(tmp / "crawl.warc.gz", [(url.format(p), (HANDBOOK / "en-US" / p).read_bytes()) for p in PAGES])
    with open(tmp / "tutorial.jsonl", "w") as f:
        for p in sorted((DATA / "python-tutorial").glob("*.rst.txt")):
            f.write(json.dumps({"id": p.name, "text": p.read_text(), "url": f"https://docs.python.org/3.11/{p.name}",
                                "licence": "PSF"}) + "\n")
    out = tmp / "out"
    assert main(["ingest", str(tmp / "crawl.warc.gz"), str(HANDBOOK / "fr-FR"), str(tmp / "tutorial.jsonl"),
                 "--out", str(out)]) == 0
    return tmp, out, warc_ids


def test_ingest_reads_warc_html_and_jsonl(ingested):
    tmp, out, warc_ids = ingested
    docs = {d["id"]: d for d in read_docs(out / "docs")}
    by_source: dict[str, set] = {}
    for d in docs.values():
        by_source.setdefault(d["metadata"]["source"], set()).add(d["id"])
    assert by_source == {"crawl": set(warc_ids), "fr-FR": set(PAGES),
                         "tutorial": {"classes.rst.txt", "datastructures.rst.txt", "errors.rst.txt", "modules.rst.txt"}}
    # WARC: Trafilatura's text (no markup), the record's URL kept
    backup = next(d for d in docs.values() if d["metadata"].get("url", "").endswith("sect.backup.html"))
    assert "rsnapshot" in backup["text"] and "<div" not in backup["text"]
    # HTML folder: extracted French, the file path as id and url
    fr = docs["sect.backup.html"]
    assert fr["metadata"]["url"] == "file:sect.backup.html" and "sauvegarde" in fr["text"].lower()
    # jsonl: text untouched, other fields kept as metadata
    cls = docs["classes.rst.txt"]
    assert cls["text"] == (DATA / "python-tutorial" / "classes.rst.txt").read_text()
    assert cls["metadata"]["licence"] == "PSF" and cls["metadata"]["url"].endswith("classes.rst.txt")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["documents_out"] == 10 and summary["sources"]["crawl"] == {"read": 3, "written": 3}
    assert not (tmp / "out.partial").exists()


def test_finished_stage_is_not_rerun(ingested, capsys):
    tmp, out, _ = ingested
    before = sorted(p.stat().st_mtime_ns for p in (out / "docs").iterdir())
    assert main(["ingest", str(HANDBOOK / "fr-FR"), "--out", str(out)]) == 0
    assert "exists (delete it to run ingest again)" in capsys.readouterr().out
    assert sorted(p.stat().st_mtime_ns for p in (out / "docs").iterdir()) == before


def _fails(capsys, argv: list[str], *words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("phi3: error: "), err
    for w in words:
        assert w in err, err


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    broken = tmp_path / "broken.warc.gz"
    broken.write_bytes(b"\x1f\x8b\x08\x00 this is not a gzip stream" * 10)
    _fails(capsys, ["ingest", str(broken), "--out", str(out)], str(broken), "WARC")
    notext = tmp_path / "notext.jsonl"
    notext.write_text(json.dumps({"id": 1, "content": "hello"}) + "\n")
    _fails(capsys, ["ingest", str(notext), "--out", str(out)], str(notext), "'text'", "--text-key")
    _fails(capsys, ["ingest", str(notext), "--out", str(out), "--executor", "rey"], "did you mean 'ray'")
    _fails(capsys, ["ingset", str(notext), "--out", str(out)], "ingset")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.warc.gz", "notext.jsonl"]


def test_missing_text_field_after_the_first_record(tmp_path, capsys):
    """The check of the first record passes; the reader's strict adapter stops the run at the bad one,
    and OUT is never published."""
    good = json.dumps({"id": "a", "text": "fine"})
    (tmp_path / "mixed.jsonl").write_text(good + "\n" + json.dumps({"id": "b", "body": "x"}) + "\n")
    out = tmp_path / "out"
    _fails(capsys, ["ingest", str(tmp_path / "mixed.jsonl"), "--out", str(out)], "record 2", "'text'")
    assert not out.exists()
