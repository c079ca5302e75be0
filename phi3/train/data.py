"""Training data: token sources, a packed and resumable mixture stream, SFT chat rendering with an
assistant-only loss mask, and DPO preference pairs.

Conventions (notes/train-spec.md): token tensors are int64 on CPU; `labels` are already shifted
(`labels[b, t]` is the token that should follow `input_ids[b, t]`, or IGNORE); `document_ids` mark
packed documents (a run of equal ids is one document; the model masks attention across runs).

Sources (`open_documents`):
- `.ds` (+ `.ds.index`): datatrove's tokenized layout, raw little-endian uint16 ids (uint32 when the
  vocabulary exceeds 65,536, or whatever `.ds.metadata` says) and uint64 cumulative document ends;
  an optional `.ds.loss` (one bool byte per token, 0 = no loss) masks labels. Read through
  np.memmap, one document at a time; nothing is loaded whole.
- a folder: every .ds/.txt/.jsonl/.parquet file under it (sorted), as one source.
- `.txt`: the whole file is ONE document (a folder of .txt files is a folder of documents). A big
  corpus in one file should be .jsonl or tokenized once with `phi3 data`.
- `.jsonl` / `.parquet`: one document per record, text under `text_key`. A .jsonl file is parsed
  line by line when opened (79 MB/s measured here), so a bad line fails before training starts;
  only line offsets are kept.
Text is tokenized on the fly with the model's tokenizer (BOS when the tokenizer adds one, as at
inference) and EOS is appended after every document, as datatrove's post-processor does; a `.ds`
document is used as written (datatrove's post-processor is "$A <EOS>": EOS, no BOS) and gets an EOS
only if it lacks one.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from phi3.errors import Phi3Error

IGNORE = -100
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
ROLES = ("system", "user", "assistant")
_SENTINEL = "\ue000phi3-assistant-turn\ue001"  # private-use characters: never in real chat text
# Documents fetched (and tokenized, for text) per call to a source: tokenizers' encode_batch runs
# them in parallel, and a resumed stream re-tokenizes at most this many documents it already saw.
PREFETCH = 64


@dataclass
class Batch:
    input_ids: torch.Tensor      # [B, T] int64
    labels: torch.Tensor         # [B, T] int64, shifted, -100 = no loss
    document_ids: torch.Tensor   # [B, T] int64


@dataclass
class PairBatch:                 # DPO: rows 0..P-1 chosen, P..2P-1 rejected (same prompts)
    input_ids: torch.Tensor      # [2P, T]
    labels: torch.Tensor         # [2P, T] -100 on prompt and padding
    attention_mask: torch.Tensor  # [2P, T] 1 on real tokens (right padding)
    index: torch.Tensor | None = None  # [P] each pair's record number in its file (a cache key for reference log-probs)


# --- Token sources ---------------------------------------------------------------------------------

class DocumentSource:
    """A random-access list of documents. `self[i]` is a document's token ids (np.int64), or for
    chat data a tuple (ids, mask) where mask[t] = 1 means ids[t] is learned. `whole` sources
    (SFT conversations) are not cut at a row's end when they would fit in a fresh row."""

    name: str = ""
    whole: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Any:
        return self.get_many([i])[0]

    def get_many(self, indices: Sequence[int]) -> list[Any]:
        return [self[i] for i in indices]


