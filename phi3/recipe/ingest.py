"""ingest: WARC/WET archives, folders of HTML pages, and jsonl/parquet files -> documents.

datatrove does the reading (WarcReader, JsonlReader, ParquetReader) and the HTML extraction
(Trafilatura(favour_precision=True), as FineWeb runs it). This module adds a reader for a folder of
.html files (datatrove has none: a file is one page), a step that stamps every document with its
`source`, and checks each input before anything is written: an archive that does not open, or a
record without the text field, is one error line naming the file.

Every document keeps `id` (WARC-Record-ID; the relative path of an HTML file; the record's id field
or "<file>/<line>" for jsonl/parquet), and metadata `url`, `source` and whatever else its record had.
"""

from __future__ import annotations

from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.readers import JsonlReader, ParquetReader, WarcReader
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.writers import JsonlWriter

from phi3.errors import Phi3Error
from phi3.recipe.pipeline import Step

WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".warc.wet", ".warc.wet.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
HTML_SUFFIXES = (".html", ".htm", ".xhtml")


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".wet", ".wet.gz")):
        return "wet"  # Common Crawl's extracted text: no HTML to extract
    if name.endswith(WARC_SUFFIXES):
        return "warc"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(HTML_SUFFIXES):
        return "html"
    return ""


def classify(path: Path) -> tuple[str, list[Path]]:
    """(kind, files) of one input: a file, or a folder whose files are all of one kind."""
    if not path.exists():
        raise Phi3Error(f"{path}: no such file or folder")
    if path.is_file():
        kind = _kind(path)
        if not kind:
            raise Phi3Error(f"{path}: unknown input format; give WARC/WET (.warc.gz, .wet.gz), .html, .jsonl(.gz) or .parquet")
        return kind, [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
    kinds = {"warc" if _kind(p) == "wet" else _kind(p) for p in files}
    if not files:
        raise Phi3Error(f"{path}: no WARC/WET, .html, .jsonl(.gz) or .parquet files in this folder")
    if len(kinds) > 1:
        raise Phi3Error(f"{path}: holds {' and '.join(sorted(kinds))} files; give each kind as its own input")
    return _kind(files[0]), files


def check_input(kind: str, files: list[Path], text_key: str, id_key: str = "id") -> None:
    """Read the first document of every file through the same datatrove reader the stage runs, so
    that an unreadable archive or a record without the text field fails before anything is written."""
    what = {"warc": "a readable WARC archive", "wet": "a readable WET archive", "jsonl": "JSON lines",
            "parquet": "a readable parquet file", "html": "readable"}[kind]
    for f in files:
        r = reader(kind, f, [f], text_key, id_key)
        try:
            next(iter(r.read_file(f.name)), None)
        except Phi3Error:
            raise
        except Exception as e:
            why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            raise Phi3Error(f"{f}: not {what} ({why})") from None


def _check_record(record: object, path: object, n: object, text_key: str) -> None:
    if not isinstance(record, dict):
        raise Phi3Error(f"{path}: record {n} is not a JSON object")
    if not isinstance(record.get(text_key), str):
        what = "has no" if text_key not in record else "has a non-string"
        raise Phi3Error(f"{path}: record {n} {what} '{text_key}' field (fields: {', '.join(list(record)[:12])}); "
                        "pass --text-key")


def _strict_adapter(self, data: dict, path: str, id_in_file: int | str) -> dict:
    """datatrove's default adapter, except that a record without the text field is an error
    (datatrove skips it with one warning for the whole run)."""
    where = self.data_folder.resolve_paths(path) if hasattr(self, "data_folder") else path
    _check_record(data, where, id_in_file + 1 if isinstance(id_in_file, int) else id_in_file, self.text_key)
    return self._default_adapter(data, path, id_in_file)


class HtmlFolderReader(BaseDiskReader):
    """Every .html file under a folder is one page: id = its path relative to the folder."""
    name = "📄 HTML files"

    def read_file(self, filepath: str):
        with self.data_folder.open(filepath, "rb") as f:
            raw = f.read()
        try:
            html = raw.decode("utf-8")
        except UnicodeDecodeError:
            html = raw.decode("latin-1")
        doc = self.get_document_from_dict({"text": html, "id": filepath, "url": f"file:{filepath}"}, filepath, 0)
        if doc:
            yield doc


class Stamp(PipelineStep):
    """Sets metadata["source"] (and a null url where the record had none)."""
    name = "🏷 source"

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            doc.metadata["source"] = self.source
            doc.metadata.setdefault("url", None)
            self.stat_update("documents")
            yield doc


def reader(kind: str, root: Path, files: list[Path], text_key: str = "text", id_key: str = "id"):
    glob = None if root.is_dir() else root.name
    folder = str(root if root.is_dir() else root.parent)
    if kind in ("warc", "wet"):
        return WarcReader(folder, glob_pattern=glob if glob else None)
    if kind == "html":
        return HtmlFolderReader(folder, glob_pattern=glob or "**/*.htm*")
    if kind == "jsonl":
        return JsonlReader(folder, glob_pattern=glob or "**/*.json*", text_key=text_key, id_key=id_key,
                           adapter=_strict_adapter)
    return ParquetReader(folder, glob_pattern=glob or "**/*.parquet", text_key=text_key, id_key=id_key,
                         adapter=_strict_adapter)


def ingest_steps(inputs: list[Path], text_key: str = "text", id_key: str = "id",
                 sources: list[str] | None = None, tasks: int = 1) -> list[Step]:
    """One datatrove run per input (each input has its own reader), all writing OUT/docs."""
    steps = []
    seen = set()
    for i, root in enumerate(inputs):
        root = Path(root)
        kind, files = classify(root)
        check_input(kind, files, text_key)
        if kind in ("warc", "html"):
            _check_extractor()
        source = sources[i] if sources else (root.stem if root.is_file() else root.name)
        source = source.removesuffix(".warc").removesuffix(".jsonl") or f"input{i}"
        if source in seen:
            source = f"{source}-{i}"
        seen.add(source)

        def pipeline(work: Path, kind=kind, root=root, files=files, source=source) -> list:
            blocks = [reader(kind, root, files, text_key, id_key)]
            if kind in ("warc", "html"):
                blocks.append(Trafilatura(favour_precision=True, timeout=10.0))
            blocks += [Stamp(source), JsonlWriter(str(work / "docs"), output_filename=f"{source}_${{rank}}.jsonl.gz")]
            return blocks
        steps.append(Step(f"ingest-{source}", pipeline, tasks=min(tasks, len(files))))
    return steps


def _check_extractor() -> None:
    """trafilatura 1.11 imports lxml.html.clean, which lxml 6 moved to lxml_html_clean; without it
    datatrove's extractor subprocess dies on import and every page counts as a 10 s timeout."""
    try:
        import lxml.html.clean  # noqa: F401
        import trafilatura  # noqa: F401
    except ImportError as e:
        raise Phi3Error(f"HTML extraction cannot start ({e.msg.splitlines()[0]}): pip install 'phi3[data]'") from None


def docs_input(path: Path) -> tuple[str, str | None]:
    """(folder, glob) of the documents a later stage reads: a previous stage's OUT (its docs/), or a
    folder or file of jsonl(.gz) records."""
    path = Path(path)
    if (path / "summary.json").is_file():  # a finished stage: its documents are in docs/
        if not (path / "docs").is_dir():
            raise Phi3Error(f"{path}: this stage kept no documents (see {path / 'summary.json'})")
        path = path / "docs"
    if path.with_name(path.name + ".partial").exists() and not path.exists():
        raise Phi3Error(f"{path} is not finished ({path.name}.partial exists): rerun the stage that writes it")
    if not path.exists():
        raise Phi3Error(f"{path}: no such file or folder")
    if path.is_file():
        if _kind(path) != "jsonl":
            raise Phi3Error(f"{path}: give a .jsonl(.gz) file, a folder of them, or a previous stage's --out folder")
        check_input("jsonl", [path], "text")
        return str(path.parent), path.name
    files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) == "jsonl")
    if not files:
        raise Phi3Error(f"{path}: no .jsonl(.gz) documents here; give a previous stage's --out folder")
    check_input("jsonl", files[:1], "text")
    return str(path), "**/*.json*"


def docs_reader(path: Path):
    folder, glob = docs_input(path)
    return JsonlReader(folder, glob_pattern=glob, adapter=_strict_adapter)
