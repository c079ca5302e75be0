"""The benchmarks of the Phi-3 report's table, read from the files their authors publish.

Every task turns its files into `Example`s: the question as the model reads it (`query`), and
either the choices to score by log-likelihood, the answers a greedy generation must match, or
the tests a generated program must pass. `context()` puts the few-shot examples in front: the
first k of the task's few-shot split (its train or dev file; the eval file itself, minus the
example at hand, where the authors publish no such split). Fixed shots make every prompt of a
task share one prefix, which the evaluator scores once.

Prompts follow lm-evaluation-harness's conventions ("Question: ...\\nAnswer:", shots joined by a
blank line, choices scored after a space), so that numbers can be compared with it.

Where users get the files is in README.md ("Evaluation data"); `TASKS[name].layout` says what
each task expects, and a missing or malformed file is an error that names it and that layout.
"""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from phi3.errors import Phi3Error

SHOT_SEPARATOR = "\n\n"


@dataclass
class Example:
    id: str
    query: str  # what the model reads after the shots
    target: str = ""  # what follows the query when this example is a shot (with its leading space)
    choices: list[str] = field(default_factory=list)  # continuations to score, leading space included
    gold: int = 0  # index of the right choice
    answers: list[str] = field(default_factory=list)  # generation: accepted answers
    group: str = ""  # subject or subtask: shots come from the same group, results break down by it
    description: str = ""  # text before the shots (MMLU's subject line, BBH's task line)
    contexts: list[str] | None = None  # WinoGrande: a query per choice, one shared continuation
    extra: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "FILE: record N (id X)": what an error about this example names


@dataclass
class TaskData:
    examples: list[Example]
    shots: list[Example]  # the few-shot split; [] means: take shots from `examples`
    files: list[Path]
    pools: dict[str, list[Example]] = field(default_factory=dict, repr=False)  # group -> its shots, built once


@dataclass
class Task:
    name: str
    title: str  # as in the report's table
    kind: str  # "choice" (log-likelihood), "generate" (greedy + answer extraction), "code" (sandbox)
    shots: int  # the report's k
    folder: str  # under --data-dir
    layout: str  # the files and fields expected
    source: str  # where the authors publish them
    load: Callable[[Path, list[str]], TaskData]
    stop: tuple[str, ...] = ()
    max_tokens: int = 256
    extract: Callable[[str], str] | None = None
    match: Callable[[str, Example], bool] | None = None
    choice_metrics: Callable[[Example, list[float]], dict[str, float]] | None = None
    subsets: Callable[[Path], list[str]] | None = None  # e.g. MMLU's subjects, for `name:a+b`
    headline: str | None = None  # the metric usually quoted for it (first in tables and the chart)


# --- reading files ------------------------------------------------------------------------------

class DataError(Phi3Error):
    pass


def bad_file(path: Path, problem: str, task: "Task | None" = None) -> DataError:
    layout = f"; expected {task.layout}" if task else ""
    return DataError(f"{path}: {problem}{layout}")


# Sizes that a benchmark file cannot exceed without being unusable, checked before the text is
# read or tokenized: one crafted record of 1 GiB used to take 21.4 GB (then the OOM killer) on its
# way through the tokenizer, which costs about 170 bytes per character (measured: 16M characters
# of English took 2.7 GB and 15 s with SmolLM2's tokenizer).
# Above the longest token of the vocabularies at hand: SmolLM2's is 81 characters (a newline and 80
# spaces), GPT-2's 64, Llama's and Phi-3's 16; phi3.eval takes a tokenizer's own longest where that is more.
MAX_CHARS_PER_TOKEN = 128
MAX_CONTEXT_TOKENS = 131072  # Phi-3's longest context (128K)
# A record longer than this fits no model's context: 128K tokens of 128 characters each.
MAX_RECORD_CHARS = MAX_CONTEXT_TOKENS * MAX_CHARS_PER_TOKEN  # 16 Mi characters
# A jsonl line is read up to this many bytes and refused beyond: 4x the longest usable record, so
# that fields a task never reads still fit (the Hugging Face TriviaQA rc records carry their
# evidence pages), while reading one line peaks at about 3x this (its bytes, its text, its parsed
# object) instead of growing with whatever a file holds.
MAX_LINE_BYTES = 4 * MAX_RECORD_CHARS  # 64 MiB
MAX_ROW_GROUP_BYTES = 4 * MAX_LINE_BYTES  # a parquet row group (uncompressed) is read whole: 256 MiB


def _mib(n: int) -> str:
    return f"{n // 2**20} MiB" if n % 2**20 == 0 else f"{n:,} bytes"


