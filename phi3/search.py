"""Search augmentation for chat: a small model answers with facts it is handed, citing them by number.

The Phi-3 report (section 5) notes that a small model lacks the capacity to store many facts and
proposes pairing it with a search engine. This module is that pairing, kept deliberately simple:

1. Find passages. Either a local full-text index over your own documents (`build_index` then
   `LocalIndex`), or a SearxNG instance's JSON API for web results (`SearxngSearch`).
   `open_searcher` picks one from a single string, so the CLI and server need one option.
2. Rewrite the last user message (`augment`) so the passages come first, numbered [1], [2], ...,
   followed by a one-line instruction to cite them and then the original question. The target
   models are tiny (SmolLM2-135M): a short instruction and the question last, closest to where the
   answer starts, work better than a long system prompt.

Ranking is tantivy's BM25 over each passage's title and text; nothing here scores documents itself.
Documents are cut into passages of about `passage_words` words on paragraph boundaries, because a
whole document would not fit the model's context and a passage is what gets cited.

User text is never handed to tantivy's query language as is: it is cut into alphanumeric words and
each word is quoted, so quotes, colons, parentheses or a bare AND in a question cannot cause a syntax
error, while tantivy still applies the index's own analyzer (lowercasing, English stemming) to them.

An index folder is recognised by its `phi3-index.json` marker, which also records what was indexed
(the list of documents is what `phi3 serve` may show under /sources/, and nothing else).
Rebuilding replaces a folder that carries the marker and refuses any other non-empty folder, so a
mistyped --index path cannot delete user data.

What gets indexed stays inside the documents folder: a link (to a file or a folder) that resolves
outside it is skipped, and so is a binary file, whatever its name: a file whose first 8 KiB hold a
NUL byte (git's and grep's test), or that is not valid UTF-8. `build_index` lists what it skipped
and why, and `phi3 index build` prints that list.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from phi3.errors import Phi3Error

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm")
MARKER_FILE = "phi3-index.json"
MARKER_FORMAT = "phi3-index"
MARKER_VERSION = 2  # 2: the marker lists the indexed documents ("sources")
ANALYZER = "en_stem"  # tantivy's built-in English analyzer: "moons" finds "moon"
INSTRUCTION = "Answer the question using the search results below. Cite the results you use by number, like [1]."
BUILD_HINT = "build one with `phi3 index build DOCS --index PATH`"


@dataclass
class Passage:
    title: str
    url: str  # file:// URI of the absolute path for local files; the result URL for web results
    text: str
    score: float
    source: str  # path relative to the indexed folder for local files; the URL for web results


@dataclass
class IndexStats:
    documents: int
    passages: int
    path: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path under the folder, why)


class _Skip(Exception):
    """A file that is not indexed, and why (reported, not fatal)."""


BINARY_SNIFF_BYTES = 8192


# ---------------------------------------------------------------------------------------------
# Reading documents


class _HTMLText(HTMLParser):
    """Visible text and <title> of an HTML page. Block elements become paragraph breaks so the
    passage splitter can cut between them."""

    SKIP = {"script", "style", "noscript", "template", "title"}
    BLOCK = {"p", "div", "br", "hr", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "section",
             "article", "aside", "header", "footer", "nav", "main", "blockquote", "pre", "figure",
             "figcaption", "form", "h1", "h2", "h3", "h4", "h5", "h6", "body", "details", "summary"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title_parts: list[str] = []
        self.skip_depth = 0
        self.in_title = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self.skip_depth += 1
            self.in_title = self.in_title or tag == "title"
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        # <br/> and friends: no matching end tag will come, so never count them as open
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
            if tag == "title":
                self.in_title = False
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title_parts.append(data)
        elif self.skip_depth == 0:
            self.parts.append(data)


def _paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines. Line breaks inside one are kept (markdown lists, poems,
    tables read badly run together); other whitespace runs become one space."""
    paras = ("\n".join(" ".join(line.split()) for line in p.splitlines() if line.strip())
             for p in re.split(r"\n\s*\n", text))
    return [p for p in paras if p]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        raise _Skip("a binary file (a NUL byte in its first 8 KiB)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Skip(f"not UTF-8 text (byte {e.start}): binary, or another encoding; convert it to UTF-8 "
                    "to index it") from None


