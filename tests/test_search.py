"""phi3.search: the local tantivy index, the SearxNG client against a local HTTP server, and the
prompt rewriting. Everything runs on tiny files in a tmp folder, in well under a second each."""

from __future__ import annotations

import copy
import http.server
import json
import threading
from pathlib import Path

import pytest

from phi3.errors import Phi3Error
from phi3.search import (IndexStats, LocalIndex, Passage, SearxngSearch, augment, build_index, open_searcher,
                         query_of, split_passages)

NOTES = "The zorblat moon of planet Kexx is made of green cheese.\nIt was found in 2231.\n"
GUIDE = "# Quibble Guide\n\nQuibbles eat frumious berries.\n\nThey sleep at noon.\n"
PAGE = """<html><head><title>Snark  Hunting</title>
<style>.x { color: red } /* stylishword */</style>
<script>var secretword = "hidden"; if (a < b) {}</script></head>
<body><h1>Snarks</h1><p>A snark is hunted with thimbles &amp; care.</p><div>Bring forks<br>and hope.</div>
</body></html>"""


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text(NOTES)
    (d / "sub" / "guide.md").write_text(GUIDE)
    (d / "page.html").write_text(PAGE)
    (d / "data.csv").write_text("unsupportedword,1\n")  # not a supported type: ignored
    (d / ".git").mkdir()
    (d / ".git" / "HEAD.md").write_text("hiddenword\n")  # hidden folders are tooling, not documents
    return d


@pytest.fixture
def index(docs: Path, tmp_path: Path) -> LocalIndex:
    build_index(docs, tmp_path / "idx", progress=False)
    return LocalIndex(tmp_path / "idx")


def test_build_index_stats_and_marker(docs: Path, tmp_path: Path):
    stats = build_index(docs, tmp_path / "idx", progress=False)
    assert stats == IndexStats(documents=3, passages=3, path=tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "phi3-index.json").read_text())
    assert (meta["format"], meta["documents"], meta["passages"], meta["passage_words"], meta["docs_dir"]) == \
        ("phi3-index", 3, 3, 120, str(docs.resolve()))
    # the build happens in a sibling folder that is moved into place: nothing may be left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "idx"]


def test_build_index_progress_bar(docs: Path, tmp_path: Path, capsys):
    build_index(docs, tmp_path / "idx", progress=True)
    assert "indexing" in capsys.readouterr().err


def test_search_txt_finds_fact(index: LocalIndex, docs: Path):
    hits = index.search("What is the zorblat moon made of?")
    assert hits[0] == Passage(title="notes.txt", url=(docs / "notes.txt").resolve().as_uri(),
                              text=NOTES.strip(), score=hits[0].score, source="notes.txt")
    assert hits[0].score > 0
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_search_markdown_title_and_relative_source(index: LocalIndex, docs: Path):
    hits = index.search("frumious berries", k=1)
    assert len(hits) == 1
    assert (hits[0].title, hits[0].source, hits[0].url, hits[0].text) == \
        ("Quibble Guide", "sub/guide.md", (docs / "sub" / "guide.md").resolve().as_uri(), GUIDE.strip())


def test_search_matches_title_field_and_stems(index: LocalIndex):
    assert index.search("quibble", k=1)[0].source == "sub/guide.md"   # in the title and body
    assert index.search("hunting", k=1)[0].source == "page.html"      # only in the <title>
    assert index.search("moons", k=1)[0].source == "notes.txt"        # English stemming: moons -> moon


def test_html_visible_text_only(index: LocalIndex, docs: Path):
    hits = index.search("thimbles")
    assert len(hits) == 1
    assert (hits[0].title, hits[0].source, hits[0].url) == \
        ("Snark Hunting", "page.html", (docs / "page.html").resolve().as_uri())
    assert hits[0].text == "Snarks\n\nA snark is hunted with thimbles & care.\n\nBring forks\n\nand hope."
    assert index.search("secretword") == []
    assert index.search("stylishword") == []


def test_unsupported_and_hidden_files_ignored(index: LocalIndex):
    assert index.search("unsupportedword") == []
    assert index.search("hiddenword") == []


