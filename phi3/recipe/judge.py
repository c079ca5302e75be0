"""judge: an LLM scores a sample of the documents for educational value, 0-5 (issue 16, stage 4).

The rubric is our own, in the spirit of FineWeb-Edu's additive prompt and phi-1's "educational
value for a student": points accumulate for teaching knowledge and reasoning a student can learn
from; pages whose facts are ephemeral (one day's sports results, prices, schedules, announcements)
score low whatever their quality, as the Phi-3 report asks. The judge answers with a short
justification and a last line "Educational score: N".

The LLM is any OpenAI-compatible endpoint (`phi3 serve` is one), through phi3.judge's client (its
retries on 408/429/5xx and connection errors) and its resumable jsonl records: every judgment is
appended to OUT.partial/judgments.jsonl as soon as it exists, a rerun judges only the documents not
yet there, and OUT appears when every sampled document is judged. An answer without a score in 0-5
is recorded with score null and `unparsable: true`, never a crash. An endpoint that is down (after
the retries) is one error line, exit 2; what was judged is kept for the rerun.

The sample is deterministic: the `sample` documents whose hash of (seed, id) is smallest, so it
does not depend on file order or on how the corpus was sharded.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from pathlib import Path

from phi3.errors import Phi3Error

MAX_DOC_CHARS = 3000  # of each document shown to the judge; FineWeb-2's reuse of the prompt cuts at 30,000
SCORE = re.compile(r"educational score:\s*\**\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)

PROMPT = """Below is an extract from a web page. Judge whether it could teach a student something: \
knowledge and reasoning at a level that a student, from primary school to college, can learn from. \
Use this additive 5-point system; add a point for each criterion the extract meets:

- Add 1 point if the extract gives some basic information on an educational topic, even if it also \
holds advertisements, navigation or other noise.
- Add another point if it addresses elements that matter in education but does not align closely \
with educational standards, or mixes educational content with non-educational material.
- Add a third point if it is appropriate for educational use and introduces key concepts, coherently, \
like the first pages of a textbook or a tutorial.
- Add a fourth point if it is highly relevant and useful for learning: clear, consistent, with \
reasoning or worked examples a student can follow, and little irrelevant content.
- Add a fifth point if it is outstanding in its educational value: it explains step by step, with \
exercises or solutions, knowledge that stays true and useful.

Score 0 or 1, whatever its quality, a page whose facts are ephemeral or trivia that teaches no \
reasoning: one day's sports results, prices, schedules, weather, announcements, lists of links.

The extract:
<extract>
{document}
</extract>

Justify your total score in at most 100 words, then end with a last line "Educational score: <points>"."""

# For a small judge on a CPU (SmolLM2-135M in `make data-demo`): the same scale in four lines and
# the score alone. The full prompt's justification costs ~100 generated tokens per document, and
# SmolLM2-135M mostly echoed the extract instead of justifying (its first demo judgment took 3.5
# minutes on a loaded 2-core machine and held no score).
PROMPT_BRIEF = """Rate the educational value of the extract below for a student, from 0 to 5:
0-1: no educational value, or ephemeral facts (sports results, prices, schedules, announcements, lists of links).
2: some basic information on an educational topic, mixed with noise.
3: introduces key concepts coherently, like a textbook or a tutorial.
4: clear explanations with reasoning or worked examples a student can follow.
5: outstanding step-by-step teaching, with exercises or solutions.

<extract>
{document}
</extract>

Answer with one line only: "Educational score: <0-5>"."""
PROMPTS = {"full": PROMPT, "brief": PROMPT_BRIEF}
BARE = re.compile(r"^\W*([0-5])(?:\s*/\s*5)?\W*$")
# SmolLM2-135M's usual brief answer: "The educational value of the extract is 0."
STATED = re.compile(r"educational (?:score|value)\b[^0-9\n]{0,40}?\b([0-5])(?:\s*/\s*5)?\b(?![.,]?\d)", re.IGNORECASE)


def sample_ids(ids: list[str], n: int, seed: int) -> list[str]:
    """The n ids with the smallest sha1(seed, id): a fixed sample, whatever the order of the input."""
    key = lambda i: hashlib.sha1(f"{seed}\x00{i}".encode()).digest()  # noqa: E731
    return sorted(sorted(set(ids), key=key)[:n], key=key)


def parse_score(answer: str) -> int | None:
    """The last "Educational score: N" of an answer, if N is a whole number in 0-5; else an answer
    that is only a digit 0-5, or states "educational value ... is N" (the brief prompt's small
    judges answer so)."""
    found = SCORE.findall(answer or "")
    if not found:
        bare = BARE.match((answer or "").strip()) or STATED.search(answer or "")
        return int(bare.group(1)) if bare else None
    value = float(found[-1])
    return int(value) if value.is_integer() and 0 <= value <= 5 else None


def messages(text: str, max_chars: int = MAX_DOC_CHARS, prompt: str = "full") -> tuple[list[dict[str, str]], int]:
    """The judge's prompt for a document, and how many characters of it were cut (recorded)."""
    shown = text[:max_chars]
    return [{"role": "user", "content": PROMPTS[prompt].format(document=shown)}], len(text) - len(shown)


