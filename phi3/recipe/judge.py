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

Method (`method`): "digit" (the default) asks for the rubric's score, as above. "yesno",
"contrast" and "additive" ask one or more yes/no questions after the extract and read P(yes) at
the reply token after the prefill "Answer:" (or, in text mode, the answer's first word): yesno is
5 P(yes) to "would this page teach a student something?"; contrast subtracts P(yes) to "is this page
only a log, a list, a notice or a record of facts?" (2.5 + 2.5 (p1 - p2)), so that a judge's
page-wide leaning to say yes cancels; additive asks FineWeb-Edu's five criteria one at a time and
adds their P(yes). `ask = "both"` puts the question before the extract as well as after it, and
`shots = 2` adds two answered examples first. These are for small judges: SmolLM2-135M's digit did
not tell the demo's sources apart; yesno with ask "both" and shots 2 did (AUC of docs against
changelogs and dictionary entries 0.93 and 1.00 on two samples of 50 pages, the digit 0.69 and 0.68;
benchmarks/judge_variants.py, DATA.md), and `make data-demo` uses it.

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

# Methods (`method`). "digit": the rubric above, the score one digit (G-Eval in logprobs mode).
# The others ask yes/no questions, each read as p = P(yes) / (P(yes) + P(no)) at the first reply
# token after the prefill "Answer:" (" Yes", "yes", ... added together); score = offset + the sum of
# weight * p, in 0-5. SmolLM2-135M cannot apply the six-level rubric (its digit ranked changelogs
# above the Python docs in `make data-demo`). benchmarks/judge_variants.py measured each way of asking
# on 50 of the demo's pages (DATA.md): AUC of docs against changelogs + dictionary, digit 0.69 (0.49
# against changelogs alone), yesno 0.51, contrast 0.40; yesno with its question before and after the
# page (`ask = "both"`) 0.84, and with the two examples below as well (`shots = 2`) 0.93; on a second
# sample of 50 pages, drawn after these choices, 0.89 and 1.00 (digit 0.68).
METHODS = ("digit", "yesno", "contrast", "additive")
YES_PREFILL = "Answer:"
QUESTION = "Would this page teach a student something: knowledge or reasoning a student can learn from?"
# contrast's second question: each page's own baseline. A small model's P(yes) rises and falls
# with the page whatever is asked; P(yes | teaches?) - P(yes | nothing to learn?) should cancel that,
# but with SmolLM2-135M it did worse than yesno (AUC 0.40 against 0.51; with few-shot 0.57 against 0.71).
CONTRA = "Is this page only a log, a list, a notice or a record of facts, with nothing a student can learn from?"
# FineWeb-Edu's additive rubric, one criterion per question, a point each.
CRITERIA = (
    "Does this page give some basic information on an educational topic?",
    "Does this page address ideas that matter in school or university education?",
    "Does this page introduce key concepts coherently, like a textbook or a tutorial?",
    "Does this page explain clearly, with reasoning or worked examples a student can follow?",
    "Does this page teach step by step knowledge that stays true and useful, with examples or exercises?",
)
# Few-shot (`shots = 2`): before the page, one short high-value and one low-value extract, each
# answered (yes/no methods: "Answer: Yes"/"Answer: No", flipped for a question whose weight is
# negative; digit: "Educational score: 4"/"Educational score: 0"). From neither side of the demo
# (no Python, Debian, changelog or dictionary text), so that they teach the scale, not the sources;
# the low one is the Phi-3 report's example of ephemeral facts. SmolLM2-135M's yesno went from AUC
# 0.51 to 0.71 with them (0.93 with ASKS "both" too), its digit from 0.69 down to 0.36 (DATA.md).
SHOT_HIGH = ("Photosynthesis is how plants make their food. Leaves take in carbon dioxide from the air and "
             "roots take in water; with the energy of sunlight, chlorophyll turns them into glucose and oxygen. "
             "Example: a plant kept in the dark for a week stops growing, because without light it cannot make "
             "glucose. Exercise: explain why most leaves turn to face the sun.")