def test_k_limits_results(index: LocalIndex):
    query = "zorblat quibbles snark"
    assert len(index.search(query, k=3)) == 3
    assert len(index.search(query, k=2)) == 2
    assert index.search(query, k=0) == []


@pytest.mark.parametrize("query", [
    "", "   ", "?", "!!!", "()", '"', '""', ":", "AND", "OR", "NOT", "a AND", "OR b", "title:", "text:zorblat",
    'zorblat "moon', "(zorblat", "zorblat)", "[1 TO 2]", "{x}", "moon^2", "moon~", "moo*", "+zorblat -moon",
    "a && b || !c", "\\", "/regex/", "IN [a b]", "café ünïcode 漢字", "x" * 60, "what's 'it'?",
])
def test_queries_never_raise(index: LocalIndex, query: str):
    hits = index.search(query)
    assert isinstance(hits, list) and all(isinstance(h, Passage) for h in hits)


@pytest.mark.parametrize("query", ["", "   ", "?!.,;:", '"""', "()[]{}", "+-&&||!^~*:\\/"])
def test_empty_or_punctuation_query_returns_nothing(index: LocalIndex, query: str):
    assert index.search(query) == []


def test_query_syntax_is_treated_as_words(index: LocalIndex):
    # quotes, colons, parentheses and operators around the words must not change what is found
    for query in ['what is "zorblat"? (moon: AND OR)', "title:zorblat", "zorblat moon AND", "-zorblat"]:
        assert index.search(query, k=1)[0].source == "notes.txt", query


def test_split_passages_exact():
    text = "one two three\n\nfour five\n\nsix seven eight nine ten eleven twelve\n\nthirteen"
    assert split_passages(text, 5) == ["one two three\n\nfour five", "six seven eight nine ten",
                                       "eleven twelve\n\nthirteen"]
    assert split_passages("  \n\n \n", 5) == []
    # line breaks inside a paragraph that fits survive; whitespace runs do not
    assert split_passages("- a  b\n-\tc\n\n\n\nd", 6) == ["- a b\n- c\n\nd"]
    with pytest.raises(Phi3Error, match="at least 1 word"):
        split_passages("a", 0)


def _long_text() -> str:
    paras, n = [], 0
    for length in [3, 40, 7, 7, 25, 1, 60, 2, 11, 30]:  # paragraphs shorter and longer than a passage
        paras.append(" ".join(f"w{n + i}" for i in range(length)))
        n += length
    return "Intro line\nwith a wrapped   sentence.\n\n" + "\n\n".join(paras) + "\n"


def test_split_passages_keeps_every_word():
    text = _long_text()
    for size in [1, 5, 10, 24, 120]:
        passages = split_passages(text, size)
        assert " ".join(passages).split() == text.split(), size
        assert all(1 <= len(p.split()) <= size for p in passages), size


def test_index_passages_keep_every_word(tmp_path: Path):
    import tantivy

    docs = tmp_path / "docs"
    docs.mkdir()
    text = _long_text()
    (docs / "long.txt").write_text(text)
    stats = build_index(docs, tmp_path / "idx", passage_words=10, progress=False)
    assert (stats.documents, stats.passages) == (1, len(split_passages(text, 10)))
    # read every stored passage back, in document order, straight from tantivy
    index = tantivy.Index.open(str(tmp_path / "idx"))
    searcher = index.searcher()
    docs_found = [searcher.doc(a) for _, a in searcher.search(tantivy.Query.all_query(), limit=1000).hits]
    docs_found.sort(key=lambda d: d.get_first("position"))
    assert len(docs_found) == stats.passages
    assert " ".join(d.get_first("text") for d in docs_found).split() == text.split()
    assert all(len(d.get_first("text").split()) <= 10 for d in docs_found)


def test_rebuild_replaces_previous_index(tmp_path: Path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "a.txt").write_text("alpha aardvark")
    (second / "b.md").write_text("# Beta\n\nbeta bandicoot")
    (second / "c.txt").write_text("gamma")
    idx = tmp_path / "idx"
    build_index(first, idx, progress=False)
    assert LocalIndex(idx).search("aardvark")[0].source == "a.txt"
    stats = build_index(second, idx, progress=False)
    assert (stats.documents, stats.passages) == (2, 2)
    fresh = LocalIndex(idx)
    assert fresh.search("aardvark") == []
    assert [(p.title, p.source) for p in fresh.search("bandicoot")] == [("Beta", "b.md")]
    assert json.loads((idx / "phi3-index.json").read_text())["docs_dir"] == str(second.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "idx", "second"]