def _read_document(path: Path) -> tuple[str, str]:
    """(title, text) of a supported file; the title falls back to the file name. _Skip for a
    binary file."""
    raw = _read_text(path)
    suffix = path.suffix.lower()
    if suffix in (".html", ".htm"):
        parser = _HTMLText()
        parser.feed(raw)
        parser.close()
        title = " ".join("".join(parser.title_parts).split())
        # newlines in HTML source are layout, not content: only block elements break paragraphs
        paras = (" ".join(p.split()) for p in re.split(r"\n\s*\n", "".join(parser.parts)))
        return title or path.name, "\n\n".join(p for p in paras if p)
    title = ""
    if suffix in (".md", ".markdown"):
        for line in raw.splitlines():
            if line.startswith("# "):
                title = line[2:].strip().rstrip("#").strip()
                break
    return title or path.name, raw


def split_passages(text: str, passage_words: int = 120) -> list[str]:
    """Cut text into passages of about `passage_words` words, between paragraphs where possible.

    Whole paragraphs are packed together until the next one would overflow; a paragraph longer
    than `passage_words` is cut every `passage_words` words (its line breaks become spaces, the
    price of cutting mid-paragraph). Every word lands in exactly one passage, in order, so `" ".join(passages).split() == text.split()`.
    """
    if passage_words < 1:
        raise Phi3Error(f"passage size must be at least 1 word, got {passage_words}")
    passages: list[str] = []
    current: list[str] = []  # paragraphs of the passage being filled
    count = 0
    for para in _paragraphs(text):
        words = para.split()
        if count and count + len(words) > passage_words:
            passages.append("\n\n".join(current))
            current, count = [], 0
        while len(words) > passage_words:
            passages.append(" ".join(words[:passage_words]))
            words = words[passage_words:]
        if words:
            current.append(para if len(words) == len(para.split()) else " ".join(words))
            count += len(words)
    if current:
        passages.append("\n\n".join(current))
    return passages


