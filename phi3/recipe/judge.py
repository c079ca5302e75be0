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

Scoring (`scoring`): "logprobs" reads the score G-Eval style. The prompt asks for the score alone,
one digit; the endpoint returns the top-20 log-probabilities of each reply token (OpenAI's
`logprobs: true, top_logprobs: 20`); at the score's position the probabilities of "0".."5" are
renormalised, and the judgment records their expected value as its score, the argmax, the
distribution and the digits' share of the probability mass. A small judge whose greedy answer is
always the same digit (SmolLM2-135M answered 0 for every page in the first `make data-demo`) still
ranks pages by how much probability it puts on the higher digits. "text" parses the answer's
"Educational score: N". "auto" (the default) uses logprobs when the endpoint returns them and falls
back to text, with a one-line note, when it does not.

The sample is deterministic: the `sample` documents whose hash of (seed, id) is smallest, so it
does not depend on file order or on how the corpus was sharded.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import sys
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
# The logprobs mode's last line, instead of the text modes' (a justification first would put the
# score at a position the judge chooses): the reply's first token should be the digit.
DIGIT_ASK = "Answer with the score only: one digit from 0 to 5."
SCORINGS = ("auto", "logprobs", "text")
TOP_LOGPROBS = 20  # OpenAI's maximum: the digits' alternatives are read from these
DIGIT_TOKENS = 4  # reply tokens asked for in logprobs mode: the digit is looked for among them
# The reply is prefilled with this (continue_final_message: vLLM's and phi3 serve's), so the next
# token is the digit. Without it SmolLM2-135M began its reply with echoes such as "B.4." or "1."
# (a heading's or a list's number), whose digit is no score. The trailing space: SmolLM2's
# tokenizer makes " " a token of its own before a digit.
PREFILL = "Educational score: "
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


def prompt_template(prompt: str = "full", scoring: str = "text") -> str:
    """The rubric `prompt`, its last line asking for the score alone in logprobs mode."""
    template = PROMPTS[prompt]
    return template.rsplit("\n\n", 1)[0] + "\n\n" + DIGIT_ASK if scoring == "logprobs" else template


def messages(text: str, max_chars: int = MAX_DOC_CHARS, prompt: str = "full",
             scoring: str = "text") -> tuple[list[dict[str, str]], int]:
    """The judge's prompt for a document, and how many characters of it were cut (recorded)."""
    shown = text[:max_chars]
    return [{"role": "user", "content": prompt_template(prompt, scoring).format(document=shown)}], len(text) - len(shown)


def _digit(token: str) -> int | None:
    t = token.strip()
    return int(t) if len(t) == 1 and t in "012345" else None


def score_from_logprobs(content: list[dict] | None) -> dict:
    """The G-Eval score of a reply's token log-probabilities (OpenAI's logprobs.content).

    The score's position is the first reply token that is a digit 0-5 (spaces aside); if none is,
    the first position with a digit 0-5 among its top alternatives. There P(d) for d in 0..5 (" 3"
    and "3" added together) is renormalised: `score` is the expected value, `argmax` the likeliest
    digit, `distribution` the six probabilities and `digit_mass` their share before renormalising
    (how much the judge wanted to answer with a digit there at all). Without any digit:
    {"score": None, "unparsable": True, "reason": ...}, never an exception."""
    if not content:
        return {"score": None, "argmax": None, "unparsable": True, "reason": "the reply has no tokens with logprobs"}

    def alternatives(entry: dict) -> list[tuple[str, float]]:
        top = entry.get("top_logprobs") or []
        pairs = [(t.get("token", ""), t.get("logprob")) for t in top if isinstance(t, dict)]
        pairs = pairs or [(entry.get("token", ""), entry.get("logprob"))]
        return [(tok, float(lp)) for tok, lp in pairs if isinstance(tok, str) and isinstance(lp, (int, float))]

    chosen = next((i for i, e in enumerate(content) if _digit(str(e.get("token", ""))) is not None), None)
    position = chosen if chosen is not None else next(
        (i for i, e in enumerate(content) if any(_digit(t) is not None for t, _ in alternatives(e))), None)
    if position is None:
        return {"score": None, "argmax": None, "unparsable": True,
                "reason": f"no digit 0-5 among the top alternatives of the {len(content)} reply tokens"}
    probs = [0.0] * 6
    for tok, lp in alternatives(content[position]):
        d = _digit(tok)
        if d is not None:
            probs[d] += math.exp(lp)
    mass = sum(probs)
    if not mass > 0:
        return {"score": None, "argmax": None, "unparsable": True,
                "reason": f"the digits at reply token {position} have probability 0"}
    dist = [q / mass for q in probs]
    return {"score": round(sum(d * q for d, q in enumerate(dist)), 4), "argmax": max(range(6), key=lambda d: dist[d]),
            "distribution": {str(d): round(q, 4) for d, q in enumerate(dist)}, "digit_mass": round(mass, 4),
            "position": position, "digit_chosen": chosen is not None, "unparsable": False}


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


def _supports_logprobs(endpoint, probe: list[dict[str, str]]) -> tuple[bool, str | None, str]:
    """Whether the endpoint returns token log-probabilities, and takes an assistant prefill (one or
    two requests with a document's prompt): (logprobs, the prefill to use or None, why not). An
    endpoint that is down raises, as any other call would."""
    from phi3.judge import EndpointError
    why = ""
    for prefill in (PREFILL, None):
        try:
            result = endpoint.chat_logprobs(probe, TOP_LOGPROBS, max_tokens=1, prefill=prefill)
        except EndpointError as e:
            if e.request_specific:  # 400: OpenAI-compatible servers refuse what they do not serve
                why = str(e)
                continue
            raise
        if result.logprobs is None:
            return False, None, "its answer holds no choices[0].logprobs.content"
        return True, prefill, ""
    return False, None, why