SHOT_LOW = ("Saturday's results: Arsenal 2-1 Chelsea, Leeds 0-0 Everton, Spurs 3-2 Fulham. Next fixtures "
            "Tuesday 19:45. Tickets from the box office, 10% off for members. Click here to subscribe.")
SHOTS = (0, 2)
# Where the yes/no question goes (`ask`): after the extract ("end"), or before and after it ("both").
# Read first, the question tells a small judge what to look for while it reads; with it SmolLM2-135M's
# AUC on the demo's pages went from 0.51 to 0.84, and with `shots = 2` as well to 0.93 (DATA.md).
ASKS = ("end", "both")
# method -> (offset, ((question, weight), ...)): score = offset + sum(weight * p), from 0 to 5
YES_NO = {"yesno": (0.0, ((QUESTION, 5.0),)),
          "contrast": (2.5, ((QUESTION, 2.5), (CONTRA, -2.5))),
          "additive": (0.0, tuple((q, 1.0) for q in CRITERIA))}



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
             scoring: str = "text", shots: int = 0) -> tuple[list[dict[str, str]], int]:
    """The judge's prompt for a document, and how many characters of it were cut (recorded); with
    `shots` 2, SHOT_HIGH and SHOT_LOW first, scored 4 and 0."""
    shown = text[:max_chars]
    user = lambda t: {"role": "user", "content": prompt_template(prompt, scoring).format(document=t)}  # noqa: E731
    few = [user(SHOT_HIGH), {"role": "assistant", "content": "Educational score: 4"},
           user(SHOT_LOW), {"role": "assistant", "content": "Educational score: 0"}] if shots else []
    return [*few, user(shown)], len(text) - len(shown)


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


def yes_no_messages(text: str, question: str, max_chars: int = MAX_DOC_CHARS, shots: int = 0,
                    positive: bool = True, ask: str = "end") -> tuple[list[dict[str, str]], int]:
    """A yes/no method's prompt for one question: the extract, then the question (close to the
    answer); `ask` "both": the question before the extract too. With `shots` 2, SHOT_HIGH and
    SHOT_LOW first, answered yes and no (no and yes for a question that is not `positive`)."""
    shown = text[:max_chars]
    head = f"{question}\n\n" if ask == "both" else ""
    user = lambda t: {"role": "user", "content": f"{head}<extract>\n{t}\n</extract>\n\n{question} Answer Yes or No."}  # noqa: E731
    high, low = ("Yes", "No") if positive else ("No", "Yes")
    few = [user(SHOT_HIGH), {"role": "assistant", "content": f"Answer: {high}"},
           user(SHOT_LOW), {"role": "assistant", "content": f"Answer: {low}"}] if shots else []
    return [*few, user(shown)], len(text) - len(shown)


def yes_from_logprobs(content: list[dict] | None) -> dict:
    """p = P(yes) / (P(yes) + P(no)) at the first reply token (its top alternatives, case and spaces
    aside), and `mass`, the two answers' share of the probability there; neither among them:
    {"p": None, "unparsable": True, "reason": ...}, never an exception."""
    if not content:
        return {"p": None, "mass": 0.0, "unparsable": True, "reason": "the reply has no tokens with logprobs"}
    first = content[0]
    top = [t for t in first.get("top_logprobs") or [] if isinstance(t, dict)] or [first]
    yes = no = 0.0
    for t in top:
        word, lp = str(t.get("token", "")).strip().lower(), t.get("logprob")
        if isinstance(lp, (int, float)):
            yes += math.exp(lp) if word == "yes" else 0.0
            no += math.exp(lp) if word == "no" else 0.0
    if not yes + no > 0:
        return {"p": None, "mass": 0.0, "unparsable": True, "reason": "neither yes nor no among the first reply "
                f"token's {len(top)} top alternatives"}
    return {"p": round(yes / (yes + no), 4), "mass": round(yes + no, 4), "unparsable": False}