def _tokenize_texts(tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Each text as BOS (when the tokenizer adds one) + tokens + EOS, in one encode_batch call."""
    if tokenizer is None:
        raise Phi3Error("text data needs a tokenizer: give the model's tokenizer (--model or tokenizer=)")
    encs = tokenizer.encode_batch(texts)
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return [np.array(bos + e + eos, dtype=np.int64) for e in encs]


class TokenFile(DocumentSource):
    """One datatrove `.ds` shard, memory-mapped."""

    def __init__(self, path: Path, tokenizer=None) -> None:
        self.path, self.name = path, str(path)
        index_path = Path(str(path) + ".index")
        if not index_path.exists():
            raise Phi3Error(f"{path}: no {index_path.name} next to it (datatrove writes both; re-run the tokenizer)")
        size = path.stat().st_size
        self.vocab = tokenizer.vocab_size if tokenizer is not None else None
        self.eos = tokenizer.eos_id if tokenizer is not None else None
        if size == 0 and index_path.stat().st_size == 0:
            # datatrove's tokenizer writes a 0-byte shard and index for a task that got no documents
            # (more tasks than documents: `phi3 data phases` with tasks=2 on 4 synthetic passages).
            # An empty shard, not a broken one; a folder of shards skips it.
            self.ends, self.tokens, self.loss = np.zeros(0, "<u8"), np.zeros(0, np.uint16), None
            return
        if index_path.stat().st_size == 0 or index_path.stat().st_size % 8:
            raise Phi3Error(f"{index_path}: empty or not a uint64 array; re-run the tokenizer")
        self.ends = np.memmap(index_path, dtype="<u8", mode="r")
        total = int(self.ends[-1])
        width = self._token_size(path, tokenizer, size, total)
        if size != total * width:
            raise Phi3Error(f"{path}: {size} bytes but the index says {total} tokens of {width} bytes; "
                            "the .ds and .ds.index do not belong together (or the token size is wrong)")
        if len(self.ends) > 1 and bool((np.diff(self.ends.astype(np.int64)) < 0).any()):
            raise Phi3Error(f"{index_path}: document ends are not increasing; the index is corrupt")
        self.tokens = np.memmap(path, dtype="<u2" if width == 2 else "<u4", mode="r") if total else np.zeros(0, np.uint16)
        # datatrove's optional loss mask (save_loss_metadata): one bool byte per token, 0 = no loss
        loss_path = Path(str(path) + ".loss")
        self.loss = None
        if loss_path.exists():
            if loss_path.stat().st_size != total:
                raise Phi3Error(f"{loss_path}: {loss_path.stat().st_size} bytes for {total} tokens; the loss mask "
                                "does not belong to this shard")
            self.loss = np.memmap(loss_path, dtype=np.uint8, mode="r") if total else np.zeros(0, np.uint8)

    @staticmethod
    def _token_size(path: Path, tokenizer, size: int, total: int) -> int:
        meta = Path(str(path) + ".metadata")
        if meta.exists():  # "<tokenizer>|<token_size>" on the first line; older datatrove: "<tokenizer>", uint16
            first = (meta.read_text(errors="replace").splitlines() or [""])[0]
            if "|" not in first:
                return 2
            size = first.rsplit("|", 1)[1].strip()
            if size not in ("2", "4"):
                raise Phi3Error(f"{meta}: token size {size!r} on its first line; datatrove writes 2 (uint16) or 4 (uint32)")
            return int(size)
        if tokenizer is not None:
            return 2 if tokenizer.vocab_size <= 65536 else 4
        return 4 if total and size == 4 * total else 2

    def __len__(self) -> int:
        return len(self.ends)

    def get_many(self, indices: Sequence[int]) -> list[np.ndarray]:
        out = []
        for i in indices:
            start = int(self.ends[i - 1]) if i else 0
            doc = np.asarray(self.tokens[start:int(self.ends[i])], dtype=np.int64)
            if self.vocab is not None and len(doc) and int(doc.max()) >= self.vocab:
                raise Phi3Error(f"{self.path}: document {i} holds token id {int(doc.max())}, beyond the tokenizer's "
                                f"vocabulary of {self.vocab}; the shard was written with another tokenizer")
            missing_eos = self.eos is not None and (len(doc) == 0 or doc[-1] != self.eos)
            if missing_eos:
                doc = np.append(doc, np.int64(self.eos))
            if self.loss is None:
                out.append(doc)
                continue
            mask = np.asarray(self.loss[start:int(self.ends[i])], dtype=np.int8)
            out.append((doc, np.append(mask, np.int8(1)) if missing_eos else mask))
        return out


class TextFiles(DocumentSource):
    """.txt files, each file one document."""

    def __init__(self, paths: list[Path], tokenizer, name: str) -> None:
        self.paths, self.tokenizer, self.name = paths, tokenizer, name

    def __len__(self) -> int:
        return len(self.paths)

    def get_many(self, indices: Sequence[int]) -> list[np.ndarray]:
        texts = []
        for i in indices:
            try:
                texts.append(self.paths[i].read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise Phi3Error(f"{self.paths[i]}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return _tokenize_texts(self.tokenizer, texts)


def _scan_jsonl(path: Path, check) -> np.ndarray:
    """Byte offsets of the non-blank lines of a jsonl file; `check(record, where)` validates each
    record up front, so a bad line fails before training starts, naming file and line."""
    offsets = []
    with open(path, "rb") as f:
        pos = 0
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise Phi3Error(f"{where}: not valid JSON ({getattr(e, 'msg', e)}); one JSON object per line") from None
                if not isinstance(record, dict):
                    raise Phi3Error(f"{where}: expected a JSON object, got {type(record).__name__}")
                check(record, where)
                offsets.append((pos, lineno))
            pos += len(raw)
    return np.array(offsets, dtype=np.int64).reshape(-1, 2)


class JsonlRecords:
    """Lazy access to the records of a validated jsonl file (offsets kept, records re-read)."""

    def __init__(self, path: Path, check) -> None:
        self.path = path
        self.offsets = _scan_jsonl(path, check)

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, i: int) -> str:
        return f"{self.path}:{int(self.offsets[i, 1])}"

    def read(self, indices: Sequence[int]) -> list[dict]:
        out = []
        with open(self.path, "rb") as f:
            for i in indices:
                f.seek(int(self.offsets[i, 0]))
                out.append(json.loads(f.readline()))
        return out


class JsonlText(DocumentSource):
    def __init__(self, path: Path, tokenizer, text_key: str) -> None:
        def check(record: dict, where: str) -> None:
            if text_key not in record:
                hint = " (chat data: use the sft stage)" if "messages" in record else ""
                raise Phi3Error(f"{where}: no {text_key!r} key{hint}; set text_key to the field holding the text")
            if not isinstance(record[text_key], str):
                raise Phi3Error(f"{where}: {text_key!r} should be a string, got {type(record[text_key]).__name__}")
        self.records, self.tokenizer, self.text_key, self.name = JsonlRecords(path, check), tokenizer, text_key, str(path)

    def __len__(self) -> int:
        return len(self.records)

    def get_many(self, indices: Sequence[int]) -> list[np.ndarray]:
        return _tokenize_texts(self.tokenizer, [r[self.text_key] for r in self.records.read(indices)])


class ParquetText(DocumentSource):
    """The text column is held as an Arrow array (compact; documents are tokenized on demand)."""

    def __init__(self, path: Path, tokenizer, text_key: str) -> None:
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path, columns=None)
        except Exception as e:
            raise Phi3Error(f"{path}: not a readable parquet file ({e})") from None
        if text_key not in table.column_names:
            raise Phi3Error(f"{path}: no {text_key!r} column (columns: {', '.join(table.column_names)}); "
                            "set text_key to the column holding the text")
        column = table.column(text_key)
        import pyarrow as pa
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise Phi3Error(f"{path}: column {text_key!r} is {column.type}, not text")
        if column.null_count:
            raise Phi3Error(f"{path}: column {text_key!r} has {column.null_count} empty (null) rows; drop them first")
        self.column, self.tokenizer, self.name = column.combine_chunks(), tokenizer, str(path)

    def __len__(self) -> int:
        return len(self.column)

    def get_many(self, indices: Sequence[int]) -> list[np.ndarray]:
        return _tokenize_texts(self.tokenizer, [self.column[i].as_py() for i in indices])


class ConcatSource(DocumentSource):
    """Several sources as one list of documents (a folder)."""

    def __init__(self, parts: list[DocumentSource], name: str) -> None:
        self.parts, self.name = parts, name
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.whole = any(p.whole for p in parts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get_many(self, indices: Sequence[int]) -> list[Any]:
        out: list[Any] = [None] * len(indices)
        part_of = np.searchsorted(self.starts, np.asarray(indices, dtype=np.int64), side="right") - 1
        for p in np.unique(part_of):
            where = np.nonzero(part_of == p)[0]
            docs = self.parts[p].get_many([int(indices[k]) - int(self.starts[p]) for k in where])
            for k, d in zip(where, docs):
                out[k] = d
        return out


def _need(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise Phi3Error(f"{path}: no such file or folder")
    return path


def _empty_shard(path: Path) -> bool:
    index_path = Path(str(path) + ".index")
    return path.stat().st_size == 0 and index_path.exists() and index_path.stat().st_size == 0


def open_documents(path: str | Path, tokenizer, text_key: str = "text") -> DocumentSource:
    """A token source: a datatrove `.ds` shard, a folder of shards and/or text files, or a
    .txt/.jsonl/.parquet file tokenized on the fly (see the module docstring for the rules)."""
    path = _need(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and (p.name.endswith(".ds") or p.suffix in TEXT_SUFFIXES))
        if not files:
            raise Phi3Error(f"{path}: no .ds, .txt, .jsonl or .parquet files in this folder")
        txt = [p for p in files if p.suffix == ".txt"]
        parts = [open_documents(p, tokenizer, text_key) for p in files
                 if p.suffix != ".txt" and not (p.name.endswith(".ds") and _empty_shard(p))]
        if not parts and not txt:
            raise Phi3Error(f"{path}: holds no documents (every .ds shard in it is empty)")
        if txt:
            parts.append(TextFiles(txt, tokenizer, f"{path}/*.txt"))
        source: DocumentSource = parts[0] if len(parts) == 1 else ConcatSource(parts, str(path))
    elif path.name.endswith(".ds"):
        source = TokenFile(path, tokenizer)
    elif path.suffix == ".txt":
        source = TextFiles([path], tokenizer, str(path))
    elif path.suffix == ".jsonl":
        source = JsonlText(path, tokenizer, text_key)
    elif path.suffix == ".parquet":
        source = ParquetText(path, tokenizer, text_key)
    else:
        raise Phi3Error(f"{path}: unknown data format; give .ds (phi3 data / datatrove), .txt, .jsonl, .parquet or a folder")
    if len(source) == 0:
        raise Phi3Error(f"{path}: holds no documents")
    return source


def _as_doc(item: Any) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(item, tuple):
        return np.asarray(item[0], dtype=np.int64), np.asarray(item[1], dtype=np.int8)
    return np.asarray(item, dtype=np.int64), None


# --- Packing ---------------------------------------------------------------------------------------

class PackedStream:
    """Deterministic, resumable stream of packed rows of seq_len tokens from a weighted mixture of
    DocumentSources (seeded; per-source shuffled order per epoch). Documents longer than a row are split.

    Mixture: weights are shares of TOKENS. The next document comes from the source whose tokens
    taken so far, divided by its weight, are the smallest (ties: the first source); this is
    Megatron's error-minimising blend and needs no random draws, so the shares are exact at every
    step and the state is a few integers. Within a source the order is a permutation seeded by
    (seed, source number, epoch); at its end the source starts its next epoch.

    Packing: documents are laid end to end. A document that runs past the row's end is split there
    and its remaining tokens open the next row (nanoGPT/torchtitan style, nothing dropped): that
    piece is a new document for attention and positions, it sees none of its earlier context, and
    the row's last token still has the document's next token as its label. Chat conversations
    (`whole` sources) that do not fit in the room left start a new row instead, the rest of the row
    being padding (one more document, labels IGNORE); only a conversation longer than a whole row is
    split as above.

    Resuming: state_dict() is the per-source (epoch, position, tokens taken) and the document being
    split, if any; load_state_dict() rebuilds the permutations and re-reads only that document, so
    nothing before the resume point is read or tokenized again."""

    def __init__(self, sources: list[DocumentSource], weights: list[float], seq_len: int, seed: int,
                 *, pad_id: int = 0) -> None:
        if not sources:
            raise Phi3Error("empty mixture: give at least one data source")
        if len(weights) != len(sources):
            raise Phi3Error(f"{len(sources)} data sources but {len(weights)} weights; give one weight per source")
        for s, w in zip(sources, weights):
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w > 0):
                raise Phi3Error(f"weight {w!r} for {s.name}: weights must be positive numbers")
            if len(s) == 0:
                raise Phi3Error(f"{s.name}: holds no documents")
        if seq_len < 2:
            raise Phi3Error(f"seq_len {seq_len} is too short; give at least 2")
        if not isinstance(seed, int) or seed < 0:
            raise Phi3Error(f"seed {seed!r}: give a non-negative integer")
        self.sources, self.seq_len, self.seed, self.pad_id = sources, int(seq_len), int(seed), int(pad_id)
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]
        n = len(sources)
        self.epoch, self.pos, self.taken = [0] * n, [0] * n, [0] * n
        self.rows = 0
        self.cut_conversations = 0  # `whole` documents longer than seq_len, split across rows (not saved)
        self.carry: list[int] | None = None  # [source, document, offset] of a document split across rows
        self._doc: tuple[np.ndarray, np.ndarray | None] | None = None
        self._perm: dict[int, tuple[int, np.ndarray]] = {}
        self._buf: dict[int, dict[int, Any]] = {}
        self._empty = 0  # empty documents in a row (all empty would loop forever)

    # -- order --
    def _order(self, s: int) -> np.ndarray:
        cached = self._perm.get(s)
        if cached is None or cached[0] != self.epoch[s]:
            rng = np.random.default_rng([self.seed, s, self.epoch[s]])
            cached = (self.epoch[s], rng.permutation(len(self.sources[s])))
            self._perm[s] = cached
        return cached[1]

    def _fetch(self, s: int, pos: int) -> Any:
        buf = self._buf.setdefault(s, {})
        if pos not in buf:
            order = self._order(s)
            stop = min(pos + PREFETCH, len(order))
            buf.clear()
            buf.update(zip(range(pos, stop), self.sources[s].get_many([int(i) for i in order[pos:stop]])))
        return buf.pop(pos)

    def _next_document(self) -> None:
        s = min(range(len(self.sources)), key=lambda i: (self.taken[i] / self.weights[i], i))
        pos = self.pos[s]
        idx = int(self._order(s)[pos])
        self._doc = _as_doc(self._fetch(s, pos))
        self.taken[s] += len(self._doc[0])
        self._empty = self._empty + 1 if len(self._doc[0]) == 0 else 0
        if self._empty > sum(len(src) for src in self.sources):
            raise Phi3Error("every document in the mixture is empty; check the data (and that the tokenizer has an EOS)")
        self.pos[s] += 1
        if self.pos[s] == len(self.sources[s]):
            self.epoch[s] += 1
            self.pos[s] = 0
            self._buf.pop(s, None)
        self.carry = [s, idx, 0]

    def next_rows(self, n: int) -> Batch:
        """The next n rows (global)."""
        T = self.seq_len
        ids = np.full((n, T), self.pad_id, dtype=np.int64)
        labels = np.full((n, T), IGNORE, dtype=np.int64)
        docs = np.zeros((n, T), dtype=np.int64)
        for r in range(n):
            t = d = 0
            while t < T:
                if self.carry is None:
                    self._next_document()
                elif self._doc is None:  # resumed mid-document
                    s, idx, _ = self.carry
                    self._doc = _as_doc(self.sources[s].get_many([idx])[0])
                s, _, off = self.carry
                tokens, mask = self._doc
                if off == 0 and self.sources[s].whole and len(tokens) > T - t:
                    if t > 0:
                        break  # a conversation that fits in a fresh row is not cut: pad this one
                    self.cut_conversations += 1  # longer than a row: split (the trainer may warn)
                k = min(len(tokens) - off, T - t)
                ids[r, t:t + k] = tokens[off:off + k]
                docs[r, t:t + k] = d
                nxt = tokens[off + 1:off + k + 1]  # k labels, or k-1 when the document ends here
                if mask is not None:
                    nxt = np.where(mask[off + 1:off + k + 1] > 0, nxt, IGNORE)
                labels[r, t:t + len(nxt)] = nxt
                t, d = t + k, d + (k > 0)
                if off + k == len(tokens):
                    self.carry, self._doc = None, None
                else:
                    self.carry[2] = off + k
            docs[r, t:] = d  # padding is one more document
        self.rows += n
        return Batch(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(docs))

    def state_dict(self) -> dict:
        """Small and JSON-serialisable."""
        return {"version": 1, "seed": self.seed, "seq_len": self.seq_len, "rows": self.rows,
                "sources": [{"name": s.name, "documents": len(s), "epoch": e, "position": p, "tokens": k}
                            for s, e, p, k in zip(self.sources, self.epoch, self.pos, self.taken)],
                "carry": list(self.carry) if self.carry is not None else None}

    def load_state_dict(self, state: dict) -> None:
        try:
            srcs = state["sources"]
            if len(srcs) != len(self.sources) or state["seq_len"] != self.seq_len or state["seed"] != self.seed:
                raise Phi3Error(
                    f"the checkpoint's data position is for {len(srcs)} sources at seq_len {state['seq_len']} "
                    f"and seed {state['seed']}, this run has {len(self.sources)} at {self.seq_len} and {self.seed}; "
                    "resume with the same data and settings, or start a new run")
            for mine, theirs in zip(self.sources, srcs):
                if theirs["documents"] != len(mine):
                    raise Phi3Error(f"{mine.name} now holds {len(mine)} documents, the checkpoint's data held "
                                    f"{theirs['documents']}; resume with the same data, or start a new run")
            self.epoch = [int(s["epoch"]) for s in srcs]
            self.pos = [int(s["position"]) for s in srcs]
            self.taken = [int(s["tokens"]) for s in srcs]
            self.rows = int(state["rows"])
            self.carry = [int(x) for x in state["carry"]] if state["carry"] is not None else None
        except (KeyError, TypeError, ValueError) as e:
            raise Phi3Error(f"the checkpoint's data state is not one PackedStream wrote ({e!r}); start a new run") from None
        self._doc, self._perm, self._buf = None, {}, {}

    @property
    def epochs(self) -> list[float]:
        """How many passes over each source so far (fractional)."""
        return [e + p / len(s) for e, p, s in zip(self.epoch, self.pos, self.sources)]


def global_step_batches(stream, global_batch: int, micro_batch: int, world: int, rank: int) -> list:
    """Reads the optimizer step's global_batch rows (pairs, for a PairStream) from the stream, on
    every rank, and returns this rank's micro-batches: micro-batch j holds rows [j*mb, (j+1)*mb)
    and rank r takes those with j % world == r. The order is the same for any world size."""
    if global_batch <= 0 or micro_batch <= 0 or global_batch % (micro_batch * world):
        raise Phi3Error(f"global_batch_size {global_batch} must be a multiple of micro_batch_size {micro_batch} "
                        f"x {world} processes; change one of them")
    mine = [j for j in range(global_batch // micro_batch) if j % world == rank]
    if isinstance(stream, PairStream):
        pairs = stream.next_pairs(global_batch)
        return [collate_pairs(pairs[j * micro_batch:(j + 1) * micro_batch], stream.pad_id) for j in mine]
    rows = stream.next_rows(global_batch)
    sl = lambda j: slice(j * micro_batch, (j + 1) * micro_batch)  # noqa: E731
    return [Batch(rows.input_ids[sl(j)], rows.labels[sl(j)], rows.document_ids[sl(j)]) for j in mine]


# --- Chat rendering and the assistant mask ----------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    from phi3.tokenizer import _jinja_env
    try:
        return _jinja_env().from_string(template)
    except Exception as e:
        raise Phi3Error(f"chat template does not parse: {e}") from None


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """Tokenizer.apply_chat_template with the template compiled once and an empty conversation
    allowed (the text before a first assistant turn)."""
    from phi3.tokenizer import PHI3_CHAT_TEMPLATE
    extra = {k: v for k, v in tokenizer.special_tokens.items() if k not in ("bos_token", "eos_token")}
    try:
        return _compiled(tokenizer.chat_template or PHI3_CHAT_TEMPLATE).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "", **extra)
    except Phi3Error:
        raise
    except Exception as e:
        raise Phi3Error(f"chat template failed to render: {e}") from None


def _check_messages(messages: Any, where: str, what: str = "messages") -> None:
    if not isinstance(messages, list) or not messages:
        raise Phi3Error(f"{where}: {what!r} should be a non-empty list of {{'role', 'content'}} messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise Phi3Error(f"{where}: {what}[{k}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise Phi3Error(f"{where}: {what}[{k}] has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise Phi3Error(f"{where}: {what}[{k}] content should be a string, got {type(m['content']).__name__}")


def _lcp(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first differing character
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _assistant_spans(tokenizer, messages: list[dict], where: str, only_last: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, per assistant turn, the character span [start, end) to learn.

    start: the length of the render of the turns before it with the generation prompt (the
    assistant header), which must be a prefix of the whole render. end: where the render of the
    conversation up to this turn stops agreeing with the whole render, i.e. the turn's content,
    its end-of-turn text (`<|end|>\\n`, `<|im_end|>\\n`) and, for the last turn, what the template
    puts after the last message (Phi-3's EOS). The common prefix can run a few characters into the
    next turn's opening ("<|" of "<|endoftext|>" and "<|user|>"); _mask_from_offsets cuts it back
    to the token boundary. This is what TRL's {% generation %} training templates mark."""
    full = _render(tokenizer, messages, False)
    spans = []
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise Phi3Error(f"{where}: no assistant turn to learn from; each conversation needs one")
    for i in turns[-1:] if only_last else turns:
        head = _render(tokenizer, messages[:i], True)
        start = len(head)
        if not full.startswith(head):
            # e.g. SmolLM2's template writes its default system prompt only when a first message
            # exists: find where this turn's content goes with a sentinel in its place instead.
            marked = _render(tokenizer, messages[:i] + [{**messages[i], "content": _SENTINEL}] + messages[i + 1:], False)
            start = marked.find(_SENTINEL)
            if start < 0 or marked[:start] != full[:start]:
                start = -1
        if start < 0:
            raise Phi3Error(f"{where}: the chat template renders the turns before assistant turn {i} differently "
                            "inside the whole conversation, so assistant tokens cannot be marked; use a template "
                            "whose rendering of earlier turns does not depend on later ones")
        end = len(full) if i == len(messages) - 1 else _lcp(full, _render(tokenizer, messages[:i + 1], False))
        content = messages[i]["content"]
        if end <= start or content not in full[start:end]:
            raise Phi3Error(f"{where}: the chat template does not write assistant turn {i} after its generation "
                            "prompt, so its tokens cannot be marked; use the model's own chat template")
        spans.append((start, end))
    return full, spans


def _mask_from_offsets(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], text_len: int) -> np.ndarray:
    """1 on tokens that overlap a span: from the token holding its first character to the token
    holding its last (transformers' return_assistant_tokens_mask rule), after cutting an end that
    lies inside a token back to that token's start (see _assistant_spans)."""
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    a, b = off[:, 0], np.maximum(off[:, 1], off[:, 0] + 1)
    mask = np.zeros(len(off), dtype=np.int8)
    for s, e in spans:
        if e < text_len:
            inside = (a < e) & (b > e) & (off[:, 1] > off[:, 0])
            if inside.any():
                e = int(a[inside].min())
        mask |= ((a < e) & (b > s)).astype(np.int8)
    return mask


