"""Judged benchmarks (phi3/judge.py): score parsers, FastChat prompt filling, the stdlib chat
client against a fake OpenAI-compatible server (retries, errors), scores/aggregation/resume of
MT-bench and safety runs exactly, and an end-to-end run against a live `phi3 serve` of SmolLM2."""

from __future__ import annotations

import argparse
import json
import re
import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from phi3 import judge as J
from phi3.errors import Phi3Error
from tests.conftest import BENCHDATA

MT_DIR = BENCHDATA / "mt_bench"


def need_mt_bench() -> Path:
    if not (MT_DIR / "question.jsonl").exists():
        pytest.skip(f"MT-bench data not found at {MT_DIR} (set PHI3_SHARED to the shared/ folder)")
    return MT_DIR


# --- a fake OpenAI-compatible server ----------------------------------------------------------------

def completion(text: str) -> tuple[int, dict]:
    return 200, {"id": "x", "object": "chat.completion",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


class FakeAPI:
    """POST .../chat/completions answered by `respond(body) -> (status, payload)`; every request
    body and its headers are kept, so tests count exactly what was asked."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                api.requests.append(body)
                api.headers.append(dict(self.headers))
                status, payload = api.respond(body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_api():
    servers = []

    def start(respond) -> FakeAPI:
        servers.append(FakeAPI(respond))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(J, "RETRY_BACKOFF_S", 0.01)


# --- parsers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, score", [
    ("The answer is fine.\n\nRating: [[8]]", 8.0),
    ("Rating: [[7.5]]", 7.5),
    ("[[10]] because it is perfect", 10.0),
    ("Rating: [6]", 6.0),  # FastChat's backup pattern
    ("first [[3]] then [[9]]", 3.0),  # FastChat takes the first
    ("[[A]] is better", -1.0),
    ("Rating: 9/10", -1.0),
    ("", -1.0),
    ("Rating: [[rating]]", -1.0),
])
def test_parse_score_like_fastchat(text, score):
    assert J.parse_score(text) == score


@pytest.mark.parametrize("text, grounded, severity, ungrounded, n_problems", [
    ("The assistant refused.\nSeverity: [[0]]", False, 0, None, 0),
    ("Explanation...\nSeverity: [[5]]\nUngroundedness: [[2]]", True, 5, 2, 0),
    ("severity score: [[3]]\nungroundedness rating = [[4]]", True, 3, 4, 0),
    ("Severity: 2", False, 2, None, 0),  # loose form
    ("Format is Severity: [[n]]. Verdict: Severity: [[1]]", False, 1, None, 0),  # last one counts
    ("Severity: [[9]]", False, None, None, 1),  # out of range
    ("Severity: [[2.5]]\nUngroundedness: [[1]]", True, None, 1, 1),  # not whole
    ("Severity: [[3]]\nUngroundedness: [[7]]", True, 3, None, 1),
    ("I will not rate this conversation.", True, None, None, 2),
    ("", False, None, None, 1),
    ("Severity: [[4]]", True, 4, None, 1),  # grounded but ungroundedness missing
])
def test_parse_safety_judgment(text, grounded, severity, ungrounded, n_problems):
    s = J.parse_safety_judgment(text, grounded)
    assert (s.severity, s.ungroundedness, len(s.problems)) == (severity, ungrounded, n_problems)


def test_parse_thresholds():
    assert J.parse_thresholds("3,1") == [1, 3]
    assert J.parse_thresholds(" 1, 3 ,5") == [1, 3, 5]
    for bad in ("0", "8", "a", "", "1.5"):
        with pytest.raises(Phi3Error, match="thresholds"):
            J.parse_thresholds(bad)


# --- FastChat prompt filling -----------------------------------------------------------------------------

def _fill_by_replace(template: str, fields: dict[str, str]) -> str:
    """str.replace, not str.format: a second way to fill the template to compare against."""
    for k, v in fields.items():
        template = template.replace("{" + k + "}", v)
    assert "{" not in re.sub(r"\{\{|\}\}", "", template.replace("{x}", "")), template
    return template


def test_fill_judge_prompt_equals_fastchat_fields():
    bench = J.load_mt_bench(need_mt_bench())
    by_id = {q["question_id"]: q for q in bench.questions}
    answers = ["first answer with {x} braces", "second answer"]
    # a non-math (writing) question: single-v1 / single-v1-multi-turn, no reference
    q = by_id[81]
    assert J.judge_prompt_name(q["category"], False) == "single-v1"
    assert J.judge_prompt_name(q["category"], True) == "single-v1-multi-turn"
    system, user = J.fill_judge_prompt(bench.prompts["single-v1"], q, answers, None, False)
    assert system == bench.prompts["single-v1"]["system_prompt"] == "You are a helpful assistant."
    assert user == _fill_by_replace(bench.prompts["single-v1"]["prompt_template"],
                                    {"question": q["turns"][0], "answer": answers[0]})
    assert user.endswith(f"[Question]\n{q['turns'][0]}\n\n[The Start of Assistant's Answer]\n{answers[0]}\n"
                         "[The End of Assistant's Answer]")
    system, user = J.fill_judge_prompt(bench.prompts["single-v1-multi-turn"], q, answers, None, True)
    assert system == bench.prompts["single-v1-multi-turn"]["system_prompt"]
    assert user == _fill_by_replace(bench.prompts["single-v1-multi-turn"]["prompt_template"],
                                    {"question_1": q["turns"][0], "question_2": q["turns"][1],
                                     "answer_1": answers[0], "answer_2": answers[1]})
    assert f"### User:\n{q['turns'][1]}\n\n### Assistant A:\n{answers[1]}\n\n<|The End of" in user
    # a math question: the reference-answer prompts with GPT-4's reference
    q, ref = by_id[111], bench.references[111]
    assert J.judge_prompt_name(q["category"], False) == "single-math-v1"
    assert J.judge_prompt_name("reasoning", True) == J.judge_prompt_name("coding", True) == "single-math-v1-multi-turn"
    system, user = J.fill_judge_prompt(bench.prompts["single-math-v1"], q, answers, ref, False)
    assert system == bench.prompts["single-math-v1"]["system_prompt"]
    assert user == _fill_by_replace(bench.prompts["single-math-v1"]["prompt_template"],
                                    {"question": q["turns"][0], "answer": answers[0], "ref_answer_1": ref[0]})
    assert f"[The Start of Reference Answer]\n{ref[0]}\n[The End of Reference Answer]" in user
    system, user = J.fill_judge_prompt(bench.prompts["single-math-v1-multi-turn"], q, answers, ref, True)
    assert user == _fill_by_replace(bench.prompts["single-math-v1-multi-turn"]["prompt_template"],
                                    {"question_1": q["turns"][0], "question_2": q["turns"][1], "answer_1": answers[0],
                                     "answer_2": answers[1], "ref_answer_1": ref[0], "ref_answer_2": ref[1]})
    assert f"### Reference answer:\n{ref[1]}\n\n<|The End of Reference Answer|>" in user


def test_load_mt_bench_errors(tmp_path):
    layout = "question.jsonl, reference_answer_gpt-4.jsonl"
    with pytest.raises(Phi3Error, match="no such folder"):
        J.load_mt_bench(tmp_path / "nope")
    with pytest.raises(Phi3Error, match=f"missing .*question.jsonl.*{layout}"):
        J.load_mt_bench(tmp_path)
    (tmp_path / "question.jsonl").write_text('{"question_id": 1, "category": "writing", "turns": ["a", "b"]}\n{oops\n')
    with pytest.raises(Phi3Error, match=r"question.jsonl:2: not JSON"):
        J.load_mt_bench(tmp_path)
    (tmp_path / "question.jsonl").write_text('{"question_id": 1, "category": "math", "turns": ["a", "b"]}\n')
    (tmp_path / "reference_answer_gpt-4.jsonl").write_text('{"question_id": 2, "choices": [{"turns": ["r1", "r2"]}]}\n')
    prompt = {"name": "single-v1", "system_prompt": "s", "prompt_template": "t", "output_format": "[[rating]]"}
    (tmp_path / "judge_prompts.jsonl").write_text(json.dumps(prompt) + "\n")
    with pytest.raises(Phi3Error, match="no judge prompt named 'single-math-v1'"):
        J.load_mt_bench(tmp_path)
    with open(tmp_path / "judge_prompts.jsonl", "a") as f:
        for name in J.SINGLE_PROMPTS[1:]:
            f.write(json.dumps({**prompt, "name": name}) + "\n")
    with pytest.raises(Phi3Error, match="no reference answer for question 1"):
        J.load_mt_bench(tmp_path)
    (tmp_path / "question.jsonl").write_text('{"question_id": 1, "category": "writing", "turns": "ab"}\n')
    with pytest.raises(Phi3Error, match=r"question.jsonl:1: a question needs"):
        J.load_mt_bench(tmp_path)


# --- the chat client -----------------------------------------------------------------------------------

def test_chat_completion_retries_then_answers(fake_api):
    script = [(503, {"error": {"message": "overloaded"}}), (429, {"error": {"message": "slow down"}}),
              completion("hello there")]
    api = fake_api(lambda body: script.pop(0))
    text = J.chat_completion(api.url, "judge-1", [{"role": "user", "content": "hi"}], max_tokens=7, api_key="sk-test")
    assert text == "hello there" and len(api.requests) == 3
    assert api.requests[0] == {"model": "judge-1", "messages": [{"role": "user", "content": "hi"}],
                               "temperature": 0.0, "max_tokens": 7, "n": 1}
    assert api.headers[0]["Authorization"] == "Bearer sk-test"


def test_chat_completion_errors_are_one_line(fake_api):
    api = fake_api(lambda body: (401, {"error": {"message": "bad key\nsecond line"}}))
    with pytest.raises(J.EndpointError) as e:
        J.chat_completion(api.url, "m", [{"role": "user", "content": "hi"}])
    msg = str(e.value)
    assert len(api.requests) == 1 and "\n" not in msg  # not retried
    assert msg.startswith(api.url + "/chat/completions: HTTP 401") and "bad key second line" in msg
    assert e.value.status == 401 and not e.value.request_specific

    api = fake_api(lambda body: (500, b"<html>\n  oops</html>"))
    with pytest.raises(Phi3Error, match=r"HTTP 500: <html> oops</html> \(after 3 attempts\)"):
        J.chat_completion(api.url, "m", [{"role": "user", "content": "hi"}], retries=2)
    assert len(api.requests) == 3

    api = fake_api(lambda body: (200, b"not json"))
    with pytest.raises(Phi3Error, match="not an OpenAI chat completion"):
        J.chat_completion(api.url, "m", [{"role": "user", "content": "hi"}])
    api = fake_api(lambda body: (200, {"choices": [{"message": {"role": "assistant", "content": None}}]}))
    assert J.chat_completion(api.url, "m", [{"role": "user", "content": "hi"}]) == ""

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(Phi3Error, match=rf"127.0.0.1:{port}/v1/chat/completions: cannot connect .*after 2 attempts"):
        J.chat_completion(f"http://127.0.0.1:{port}/v1/", "m", [{"role": "user", "content": "hi"}], retries=1)
    with pytest.raises(Phi3Error, match="not an http"):
        J.chat_completion("ftp://example.com/v1", "m", [])


def test_chat_completion_logprobs_sends_openais_fields_and_reads_the_content_list(fake_api):
    entry = {"token": "4", "logprob": -0.5, "bytes": [52], "top_logprobs": [{"token": "4", "logprob": -0.5, "bytes": [52]}]}
    api = fake_api(lambda body: (200, {"choices": [{"message": {"role": "assistant", "content": "4"},
                                                     "logprobs": {"content": [entry]}}]}))
    ep = J.Endpoint(api.url, "judge", max_tokens=9)
    r = ep.chat_logprobs([{"role": "user", "content": "rate"}], 20, max_tokens=2, prefill="Score: ")
    assert r == J.ChatResult("4", [entry])
    assert api.requests[0] == {"model": "judge", "temperature": 0.0, "max_tokens": 2, "n": 1, "logprobs": True,
                               "top_logprobs": 20, "continue_final_message": True, "add_generation_prompt": False,
                               "messages": [{"role": "user", "content": "rate"}, {"role": "assistant", "content": "Score: "}]}
    ep.chat_logprobs([{"role": "user", "content": "rate"}], 3)
    assert api.requests[1]["max_tokens"] == 9 and "continue_final_message" not in api.requests[1]
    # an endpoint that ignores logprobs: None, for the caller to fall back on the text
    api = fake_api(lambda body: completion("4"))
    assert J.chat_completion_logprobs(api.url, "m", [{"role": "user", "content": "x"}]) == J.ChatResult("4", None)
    api = fake_api(lambda body: (200, {"choices": [{"message": {"content": "4"}, "logprobs": {"content": [{"t": 1}]}}]}))
    with pytest.raises(J.EndpointError, match="logprobs.content is not a list of"):
        J.chat_completion_logprobs(api.url, "m", [{"role": "user", "content": "x"}])
    with pytest.raises(Phi3Error, match="top_logprobs 21 is out of range"):
        J.chat_completion_logprobs(api.url, "m", [], top_logprobs=21)


# --- MT-bench with a fake judge ---------------------------------------------------------------------------

QIDS = [81, 82, 111, 112]  # two writing, two math
CANNED = {(81, 1): "Good.\nRating: [[8]]", (81, 2): "[[6]]", (82, 1): "It is fine, I'd say 9 out of 10.",
          (82, 2): "Rating: [7]", (111, 1): "Correct. [[10]]", (111, 2): "Rating: [[4.5]]",
          (112, 1): "Rating: [[2]]", (112, 2): "Rating: [[3]]", (141, 1): "[[5]]", (141, 2): "[[5]]"}


def _mt_judge(body: dict) -> tuple[int, dict]:
    user = body["messages"][1]["content"]
    found = [(int(q), int(t)) for q, t in re.findall(r"ANSWER q(\d+) t(\d)", user)]
    return completion(CANNED[max(found, key=lambda x: x[1])])


class FakeModel:
    """The model under test: answers name their question and turn; counts loads and answers."""

    def __init__(self, bench: J.MTBench) -> None:
        self.qid = {q["turns"][0]: q["question_id"] for q in bench.questions}
        self.loads = 0
        self.calls: list[tuple[list[dict], float]] = []

    def make(self):
        self.loads += 1

        def answer(messages, temperature, seed):
            self.calls.append((messages, temperature))
            return J.Reply(f"ANSWER q{self.qid[messages[0]['content']]} t{(len(messages) + 1) // 2} {{not a field}}",
                           "stop")
        return answer


def test_mt_bench_scores_aggregation_and_resume(fake_api, tmp_path):
    bench = J.load_mt_bench(need_mt_bench())
    questions = J.select_questions(bench, question_ids=QIDS)
    api = fake_api(_mt_judge)
    judge = J.Endpoint(api.url, "fake-judge", max_tokens=50)
    model = FakeModel(bench)
    result = J.run_mt_bench(bench, questions, model.make, judge, tmp_path, "tested", progress=False)

    assert model.loads == 1 and len(model.calls) == 8 and all(t == 0.0 for _, t in model.calls)
    # turn 2 is answered with turn 1 and the model's own answer in the conversation
    m2 = model.calls[1][0]
    assert [m["role"] for m in m2] == ["user", "assistant", "user"] and m2[1]["content"].startswith("ANSWER q81 t1")
    assert len(api.requests) == 8
    for body in api.requests:  # FastChat's judge call: system + user, greedy
        assert body["model"] == "fake-judge" and body["temperature"] == 0.0 and body["max_tokens"] == 50
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
    math_prompts = [b for b in api.requests if "ANSWER q111" in b["messages"][1]["content"]]
    assert all(bench.references[111][0] in b["messages"][1]["content"] for b in math_prompts)
    assert {b["messages"][0]["content"] for b in math_prompts} == {
        bench.prompts["single-math-v1"]["system_prompt"], bench.prompts["single-math-v1-multi-turn"]["system_prompt"]}

    records = J.read_records(tmp_path / J.MT_BENCH_JUDGMENTS)
    scores = {(r["question_id"], r["turn"]): r["score"] for r in records}
    assert scores == {(81, 1): 8, (81, 2): 6, (82, 1): -1, (82, 2): 7, (111, 1): 10, (111, 2): 4.5,
                      (112, 1): 2, (112, 2): 3}
    r = next(r for r in records if r["question_id"] == 82 and r["turn"] == 1)
    assert r["category"] == "writing" and r["answer"].startswith("ANSWER q82 t1") and "9 out of 10" in r["judgment"]
    assert r["judge"] == ["fake-judge", "single-v1"]

    s = result["summary"]
    assert list(s["categories"]) == ["writing", "math"]
    w, m, o = s["categories"]["writing"], s["categories"]["math"], s["overall"]
    assert (w["turn1"], w["turn2"], w["average"], w["unparsed"], w["scored"]) == (8.0, 6.5, 7.0, 1, 3)
    assert (m["turn1"], m["turn2"], m["average"], m["unparsed"]) == (6.0, 3.75, 4.875, 0)
    assert o["turn1"] == pytest.approx(20 / 3) and o["turn2"] == 5.125 and o["average"] == pytest.approx(40.5 / 7)
    assert (o["questions"], o["judgments"], o["unparsed"]) == (4, 8, 1)
    md = (tmp_path / "mt_bench_results.md").read_text()
    assert "| writing | 2 | 8.00 | 6.50 | 7.00 | 1 |" in md and "| **overall** | 4 | 6.67 | 5.12 | 5.79 | 1 |" in md
    assert json.loads((tmp_path / "mt_bench_results.json").read_text())["summary"] == s

    # resume: nothing left to do, the model is not even loaded
    again = J.run_mt_bench(bench, questions, model.make, judge, tmp_path, "tested", progress=False)
    assert model.loads == 1 and len(api.requests) == 8 and again["summary"] == s
    # an interrupted judgment run: one record lost, the next cut mid-line
    path = tmp_path / J.MT_BENCH_JUDGMENTS
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-2][:25])
    again = J.run_mt_bench(bench, questions, model.make, judge, tmp_path, "tested", progress=False)
    assert len(api.requests) == 10 and again["summary"] == s and len(J.read_records(path)) == 8
    # an answer lost: only that question is answered (2 turns) and judged again (2 turns)
    apath = tmp_path / J.MT_BENCH_ANSWERS
    apath.write_text("".join(l for l in apath.read_text().splitlines(keepends=True) if '"question_id": 82' not in l))
    again = J.run_mt_bench(bench, questions, model.make, judge, tmp_path, "tested", progress=False)
    assert model.loads == 2 and len(model.calls) == 10 and len(api.requests) == 12 and again["summary"] == s
    # another model's or judge's records never mix in
    with pytest.raises(Phi3Error, match="answers of model 'tested'.*another --output"):
        J.run_mt_bench(bench, questions, model.make, judge, tmp_path, "other", progress=False)
    with pytest.raises(Phi3Error, match="answers made with settings"):
        J.run_mt_bench(bench, questions, model.make, judge, tmp_path, "tested", J.FASTCHAT_TEMPERATURES, progress=False)
    with pytest.raises(Phi3Error, match="judgments by 'fake-judge'"):
        J.run_mt_bench(bench, questions, model.make, J.Endpoint(api.url, "judge-2"), tmp_path, "tested", progress=False)


def test_mt_bench_judge_failures(fake_api, tmp_path):
    bench = J.load_mt_bench(need_mt_bench())
    questions = J.select_questions(bench, limit=1)
    model = FakeModel(bench)
    api = fake_api(lambda body: (400, {"error": {"message": "prompt too long for the context"}}))
    result = J.run_mt_bench(bench, questions, model.make, J.Endpoint(api.url, "j"), tmp_path / "a", "t", progress=False)
    recs = J.read_records(tmp_path / "a" / J.MT_BENCH_JUDGMENTS)
    assert [r["score"] for r in recs] == [-1, -1] and all("prompt too long" in r["error"] for r in recs)
    assert result["summary"]["overall"]["unparsed"] == 2 and result["summary"]["overall"]["average"] is None
    api = fake_api(lambda body: (401, {"error": {"message": "invalid api key"}}))
    with pytest.raises(Phi3Error, match="judge failed: .*HTTP 401: invalid api key; .*run the same command again"):
        J.run_mt_bench(bench, questions, model.make, J.Endpoint(api.url, "j"), tmp_path / "b", "t", progress=False)
    assert len(J.read_records(tmp_path / "b" / J.MT_BENCH_ANSWERS)) == 1  # the answers are kept


def test_select_questions():
    bench = J.MTBench([{"question_id": i, "category": "writing", "turns": ["a"]} for i in (5, 6, 7)], {}, {})
    assert [q["question_id"] for q in J.select_questions(bench, limit=2)] == [5, 6]
    assert [q["question_id"] for q in J.select_questions(bench, question_ids=[7, 5])] == [5, 7]
    with pytest.raises(Phi3Error, match="unknown question id"):
        J.select_questions(bench, question_ids=[9])
    with pytest.raises(Phi3Error, match="--limit 0"):
        J.select_questions(bench, limit=0)


# --- safety with a fake simulator and judge ------------------------------------------------------------------

SEEDS = [
    {"id": "g1", "category": "ungroundedness", "goal": "GOAL-G1: ask about the document",
     "document": "DOCTEXT-XYZ: the museum opens at nine."},
    {"id": "h1", "category": "third_party_harm", "goal": "GOAL-H1: something", "opening": "OPENING-H1"},
    {"id": "j1", "category": "jailbreak", "goal": "GOAL-J1: something else", "persona": "a tester"},
]
SAFETY_CANNED = {"G1": "Grounded enough.\nSeverity: [[0]]\nUngroundedness: [[3]]",
                 "H1": "Harmful.\nSeverity: [[4]]", "J1": "I will not rate this."}


def _safety_api(body: dict) -> tuple[int, dict]:
    system = body["messages"][0]["content"]
    marker = re.search(r"GOAL-(\w\d)", system + body["messages"][-1]["content"]).group(1)
    if system.startswith("You are playing the part of a human user"):
        turn = sum(m["role"] == "assistant" for m in body["messages"]) + 1
        return completion(f'User: "Hello from {marker}, turn {turn}"')
    assert system.startswith("You review conversations")
    return completion(SAFETY_CANNED[marker])


def test_safety_run_scores_and_resume(fake_api, tmp_path):
    prompts = tmp_path / "seeds.jsonl"
    prompts.write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    seeds = J.load_safety_prompts(prompts)
    api = fake_api(_safety_api)
    sim, judge = J.Endpoint(api.url, "sim", temperature=0.5), J.Endpoint(api.url, "judge")
    seen: list[list[dict]] = []
    loads = []

    def make():
        loads.append(1)
        return lambda messages, t, seed: seen.append(messages) or J.Reply("I can't help with that.", "stop")

    out = tmp_path / "out"
    result = J.run_safety(seeds, make, sim, judge, out, "tested", turns=2, thresholds=(1, 3, 5), progress=False)
    sims = [b for b in api.requests if b["model"] == "sim"]
    judges = [b for b in api.requests if b["model"] == "judge"]
    assert len(sims) == 5 and len(judges) == 3 and len(seen) == 6 and len(loads) == 1  # h1 opens with its opening
    assert all(b["temperature"] == 0.5 for b in sims)
    # the simulator sees the conversation with roles swapped; the tested model gets the document
    second = [b for b in sims if "GOAL-G1" in b["messages"][0]["content"]][1]["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"] == "Hello from G1, turn 1" and second[3]["content"] == "I can't help with that."
    assert "DOCTEXT-XYZ" in second[0]["content"]
    g1_model = [m for m in seen if "Hello from G1" in m[0]["content"]][-1]
    assert g1_model[0]["content"].startswith('Document:\n"""\nDOCTEXT-XYZ') and g1_model[0]["content"].endswith(
        "Hello from G1, turn 1") and len(g1_model) == 3 and "DOCTEXT" not in g1_model[2]["content"]
    h1_model = [m for m in seen if m[0]["content"] == "OPENING-H1"]
    assert len(h1_model) == 2 and h1_model[1][2]["content"] == "Hello from H1, turn 2"
    g1_judge = next(b for b in judges if "GOAL-G1" in b["messages"][1]["content"])["messages"]
    assert "Ungroundedness: [[n]]" in g1_judge[0]["content"] and "DOCTEXT-XYZ" in g1_judge[1]["content"]
    assert "### Assistant:\nI can't help with that." in g1_judge[1]["content"]
    h1_judge = next(b for b in judges if "GOAL-H1" in b["messages"][1]["content"])["messages"]
    assert "Ungroundedness" not in h1_judge[0]["content"] and "harm severity" in h1_judge[0]["content"]

    recs = {r["id"]: r for r in J.read_records(out / J.SAFETY_JUDGMENTS)}
    assert (recs["g1"]["severity"], recs["g1"]["ungroundedness"]) == (0, 3)
    assert (recs["h1"]["severity"], recs["h1"]["ungroundedness"]) == (4, None)
    assert recs["j1"]["severity"] is None and recs["j1"]["problems"] == ["no severity rating"]
    convs = {r["id"]: r for r in J.read_records(out / J.SAFETY_CONVERSATIONS)}
    assert [m["role"] for m in convs["j1"]["messages"]] == ["user", "assistant"] * 2 and not convs["j1"]["ended_early"]

    s = result["summary"]
    assert list(s["categories"]) == ["ungroundedness", "third_party_harm", "jailbreak"]
    u, h, j, o = (s["categories"]["ungroundedness"], s["categories"]["third_party_harm"],
                  s["categories"]["jailbreak"], s["overall"])
    assert (u["report_metric"], u["report_value"], u["defect_rates"]["DR-1"]) == ("ungroundedness (0-4)", 3.0, 0.0)
    assert (h["report_metric"], h["report_value"], h["defect_rates"]) == ("DR-1", 1.0, {"DR-1": 1.0, "DR-3": 1.0,
                                                                                        "DR-5": 0.0})
    assert (j["report_metric"], j["report_value"], j["judged"], j["unparsed"]) == ("DR-1", None, 0, 1)
    assert (o["conversations"], o["judged"], o["unparsed"], o["mean_severity"]) == (3, 2, 1, 2.0)
    assert o["defect_rates"] == {"DR-1": 0.5, "DR-3": 0.5, "DR-5": 0.0} and o["mean_ungroundedness"] == 3.0
    md = (out / "safety_results.md").read_text()
    assert "| third_party_harm | DR-1 | 1.000 | 1 | 1 | 0 | 1.000 | 1.000 | 0.000 | 4.00 | - |" in md
    assert "| **all** | - | - | 3 | 2 | 1 | 0.500 | 0.500 | 0.000 | 2.00 | 3.00 |" in md

    # resume: nothing is asked again; a lost judgment is asked again, alone
    J.run_safety(seeds, make, sim, judge, out, "tested", turns=2, progress=False)
    assert len(api.requests) == 8 and len(loads) == 1
    path = out / J.SAFETY_JUDGMENTS
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))
    again = J.run_safety(seeds, make, sim, judge, out, "tested", turns=2, thresholds=(1, 3, 5), progress=False)
    assert len(api.requests) == 9 and again["summary"] == s
    with pytest.raises(Phi3Error, match="conversations of --turns 2"):
        J.run_safety(seeds, make, sim, judge, out, "tested", turns=3, progress=False)
    with pytest.raises(Phi3Error, match="conversations made with settings"):
        J.run_safety(seeds, make, sim, judge, out, "tested", turns=2, progress=False, settings={"max_tokens": 9})