def yes_from_text(answer: str) -> dict:
    """Text mode's yes/no: 1 or 0 by the answer's first word (after "Answer:"), else unparsable."""
    found = re.match(r"\W*(?:answer\W*)?(yes|no)\b", answer or "", re.IGNORECASE)
    if not found:
        return {"p": None, "unparsable": True, "reason": "the answer is neither yes nor no"}
    return {"p": 1.0 if found.group(1).lower() == "yes" else 0.0, "unparsable": False}


def yes_no_score(method: str, ps: list[float | None]) -> float | None:
    """A yes/no method's score from its questions' p, in order: offset + sum(weight * p)."""
    offset, questions = YES_NO[method]
    if len(ps) != len(questions) or any(p is None for p in ps):
        return None
    return round(min(5.0, max(0.0, offset + sum(w * p for (_, w), p in zip(questions, ps)))), 4)


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


def _supports_logprobs(endpoint, probe: list[dict[str, str]], first_prefill: str = PREFILL) -> tuple[bool, str | None, str]:
    """Whether the endpoint returns token log-probabilities, and takes an assistant prefill (one or
    two requests with a document's prompt): (logprobs, the prefill to use or None, why not). An
    endpoint that is down raises, as any other call would."""
    from phi3.judge import EndpointError
    why = ""
    for prefill in (first_prefill, None):
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
              max_chars: int = MAX_DOC_CHARS, prompt: str = "full", scoring: str = "auto", method: str = "digit",
              shots: int = 0, ask: str = "end") -> dict:
    from phi3.judge import EndpointError, append_record, progress_bar, read_records
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
    if method not in METHODS:
        raise Phi3Error(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if ask not in ASKS:
        raise Phi3Error(f"--ask {ask!r} is not one of {', '.join(ASKS)}")
    if shots not in SHOTS:
        raise Phi3Error(f"--shots {shots}: 0 (none) or 2 (a high-value and a low-value example)")
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

    mode, prefill = scoring, PREFILL if method == "digit" else YES_PREFILL

    def probe(text: str) -> list[dict[str, str]]:  # the first question's prompt, logprobs mode
        return (messages(text, max_chars, prompt, "logprobs", shots)[0] if method == "digit"
                else yes_no_messages(text, YES_NO[method][1][0][0], max_chars, shots, ask=ask)[0])

    if earlier:  # a resumed run keeps the mode and prefill its records were made with
        mode = earlier[0].get("scoring", "text") if scoring == "auto" else scoring
        prefill = earlier[0].get("prefill")
    elif todo and scoring != "text":
        try:
            ok, prefill, why = _supports_logprobs(endpoint, probe(docs[todo[0]]["text"]), prefill)
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
        if rec.get("model") != endpoint.model or rec.get("prompt_sha1") != _prompt_sha1(prompt, mode, method, shots, ask):
            raise Phi3Error(f"{path} holds judgments by {rec.get('model')!r} or another prompt or scoring; "
                            f"delete {work} to start over with {endpoint.model!r}")
    for doc_id in progress_bar(todo, len(todo), "judging", progress):
        if method != "digit":
            try:
                fields, answer, cut = _judge_yes_no(endpoint, docs[doc_id]["text"], method, mode, prefill, max_chars,
                                                    shots, ask)
            except EndpointError as e:
                raise stopped(e) from None
            append_record(path, {"id": doc_id, **fields, "answer": answer, "scoring": mode, "method": method,
                                 "chars_cut": cut, "model": endpoint.model,
                                 "prompt_sha1": _prompt_sha1(prompt, mode, method, shots, ask),
                                 "url": docs[doc_id].get("metadata", {}).get("url"),
                                 "source": docs[doc_id].get("metadata", {}).get("source")})
            continue
        msgs, cut = messages(docs[doc_id]["text"], max_chars, prompt, mode, shots)
        fields = {}
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
                             "chars_cut": cut, "model": endpoint.model, "prompt_sha1": _prompt_sha1(prompt, mode, method, shots, ask),
                             "url": docs[doc_id].get("metadata", {}).get("url"),
                             "source": docs[doc_id].get("metadata", {}).get("source")})
    records = {r["id"]: r for r in read_records(path)}
    scores = [records[i]["score"] for i in chosen]
    # counts by the nearest whole score (an expected score of 2.4 counts as 2)
    hist = {str(s): sum(1 for x in scores if x is not None and min(5, max(0, math.floor(x + 0.5))) == s) for s in range(6)}
    summary = {"stage": "judge", "documents_in": len(docs), "sample": len(chosen), "model": endpoint.model,
               "method": method, "shots": shots, **({"prompt": prompt} if method == "digit" else {"questions": [q for q, _ in YES_NO[method][1]], "ask": ask}),
               "scoring": mode, **({"prefill": prefill} if mode == "logprobs" else {}), "histogram": hist, "unparsable": sum(1 for x in scores if x is None)}
    if mode == "logprobs":
        parsed = [records[i] for i in chosen if records[i]["score"] is not None]
        values = sorted(r["score"] for r in parsed)
        if method == "digit":
            summary["argmax_histogram"] = {str(s): sum(1 for r in parsed if r["argmax"] == s) for s in range(6)}
        if values:
            # the probability the answers (digits, or yes and no) held at the read token, on average
            mass = ({"mean_digit_mass": round(sum(r["digit_mass"] for r in parsed) / len(parsed), 4)} if method == "digit"
                    else {"mean_answer_mass": round(sum(sum(r["mass"]) / len(r["mass"]) for r in parsed) / len(parsed), 4)})
            summary["expected_score"] = {"min": values[0], "median": values[len(values) // 2], "max": values[-1],
                                         "mean": round(sum(values) / len(values), 4), **mass}
    _write_json(work / "summary.json", summary)
    os.replace(work, out)
    return summary


def _prompt_sha1(prompt: str = "full", scoring: str = "text", method: str = "digit", shots: int = 0,
                 ask: str = "end") -> str:
    if method != "digit":  # its questions in the extract's frame; the rubric `prompt` is not asked
        offset, questions = YES_NO[method]
        text = json.dumps([method, offset, questions, yes_no_messages("{document}", "{question}", shots=shots, ask=ask)[0]])
        return hashlib.sha1(text.encode()).hexdigest()[:12]
    if shots:
        return hashlib.sha1(json.dumps(messages("{document}", prompt=prompt, scoring=scoring, shots=shots)[0]).encode()).hexdigest()[:12]
    return hashlib.sha1(prompt_template(prompt, scoring).encode()).hexdigest()[:12]


def _judge_yes_no(endpoint, text: str, method: str, mode: str, prefill: str | None,
                  max_chars: int, shots: int = 0, ask: str = "end") -> tuple[dict, list[str], int]:
    """One document's yes/no judgment: every question of `method` asked (logprobs: one reply token
    after the prefill), -> (record fields, the answers, characters cut). A request the endpoint
    refuses (400) makes that question, and the score, unparsable; an endpoint down raises."""
    from phi3.judge import EndpointError
    ps, masses, answers, reasons, cut = [], [], [], [], 0
    for question, weight in YES_NO[method][1]:
        msgs, cut = yes_no_messages(text, question, max_chars, shots, positive=weight > 0, ask=ask)
        try:
            if mode == "logprobs":
                result = endpoint.chat_logprobs(msgs, TOP_LOGPROBS, max_tokens=1, prefill=prefill)
                answer, got = result.text, yes_from_logprobs(result.logprobs)
            else:
                answer = endpoint.chat(msgs)
                got = yes_from_text(answer)
        except EndpointError as e:
            if not e.request_specific:
                raise
            answer, got = f"ERROR: {e}", {"p": None, "mass": 0.0, "unparsable": True, "reason": str(e)}
        ps.append(got["p"])
        masses.append(got.get("mass"))
        answers.append(answer)
        if got["unparsable"]:
            reasons.append(got["reason"])
    score = yes_no_score(method, ps)
    fields = {"score": score, "p_yes": ps, "unparsable": score is None,
              **({"mass": masses, "prefill": prefill} if mode == "logprobs" else {}),
              **({"reason": "; ".join(reasons)} if reasons else {})}
    return fields, answers, cut