def _render_many(tokenizer, conversations: list[list[dict]], wheres: list[str],
                 only_last: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    laid = [_assistant_spans(tokenizer, m, w, only_last) for m, w in zip(conversations, wheres)]
    encs = tokenizer.encode_batch_with_offsets([text for text, _ in laid])
    out = []
    for (text, spans), (ids, offsets), where in zip(laid, encs, wheres):
        mask = _mask_from_offsets(offsets, spans, len(text))
        if not mask.any():
            raise Phi3Error(f"{where}: no assistant token survives tokenization; check the chat template")
        out.append((np.array(ids, dtype=np.int64), mask))
    return out


def render_sft(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """ids and the loss mask (1 = learn) of a conversation rendered with the model's chat template:
    each assistant turn's content and the end-of-turn text closing it (on Phi-3 `<|end|>`, which
    swallows the "\\n" after it, and the final `<|endoftext|>`; on ChatML `<|im_end|>` and "\\n"),
    exactly TRL's assistant_only_loss mask from its training templates. No BOS is added beyond what
    the template writes (as transformers' apply_chat_template(tokenize=True))."""
    _check_messages(messages, "conversation")
    ids, mask = _render_many(tokenizer, [messages], ["conversation"])[0]
    return ids.tolist(), mask.tolist()


class SFTSource(DocumentSource):
    """Chat jsonl ({"messages": [...]} per line): items are (ids, mask), packed like documents."""

    whole = True

    def __init__(self, path: Path, tokenizer) -> None:
        def check(record: dict, where: str) -> None:
            if "messages" not in record:
                raise Phi3Error(f"{where}: no 'messages' key; SFT records are {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
            _check_messages(record["messages"], where)
            if not any(m["role"] == "assistant" for m in record["messages"]):
                raise Phi3Error(f"{where}: no assistant turn to learn from; each conversation needs one")
        self.records, self.tokenizer, self.name = JsonlRecords(path, check), tokenizer, str(path)
        if len(self.records):
            self.get_many([0])  # a template that cannot mark assistant turns fails now, not mid-run

    def __len__(self) -> int:
        return len(self.records)

    def get_many(self, indices: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        records = self.records.read(indices)
        return _render_many(self.tokenizer, [r["messages"] for r in records], [self.records.where(i) for i in indices])


def open_sft(path: str | Path, tokenizer) -> DocumentSource:
    """An SFT source from a chat .jsonl file or a folder of them."""
    path = _need(path)
    if tokenizer is None:
        raise Phi3Error("SFT data needs the model's tokenizer and chat template")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise Phi3Error(f"{path}: no .jsonl files in this folder")
        parts = [SFTSource(p, tokenizer) for p in files]
        source: DocumentSource = parts[0] if len(parts) == 1 else ConcatSource(parts, str(path))
    elif path.suffix == ".jsonl":
        source = SFTSource(path, tokenizer)
    else:
        raise Phi3Error(f"{path}: SFT data is .jsonl with {{\"messages\": [...]}} per line")
    if len(source) == 0:
        raise Phi3Error(f"{path}: holds no conversations")
    return source


# --- DPO pairs ---------------------------------------------------------------------------------------

@dataclass
class Pair:
    index: int                 # record number in the file (0-based)
    where: str                 # file:line
    chosen_ids: np.ndarray
    chosen_mask: np.ndarray    # 1 on the chosen answer's tokens
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def open_pairs(path: str | Path, tokenizer, max_len: int) -> list[Pair]:
    """Preference pairs from jsonl: {"prompt": [messages], "chosen": message, "rejected": message}
    (a message is {"role": "assistant", "content": ...}, a one-message list, or just the answer's
    text). Tokenized as TRL's DPOTrainer does: the prompt rendered with the generation prompt, each
    side rendered as prompt + answer; the answer is every token after the longest token prefix the
    prompt shares with both sides (so its end-of-turn and, on Phi-3, the closing EOS are learned).
    A side longer than max_len is an error naming the record: nothing is truncated."""
    path = _need(path)
    if path.is_dir() or path.suffix != ".jsonl":
        raise Phi3Error(f"{path}: DPO data is a .jsonl file of {{\"prompt\", \"chosen\", \"rejected\"}} records")
    if tokenizer is None:
        raise Phi3Error("DPO data needs the model's tokenizer and chat template")

    def answer(record: dict, key: str, where: str) -> dict:
        m = record[key]
        if isinstance(m, str):
            return {"role": "assistant", "content": m}
        if isinstance(m, list) and len(m) == 1:  # TRL's conversational form: a one-message list
            m = m[0]
        if not isinstance(m, dict) or m.get("role") != "assistant" or not isinstance(m.get("content"), str):
            raise Phi3Error(f"{where}: {key!r} should be an assistant message {{\"role\": \"assistant\", \"content\": ...}}")
        return m

    def check(record: dict, where: str) -> None:
        for key in ("prompt", "chosen", "rejected"):
            if key not in record:
                raise Phi3Error(f"{where}: no {key!r} key; DPO records are {{\"prompt\": [messages], \"chosen\": message, \"rejected\": message}}")
        _check_messages(record["prompt"], where, "prompt")
        answer(record, "chosen", where)
        answer(record, "rejected", where)

    records = JsonlRecords(path, check)
    if len(records) == 0:
        raise Phi3Error(f"{path}: holds no preference pairs")
    pairs = []
    for start in range(0, len(records), PREFETCH):
        idx = list(range(start, min(start + PREFETCH, len(records))))
        recs, wheres = records.read(idx), [records.where(i) for i in idx]
        texts = []
        for r, w in zip(recs, wheres):
            texts.append(_render(tokenizer, r["prompt"], True))
            texts += [_render(tokenizer, r["prompt"] + [answer(r, k, w)], False) for k in ("chosen", "rejected")]
        encs = tokenizer.encode_batch(texts)
        for k, (i, w) in enumerate(zip(idx, wheres)):
            p, c, r = (encs[3 * k + j] for j in range(3))
            n = min(_common_prefix(p, c), _common_prefix(p, r))
            if n == len(c) or n == len(r):
                raise Phi3Error(f"{w}: an answer adds no tokens after the prompt; give it some content")
            longest = max(len(c), len(r))
            if longest > max_len:
                raise Phi3Error(f"{w}: this pair needs {longest} tokens, over max_len {max_len}; raise seq_len "
                                f"to at least {longest} or shorten or drop the record (nothing is truncated)")
            mask = lambda ids: (np.arange(len(ids)) >= n).astype(np.int8)  # noqa: E731
            pairs.append(Pair(i, w, np.array(c, dtype=np.int64), mask(c), np.array(r, dtype=np.int64), mask(r)))
    return pairs


def _shifted(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    labels[:-1] = np.where(mask[1:] > 0, ids[1:], IGNORE)
    return labels


def collate_pairs(pairs: list[Pair], pad_id: int = 0) -> PairBatch:
    """Chosen rows first, then rejected, right-padded to the longest of the batch."""
    seqs = [(p.chosen_ids, p.chosen_mask) for p in pairs] + [(p.rejected_ids, p.rejected_mask) for p in pairs]
    T = max(len(s) for s, _ in seqs)
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    labels = np.full((len(seqs), T), IGNORE, dtype=np.int64)
    att = np.zeros((len(seqs), T), dtype=np.int64)
    for r, (s, m) in enumerate(seqs):
        ids[r, :len(s)], labels[r, :len(s)], att[r, :len(s)] = s, _shifted(s, m), 1
    return PairBatch(torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy(att),
                     torch.tensor([p.index for p in pairs], dtype=torch.int64))


class PairStream:
    """Deterministic, resumable order over preference pairs: a permutation seeded by (seed, epoch),
    epoch after epoch. State: epoch and position."""

    def __init__(self, pairs: list[Pair], batch_pairs: int, seed: int, pad_id: int = 0) -> None:
        if not pairs:
            raise Phi3Error("no preference pairs to train on")
        if batch_pairs <= 0:
            raise Phi3Error(f"batch of {batch_pairs} pairs: give at least 1")
        self.pairs, self.batch_pairs, self.seed, self.pad_id = pairs, batch_pairs, int(seed), pad_id
        self.epoch = self.pos = 0
        self._perm: tuple[int, np.ndarray] | None = None

    def _order(self) -> np.ndarray:
        if self._perm is None or self._perm[0] != self.epoch:
            self._perm = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pairs)))
        return self._perm[1]

    def next_pairs(self, n: int) -> list[Pair]:
        out = []
        for _ in range(n):
            out.append(self.pairs[int(self._order()[self.pos])])
            self.pos += 1
            if self.pos == len(self.pairs):
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def next_batch(self) -> PairBatch:
        return collate_pairs(self.next_pairs(self.batch_pairs), self.pad_id)

    def state_dict(self) -> dict:
        return {"version": 1, "seed": self.seed, "pairs": len(self.pairs), "epoch": self.epoch, "position": self.pos}

    def load_state_dict(self, state: dict) -> None:
        try:
            if state["pairs"] != len(self.pairs) or state["seed"] != self.seed:
                raise Phi3Error(f"the checkpoint's data position is for {state['pairs']} pairs with seed {state['seed']}, "
                                f"this run has {len(self.pairs)} with seed {self.seed}; resume with the same data and seed")
            self.epoch, self.pos = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as e:
            raise Phi3Error(f"the checkpoint's data state is not one PairStream wrote ({e!r}); start a new run") from None


def pair_batches(pairs: list[Pair], batch_pairs: int, seed: int, pad_id: int = 0) -> PairStream:
    """Deterministic, resumable batches of pairs (next_batch(), state_dict(), load_state_dict());
    global_step_batches(stream, ...) splits a step's pairs over ranks like rows."""
    return PairStream(pairs, batch_pairs, seed, pad_id)