def test_links_out_of_the_folder_and_binary_files_are_skipped_and_reported(tmp_path: Path):
    """Issue 14 item 6: `passwd.txt -> /etc/passwd` was indexed (and quoted as a chat source), and
    random bytes named binary.txt were indexed as text."""
    import os
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "secret.txt").write_text("outsidesecret moonbeam\n")
    (outside / "folder" / "deep.md").write_text("outsidedeep moonbeam\n")
    docs = tmp_path / "docs"
    (docs / "real").mkdir(parents=True)
    (docs / "real" / "inside.md").write_text("# Inside\n\ninsideword moonbeam\n")
    (docs / "passwd.txt").symlink_to(outside / "secret.txt")            # a file link leading out
    (docs / "elsewhere").symlink_to(outside / "folder")                 # a folder link leading out
    (docs / "again").symlink_to(docs / "real")                          # a folder link inside: walked once
    (docs / "alias.md").symlink_to(docs / "real" / "inside.md")         # a file link inside: kept
    (docs / "loop").symlink_to(docs)                                    # a link to the folder itself
    (docs / "dangling.txt").symlink_to(tmp_path / "nothing-here.txt")
    (docs / "binary.txt").write_bytes(bytes(range(256)) * 16)          # 4 KiB with NUL bytes
    (docs / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))  # not UTF-8, no NUL
    (docs / "bom.txt").write_bytes("\ufeffbomword moonbeam\n".encode("utf-8"))  # UTF-8 with a BOM is text

    stats = build_index(docs, tmp_path / "idx", progress=False)
    assert stats.skipped == [
        ("binary.txt", "a binary file (a NUL byte in its first 8 KiB)"),
        ("dangling.txt", "a broken or looping link"),
        ("elsewhere", f"a link to a folder outside {docs.resolve()}"),
        ("latin1.txt", "not UTF-8 text (byte 3): binary, or another encoding; convert it to UTF-8 to index it"),
        ("passwd.txt", f"a link to a file outside {docs.resolve()}"),
    ]
    index = LocalIndex(tmp_path / "idx")
    assert index.search("outsidesecret") == [] and index.search("outsidedeep") == []
    assert sorted(p.source for p in index.search("moonbeam", k=10)) == ["alias.md", "bom.txt", "real/inside.md"]
    assert index.search("bomword")[0].text == "bomword moonbeam"  # the BOM is not part of the text
    # the indexed documents are listed in the marker: `phi3 serve` shows those under /sources/, no others
    assert index.sources == {"alias.md", "bom.txt", "real/inside.md"}
    assert json.loads((tmp_path / "idx" / "phi3-index.json").read_text())["version"] == 2
    assert os.path.islink(docs / "loop")  # (and the walk ended: the folder was not entered twice)


def test_a_folder_of_only_skipped_files_says_why(tmp_path: Path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "passwd.txt").symlink_to("/etc/passwd")
    with pytest.raises(Phi3Error, match=r"no documents to index .*; skipped passwd.txt \(a link to a file outside"):
        build_index(docs, tmp_path / "idx", progress=False)
    (docs / "blob.md").write_bytes(b"\0" * 10)
    with pytest.raises(Phi3Error, match=r"hold no text to index; skipped passwd.txt \(.*\) and 1 more"):
        build_index(docs, tmp_path / "idx", progress=False)


def test_an_index_without_a_document_list_shows_none(index: LocalIndex, tmp_path: Path):
    marker = tmp_path / "idx" / "phi3-index.json"
    meta = json.loads(marker.read_text())
    assert index.sources == {"notes.txt", "sub/guide.md", "page.html"}
    del meta["sources"]  # as version 1 wrote it
    meta["version"] = 1
    marker.write_text(json.dumps(meta))
    old = LocalIndex(tmp_path / "idx")
    assert old.sources == frozenset() and old.search("zorblat", k=1)[0].source == "notes.txt"