def _find_documents(docs_dir: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """The supported files under docs_dir (an absolute, resolved path), and what was skipped and
    why. Links are followed only where they resolve inside docs_dir: `passwd.txt -> /etc/passwd`
    or a link to a folder elsewhere is skipped, so nothing outside the folder gets indexed (and
    later quoted to a chat client). A folder reached twice (a link to a folder inside) is walked
    once, under its own path: links to folders are followed only after every real folder."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    seen = {docs_dir}
    stack = [docs_dir]
    linked: list[tuple[Path, Path]] = []  # (link, the folder it leads to), walked last
    while stack or linked:
        if not stack:
            path, real = linked.pop(0)
            if real not in seen:
                seen.add(real)
                stack.append(path)
            continue
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            skipped.append((folder.relative_to(docs_dir).as_posix(), f"cannot read the folder ({e.strerror})"))
            continue
        for entry in entries:
            # hidden files and folders (.git, .venv, ...) hold tooling files, not documents anyone wants cited
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            rel = path.relative_to(docs_dir).as_posix()
            wanted = path.suffix.lower() in SUPPORTED_SUFFIXES
            try:
                real = path.resolve(strict=True)
                is_dir = real.is_dir()
            except (OSError, RuntimeError):
                if wanted:
                    skipped.append((rel, "a broken or looping link"))
                continue
            if entry.is_symlink() and not real.is_relative_to(docs_dir):
                if is_dir or wanted:
                    skipped.append((rel, f"a link to {'a folder' if is_dir else 'a file'} outside {docs_dir}"))
                continue
            if is_dir:
                if entry.is_symlink():
                    linked.append((path, real))
                elif real not in seen:
                    seen.add(real)
                    stack.append(path)
            elif wanted and real.is_file():
                files.append(path)
    return sorted(files), sorted(skipped)


# ---------------------------------------------------------------------------------------------
# The local index


def _schema():
    import tantivy
    b = tantivy.SchemaBuilder()
    b.add_text_field("title", stored=True, tokenizer_name=ANALYZER)
    b.add_text_field("text", stored=True, tokenizer_name=ANALYZER)
    b.add_text_field("url", stored=True, tokenizer_name="raw")
    b.add_text_field("source", stored=True, tokenizer_name="raw")
    b.add_unsigned_field("position", stored=True)  # passage number within its document
    return b.build()


def _read_marker(index_dir: Path) -> dict | None:
    try:
        meta = json.loads((index_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == MARKER_FORMAT else None


def _check_index_target(index_dir: Path) -> None:
    if not index_dir.exists():
        return
    if not index_dir.is_dir():
        raise Phi3Error(f"index path {index_dir} is a file, not a folder; pass a new or empty folder to --index")
    if _read_marker(index_dir) is None and any(index_dir.iterdir()):
        raise Phi3Error(f"{index_dir} is a non-empty folder that is not a phi3 index; refusing to overwrite it "
                        f"(pass a new or empty folder to --index)")


def build_index(docs_dir: Path, index_dir: Path, passage_words: int = 120, progress: bool = True) -> IndexStats:
    """Index the .txt, .md, .markdown, .html and .htm files under docs_dir into index_dir. Links
    that lead outside docs_dir and binary files are skipped and listed in the result's `skipped`."""
    import tantivy
    from tqdm import tqdm

    docs_dir, index_dir = Path(docs_dir).expanduser(), Path(index_dir).expanduser()
    if passage_words < 1:
        raise Phi3Error(f"passage size must be at least 1 word, got {passage_words}")
    if not docs_dir.exists():
        raise Phi3Error(f"documents folder not found: {docs_dir}")
    if not docs_dir.is_dir():
        raise Phi3Error(f"{docs_dir} is not a folder; pass the folder that holds your documents")
    docs_dir = docs_dir.resolve()
    files, skipped = _find_documents(docs_dir)
    if not files:
        raise Phi3Error(f"no documents to index in {docs_dir} (supported: {', '.join(SUPPORTED_SUFFIXES)})"
                        + _skipped_note(skipped))
    _check_index_target(index_dir)

    # Build next to the target and swap it in at the end, so a failed build keeps the old index.
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    # (mkdir rather than mkdtemp: mkdtemp's 0700 mode would carry over to the finished index)
    tmp = index_dir.parent / f".{index_dir.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        schema = _schema()
        index = tantivy.Index(schema, path=str(tmp))
        writer = index.writer()
        documents = passages = 0
        sources: list[str] = []
        for path in tqdm(files, desc="indexing", unit="file", file=sys.stderr, disable=not progress):
            source = path.relative_to(docs_dir).as_posix()
            try:
                title, text = _read_document(path)
            except _Skip as e:
                skipped.append((source, str(e)))
                continue
            except OSError as e:
                skipped.append((source, f"cannot read it ({e.strerror})"))
                continue
            chunks = split_passages(text, passage_words)
            if not chunks:
                continue  # an empty file or a page with no visible text has nothing to cite
            url = path.as_uri()
            sources.append(source)
            for position, chunk in enumerate(chunks):
                writer.add_document(tantivy.Document(title=title, text=chunk, url=url, source=source,
                                                     position=position))
            documents += 1
            passages += len(chunks)
        if not passages:
            raise Phi3Error(f"the documents in {docs_dir} hold no text to index" + _skipped_note(skipped))
        writer.commit()
        writer.wait_merging_threads()
        del writer, index  # release tantivy's handles before the folder moves
        meta = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "documents": documents,
                "passages": passages, "passage_words": passage_words, "docs_dir": str(docs_dir),
                "tantivy": getattr(tantivy, "__version__", ""), "sources": sources}
        # written last: a folder without it is never mistaken for a finished index
        (tmp / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if index_dir.exists():
            _check_index_target(index_dir)  # it may have changed while we were indexing
            shutil.rmtree(index_dir)
        os.replace(tmp, index_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return IndexStats(documents=documents, passages=passages, path=index_dir, skipped=sorted(skipped))


def _skipped_note(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    first, why = skipped[0]
    more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
    return f"; skipped {first} ({why}){more}"


_WORD = re.compile(r"[^\W_]+")  # letters and digits, as tantivy's simple tokenizer splits them


class LocalIndex:
    """A phi3 index folder made by `build_index`, searched with tantivy's BM25."""

    def __init__(self, index_dir: Path):
        import tantivy

        self.path = Path(index_dir).expanduser()
        if not self.path.is_dir():
            raise Phi3Error(f"search index not found: {self.path} ({BUILD_HINT})")
        meta = _read_marker(self.path)
        if meta is None:
            raise Phi3Error(f"{self.path} is not a phi3 search index ({BUILD_HINT})")
        self.meta = meta
        # The documents `phi3 serve` may show under /sources/: those indexed, nothing else (an
        # index built before version 2 does not list them, so none are shown until rebuilt).
        listed = meta.get("sources")
        self.sources: frozenset[str] = frozenset(s for s in listed if isinstance(s, str)) \
            if isinstance(listed, list) else frozenset()
        try:
            self._index = tantivy.Index.open(str(self.path))
        except Exception as e:  # e.g. written by an incompatible tantivy version
            raise Phi3Error(f"cannot open the search index {self.path} ({e}); rebuild it "
                            f"with `phi3 index build DOCS --index PATH`") from None
        self._searcher = self._index.searcher()

    def search(self, query: str, k: int = 3) -> list[Passage]:
        # Only runs of letters and digits survive, each quoted: the query language then sees nothing
        # but quoted words (no AND/OR, field:value, brackets or stray quotes), and tantivy still runs
        # them through the index's analyzer. Words are OR-ed over title and text, ranked by BM25.
        words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query or "")))
        if not words or k < 1:
            return []
        parsed = self._index.parse_query(" ".join(f'"{w}"' for w in words), ["title", "text"])
        hits = self._searcher.search(parsed, limit=k).hits
        results = []
        for score, address in hits:
            doc = self._searcher.doc(address)
            results.append(Passage(title=doc.get_first("title") or "", url=doc.get_first("url") or "",
                                   text=doc.get_first("text") or "", score=float(score),
                                   source=doc.get_first("source") or ""))
        return results