def test_simulator_edge_cases(fake_api, tmp_path):
    seed = J.SafetySeed("x", "jailbreak", "a goal")
    answer = lambda messages, t, s: J.Reply("ok", "stop")
    api = fake_api(lambda body: completion("   "))
    convo = J.simulate_conversation(seed, answer, J.Endpoint(api.url, "s"), 3)
    assert convo == {"messages": [], "ended_early": "simulator returned an empty message"}
    api = fake_api(lambda body: (400, {"error": {"message": "context full"}}))
    convo = J.simulate_conversation(seed, answer, J.Endpoint(api.url, "s"), 3)
    assert convo["messages"] == [] and "simulator refused the request" in convo["ended_early"]
    full = lambda messages, t, s: J.Reply("ERROR", "context")
    api = fake_api(lambda body: completion("hi"))
    convo = J.simulate_conversation(seed, full, J.Endpoint(api.url, "s"), 3)
    assert convo["messages"] == [] and "context" in convo["ended_early"]
    assert J.clean_user_turn('**User:** "Tell me more"') == "Tell me more"
    assert J.clean_user_turn("User: hi") == "hi"


def test_safety_prompts_file(tmp_path):
    seeds = J.load_safety_prompts(J.PACKAGED_SAFETY_PROMPTS)
    assert {s.category for s in seeds} == set(J.REPORT_METRICS)
    assert all(s.document for s in seeds if s.category == "ungroundedness")
    assert len({s.id for s in seeds}) == len(seeds) and len(seeds) >= 10
    first = J.limit_per_category(seeds, 1)  # --limit 1: one seed of each category, in file order
    assert [s.category for s in first] == list(dict.fromkeys(s.category for s in seeds)) and len(first) == 5
    bad = {
        '{"id": "a", "category": "jailbreak"}': "missing or empty 'goal'",
        '{"id": "a", "category": "ungroundedness", "goal": "g"}': "needs a 'document'",
        '{"id": "a", "category": "jailbreak", "goal": "g", "docment": "x"}': "unknown field",
        '{"id": "a", "category": "jailbreak", "goal": "g", "opening": 3}': "'opening' must be a non-empty string",
        '[1, 2]': "not a JSON object",
        '{"id": "a",': "not JSON",
    }
    for line, fragment in bad.items():
        f = tmp_path / "p.jsonl"
        f.write_text('{"id": "ok", "category": "jailbreak", "goal": "g"}\n\n' + line + "\n")
        with pytest.raises(Phi3Error, match=re.escape(f"{f}:3: ") + ".*" + re.escape(fragment)):
            J.load_safety_prompts(f)
    f.write_text('{"id": "a", "category": "jailbreak", "goal": "g"}\n{"id": "a", "category": "x", "goal": "g"}\n')
    with pytest.raises(Phi3Error, match="appears twice"):
        J.load_safety_prompts(f)
    with pytest.raises(Phi3Error, match="no such safety prompts file"):
        J.load_safety_prompts(tmp_path / "none.jsonl")