def read_documents(folder: str, glob: str | None) -> dict[str, dict]:
    """id -> document of a previous stage's docs (or jsonl files), read whole: the judge sees a sample."""
    docs = {}
    root = Path(folder)
    files = [root / glob] if glob and "*" not in glob else sorted(root.glob(glob or "**/*.json*"))
    for f in files:
        opener = gzip.open if f.name.endswith(".gz") else open
        with opener(f, "rt", encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    d = json.loads(line)
                    docs[str(d.get("id", f"{f.name}/{n - 1}"))] = d
    return docs


def run_judge(src: Path, out: Path, endpoint, sample: int, seed: int = 0, progress: bool = True,
              max_chars: int = MAX_DOC_CHARS, prompt: str = "full") -> dict:
    from phi3.judge import EndpointError, _progress, append_record, read_records
    from phi3.recipe.ingest import docs_input
    from phi3.recipe.pipeline import _write_json

    out = Path(out)
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        summary["skipped"] = f"{out} exists (delete it to run judge again)"
        return summary
    if out.exists():
        raise Phi3Error(f"{out} exists but is not a finished `phi3 data` stage folder; delete it or pick another --out")
    if sample < 1:
        raise Phi3Error(f"--sample {sample} must be at least 1")
    if prompt not in PROMPTS:
        raise Phi3Error(f"--prompt {prompt!r} is not one of {', '.join(PROMPTS)}")
    if max_chars < 100:
        raise Phi3Error(f"--max-chars {max_chars}: show the judge at least 100 characters of each document")
    docs = read_documents(*docs_input(src))
    chosen = sample_ids(list(docs), sample, seed)
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    path = work / "judgments.jsonl"
    done = {r["id"] for r in read_records(path)}
    for rec in read_records(path):
        if rec.get("model") != endpoint.model or rec.get("prompt_sha1") != _prompt_sha1(prompt):
            raise Phi3Error(f"{path} holds judgments by {rec.get('model')!r} or another prompt; "
                            f"delete {work} to start over with {endpoint.model!r}")
    todo = [i for i in chosen if i not in done]
    for doc_id in _progress(todo, len(todo), "judging", progress):
        msgs, cut = messages(docs[doc_id]["text"], max_chars, prompt)
        try:
            answer = endpoint.chat(msgs)
        except EndpointError as e:
            if not e.request_specific:
                raise Phi3Error(f"judge: {e} ({len(read_records(path))} of {len(chosen)} judged and kept in "
                                f"{work}; rerun the same command to go on)") from None
            answer, cut = f"ERROR: {e}", cut
        score = parse_score(answer)
        append_record(path, {"id": doc_id, "score": score, "unparsable": score is None, "answer": answer,
                             "chars_cut": cut, "model": endpoint.model, "prompt_sha1": _prompt_sha1(prompt),
                             "url": docs[doc_id].get("metadata", {}).get("url"),
                             "source": docs[doc_id].get("metadata", {}).get("source")})
    records = {r["id"]: r for r in read_records(path)}
    scores = [records[i]["score"] for i in chosen]
    hist = {str(s): sum(1 for x in scores if x == s) for s in range(6)}
    summary = {"stage": "judge", "documents_in": len(docs), "sample": len(chosen), "model": endpoint.model, "prompt": prompt,
               "histogram": hist, "unparsable": sum(1 for x in scores if x is None)}
    _write_json(work / "summary.json", summary)
    os.replace(work, out)
    return summary


def _prompt_sha1(prompt: str = "full") -> str:
    return hashlib.sha1(PROMPTS[prompt].encode()).hexdigest()[:12]
