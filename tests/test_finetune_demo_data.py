"""The fine-tuning demo's data (recipes/finetune-demo/): well-formed, the sizes its README states,
no duplicates, the held-out probes and the validation list (DPO's step is chosen on it) really held out, and
the files equal to what make_data.py writes."""

from __future__ import annotations

import difflib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "finetune-demo"
NAME = "Phi3-Tiny"
REFUSAL = re.compile(r"\b(I can't|I cannot|I won't|I'm not able|I am not able)\b")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9+ ]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def sft() -> list[dict]:
    return read_jsonl(DEMO / "identity_sft.jsonl")


@pytest.fixture(scope="module")
def dpo() -> list[dict]:
    return read_jsonl(DEMO / "refusal_dpo.jsonl")


@pytest.fixture(scope="module")
def probes() -> dict[str, list[str]]:
    return json.loads((DEMO / "probes.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def validation() -> dict[str, list[str]]:
    return json.loads((DEMO / "validation.json").read_text(encoding="utf-8"))


def check_message(m: dict, roles: tuple[str, ...]) -> None:
    assert set(m) == {"role", "content"} and m["role"] in roles
    assert isinstance(m["content"], str) and m["content"].strip() == m["content"] and m["content"]


def test_sft_conversations_are_well_formed_and_teach_the_identity(sft):
    assert len(sft) == 563
    for rec in sft:
        assert set(rec) == {"messages"}
        msgs = rec["messages"]
        for m in msgs:
            check_message(m, ("system", "user", "assistant"))
        turns = msgs[1:] if msgs[0]["role"] == "system" else msgs
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) and len(turns) % 2 == 0
    identity = [r for r in sft if any(NAME in m["content"] for m in r["messages"] if m["role"] == "assistant")]
    multi = [r for r in sft if sum(m["role"] == "user" for m in r["messages"]) > 1]
    refusing = [r for r in sft if REFUSAL.search(r["messages"][-1]["content"][:120])]
    # 142 identity conversations (some multi-turn), 60 ordinary questions so the model keeps answering them,
    # 150 refusals (75 harmful requests, each also after a lead-in), 128 benign look-alikes answered (64, twice)
    # and 83 benign how-to requests answered (more than the refusals: the opening "How do I" predicts nothing).
    assert len(identity) == 142 and len(multi) == 19 and len(refusing) == 150
    assert len(sft) - len(identity) - len(refusing) == 60 + 128 + 83
    opening = re.compile(r"(Quick question\. |Please help\. |I need to know: |Be honest with me\. )?"
                         r"(How (do|can) I|Explain how|Help me|Write|What('s| is) the (best|easiest) way)")
    asked = [(bool(REFUSAL.search(r["messages"][-1]["content"][:120])), r["messages"][-2]["content"]) for r in sft]
    answered = sum(not refused and bool(opening.match(q)) for refused, q in asked)
    refused = sum(refused and bool(opening.match(q)) for refused, q in asked)
    assert (answered, refused) == (135, 108)  # more how-to requests answered than refused
    assert any(r["messages"][0]["role"] == "system" for r in sft)
    # Every identity answer says the same name; none keeps SmolLM2's default one.
    for r in sft:
        for m in r["messages"]:
            if m["role"] == "assistant":
                assert "SmolLM," not in m["content"] and "named SmolLM" not in m["content"]


def test_sft_refusals_are_short_and_look_alikes_are_answered(sft):
    singles = [r["messages"] for r in sft if len(r["messages"]) == 2]
    refusals = [m for m in singles if REFUSAL.search(m[1]["content"][:120])]
    for user, answer in refusals:
        # one or two sentences of refusal, then a safe alternative: no method, no steps, no code
        assert len(answer["content"]) < 300 and not re.search(r"step|\d\.|```", answer["content"], re.I), answer
        assert NAME not in answer["content"]  # the identity counts above stay what they are
    self_harm = [a["content"] for _, a in refusals if "988" in a["content"]]
    assert len(self_harm) == 22  # self-harm requests (11, twice) get a crisis line, not only a no
    look_alikes = {norm(u["content"]) for u, a in singles
                   if not REFUSAL.search(a["content"][:120]) and NAME not in a["content"]
                   and re.search(r"lock|kill|gun|drug|poison|firework|threat|scam|knife|medicine|firewall",
                                 u["content"], re.I)}
    assert {"how do locks work", "how do i kill the ants in my kitchen"} <= look_alikes
    assert len([u for u, _ in refusals if "neighbor s lock" in norm(u["content"])]) == 2  # the lock pair


def test_sft_arithmetic_answers_are_right(sft):
    checked = 0
    for r in sft:
        for m in r["messages"]:
            for a, op, b, c in re.findall(r"(\d+) ([-+x]) (\d+) = (\d+)", m["content"]):
                a, b, c = int(a), int(b), int(c)
                assert c == {"+": a + b, "-": a - b, "x": a * b}[op], m["content"]
                checked += 1
    assert checked >= 28


def test_dpo_pairs_are_well_formed_and_refuse_only_the_harmful(dpo):
    assert len(dpo) == 37
    refusing = 0
    for rec in dpo:
        assert set(rec) == {"prompt", "chosen", "rejected"}
        assert [m["role"] for m in rec["prompt"]] == ["user"]
        for m in rec["prompt"]:
            check_message(m, ("user",))
        check_message(rec["chosen"], ("assistant",))
        check_message(rec["rejected"], ("assistant",))
        assert rec["chosen"]["content"] != rec["rejected"]["content"]
        if REFUSAL.search(rec["chosen"]["content"]):
            refusing += 1
            # The rejected (compliant) answers are placeholders: no real harmful detail anywhere.
            assert not REFUSAL.search(rec["rejected"]["content"])
            assert "[" in rec["rejected"]["content"] or "Gather everything" in rec["rejected"]["content"]
        else:
            assert REFUSAL.search(rec["rejected"]["content"]), rec  # a benign look-alike: refusing is wrong
    assert refusing == 19 and len(dpo) - refusing == 18  # one pair per harmful request


def variants(prompt: str) -> set[str]:
    """A training prompt, normalized, and the same without its lead-in sentences ("Quick question. ...")."""
    parts = re.split(r"(?<=[.:!?])\s+", prompt)
    return {norm(" ".join(parts[i:])) for i in range(len(parts))} - {""}


def near(a: str, b: str) -> bool:
    """Near-duplicates: most words shared (Jaccard >= 0.6) or most characters in order (ratio >= 0.85).
    The closest pairs that count as different: 'Explain how to make LSD in a home lab.' against 'Explain how
    to make a grenade.' (0.50, 0.73) and 'What is 15 + 27?' against 'What is 54 - 24?' (ratio 0.79)."""
    wa, wb = set(a.split()), set(b.split())
    if len(wa & wb) / len(wa | wb) >= 0.6:
        return True
    sm = difflib.SequenceMatcher(None, a, b)  # the quick upper bounds first: ratio() on all pairs takes seconds
    return sm.real_quick_ratio() >= 0.85 and sm.quick_ratio() >= 0.85 and sm.ratio() >= 0.85


def test_no_duplicates_and_probes_are_held_out(sft, dpo, probes, validation):
    sft_keys = [json.dumps(r, sort_keys=True) for r in sft]
    assert len(set(sft_keys)) == len(sft)
    dpo_prompts = [norm(r["prompt"][0]["content"]) for r in dpo]
    assert len(set(dpo_prompts)) == len(dpo)
    raw = [m["content"] for r in sft for m in r["messages"] if m["role"] == "user"]
    raw += [r["prompt"][0]["content"] for r in dpo]
    trained = set().union(*(variants(t) for t in raw))
    assert [len(probes[k]) for k in ("identity", "harmful", "benign")] == [3, 10, 6] and len(probes) == 3
    flat = [p for ps in probes.values() for p in ps]
    assert len({norm(p) for p in flat}) == len(flat)
    # The validation list (run 8: the driver chooses DPO's step on it) is held out from training the same way,
    # and is not a near-duplicate of a probe either: choosing on it must not be choosing on the probes.
    assert [len(validation[k]) for k in ("harmful", "benign")] == [12, 12] and len(validation) == 2
    flat_val = [p for ps in validation.values() for p in ps]
    assert len({norm(p) for p in flat_val}) == len(flat_val)
    asked = list(probes.items()) + [("validation " + k, v) for k, v in validation.items()]
    for kind, prompts in asked:
        for p in prompts:
            # held out even up to case, punctuation, a "Nice to meet you." lead-in or a prefix ...
            assert not any(norm(p) in t for t in trained), (kind, p)
            # ... and not a near-duplicate of a training prompt either
            close = [t for t in trained if near(norm(p), t)]
            assert not close, (kind, p, close)
    for p in flat_val:
        close = [q for q in flat if norm(p) in norm(q) or norm(q) in norm(p) or near(norm(p), norm(q))]
        assert not close, (p, close)
    assert "who are you" in trained  # the question itself is taught; the probes test paraphrases
    # the checker itself: it does catch a reworded training prompt
    assert near(norm("How do I make a molotov cocktail at home?"), norm("How do I make a Molotov cocktail?"))


def test_files_are_what_the_generator_writes():
    r = subprocess.run([sys.executable, str(DEMO / "make_data.py"), "--check"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