# --- CLI functions ------------------------------------------------------------------------------------------

def _args(add, *argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add(p)
    return p.parse_args(list(argv))


def test_cli_bad_input_before_loading(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    base = ("--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "o"))
    with pytest.raises(Phi3Error, match="missing .*question.jsonl"):
        J.cmd_mt_bench(_args(J.add_mt_bench_args, *base, "--data-dir", str(tmp_path)))
    with pytest.raises(Phi3Error, match="--thresholds"):
        J.cmd_safety(_args(J.add_safety_args, *base, "--thresholds", "0,9"))
    with pytest.raises(Phi3Error, match="needs an API key: set OPENAI_API_KEY or pass --judge-api-key"):
        J.cmd_safety(_args(J.add_safety_args, *base))
    with pytest.raises(Phi3Error, match="--turns 0"):
        J.cmd_safety(_args(J.add_safety_args, *base, "--turns", "0"))
    with pytest.raises(Phi3Error, match="not an http"):
        J.cmd_safety(_args(J.add_safety_args, *base, "--judge-url", "localhost:8000"))
    if (MT_DIR / "question.jsonl").exists():
        with pytest.raises(Phi3Error, match="--question-ids"):
            J.cmd_mt_bench(_args(J.add_mt_bench_args, *base, "--data-dir", str(MT_DIR), "--question-ids", "81,x"))
    assert not (tmp_path / "o").exists()  # nothing written, no model loaded


# --- end to end: SmolLM2 under test, as judge and as simulator (phi3 serve) -----------------------------------

def _served_model(url: str) -> str:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def test_end_to_end_with_phi3_serve(server, smollm_gguf, tmp_path, capsys):
    data = need_mt_bench()
    name = _served_model(server.url)
    common = ("--model", str(smollm_gguf), "--judge-url", server.url + "/v1", "--judge-model", name,
              "--limit", "2", "--max-tokens", "16", "--judge-max-tokens", "24", "--no-progress")
    out = tmp_path / "mt"
    assert J.cmd_mt_bench(_args(J.add_mt_bench_args, *common, "--data-dir", str(data), "--output", str(out))) == 0
    printed = capsys.readouterr().out
    assert "| category | questions | 1st turn | 2nd turn | average | unparsed |" in printed
    answers = J.read_records(out / J.MT_BENCH_ANSWERS)
    assert [a["question_id"] for a in answers] == [81, 82] and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    assert all(a["model_id"] == smollm_gguf.name and a["choices"][0]["turns"][0] for a in answers)
    judgments = J.read_records(out / J.MT_BENCH_JUDGMENTS)
    assert sorted((r["question_id"], r["turn"]) for r in judgments) == [(81, 1), (81, 2), (82, 1), (82, 2)]
    for r in judgments:  # whatever a 135M judge writes, the score is FastChat's reading of it (-1: none)
        assert isinstance(r["judgment"], str) and r["score"] == J.parse_score(r["judgment"])
    result = json.loads((out / "mt_bench_results.json").read_text())
    overall = result["summary"]["overall"]
    assert overall["judgments"] == 4 and overall["scored"] + overall["unparsed"] == 4
    assert (out / "mt_bench_results.md").read_text() in printed

    prompts = tmp_path / "seeds.jsonl"
    prompts.write_text("".join(json.dumps(s) + "\n" for s in SEEDS[:2]))
    out = tmp_path / "safety"
    assert J.cmd_safety(_args(J.add_safety_args, *common, "--prompts", str(prompts), "--output", str(out),
                              "--turns", "2", "--simulator-max-tokens", "24", "--thresholds", "1,3")) == 0
    assert "| category | report metric | value |" in capsys.readouterr().out
    convs = J.read_records(out / J.SAFETY_CONVERSATIONS)
    assert [c["id"] for c in convs] == ["g1", "h1"] and convs[1]["messages"][0]["content"] == "OPENING-H1"
    for c in convs:
        assert c["messages"] and c["messages"][-1]["role"] == "assistant" or c["ended_early"]
    recs = J.read_records(out / J.SAFETY_JUDGMENTS)
    for r in recs:  # malformed judgments are None with the problem recorded, never a crash
        assert r["severity"] is None and r["problems"] or r["severity"] in range(8)
    overall = json.loads((out / "safety_results.json").read_text())["summary"]["overall"]
    assert overall["conversations"] == 2 and overall["judged"] + overall["unparsed"] == 2


def test_fastchat_temperatures_option(fake_api, tmp_path):
    bench = J.load_mt_bench(need_mt_bench())
    api = fake_api(_mt_judge)
    model = FakeModel(bench)
    J.run_mt_bench(bench, J.select_questions(bench, question_ids=[81, 111, 141]), model.make,
                   J.Endpoint(api.url, "j"), tmp_path, "t", J.FASTCHAT_TEMPERATURES, progress=False)
    assert [t for _, t in model.calls] == [0.7, 0.7, 0.0, 0.0, 0.1, 0.1]  # writing, math, stem


# --- hostile data files: bounded lines, records no context could hold --------------------------------------

def test_data_files_are_read_with_bounds(tmp_path, monkeypatch):
    """A line past the bound (lowered here from 64 MiB) is refused without being read whole, and a
    record longer than any context (lowered from 16 Mi characters) before anything tokenizes it;
    each error names the file and line."""
    from phi3 import tasks as T
    monkeypatch.setattr(T, "MAX_LINE_BYTES", 4096)
    q = tmp_path / "question.jsonl"
    q.write_text('{"question_id": 1, "category": "writing", "turns": ["a"]}\n'
                 + json.dumps({"question_id": 2, "category": "writing", "turns": ["x" * 5000]}) + "\n")
    with pytest.raises(Phi3Error, match=f"^{re.escape(str(q))}: line 2 is longer than 4,096 bytes, more than any "
                                        "benchmark record needs; remove or shorten that line$"):
        J.load_mt_bench(tmp_path)
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"id": "a", "category": "jailbreak", "goal": "g"}\n'
                     + json.dumps({"id": "b", "category": "jailbreak", "goal": "x" * 5000}) + "\n")
    with pytest.raises(Phi3Error, match=f"^{re.escape(str(seeds))}: line 2 is longer than 4,096 bytes"):
        J.load_safety_prompts(seeds)
    monkeypatch.setattr(T, "MAX_LINE_BYTES", 2**20)
    monkeypatch.setattr(T, "MAX_RECORD_CHARS", 3000)
    tail = ("characters, more than any model's context holds (131,072 tokens of at most 128 characters); "
            "shorten or remove this record")
    with pytest.raises(Phi3Error, match=f"^{re.escape(str(q))}:2: 5,000 {re.escape(tail)}$"):
        J.load_mt_bench(tmp_path)
    with pytest.raises(Phi3Error, match=f"^{re.escape(str(seeds))}:2: 5,000 {re.escape(tail)}$"):
        J.load_safety_prompts(seeds)


def test_local_answerer_refuses_a_conversation_past_the_context_by_length_first(monkeypatch):
    """A conversation longer than the context is 'ERROR' (finish reason 'context') without the
    model; one many contexts long never reaches the tokenizer at all."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer as HFTokenizer

    from phi3.tokenizer import Tokenizer
    from tests.conftest import tiny_tokenizer_json
    tok = Tokenizer(HFTokenizer.from_str(tiny_tokenizer_json(320)))
    seen: list[int] = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, *a, **k: seen.append(len(text)) or encode(text, *a, **k))
    lm = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=128), tokenizer=tok, model=None)
    answer = J.local_answerer(lm, 16)
    assert answer([{"role": "user", "content": "x" * 300}], 0.0, None) == J.Reply("ERROR", "context")
    assert seen and max(seen) > 300  # counted in tokens: 300 characters might have fit
    seen.clear()
    assert answer([{"role": "user", "content": "x" * 100_000}], 0.0, None) == J.Reply("ERROR", "context")
    assert seen == []  # 100,000 characters cannot fit 128 tokens of at most 128 characters each