def run_judge(src: Path, out: Path, endpoint, sample: int, seed: int = 0, progress: bool = True,
              max_chars: int = MAX_DOC_CHARS, prompt: str = "full", scoring: str = "auto") -> dict:
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
    if scoring not in SCORINGS:
        raise Phi3Error(f"--scoring {scoring!r} is not one of {', '.join(SCORINGS)}")
    if max_chars < 100:
        raise Phi3Error(f"--max-chars {max_chars}: show the judge at least 100 characters of each document")
    docs = read_documents(*docs_input(src))
    chosen = sample_ids(list(docs), sample, seed)
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    path = work / "judgments.jsonl"
    earlier = read_records(path)
    done = {r["id"] for r in earlier}
    todo = [i for i in chosen if i not in done]

    def stopped(e: Exception) -> Phi3Error:
        return Phi3Error(f"judge: {e} ({len(read_records(path))} of {len(chosen)} judged and kept in "
                         f"{work}; rerun the same command to go on)")

    mode, prefill = scoring, PREFILL
    if earlier:  # a resumed run keeps the mode and prefill its records were made with
        mode = earlier[0].get("scoring", "text") if scoring == "auto" else scoring
        prefill = earlier[0].get("prefill")
    elif todo and scoring != "text":
        try:
            ok, prefill, why = _supports_logprobs(endpoint, messages(docs[todo[0]]["text"], max_chars, prompt,
                                                                     "logprobs")[0])
        except EndpointError as e:
            raise stopped(e) from None
        if not ok and scoring == "logprobs":
            raise Phi3Error(f"judge: --scoring logprobs, but {endpoint.url} gives no token log-probabilities ({why}); "
                            "use --scoring text or auto")
        if not ok:
            mode = "text"
            print(f"phi3 data judge: {endpoint.url} gives no token log-probabilities ({why}); scoring from the "
                  "answer's text instead", file=sys.stderr)
        else:
            mode = "logprobs"
    for rec in earlier:
        if rec.get("model") != endpoint.model or rec.get("prompt_sha1") != _prompt_sha1(prompt, mode):
            raise Phi3Error(f"{path} holds judgments by {rec.get('model')!r} or another prompt or scoring; "
                            f"delete {work} to start over with {endpoint.model!r}")
    for doc_id in _progress(todo, len(todo), "judging", progress):
        msgs, cut = messages(docs[doc_id]["text"], max_chars, prompt, mode)
        fields: dict = {}
        try:
            if mode == "logprobs":
                result = endpoint.chat_logprobs(msgs, TOP_LOGPROBS, max_tokens=min(endpoint.max_tokens, DIGIT_TOKENS),
                                                prefill=prefill)
                answer = result.text
                fields = score_from_logprobs(result.logprobs) if result.logprobs is not None else {
                    "score": None, "argmax": None, "unparsable": True, "reason": "the answer holds no logprobs"}
            else:
                answer = endpoint.chat(msgs)
        except EndpointError as e:
            if not e.request_specific:
                raise stopped(e) from None
            answer = f"ERROR: {e}"
            fields = {"score": None, "unparsable": True, "reason": str(e)} if mode == "logprobs" else {}
        if mode == "text":
            score = parse_score(answer)
            fields = {"score": score, "unparsable": score is None}
        if mode == "logprobs":
            fields["prefill"] = prefill
        append_record(path, {"id": doc_id, **fields, "answer": answer, "scoring": mode,
                             "chars_cut": cut, "model": endpoint.model, "prompt_sha1": _prompt_sha1(prompt, mode),
                             "url": docs[doc_id].get("metadata", {}).get("url"),
                             "source": docs[doc_id].get("metadata", {}).get("source")})
    records = {r["id"]: r for r in read_records(path)}
    scores = [records[i]["score"] for i in chosen]
    # counts by the nearest whole score (an expected score of 2.4 counts as 2)
    hist = {str(s): sum(1 for x in scores if x is not None and min(5, max(0, math.floor(x + 0.5))) == s) for s in range(6)}
    summary = {"stage": "judge", "documents_in": len(docs), "sample": len(chosen), "model": endpoint.model, "prompt": prompt,
               "scoring": mode, **({"prefill": prefill} if mode == "logprobs" else {}), "histogram": hist, "unparsable": sum(1 for x in scores if x is None)}
    if mode == "logprobs":
        parsed = [records[i] for i in chosen if records[i]["score"] is not None]
        values = sorted(r["score"] for r in parsed)
        summary["argmax_histogram"] = {str(s): sum(1 for r in parsed if r["argmax"] == s) for s in range(6)}
        if values:
            summary["expected_score"] = {"min": values[0], "median": values[len(values) // 2], "max": values[-1],
                                         "mean": round(sum(values) / len(values), 4),
                                         "mean_digit_mass": round(sum(r["digit_mass"] for r in parsed) / len(parsed), 4)}
    _write_json(work / "summary.json", summary)
    os.replace(work, out)
    return summary


def _prompt_sha1(prompt: str = "full", scoring: str = "text") -> str:
    return hashlib.sha1(prompt_template(prompt, scoring).encode()).hexdigest()[:12]