def read_lines(path: Path, max_line_bytes: int | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file (.gz: decompressed), each line read with readline's
    size limit so that no line longer than `max_line_bytes` (MAX_LINE_BYTES) is ever held whole."""
    max_line_bytes = max_line_bytes or MAX_LINE_BYTES
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            n = 0
            while True:
                raw = f.readline(max_line_bytes + 1)
                if not raw:
                    return
                n += 1
                if len(raw) > max_line_bytes:
                    raise DataError(f"{path}: line {n} is longer than {_mib(max_line_bytes)}, more than any "
                                    "benchmark record needs; remove or shorten that line")
                try:
                    yield n, raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: line {n} is not UTF-8 text (byte {e.start}); "
                                    "save the file as UTF-8") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def read_jsonl(path: Path, max_line_bytes: int | None = None) -> list[dict]:
    rows = []
    for n, line in read_lines(path, max_line_bytes):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not JSON ({e.msg})") from None
            except RecursionError:
                raise DataError(f"{path}: line {n} nests JSON too deeply") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {n} is not a JSON object")
            rows.append(row)
    return rows


def read_json(path: Path) -> Any:
    """A whole .json file (TriviaQA's run to hundreds of MB, so no size bound here: its records are
    checked by length once read, before any tokenizing)."""
    try:
        return json.loads(path.read_bytes())  # from bytes: no decoded copy of the whole file
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply") from None


def read_text_file(path: Path, max_bytes: int | None = None) -> str:
    """A small text file read whole (BBH's prompts), refused by its size before reading."""
    max_bytes = max_bytes or MAX_LINE_BYTES
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(f"{path}: {size:,} bytes, more than {_mib(max_bytes)}; a prompt file this long fits "
                            "no model's context")
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def read_csv(path: Path, header: bool, max_line_bytes: int | None = None) -> list[Any]:
    lines = (line for _, line in read_lines(path, max_line_bytes))
    try:
        return list(csv.DictReader(lines) if header else csv.reader(lines))
    except csv.Error as e:  # among others: a field over csv's 131,072-character limit
        raise DataError(f"{path}: cannot read as CSV ({e})") from None


def read_parquet(path: Path, max_group_bytes: int | None = None) -> list[dict]:
    max_group_bytes = max_group_bytes or MAX_ROW_GROUP_BYTES
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
        rows: list[dict] = []
        for i in range(pf.num_row_groups):
            # A row group is decoded whole: its uncompressed size is known from the footer first.
            size = pf.metadata.row_group(i).total_byte_size
            if size > max_group_bytes:
                raise DataError(f"{path}: row group {i} holds {size:,} bytes uncompressed, more than "
                                f"{_mib(max_group_bytes)}; write the file with smaller row groups, or remove the "
                                "oversized records")
            rows += pf.read_row_group(i).to_pylist()
        return rows
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds
        raise DataError(f"{path}: cannot read as parquet ({e})") from None


def read_records(path: Path) -> list[dict]:
    """Rows of a .jsonl(.gz), .json (a list, or {"Data": [...]} as TriviaQA has it) or .parquet file."""
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl(path)
    if name.endswith(".parquet"):
        return read_parquet(path)
    data = read_json(path)
    if isinstance(data, dict) and isinstance(data.get("Data"), list):
        data = data["Data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects")
    return data


def find(root: Path, task: Task, names: list[str], required: bool = True) -> Path | None:
    """The first of `names` under the task's folder (searched recursively: archives unpack with
    their own sub-folders)."""
    base = root / task.folder
    for name in names:
        direct = base / name
        if direct.is_file():
            return direct
    if base.is_dir():
        for name in names:
            hits = sorted(base.rglob(name))
            if len({h.parent for h in hits}) > 1:
                # An unpacked archive may hold several (MedQA: US and Mainland): never guess.
                raise DataError(f"{base}: {len(hits)} files named {name} ({', '.join(str(h.relative_to(base)) for h in hits[:4])}); "
                                f"keep only the one for {task.name} there, or point --data-dir at it")
            if hits:
                return hits[0]
    if not required:
        return None
    if not base.is_dir():
        raise DataError(f"no folder {base} for {task.name}: expected {task.layout} (get it from {task.source}; "
                        f"--data-dir sets the root)")
    raise DataError(f"{base}: no {' or '.join(names)} for {task.name}; expected {task.layout} "
                    f"(get it from {task.source})")


def find_dir(root: Path, task: Task, name: str) -> Path:
    """The folder `name` under the task's folder, or in a sub-folder an archive unpacked into."""
    base = root / task.folder
    if (base / name).is_dir():
        return base / name
    hits = sorted(d for d in base.rglob(name) if d.is_dir()) if base.is_dir() else []
    if not hits:
        raise DataError(f"no folder {base / name} for {task.name}: expected {task.layout} (get it from {task.source})")
    return hits[0]


def field_of(row: dict, key: str, path: Path, n: int, task: Task, kind: type | tuple = str) -> Any:
    if key not in row:
        raise bad_file(path, f"record {n} has no field '{key}'", task)
    value = row[key]
    if not isinstance(value, kind):
        raise bad_file(path, f"record {n}: field '{key}' is {type(value).__name__}", task)
    return value


def check_gold(gold: int, choices: list, path: Path, n: int, task: Task) -> int:
    if not 0 <= gold < len(choices):
        raise bad_file(path, f"record {n}: answer index {gold} is outside its {len(choices)} choices", task)
    return gold


LETTERS = "ABCDEFGHIJ"


def lettered(options: list[str]) -> str:
    return "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(options))


# --- few-shot prompts ---------------------------------------------------------------------------

def pick_shots(ex: Example, data: TaskData, k: int) -> list[Example]:
    """The first k examples of the example's group in the few-shot split (never the example itself
    where that split is the eval set)."""
    if k <= 0:
        return []
    own_split = not data.shots  # shots drawn from the eval set itself: skip the example at hand
    if ex.group not in data.pools:
        pool = data.examples if own_split else data.shots
        data.pools[ex.group] = [s for s in pool if s.group == ex.group] or pool
    chosen = [s for s in data.pools[ex.group][:k + 1] if not (own_split and s.id == ex.id)][:k]
    if len(chosen) < k:
        raise Phi3Error(f"{ex.group or 'this task'} has only {len(chosen)} few-shot examples; "
                        f"asked for {k} (lower --shots)")
    return chosen


def context(ex: Example, data: TaskData, k: int, query: str | None = None) -> str:
    """Description, k shots (each its query and target), then the example's query."""
    shots = pick_shots(ex, data, k)
    text = ex.description + "".join(s.query + s.target + SHOT_SEPARATOR for s in shots)
    return text + (ex.query if query is None else query)


def prompt_chars(ex: Example, data: TaskData, k: int) -> list[int]:
    """Characters of each prompt (context and continuation) that `requests` would build, or of the
    one `context` would build for an example without choices, counted without building them: a
    prompt far too long for any context is refused before it is ever put together."""
    shots = pick_shots(ex, data, k)
    head = len(ex.description) + sum(len(s.query) + len(s.target) + len(SHOT_SEPARATOR) for s in shots)
    if ex.contexts is not None:
        return [head + len(q) + len(ex.target) for q in ex.contexts]
    return [head + len(ex.query) + len(c) for c in ex.choices] or [head + len(ex.query)]


def requests(ex: Example, data: TaskData, k: int) -> list[tuple[str, str]]:
    """(context, continuation) pairs whose log-likelihoods decide a choice example."""
    if ex.contexts is not None:
        return [(context(ex, data, k, q), ex.target) for q in ex.contexts]
    ctx = context(ex, data, k)
    return [(ctx, c) for c in ex.choices]


# --- answer extraction and matching (generation tasks) -------------------------------------------

NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def last_number(text: str) -> str:
    """GSM-8K's answer: the last number in the completion, "$1,000." read as "1000"."""
    found = NUMBER.findall(text)
    if not found:
        return ""
    a, b = found[-1]
    return clean_number(a or b)


def clean_number(s: str) -> str:
    s = s.replace(",", "").replace("$", "").strip()
    return s[:-1] if s.endswith(".") else s


ANSWER_IS = re.compile(r"(?m)the answer is (.*?)\.?$")


def answer_is(text: str) -> str:
    """BBH's answer: what follows the first "the answer is", to the end of that line, less a final period."""
    found = ANSWER_IS.findall(text)
    return found[0].strip() if found else ""


def exact_ignoring_case(answer: str, ex: Example) -> bool:
    return any(answer.strip().lower() == a.strip().lower() for a in ex.answers)


def normalize_answer(s: str) -> str:
    """SQuAD/TriviaQA normalisation: lower case, no punctuation, articles or extra spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def first_line(text: str) -> str:
    return text.strip().split("\n")[0]


def normalized_match(answer: str, ex: Example) -> bool:
    a = normalize_answer(answer)
    return bool(a) and any(a == normalize_answer(x) for x in ex.answers)


LETTER_ANSWER = re.compile(r"answer is \(?([A-J])\)?")


def answer_letter(text: str) -> str:
    found = LETTER_ANSWER.findall(text)
    return found[-1] if found else ""


# --- choice metrics -----------------------------------------------------------------------------

def accuracy(ex: Example, lls: list[float]) -> dict[str, float]:
    """acc: the likeliest choice is right; acc_norm: the same with each log-likelihood divided by
    its choice's length in characters (lm-eval's normalisation; WinoGrande's choices share one
    continuation, so there it equals acc)."""
    best = max(range(len(lls)), key=lambda i: lls[i])
    if ex.contexts is not None:
        return {"acc": float(best == ex.gold), "acc_norm": float(best == ex.gold)}
    lengths = [max(1, len(c[1:] if c.startswith(" ") else c)) for c in ex.choices]
    norm = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
    return {"acc": float(best == ex.gold), "acc_norm": float(norm == ex.gold)}


def truthfulqa_metrics(ex: Example, lls: list[float]) -> dict[str, float]:
    """MC1: the single true answer is the likeliest; MC2: the probability mass of the true
    answers, normalised over all of MC2's answers."""
    import math
    n1 = ex.extra["n_mc1"]
    mc1, mc2 = lls[:n1], lls[n1:]
    labels = ex.extra["mc2_labels"]
    top = max(mc2)  # relative to the largest: exp of a long answer's log-likelihood underflows to 0
    probs = [math.exp(x - top) for x in mc2]
    total = sum(probs)
    true_mass = sum(p for p, label in zip(probs, labels) if label) / total if total > 0 else 0.0
    best = max(range(n1), key=lambda i: mc1[i])
    return {"mc1": float(best == 0), "mc2": true_mass}


# --- loaders ------------------------------------------------------------------------------------
# Each returns TaskData; `subsets` narrows a task to some of its subjects/subtasks/files.

def _choice_task_rows(task: Task, path: Path, make: Callable[[dict, int], Example]) -> list[Example]:
    rows = read_records(path)
    if not rows:
        raise bad_file(path, "has no records", task)
    return [at(make(r, n), path, n) for n, r in enumerate(rows, 1)]


def at(ex: Example, path: Path, n: int, what: str = "record") -> Example:
    """The example, with where it comes from (for errors that name the record)."""
    ex.source = f"{path}: {what} {n}" + (f" (id {ex.id})" if ex.id != str(n) else "")
    return ex


def _arc_like(task: Task, path: Path, letters_in_query: bool) -> list[Example]:
    def make(r: dict, n: int) -> Example:
        q = field_of(r, "question", path, n, task, dict)
        stem = q.get("stem")
        choices = q.get("choices")
        if not isinstance(stem, str) or not isinstance(choices, list) or not choices:
            raise bad_file(path, f"record {n}: question needs 'stem' and a list of 'choices'", task)
        labels = [c.get("label") for c in choices]
        texts = [c.get("text") for c in choices]
        if not all(isinstance(t, str) for t in texts):
            raise bad_file(path, f"record {n}: every choice needs a 'text'", task)
        key = str(field_of(r, "answerKey", path, n, task, (str, int)))
        if key not in labels:
            raise bad_file(path, f"record {n}: answerKey {key!r} is not one of the labels {labels}", task)
        gold = labels.index(key)
        if letters_in_query:
            query = f"Question: {stem.strip()}{lettered(texts)}\nAnswer:"
            opts = [f" {LETTERS[i]}" for i in range(len(texts))]
        else:
            query = f"Question: {stem.strip()}\nAnswer:" if task.name != "openbookqa" else stem.strip()
            opts = [f" {t}" for t in texts]
        return Example(str(r.get("id", n)), query, opts[gold], opts, gold)
    return _choice_task_rows(task, path, make)


def with_shots(make_rows: Callable[[Path], list[Example]], test: Path, train: Path | None) -> TaskData:
    """An eval file and, where there is one, its few-shot file."""
    return TaskData(make_rows(test), make_rows(train) if train else [], [p for p in (test, train) if p])


def _sibling_shots(path: Path, test_word: str, train_word: str) -> Path | None:
    other = path.with_name(path.name.replace(test_word, train_word))
    return other if other != path and other.is_file() else None


def load_arc(task: Task, which: str) -> Callable[[Path, list[str]], TaskData]:
    def load(root: Path, subsets: list[str]) -> TaskData:
        test = find(root, task, [f"ARC-{which}-Test.jsonl"])
        train = _sibling_shots(test, "-Test", "-Train")
        return with_shots(lambda path: _arc_like(task, path, False), test, train)
    return load


def load_arc_file(task: Task, test: Path) -> TaskData:
    """An ARC-layout file given directly (`arc_challenge=PATH`); shots from its Train sibling."""
    train = None
    for a, b in (("-Test", "-Train"), ("Test", "Train"), ("test", "train"), ("dev", "train"), ("Dev", "Train")):
        train = train or _sibling_shots(test, a, b)
    letters = task.name == "commonsenseqa"
    return with_shots(lambda path: _arc_like(task, path, letters), test, train)


def load_mmlu(task: Task) -> Callable[[Path, list[str]], TaskData]:
    def subjects(root: Path) -> list[str]:
        test_dir = _mmlu_dir(root, task, "test")
        return sorted(p.name[:-len("_test.csv")] for p in test_dir.glob("*_test.csv"))

    def rows(path: Path, subject: str, split: str) -> list[Example]:
        out = []
        for n, r in enumerate(read_csv(path, header=False), 1):
            if len(r) != 6 or r[5].strip() not in ("A", "B", "C", "D"):
                raise bad_file(path, f"row {n} has {len(r)} columns or answer {r[-1]!r}", task)
            gold = "ABCD".index(r[5].strip())
            opts = [" A", " B", " C", " D"]
            out.append(at(Example(f"{subject}/{split}/{n}", f"{r[0].strip()}{lettered(r[1:5])}\nAnswer:",
                                  opts[gold], opts, gold, group=subject,
                                  description=f"The following are multiple choice questions (with answers) about "
                                              f"{subject.replace('_', ' ')}.\n\n"), path, n, "row"))
        return out

    def load(root: Path, only: list[str]) -> TaskData:
        names = subjects(root)
        if not names:
            raise bad_file(_mmlu_dir(root, task, "test"), "has no <subject>_test.csv files", task)
        for s in only:
            if s not in names:
                raise Phi3Error(f"mmlu has no subject {s!r}; subjects are: {', '.join(names[:8])}, ...")
        examples, shots, files = [], [], []
        for s in (only or names):
            test = _mmlu_dir(root, task, "test") / f"{s}_test.csv"
            dev = _mmlu_dir(root, task, "dev") / f"{s}_dev.csv"
            if not dev.is_file():
                raise bad_file(dev, "is missing (the few-shot examples)", task)
            examples += rows(test, s, "test")
            shots += rows(dev, s, "dev")
            files += [test, dev]
        return TaskData(examples, shots, files)

    task.subsets = subjects
    return load


def _mmlu_dir(root: Path, task: Task, split: str) -> Path:
    for d in (root / task.folder / split, root / task.folder / "data" / split):
        if d.is_dir():
            return d
    raise DataError(f"no folder {root / task.folder / split}: expected {task.layout} (get it from {task.source})")


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(task: Task) -> Callable[[Path, list[str]], TaskData]:
    def make_rows(path: Path) -> list[Example]:
        def make(r: dict, n: int) -> Example:
            ctx = field_of(r, "ctx_a", path, n, task) + " " + field_of(r, "ctx_b", path, n, task).capitalize()
            endings = field_of(r, "endings", path, n, task, list)
            label = str(field_of(r, "label", path, n, task, (int, str)))
            if not label.isdigit():
                raise bad_file(path, f"record {n}: label {label!r} is not a number (the test split has no labels)", task)
            gold = check_gold(int(label), endings, path, n, task)
            query = _hellaswag_clean(field_of(r, "activity_label", path, n, task) + ": " + ctx)
            opts = [" " + _hellaswag_clean(e) for e in endings]
            return Example(str(r.get("ind", n)), query, opts[gold], opts, gold)
        return _choice_task_rows(task, path, make)

    def load(root: Path, subsets: list[str]) -> TaskData:
        val = find(root, task, ["hellaswag_val.jsonl"])
        train = find(root, task, ["hellaswag_train.jsonl"], required=False)
        return with_shots(make_rows, val, train)
    return load


def load_anli(task: Task) -> Callable[[Path, list[str]], TaskData]:
    labels = {"e": 0, "n": 1, "c": 2}
    opts = [" True", " Neither", " False"]

    def make_rows(path: Path, rnd: str) -> list[Example]:
        def make(r: dict, n: int) -> Example:
            label = field_of(r, "label", path, n, task)
            if label not in labels:
                raise bad_file(path, f"record {n}: label {label!r} is not e, n or c", task)
            query = (f"{field_of(r, 'premise', path, n, task)}\nQuestion: {field_of(r, 'hypothesis', path, n, task)} "
                     "True, False, or Neither?\nAnswer:")
            return Example(str(r.get("uid", n)), query, opts[labels[label]], list(opts), labels[label], group=rnd)
        return _choice_task_rows(task, path, make)

    def load(root: Path, only: list[str]) -> TaskData:
        examples, shots, files = [], [], []
        for rnd in only or ["R1", "R2", "R3"]:
            test = find_dir(root, task, rnd) / "test.jsonl"
            if not test.is_file():
                raise DataError(f"{test}: missing; expected {task.layout} (get it from {task.source})")
            train = test.with_name("train.jsonl")
            examples += make_rows(test, rnd)
            if train.is_file():
                shots += make_rows(train, rnd)
            files += [p for p in (test, train) if p.is_file()]
        return TaskData(examples, shots, files)
    task.subsets = lambda root: ["R1", "R2", "R3"]
    return load


def load_gsm8k(task: Task) -> Callable[[Path, list[str]], TaskData]:
    def make_rows(path: Path) -> list[Example]:
        def make(r: dict, n: int) -> Example:
            answer = field_of(r, "answer", path, n, task)
            if "####" not in answer:
                raise bad_file(path, f"record {n}: answer has no '#### N' final line", task)
            final = clean_number(answer.split("####")[-1])
            return Example(str(n), f"Question: {field_of(r, 'question', path, n, task)}\nAnswer:", " " + answer,
                           answers=[final])
        return _choice_task_rows(task, path, make)

    def load(root: Path, subsets: list[str]) -> TaskData:
        test = find(root, task, ["test.jsonl"])
        train = find(root, task, ["train.jsonl"], required=False)
        return with_shots(make_rows, test, train)
    return load


def load_medqa(task: Task) -> Callable[[Path, list[str]], TaskData]:
    def make_rows(path: Path) -> list[Example]:
        def make(r: dict, n: int) -> Example:
            options = field_of(r, "options", path, n, task, dict)
            keys = sorted(options)
            key = field_of(r, "answer_idx", path, n, task)
            if key not in options:
                raise bad_file(path, f"record {n}: answer_idx {key!r} is not an option", task)
            gold = keys.index(key)
            opts = [f" {k}" for k in keys]
            query = f"Question: {field_of(r, 'question', path, n, task).strip()}" + "".join(
                f"\n{k}. {options[k]}" for k in keys) + "\nAnswer:"
            return Example(str(n), query, opts[gold], opts, gold)
        return _choice_task_rows(task, path, make)

    def load(root: Path, subsets: list[str]) -> TaskData:
        test = find(root, task, ["phrases_no_exclude_test.jsonl", "test.jsonl"])
        train = _sibling_shots(test, "test", "train")
        return with_shots(make_rows, test, train)
    return load


AGIEVAL_ENGLISH = ["aqua-rat", "logiqa-en", "lsat-ar", "lsat-lr", "lsat-rc", "sat-en", "sat-en-without-passage",
                   "sat-math", "gaokao-english"]


def load_agieval(task: Task) -> Callable[[Path, list[str]], TaskData]:
    option_label = re.compile(r"^\(?([A-J])\)\s*")

    def make_rows(path: Path, name: str) -> list[Example]:
        def make(r: dict, n: int) -> Example:
            options = field_of(r, "options", path, n, task, list)
            label = field_of(r, "label", path, n, task, (str, list))
            label = label[0] if isinstance(label, list) and label else label
            letters = [LETTERS[i] for i in range(len(options))]
            if label not in letters:
                raise bad_file(path, f"record {n}: label {label!r} is not one of {letters}", task)
            texts = [option_label.sub("", o) for o in options]
            passage = r.get("passage") or ""
            query = (passage.strip() + "\n" if passage.strip() else "") + \
                f"Question: {field_of(r, 'question', path, n, task).strip()}{lettered(texts)}\nAnswer:"
            opts = [f" {x}" for x in letters]
            return Example(f"{name}/{n}", query, opts[letters.index(label)], opts, letters.index(label), group=name)
        return _choice_task_rows(task, path, make)

    def load(root: Path, only: list[str]) -> TaskData:
        folder = root / task.folder
        if folder.is_dir() and not any(folder.glob("*.jsonl")):
            folder = next((d.parent for d in sorted(folder.rglob("lsat-lr.jsonl"))), folder)  # data/v1/ of the archive
        names = only or [n for n in AGIEVAL_ENGLISH if (folder / f"{n}.jsonl").is_file()]
        if not names:
            raise DataError(f"{folder}: none of {', '.join(n + '.jsonl' for n in AGIEVAL_ENGLISH)}; "
                            f"expected {task.layout} (get it from {task.source})")
        examples, files = [], []
        for name in names:
            path = folder / f"{name}.jsonl"
            if not path.is_file():
                raise DataError(f"{path}: missing; expected {task.layout}")
            examples += make_rows(path, name)
            files.append(path)
        return TaskData(examples, [], files)
    task.subsets = lambda root: list(AGIEVAL_ENGLISH)
    return load


def load_triviaqa(task: Task) -> Callable[[Path, list[str]], TaskData]:
    def make_rows(path: Path) -> list[Example]:
        def make(r: dict, n: int) -> Example:
            answer = r.get("Answer") or r.get("answer")
            question = r.get("Question") or r.get("question")
            if not isinstance(answer, dict) or not isinstance(question, str):
                raise bad_file(path, f"record {n} needs 'Question' and an 'Answer' object", task)
            aliases = list(answer.get("Aliases") or answer.get("aliases") or []) + \
                list(answer.get("NormalizedAliases") or answer.get("normalized_aliases") or [])
            value = answer.get("Value") or answer.get("value") or (aliases[0] if aliases else "")
            qid = r.get("QuestionId") or r.get("question_id") or n
            return Example(str(qid), f"Question: {question.strip()}?\nAnswer:".replace("??", "?"), " " + value,
                           answers=[value] + aliases)
        return _choice_task_rows(task, path, make)

    def load(root: Path, subsets: list[str]) -> TaskData:
        dev = find(root, task, ["unfiltered-web-dev.json", "web-dev.json", "verified-web-dev.json",
                                "wikipedia-dev.json", "validation.jsonl"])
        train = find(root, task, ["unfiltered-web-train.json", "web-train.json", "train.jsonl"], required=False)
        return with_shots(make_rows, dev, train)
    return load


def _labels_file(path: Path, task: Task, count: int) -> list[int]:
    labels_path = path.with_name(path.stem + "-labels.lst")
    if not labels_path.is_file():
        raise DataError(f"{labels_path}: missing (the answers for {path.name}); expected {task.layout}")
    labels = []
    for _, line in read_lines(labels_path, max_line_bytes=1024):  # a label is a digit
        if line.strip():
            labels.append(line.strip())
            if len(labels) > count:  # stop here: a file of millions of lines is not read through
                raise bad_file(labels_path, f"has more than {count} labels for {count} records", task)
    if len(labels) != count:
        raise bad_file(labels_path, f"has {len(labels)} labels for {count} records", task)
    try:
        return [int(x) for x in labels]
    except ValueError:
        raise bad_file(labels_path, "holds a label that is not a number", task) from None


def load_piqa(task: Task) -> Callable[[Path, list[str]], TaskData]:
    def make_rows(path: Path) -> list[Example]:
        rows = read_records(path)
        labels = _labels_file(path, task, len(rows))
        out = []
        for n, (r, label) in enumerate(zip(rows, labels), 1):
            opts = [" " + field_of(r, "sol1", path, n, task), " " + field_of(r, "sol2", path, n, task)]
            gold = check_gold(label, opts, path, n, task)
            out.append(at(Example(str(r.get("id", n)), f"Question: {field_of(r, 'goal', path, n, task)}\nAnswer:",
                                  opts[gold], opts, gold), path, n))
        return out

    def load(root: Path, subsets: list[str]) -> TaskData:
        valid = find(root, task, ["valid.jsonl"])
        train = _sibling_shots(valid, "valid", "train")
        return with_shots(make_rows, valid, train)
    return load


def load_siqa(task: Task) -> Callable[[Path, list[str]], TaskData]:
    def make_rows(path: Path) -> list[Example]:
        rows = read_records(path)
        labels = _labels_file(path, task, len(rows))
        out = []
        for n, (r, label) in enumerate(zip(rows, labels), 1):
            opts = [" " + field_of(r, k, path, n, task) for k in ("answerA", "answerB", "answerC")]
            gold = check_gold(label - 1, opts, path, n, task)
            query = f"Q: {field_of(r, 'context', path, n, task)} {field_of(r, 'question', path, n, task)}\nA:"
            out.append(at(Example(str(n), query, opts[gold], opts, gold), path, n))
        return out

    def load(root: Path, subsets: list[str]) -> TaskData:
        dev = find(root, task, ["dev.jsonl"])
        train = _sibling_shots(dev, "dev", "train")
        return with_shots(make_rows, dev, train)
    return load


BBH_QUERY = "Q: {input}\nA: Let's think step by step."


def load_bbh(task: Task) -> Callable[[Path, list[str]], TaskData]:
    def folder(root: Path) -> Path:
        base = root / task.folder
        if base.is_dir() and not (base / "cot-prompts").is_dir():
            return next((d.parent for d in sorted(base.rglob("cot-prompts")) if d.is_dir()), base)
        return base

    def subtasks(root: Path) -> list[str]:
        base = folder(root)
        return sorted(p.stem for p in (base / "bbh").glob("*.json")) if not any(base.glob("*.json")) \
            else sorted(p.stem for p in base.glob("*.json"))

    def shots_of(path: Path, name: str) -> tuple[str, list[Example]]:
        """The published CoT prompt: a canary line, '-----', the task's description, then 3
        worked examples 'Q: ...\\nA: Let's think step by step.\\n<reasoning> So the answer is X.'"""
        text = read_text_file(path)
        if "-----\n" in text:
            text = text.split("-----\n", 1)[1]
        parts = text.strip().split("\n\nQ: ")
        if len(parts) < 2:
            raise bad_file(path, "has no 'Q: ...' examples", task)
        description, shots = parts[0].strip() + "\n\n", []
        for i, part in enumerate(parts[1:], 1):
            head, sep, reasoning = part.partition("\nA: Let's think step by step.")
            if not sep:
                raise bad_file(path, f"example {i} has no \"A: Let's think step by step.\"", task)
            shots.append(at(Example(f"{name}/shot{i}", BBH_QUERY.format(input=head.strip()), reasoning.rstrip(),
                                    group=name), path, i, "example"))
        return description, shots

    def load(root: Path, only: list[str]) -> TaskData:
        names = only or subtasks(root)
        if not names:
            raise DataError(f"{root / task.folder}: no <task>.json files; expected {task.layout} "
                            f"(get it from {task.source})")
        base = folder(root)
        data_dir = base if any(base.glob("*.json")) else base / "bbh"  # the repository keeps them in bbh/
        examples, shots, files = [], [], []
        for name in names:
            path = data_dir / f"{name}.json"
            prompt = base / "cot-prompts" / f"{name}.txt"
            for p in (path, prompt):
                if not p.is_file():
                    raise DataError(f"{p}: missing; expected {task.layout} (get it from {task.source})")
            description, task_shots = shots_of(prompt, name)
            data = read_json(path)
            rows = data.get("examples") if isinstance(data, dict) else None
            if not isinstance(rows, list) or not rows:
                raise bad_file(path, "has no 'examples' list", task)
            for n, r in enumerate(rows, 1):
                target = field_of(r, "target", path, n, task)
                examples.append(at(Example(f"{name}/{n}", BBH_QUERY.format(input=field_of(r, "input", path, n, task)),
                                           answers=[target], group=name, description=description), path, n))
            shots += task_shots
            files += [path, prompt]
        return TaskData(examples, shots, files)
    task.subsets = subtasks
    return load


def load_winogrande(task: Task) -> Callable[[Path, list[str]], TaskData]:
    def make_rows(path: Path) -> list[Example]:
        def make(r: dict, n: int) -> Example:
            sentence = field_of(r, "sentence", path, n, task)
            if "_" not in sentence:
                raise bad_file(path, f"record {n}: sentence has no '_' blank", task)
            cut = sentence.index("_")
            options = [field_of(r, "option1", path, n, task), field_of(r, "option2", path, n, task)]
            answer = str(field_of(r, "answer", path, n, task, (str, int)))
            if answer not in ("1", "2"):
                raise bad_file(path, f"record {n}: answer {answer!r} is not 1 or 2 (the test split has no answers)",
                               task)
            gold = int(answer) - 1
            contexts = [sentence[:cut] + o for o in options]
            continuation = " " + sentence[cut + 1:].strip()
            return Example(str(r.get("qID", n)), contexts[gold], continuation, gold=gold, contexts=contexts)
        return _choice_task_rows(task, path, make)

    def load(root: Path, subsets: list[str]) -> TaskData:
        dev = find(root, task, ["dev.jsonl"])
        train = find(root, task, ["train_xl.jsonl", "train_l.jsonl", "train_m.jsonl", "train_s.jsonl",
                                  "train_xs.jsonl"], required=False)
        return with_shots(make_rows, dev, train)
    return load


def load_arc_layout(task: Task, test_names: list[str], train_word: tuple[str, str],
                    letters: bool) -> Callable[[Path, list[str]], TaskData]:
    def load(root: Path, subsets: list[str]) -> TaskData:
        test = find(root, task, test_names)
        train = _sibling_shots(test, *train_word)
        return with_shots(lambda path: _arc_like(task, path, letters), test, train)
    return load


def load_boolq(task: Task) -> Callable[[Path, list[str]], TaskData]:
    opts = [" no", " yes"]

    def make_rows(path: Path) -> list[Example]:
        def make(r: dict, n: int) -> Example:
            answer = field_of(r, "answer", path, n, task, (bool, int))
            gold = int(bool(answer))
            query = f"{field_of(r, 'passage', path, n, task)}\nQuestion: {field_of(r, 'question', path, n, task)}?\nAnswer:"
            return Example(str(n), query, opts[gold], list(opts), gold)
        return _choice_task_rows(task, path, make)

    def load(root: Path, subsets: list[str]) -> TaskData:
        dev = find(root, task, ["dev.jsonl", "val.jsonl"])
        train = find(root, task, ["train.jsonl"], required=False)
        return with_shots(make_rows, dev, train)
    return load


def load_truthfulqa(task: Task) -> Callable[[Path, list[str]], TaskData]:
    def targets(value: Any, path: Path, n: int, key: str) -> tuple[list[str], list[int]]:
        try:
            if isinstance(value, dict) and "choices" in value:  # the Hugging Face copy
                return list(value["choices"]), [int(x) for x in value["labels"]]
            if isinstance(value, dict) and value:  # the authors' mc_task.json: {answer: 0/1}
                return list(value), [int(x) for x in value.values()]
        except (TypeError, ValueError):
            pass
        raise bad_file(path, f"record {n}: '{key}' is not {{answer: 0 or 1}}", task)

    def load(root: Path, subsets: list[str]) -> TaskData:
        path = find(root, task, ["mc_task.json", "multiple_choice.jsonl"])
        examples = []
        for n, r in enumerate(read_records(path), 1):
            q = field_of(r, "question", path, n, task)
            mc1, labels1 = targets(r.get("mc1_targets"), path, n, "mc1_targets")
            mc2, labels2 = targets(r.get("mc2_targets"), path, n, "mc2_targets")
            if not labels1 or labels1[0] != 1 or sum(labels1) != 1:
                raise bad_file(path, f"record {n}: mc1_targets must list the one true answer first", task)
            choices = [" " + c for c in mc1 + mc2]
            examples.append(at(Example(str(n), f"Q: {q}\nA:", " " + mc1[0], choices, 0,
                                       extra={"n_mc1": len(mc1), "mc2_labels": labels2}), path, n))
        return TaskData(examples, [], [path])
    return load


HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def load_humaneval(task: Task) -> Callable[[Path, list[str]], TaskData]:
    def load(root: Path, subsets: list[str]) -> TaskData:
        path = find(root, task, ["HumanEval.jsonl.gz", "HumanEval.jsonl"])
        examples = []
        for n, r in enumerate(read_jsonl(path), 1):
            keys = ("task_id", "prompt", "test", "entry_point")
            for k in keys:
                field_of(r, k, path, n, task)
            examples.append(at(Example(r["task_id"], r["prompt"], r.get("canonical_solution", ""),
                                       extra={"test": r["test"], "entry_point": r["entry_point"]}), path, n))
        if not examples:
            raise bad_file(path, "has no records", task)
        return TaskData(examples, [], [path])
    return load


MBPP_SHOT_IDS = (2, 3, 4)  # the prompt split the MBPP paper uses for its 3 shots
MBPP_TEST_IDS = range(11, 511)


def load_mbpp(task: Task) -> Callable[[Path, list[str]], TaskData]:
    def load(root: Path, subsets: list[str]) -> TaskData:
        path = find(root, task, ["mbpp.jsonl"])
        by_id = {}
        for n, r in enumerate(read_jsonl(path), 1):
            tid = field_of(r, "task_id", path, n, task, int)
            tests = field_of(r, "test_list", path, n, task, list)
            text, code = field_of(r, "text", path, n, task), field_of(r, "code", path, n, task)
            query = (f"You are an expert Python programmer, and here is your task: {text} "
                     f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")
            by_id[tid] = at(Example(str(tid), query, code.replace("\r\n", "\n") + "\n[DONE]",
                                    extra={"tests": tests, "setup": r.get("test_setup_code", "")}), path, n)
        shots = [by_id[i] for i in MBPP_SHOT_IDS if i in by_id]
        examples = [by_id[i] for i in MBPP_TEST_IDS if i in by_id] or \
            [e for i, e in by_id.items() if i not in MBPP_SHOT_IDS]
        return TaskData(examples, shots, [path])
    return load


def load_gpqa(task: Task) -> Callable[[Path, list[str]], TaskData]:
    cols = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")

    def load(root: Path, subsets: list[str]) -> TaskData:
        path = find(root, task, ["gpqa_main.csv", "gpqa_diamond.csv", "gpqa_extended.csv"])
        rows = read_csv(path, header=True)
        if not rows or any(c not in rows[0] for c in cols):
            raise bad_file(path, f"needs the columns {', '.join(cols)}", task)
        examples = []
        for n, r in enumerate(rows, 1):
            rid = r.get("Record ID") or str(n)
            answers = [r[c].strip() for c in cols[1:]]
            order = list(range(4))
            random.Random(rid).shuffle(order)  # a fixed order per question, the right answer anywhere
            gold = order.index(0)
            options = "".join(f"\n({LETTERS[i]}) {answers[j]}" for i, j in enumerate(order))
            query = f"Question: {r['Question'].strip()}\nChoices:{options}\nAnswer: Let's think step by step."
            explanation = " ".join((r.get("Explanation") or "").split())
            examples.append(at(Example(rid, query, f" {explanation} So the answer is ({LETTERS[gold]}).",
                                       answers=[LETTERS[gold]]), path, n, "row"))
        return TaskData(examples, [], [path])
    return load


# --- the table ----------------------------------------------------------------------------------

def _task(name: str, title: str, kind: str, shots: int, folder: str, layout: str, source: str,
          loader: Callable[[Task], Callable[[Path, list[str]], TaskData]], **kw: Any) -> Task:
    task = Task(name, title, kind, shots, folder, layout, source, load=lambda root, subsets: None, **kw)
    task.load = loader(task)
    return task


def _all_tasks() -> list[Task]:
    arc_layout = ('JSONL records {"id", "question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}')
    return [
        _task("mmlu", "MMLU", "choice", 5, "mmlu",
              "mmlu/dev/<subject>_dev.csv and mmlu/test/<subject>_test.csv, rows question,A,B,C,D,answer "
              "without a header", "https://people.eecs.berkeley.edu/~hendrycks/data.tar (data/dev, data/test)",
              load_mmlu),
        _task("hellaswag", "HellaSwag", "choice", 5, "hellaswag",
              'hellaswag/hellaswag_val.jsonl (and hellaswag_train.jsonl for shots), records {"ctx_a", "ctx_b", '
              '"activity_label", "endings": [4], "label"}', "github.com/rowanz/hellaswag (data/)", load_hellaswag, headline="acc_norm"),
        _task("anli", "ANLI", "choice", 7, "anli",
              'anli/R1|R2|R3/test.jsonl (and train.jsonl), records {"uid", "premise", "hypothesis", "label": e|n|c}',
              "github.com/facebookresearch/anli (anli_v1.0.zip)", load_anli),
        _task("gsm8k", "GSM-8K", "generate", 8, "gsm8k",
              'gsm8k/test.jsonl and train.jsonl, records {"question", "answer" ending in "#### N"}',
              "github.com/openai/grade-school-math (grade_school_math/data/)", load_gsm8k,
              stop=("Question:", "\n\n"), max_tokens=256, extract=last_number, match=exact_ignoring_case),
        _task("medqa", "MedQA", "choice", 2, "medqa",
              'medqa/test.jsonl (and train.jsonl), records {"question", "options": {"A": ..}, "answer_idx"}',
              "github.com/jind11/MedQA (data_clean/questions/US/4_options/phrases_no_exclude_*.jsonl)",
              load_medqa),
        _task("agieval", "AGIEval", "choice", 0, "agieval",
              'agieval/<name>.jsonl for the English sets (' + ", ".join(AGIEVAL_ENGLISH) + '), records '
              '{"passage", "question", "options": ["(A)..", ..], "label": "A"}',
              "github.com/ruixiangcui/AGIEval (data/v1/)", load_agieval),
        _task("triviaqa", "TriviaQA", "generate", 5, "triviaqa",
              'triviaqa/unfiltered-web-dev.json (or web-dev.json; *-train.json for shots), '
              '{"Data": [{"Question", "Answer": {"Value", "Aliases", "NormalizedAliases"}}]}',
              "nlp.cs.washington.edu/triviaqa (triviaqa-unfiltered.tar.gz or triviaqa-rc.tar.gz qa/)",
              load_triviaqa, stop=("\n", ".", ","), max_tokens=32, extract=first_line, match=normalized_match),
        _task("arc_challenge", "ARC-Challenge", "choice", 10, "arc",
              f"arc/ARC-Challenge-Test.jsonl (and -Train.jsonl for shots), {arc_layout}",
              "allenai.org/data/arc (ARC-V1-Feb2018.zip)", lambda t: load_arc(t, "Challenge"), headline="acc_norm"),
        _task("arc_easy", "ARC-Easy", "choice", 10, "arc",
              f"arc/ARC-Easy-Test.jsonl (and -Train.jsonl for shots), {arc_layout}",
              "allenai.org/data/arc (ARC-V1-Feb2018.zip)", lambda t: load_arc(t, "Easy"), headline="acc_norm"),
        _task("piqa", "PIQA", "choice", 5, "piqa",
              'piqa/valid.jsonl with valid-labels.lst (and train.jsonl, train-labels.lst), records '
              '{"goal", "sol1", "sol2"}, labels 0/1 one per line', "github.com/ybisk/ybisk.github.io (piqa/data/)",
              load_piqa, headline="acc_norm"),
        _task("siqa", "Social IQA", "choice", 5, "siqa",
              'siqa/dev.jsonl with dev-labels.lst (and train.jsonl, train-labels.lst), records {"context", '
              '"question", "answerA", "answerB", "answerC"}, labels 1-3 one per line',
              "leaderboard.allenai.org/socialiqa (socialiqa-train-dev.zip)", load_siqa),
        _task("bbh", "BigBench-Hard", "generate", 3, "bbh",
              'bbh/<task>.json {"examples": [{"input", "target"}]} and bbh/cot-prompts/<task>.txt',
              "github.com/suzgunmirac/BIG-Bench-Hard (bbh/, cot-prompts/)", load_bbh,
              stop=("\n\n", "\nQ:"), max_tokens=256, extract=answer_is, match=exact_ignoring_case),
        _task("winogrande", "WinoGrande", "choice", 5, "winogrande",
              'winogrande/dev.jsonl (and train_xl.jsonl), records {"sentence" with one "_", "option1", '
              '"option2", "answer": "1"|"2"}', "github.com/allenai/winogrande (winogrande_1.1.zip)",
              load_winogrande),
        _task("openbookqa", "OpenBookQA", "choice", 10, "openbookqa",
              f"openbookqa/test.jsonl (and train.jsonl), {arc_layout}",
              "allenai.org/data/open-book-qa (OpenBookQA-V1-Sep2018, Data/Main/)",
              lambda t: load_arc_layout(t, ["test.jsonl"], ("test", "train"), False), headline="acc_norm"),
        _task("boolq", "BoolQ", "choice", 2, "boolq",
              'boolq/dev.jsonl (and train.jsonl), records {"question", "passage", "answer": true|false}',
              "github.com/google-research-datasets/boolean-questions", load_boolq),
        _task("commonsenseqa", "CommonsenseQA", "choice", 10, "commonsenseqa",
              f"commonsenseqa/dev_rand_split.jsonl (and train_rand_split.jsonl), {arc_layout}",
              "www.tau-nlp.sites.tau.ac.il/commonsenseqa",
              lambda t: load_arc_layout(t, ["dev_rand_split.jsonl"], ("dev", "train"), True)),
        _task("truthfulqa_mc", "TruthfulQA (MC)", "choice", 10, "truthfulqa",
              'truthfulqa/mc_task.json, a list of {"question", "mc1_targets": {answer: 1|0}, "mc2_targets": ...} '
              '(the true MC1 answer first)', "github.com/sylinrl/TruthfulQA (data/mc_task.json)",
              load_truthfulqa, choice_metrics=truthfulqa_metrics),
        _task("humaneval", "HumanEval", "code", 0, "humaneval",
              'humaneval/HumanEval.jsonl.gz, records {"task_id", "prompt", "test", "entry_point"}',
              "github.com/openai/human-eval (data/)", load_humaneval, stop=HUMANEVAL_STOP, max_tokens=512),
        _task("mbpp", "MBPP", "code", 3, "mbpp",
              'mbpp/mbpp.jsonl, records {"task_id", "text", "code", "test_list", "test_setup_code"}',
              "github.com/google-research/google-research (mbpp/)", load_mbpp, stop=("[DONE]",), max_tokens=512),
        _task("gpqa", "GPQA", "generate", 2, "gpqa",
              "gpqa/gpqa_main.csv with the columns Question, Correct Answer, Incorrect Answer 1-3, Explanation",
              "github.com/idavidrein/gpqa (dataset.zip)", load_gpqa,
              stop=("\nQuestion:",), max_tokens=512, extract=answer_letter, match=exact_ignoring_case),
    ]


TASKS: dict[str, Task] = {t.name: t for t in _all_tasks()}


def parse_tasks(spec: str) -> list[tuple[Task, list[str], Path | None]]:
    """'mmlu,gsm8k,bbh:navigate+snarks,arc_challenge=path/to/file.jsonl' -> (task, subsets, file)."""
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, _, file = item.partition("=")
        name, _, subs = name.partition(":")
        if name == "all":
            out += [(t, [], None) for t in TASKS.values()]
            continue
        if name not in TASKS:
            raise Phi3Error(f"unknown task {name!r}; tasks are: {', '.join(TASKS)} (or all)")
        task = TASKS[name]
        if file and task.name not in ("arc_challenge", "arc_easy", "openbookqa", "commonsenseqa"):
            raise Phi3Error(f"{name}=FILE works for the ARC-layout tasks only; use --data-dir for {name}")
        out.append((task, [s for s in subs.split("+") if s], Path(file) if file else None))
    if not out:
        raise Phi3Error("no tasks given: pass --tasks, e.g. --tasks gsm8k,arc_challenge (or all)")
    return out


def record_chars(ex: Example) -> int:
    """Characters of the longest prompt an example makes without shots: what it brings to any context."""
    queries = ex.contexts if ex.contexts is not None else [ex.query]
    return len(ex.description) + max(len(q) for q in queries) + max(len(t) for t in ex.choices + [ex.target])


def check_lengths(data: TaskData) -> None:
    """Refuse a record that no model's context could hold, before anything tokenizes it (phi3.eval
    then checks each prompt against the model's own context)."""
    for ex in data.examples + data.shots:
        size = record_chars(ex)
        if size > MAX_RECORD_CHARS:
            raise DataError(f"{ex.source or ex.id}: {size:,} characters, more than any model's context holds "
                            f"({MAX_CONTEXT_TOKENS:,} tokens of at most {MAX_CHARS_PER_TOKEN} characters); "
                            "shorten or remove this record")


def load_task(task: Task, root: Path, subsets: list[str], file: Path | None = None) -> TaskData:
    if file is not None:
        if not file.is_file():
            raise DataError(f"{file}: no such file; expected {task.layout}")
        data = load_arc_file(task, file)
    else:
        data = task.load(root, subsets)
    check_lengths(data)
    return data