def test_refuses_non_index_folder(docs: Path, tmp_path: Path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(Phi3Error, match="not a phi3 index; refusing to overwrite"):
        build_index(docs, precious, progress=False)
    assert [p.name for p in precious.iterdir()] == ["thesis.txt"]
    assert (precious / "thesis.txt").read_text() == "do not delete"


def test_refuses_index_path_that_is_a_file(docs: Path, tmp_path: Path):
    f = tmp_path / "idx"
    f.write_text("x")
    with pytest.raises(Phi3Error, match="is a file, not a folder"):
        build_index(docs, f, progress=False)
    assert f.read_text() == "x"


def test_builds_into_existing_empty_folder(docs: Path, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    assert build_index(docs, tmp_path / "empty", progress=False).passages == 3
    assert LocalIndex(tmp_path / "empty").search("zorblat", k=1)[0].source == "notes.txt"


def test_docs_dir_errors(tmp_path: Path):
    with pytest.raises(Phi3Error, match="documents folder not found"):
        build_index(tmp_path / "missing", tmp_path / "idx", progress=False)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(Phi3Error, match="is not a folder"):
        build_index(tmp_path / "file.txt", tmp_path / "idx", progress=False)
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "data.csv").write_text("a,b")
    with pytest.raises(Phi3Error, match=r"no documents to index .*\.txt, \.md"):
        build_index(tmp_path / "nothing", tmp_path / "idx", progress=False)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "empty.txt").write_text("  \n")
    with pytest.raises(Phi3Error, match="hold no text"):
        build_index(tmp_path / "blank", tmp_path / "idx", progress=False)
    assert not (tmp_path / "idx").exists()
    assert not any(p.name.startswith(".idx") for p in tmp_path.iterdir())


def test_local_index_errors(docs: Path, tmp_path: Path):
    with pytest.raises(Phi3Error, match=r"search index not found: .*phi3 index build DOCS --index PATH"):
        LocalIndex(tmp_path / "missing")
    with pytest.raises(Phi3Error, match=r"is not a phi3 search index .*phi3 index build DOCS --index PATH"):
        LocalIndex(docs)
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "phi3-index.json").write_text("not json")
    with pytest.raises(Phi3Error, match="is not a phi3 search index"):
        LocalIndex(tmp_path / "fake")


# --- SearxNG -----------------------------------------------------------------------------------

CANNED = {"query": "q", "results": [
    {"title": "Zorblat - Wiki", "url": "https://example.org/zorblat", "content": "The zorblat moon is cheese.",
     "score": 2.5, "engine": "x"},
    {"title": "No content", "url": "https://example.org/empty"},
    {"title": "", "url": "https://example.org/nothing", "content": ""},  # nothing usable: skipped
    {"title": "Third", "url": "https://example.org/3", "content": "three"},
]}