# ---------------------------------------------------------------------------------------------
# Web search


class SearxngSearch:
    """Web search through a SearxNG instance (https://docs.searxng.org), or anything speaking its JSON.

    The interface is one HTTP request per query:

        GET {base_url}/search?q=QUERY&format=json

    answered with a JSON object whose "results" list holds one object per hit, best first:

        {"results": [{"title": "...", "url": "https://...", "content": "a snippet of the page"}, ...]}

    Only "title", "url" and "content" are read ("score" too, when present); other keys are ignored.
    Each result becomes a Passage whose text is the snippet and whose source is the URL. SearxNG
    ships with the JSON format switched off: add `json` to `search.formats` in its settings.yml.
    """

    def __init__(self, base_url: str, timeout: float = 10.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def search(self, query: str, k: int = 3) -> list[Passage]:
        if not (query or "").strip() or k < 1:
            return []
        url = f"{self.base_url}/search?{urllib.parse.urlencode({'q': query, 'format': 'json'})}"
        request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "phi3"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as e:
            hint = " (is `json` enabled in SearxNG's search.formats?)" if e.code == 403 else ""
            raise Phi3Error(f"web search at {url} failed: HTTP {e.code} {e.reason}{hint}") from None
        except urllib.error.URLError as e:
            raise Phi3Error(f"web search at {url} failed: {e.reason} (check the search URL)") from None
        except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
            raise Phi3Error(f"web search at {url} failed: {e} (check the search URL)") from None
        try:
            data = json.loads(body)
        except ValueError as e:
            raise Phi3Error(f"web search at {url} returned invalid JSON ({e}); "
                            f"it should be a SearxNG JSON endpoint") from None
        results = data.get("results") if isinstance(data, dict) else None
        if not isinstance(results, list):
            raise Phi3Error(f"web search at {url} returned JSON without a \"results\" list; "
                            f"it should be a SearxNG JSON endpoint")
        passages = []
        for r in results:
            if not isinstance(r, dict):
                continue
            title, link, content = (str(r.get(key) or "").strip() for key in ("title", "url", "content"))
            if not (title or content):
                continue  # nothing the model could use
            score = r.get("score")
            passages.append(Passage(title=title or link, url=link, text=content,
                                    score=float(score) if isinstance(score, (int, float)) else 0.0,
                                    source=link))
            if len(passages) == k:
                break
        return passages


def open_searcher(spec: str) -> LocalIndex | SearxngSearch:
    """An http(s) URL means a SearxNG instance; anything else is the path of a local index."""
    if spec.lower().startswith(("http://", "https://")):
        return SearxngSearch(spec)
    return LocalIndex(Path(spec))


# ---------------------------------------------------------------------------------------------
# Prompting


def _text_of(content) -> str:
    # OpenAI-style clients may send content as a list of parts; only the text parts matter here
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return "" if content is None else str(content)


def _last_user(messages: list[dict]) -> int:
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            return i
    raise Phi3Error("the conversation has no user message to search for; end it with a user turn")


def query_of(messages: list[dict]) -> str:
    """The text to search for: the last user message."""
    return _text_of(messages[_last_user(messages)].get("content"))


def augment(messages: list[dict], passages: list[Passage]) -> list[dict]:
    """A copy of messages whose last user message carries the passages as numbered sources."""
    out = [dict(m) for m in messages]
    if not passages:
        return out
    i = _last_user(out)
    sources = "\n\n".join(f"[{n}] {p.title}\n{p.text}" for n, p in enumerate(passages, 1))
    out[i]["content"] = f"{INSTRUCTION}\n\n{sources}\n\nQuestion: {_text_of(out[i].get('content'))}"
    return out