class _Server:
    """A one-route HTTP server in a thread; `reply` is (status, body bytes) and `paths` logs requests."""

    def __init__(self, status: int, body: bytes):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.paths.append(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.paths: list[str] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(status: int = 200, body: bytes | dict = CANNED) -> _Server:
        s = _Server(status, json.dumps(body).encode() if isinstance(body, dict) else body)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def test_searxng_results(serve):
    server = serve()
    hits = SearxngSearch(server.url + "/").search("zorblat moon: what?", k=3)
    assert hits == [
        Passage(title="Zorblat - Wiki", url="https://example.org/zorblat", text="The zorblat moon is cheese.",
                score=2.5, source="https://example.org/zorblat"),
        Passage(title="No content", url="https://example.org/empty", text="", score=0.0,
                source="https://example.org/empty"),
        Passage(title="Third", url="https://example.org/3", text="three", score=0.0, source="https://example.org/3"),
    ]
    assert server.paths == ["/search?q=zorblat+moon%3A+what%3F&format=json"]


def test_searxng_k_and_empty_query(serve):
    server = serve()
    searcher = SearxngSearch(server.url)
    assert [p.title for p in searcher.search("zorblat", k=1)] == ["Zorblat - Wiki"]
    assert searcher.search("   ") == []
    assert searcher.search("zorblat", k=0) == []
    assert len(server.paths) == 1  # no request for an empty query or k=0


def test_searxng_bad_json(serve):
    server = serve(body=b"<html>not json</html>")
    with pytest.raises(Phi3Error, match=rf"web search at {server.url}/search\?q=x&format=json returned invalid JSON"):
        SearxngSearch(server.url).search("x")


def test_searxng_json_without_results(serve):
    server = serve(body={"error": "nope"})
    with pytest.raises(Phi3Error, match='without a "results" list'):
        SearxngSearch(server.url).search("x")


def test_searxng_http_errors(serve):
    server = serve(status=500, body=b"{}")
    with pytest.raises(Phi3Error, match=rf"web search at {server.url}/search\?q=x&format=json failed: HTTP 500"):
        SearxngSearch(server.url).search("x")
    forbidden = serve(status=403, body=b"{}")
    with pytest.raises(Phi3Error, match=r"HTTP 403 .*search\.formats"):
        SearxngSearch(forbidden.url).search("x")


def test_searxng_connection_refused(serve):
    server = serve()
    url = server.url
    server.close()
    with pytest.raises(Phi3Error, match=rf"web search at {url}/search\?q=x&format=json failed: "):
        SearxngSearch(url, timeout=2).search("x")


def test_open_searcher(index: LocalIndex, tmp_path: Path):
    web = open_searcher("https://search.example.org/")
    assert isinstance(web, SearxngSearch) and web.base_url == "https://search.example.org"
    assert isinstance(open_searcher("HTTP://localhost:8888"), SearxngSearch)
    local = open_searcher(str(tmp_path / "idx"))
    assert isinstance(local, LocalIndex)
    assert local.search("zorblat", k=1)[0].source == "notes.txt"
    with pytest.raises(Phi3Error, match="search index not found"):
        open_searcher(str(tmp_path / "nope"))


# --- prompting ---------------------------------------------------------------------------------

P1 = Passage(title="Moon facts", url="file:///m.txt", text="The moon is cheese.", score=3.0, source="m.txt")
P2 = Passage(title="Kexx", url="https://example.org/k", text="Kexx has one moon.", score=1.0,
             source="https://example.org/k")


def test_augment_numbers_sources_in_last_user_message():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is the moon made of?"}]
    before = copy.deepcopy(messages)
    out = augment(messages, [P1, P2])
    assert messages == before
    assert out[:3] == before[:3]
    assert out[3] == {"role": "user", "content": (
        "Answer the question using the search results below. Cite the results you use by number, like [1].\n\n"
        "[1] Moon facts\nThe moon is cheese.\n\n"
        "[2] Kexx\nKexx has one moon.\n\n"
        "Question: What is the moon made of?")}
    out[0]["content"] = "changed"
    assert messages[0]["content"] == "Be brief."  # the copies are new dicts too


def test_augment_without_passages_is_a_copy():
    messages = [{"role": "user", "content": "Hi"}]
    out = augment(messages, [])
    assert out == messages and out is not messages and out[0] is not messages[0]


def test_augment_needs_a_user_message():
    with pytest.raises(Phi3Error, match="no user message"):
        augment([{"role": "system", "content": "x"}], [P1])


def test_query_of():
    assert query_of([{"role": "system", "content": "s"}, {"role": "user", "content": "first"},
                     {"role": "assistant", "content": "a"}, {"role": "user", "content": "second?"}]) == "second?"
    assert query_of([{"role": "user", "content": [{"type": "text", "text": "parts"},
                                                  {"type": "image_url", "image_url": {"url": "x"}}]}]) == "parts"
    with pytest.raises(Phi3Error, match="no user message"):
        query_of([{"role": "assistant", "content": "a"}])


def test_index_build_command_lists_what_it_skipped(tmp_path: Path):
    from tests.conftest import run_cli
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("hello there\n")
    (docs / "passwd.txt").symlink_to("/etc/passwd")
    r = run_cli("index", "build", str(docs), "--index", str(tmp_path / "idx"), timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"phi3: skipped passwd.txt: a link to a file outside {docs.resolve()}" in r.stderr.splitlines()
    assert r.stdout.strip() == f"indexed 1 documents in 1 passages into {tmp_path / 'idx'} (skipped 1, listed above)"
