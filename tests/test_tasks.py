"""Every task of the report's table reads its authors' file layout (tiny files written here), builds
lm-eval-style prompts, and names the file and the expected layout when data is missing or bad."""

import gzip
import json
import re
from pathlib import Path

import pytest

from phi3 import tasks as T
from phi3.errors import Phi3Error

ARC_ROW = {"id": "q1", "question": {"stem": "Which is a gas?", "choices": [
    {"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}, {"text": "rock", "label": "C"}]}, "answerKey": "B"}


def jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def arc_rows(n: int, prefix: str) -> list:
    rows = []
    for i in range(n):
        r = json.loads(json.dumps(ARC_ROW))
        r["id"] = f"{prefix}{i}"
        r["question"]["stem"] = f"{prefix} question {i}?"
        rows.append(r)
    return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One tiny copy of every benchmark, in the layout its authors publish."""
    d = tmp_path_factory.mktemp("data")
    (d / "mmlu/dev").mkdir(parents=True)
    (d / "mmlu/test").mkdir(parents=True)
    for split, n in (("dev", 5), ("test", 3)):
        (d / f"mmlu/{split}/high_school_physics_{split}.csv").write_text(
            "".join(f'"What, is {split} {i}?",a,b,c,d,{"ABCD"[i % 4]}\n' for i in range(n)))
    hs = {"ctx_a": "A man is sitting on a roof.", "ctx_b": "he", "activity_label": "Roof shingle removal",
          "endings": ["is using wrap.", "starts pulling up roofing [title] on a roof.", "is ripping level tiles off.",
                      "is holding a rubik's cube."], "label": 3}
    jsonl(d / "hellaswag/hellaswag_val.jsonl", [dict(hs, ind=i) for i in range(3)])
    jsonl(d / "hellaswag/hellaswag_train.jsonl", [dict(hs, ind=100 + i) for i in range(5)])
    for rnd in ("R1", "R2", "R3"):
        rows = [{"uid": f"{rnd}{i}", "premise": "The sky is blue.", "hypothesis": "The sky has a colour.",
                 "label": "enc"[i % 3]} for i in range(8)]
        jsonl(d / f"anli/{rnd}/test.jsonl", rows[:2])
        jsonl(d / f"anli/{rnd}/train.jsonl", rows)
    gsm = [{"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"{i} + 2 = <<{i}+2={i + 2}>>{i + 2}\n#### {i + 2:,}"}
           for i in range(10)]
    jsonl(d / "gsm8k/test.jsonl", gsm[:2])
    jsonl(d / "gsm8k/train.jsonl", gsm)
    mq = {"question": "Which organ pumps blood?", "options": {"A": "lung", "B": "heart", "C": "skin", "D": "bone"},
          "answer_idx": "B", "answer": "heart"}
    jsonl(d / "medqa/test.jsonl", [mq, mq])
    jsonl(d / "medqa/train.jsonl", [mq] * 3)
    jsonl(d / "agieval/lsat-lr.jsonl", [{"passage": "All cats purr.", "question": "Does Tom purr?",
                                         "options": ["(A)yes", "(B)no", "(C)maybe"], "label": "A"}] * 2)
    tqa = {"Data": [{"Question": f"Who wrote Hamlet {i}", "QuestionId": f"t{i}",
                     "Answer": {"Value": "William Shakespeare", "Aliases": ["Shakespeare"],
                                "NormalizedAliases": ["shakespeare", "william shakespeare"]}} for i in range(7)]}
    (d / "triviaqa").mkdir()
    (d / "triviaqa/unfiltered-web-dev.json").write_text(json.dumps(tqa))
    jsonl(d / "arc/ARC-V1-Feb2018/ARC-Challenge/ARC-Challenge-Test.jsonl", arc_rows(3, "c"))
    jsonl(d / "arc/ARC-V1-Feb2018/ARC-Challenge/ARC-Challenge-Train.jsonl", arc_rows(12, "ct"))
    jsonl(d / "arc/ARC-V1-Feb2018/ARC-Easy/ARC-Easy-Test.jsonl", arc_rows(3, "e"))
    jsonl(d / "arc/ARC-V1-Feb2018/ARC-Easy/ARC-Easy-Train.jsonl", arc_rows(12, "et"))
    piqa = [{"id": f"p{i}", "goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"} for i in range(6)]
    jsonl(d / "piqa/valid.jsonl", piqa[:2])
    (d / "piqa/valid-labels.lst").write_text("0\n1\n")
    jsonl(d / "piqa/train.jsonl", piqa)
    (d / "piqa/train-labels.lst").write_text("0\n" * 6)
    siqa = [{"context": "Ann gave Bo a gift.", "question": "How does Bo feel?", "answerA": "happy",
             "answerB": "sad", "answerC": "angry"}] * 6
    jsonl(d / "siqa/dev.jsonl", siqa[:2])
    (d / "siqa/dev-labels.lst").write_text("1\n3\n")
    jsonl(d / "siqa/train.jsonl", siqa)
    (d / "siqa/train-labels.lst").write_text("1\n" * 6)
    (d / "bbh/cot-prompts").mkdir(parents=True)
    (d / "bbh/navigate.json").write_text(json.dumps({"canary": "x", "examples": [
        {"input": "Take 1 step. Take 1 step back. Are you at the start?", "target": "Yes"},
        {"input": "Take 2 steps. Are you at the start?", "target": "No"}]}))
    shots = "".join(f"\n\nQ: shot {i}?\nA: Let's think step by step.\nStep {i}. So the answer is Yes." for i in range(3))
    (d / "bbh/cot-prompts/navigate.txt").write_text("CANARY LINE\n-----\nNavigate the steps." + shots)
    wg = [{"qID": f"w{i}", "sentence": "The trophy doesn't fit in the case because the _ is too big.",
           "option1": "trophy", "option2": "case", "answer": "1"} for i in range(6)]
    jsonl(d / "winogrande/dev.jsonl", wg[:2])
    jsonl(d / "winogrande/train_xl.jsonl", wg)
    jsonl(d / "openbookqa/Data/Main/test.jsonl", arc_rows(2, "o"))
    jsonl(d / "openbookqa/Data/Main/train.jsonl", arc_rows(12, "ot"))
    jsonl(d / "boolq/dev.jsonl", [{"question": "is water wet", "title": "Water", "answer": True,
                                   "passage": "Water is a liquid."}] * 2)
    jsonl(d / "boolq/train.jsonl", [{"question": "is fire cold", "title": "Fire", "answer": False,
                                     "passage": "Fire is hot."}] * 3)
    jsonl(d / "commonsenseqa/dev_rand_split.jsonl", arc_rows(2, "k"))
    jsonl(d / "commonsenseqa/train_rand_split.jsonl", arc_rows(12, "kt"))
    (d / "truthfulqa").mkdir()
    (d / "truthfulqa/mc_task.json").write_text(json.dumps([
        {"question": f"What happens if you crack your knuckles {i}?",
         "mc1_targets": {"Nothing in particular happens.": 1, "You get arthritis.": 0},
         "mc2_targets": {"Nothing in particular happens.": 1, "Nothing harmful.": 1, "You get arthritis.": 0}}
        for i in range(12)]))
    (d / "humaneval").mkdir()
    with gzip.open(d / "humaneval/HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps({"task_id": "HumanEval/0", "prompt": "def add(a, b):\n", "canonical_solution": "    return a + b\n",
                            "test": "def check(f):\n    assert f(1, 2) == 3\n", "entry_point": "add"}) + "\n")
    jsonl(d / "mbpp/mbpp.jsonl", [{"task_id": i, "text": f"Write a function f{i}.", "code": f"def f{i}():\n\treturn {i}",
                                   "test_list": [f"assert f{i}() == {i}"], "test_setup_code": "",
                                   "challenge_test_list": []} for i in range(1, 14)])
    (d / "gpqa").mkdir()
    (d / "gpqa/gpqa_main.csv").write_text(
        "Record ID,Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3,Explanation\n"
        + "".join(f'r{i},"What is {i}+1?",{i + 1},{i + 2},{i + 3},{i + 4},"Add one, get {i + 1}."\n' for i in range(4)))
    return d


def test_every_task_of_the_report_is_there():
    titles = {t.title for t in T.TASKS.values()}
    assert titles == {"MMLU", "HellaSwag", "ANLI", "GSM-8K", "MedQA", "AGIEval", "TriviaQA", "ARC-Challenge",
                      "ARC-Easy", "PIQA", "Social IQA", "BigBench-Hard", "WinoGrande", "OpenBookQA", "BoolQ",
                      "CommonsenseQA", "TruthfulQA (MC)", "HumanEval", "MBPP", "GPQA"}
    shots = {t.name: t.shots for t in T.TASKS.values()}
    assert shots == {"mmlu": 5, "hellaswag": 5, "anli": 7, "gsm8k": 8, "medqa": 2, "agieval": 0, "triviaqa": 5,
                     "arc_challenge": 10, "arc_easy": 10, "piqa": 5, "siqa": 5, "bbh": 3, "winogrande": 5,
                     "openbookqa": 10, "boolq": 2, "commonsenseqa": 10, "truthfulqa_mc": 10, "humaneval": 0,
                     "mbpp": 3, "gpqa": 2}


@pytest.mark.parametrize("name", list(T.TASKS))
def test_every_task_loads_its_authors_layout(data_dir, name):
    task = T.TASKS[name]
    data = T.load_task(task, data_dir, [])
    assert data.examples and data.files
    ex = data.examples[0]
    shots = min(task.shots, 2)
    if task.kind == "choice":
        reqs = T.requests(ex, data, shots)
        assert len(reqs) >= 2
        for ctx, cont in reqs:
            assert ctx.endswith(ex.query if ex.contexts is None else ctx[-5:]) and cont
        if ex.contexts is None:
            assert 0 <= ex.gold < len(ex.choices) and ex.target == ex.choices[ex.gold]
    else:
        prompt = T.context(ex, data, shots)
        assert prompt.endswith(ex.query)
        assert prompt.count(T.SHOT_SEPARATOR) >= shots
    # Lengths counted without building prompts equal the built ones; every example names its file.
    for e in data.examples:
        built = [len(c) + len(x) for c, x in T.requests(e, data, shots)] if task.kind == "choice" else \
            [len(T.context(e, data, shots))]
        assert T.prompt_chars(e, data, shots) == built
        assert any(e.source.startswith(f"{f}: ") for f in data.files) or e.source.startswith(str(data_dir)), e.source


def test_prompts_follow_lm_eval_conventions(data_dir):
    data = T.load_task(T.TASKS["arc_challenge"], data_dir, [])
    ctx, cont = T.requests(data.examples[0], data, 2)[1]
    assert ctx == ("Question: ct question 0?\nAnswer: steam\n\nQuestion: ct question 1?\nAnswer: steam\n\n"
                   "Question: c question 0?\nAnswer:")
    assert cont == " steam"
    mmlu = T.load_task(T.TASKS["mmlu"], data_dir, [])
    ctx, cont = T.requests(mmlu.examples[1], mmlu, 1)[0]
    assert ctx == ("The following are multiple choice questions (with answers) about high school physics.\n\n"
                   "What, is dev 0?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\n"
                   "What, is test 1?\nA. a\nB. b\nC. c\nD. d\nAnswer:")
    assert mmlu.examples[1].gold == 1 and cont == " A"
    gsm = T.load_task(T.TASKS["gsm8k"], data_dir, [])
    assert gsm.examples[1].answers == ["3"]
    assert T.context(gsm.examples[0], gsm, 1) == ("Question: Tom has 0 apples and buys 2. How many?\nAnswer: "
                                                   "0 + 2 = <<0+2=2>>2\n#### 2\n\nQuestion: Tom has 0 apples and buys 2. "
                                                   "How many?\nAnswer:")
    hs = T.load_task(T.TASKS["hellaswag"], data_dir, [])
    assert hs.examples[0].query == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.examples[0].choices[1] == " starts pulling up roofing. on a roof."
    wg = T.load_task(T.TASKS["winogrande"], data_dir, [])
    (c1, x1), (c2, x2) = T.requests(wg.examples[0], wg, 0)
    assert (c1, c2) == ("The trophy doesn't fit in the case because the trophy",
                        "The trophy doesn't fit in the case because the case")
    assert x1 == x2 == " is too big."
    bbh = T.load_task(T.TASKS["bbh"], data_dir, [])
    prompt = T.context(bbh.examples[0], bbh, 3)
    assert prompt.startswith("Navigate the steps.\n\nQ: shot 0?\nA: Let's think step by step.\nStep 0. So the answer is Yes."
                             "\n\nQ: shot 1?")
    assert prompt.endswith("Q: Take 1 step. Take 1 step back. Are you at the start?\nA: Let's think step by step.")
    gp = T.load_task(T.TASKS["gpqa"], data_dir, [])
    ex = gp.examples[0]
    assert f"({ex.answers[0]}) 1\n" in ex.query + "\n" and ex.target.endswith(f"So the answer is ({ex.answers[0]}).")


def test_shots_come_from_the_same_group_and_never_the_example_itself(data_dir):
    tqa = T.load_task(T.TASKS["truthfulqa_mc"], data_dir, [])
    ex = tqa.examples[3]
    shots = T.pick_shots(ex, tqa, 10)
    assert len(shots) == 10 and ex.id not in {s.id for s in shots}
    with pytest.raises(Phi3Error, match="only 11 few-shot examples; asked for 20"):
        T.pick_shots(ex, tqa, 20)


def test_answer_extraction():
    assert T.last_number("5 + 3 = 8 apples, so $1,000.") == "1000"
    assert T.last_number("The answer is 18.\n#### 18") == "18"
    assert T.last_number("no digits") == ""
    assert T.answer_is("Step one. So the answer is (B).\nMore") == "(B)"
    assert T.answer_is("so the answer is valid") == "valid"
    assert T.answer_letter("I think the answer is (C). Or the answer is D") == "D"
    ex = T.Example("1", "q", answers=["William Shakespeare", "Shakespeare"])
    assert T.normalized_match("  the Shakespeare.", ex) and not T.normalized_match("Marlowe", ex)
    assert T.first_line("\n Paris\nFrance") == "Paris"


def test_choice_metrics():
    ex = T.Example("1", "q", choices=[" a", " bbbbbbbbbb"], gold=1)
    assert T.accuracy(ex, [-1.0, -2.0]) == {"acc": 0.0, "acc_norm": 1.0}
    tq = T.Example("1", "q", choices=[" t", " f", " t", " t2", " f"], gold=0,
                   extra={"n_mc1": 2, "mc2_labels": [1, 1, 0]})
    import math
    m = T.truthfulqa_metrics(tq, [-1.0, -0.5, math.log(0.3), math.log(0.1), math.log(0.1)])
    assert m["mc1"] == 0.0 and m["mc2"] == pytest.approx(0.8)


def test_task_list_parsing(tmp_path):
    parsed = T.parse_tasks("mmlu, bbh:navigate+snarks,arc_easy=x.jsonl")
    assert [(t.name, s, str(f) if f else None) for t, s, f in parsed] == [
        ("mmlu", [], None), ("bbh", ["navigate", "snarks"], None), ("arc_easy", [], "x.jsonl")]
    assert len(T.parse_tasks("all")) == 20
    with pytest.raises(Phi3Error, match="unknown task 'mmlux'; tasks are: mmlu, hellaswag"):
        T.parse_tasks("mmlux")
    with pytest.raises(Phi3Error, match="works for the ARC-layout tasks only"):
        T.parse_tasks("gsm8k=foo.jsonl")
    with pytest.raises(Phi3Error, match="no tasks given"):
        T.parse_tasks(" , ")


def test_missing_and_malformed_files_name_the_file_and_the_layout(data_dir, tmp_path):
    with pytest.raises(Phi3Error, match=r"no folder .*gsm8k for gsm8k: expected gsm8k/test.jsonl and train.jsonl, "
                                        r"records \{\"question\", \"answer\" ending in \"#### N\"\} "
                                        r"\(get it from github.com/openai/grade-school-math"):
        T.load_task(T.TASKS["gsm8k"], tmp_path, [])
    bad = jsonl(tmp_path / "gsm8k/test.jsonl", [{"question": "q", "answer": "no final line"}])
    with pytest.raises(Phi3Error, match=f"{bad}: record 1: answer has no '#### N' final line; expected gsm8k/test.jsonl"):
        T.load_task(T.TASKS["gsm8k"], tmp_path, [])
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    with pytest.raises(Phi3Error, match=f"{bad}: line 2 is not JSON"):
        T.load_task(T.TASKS["gsm8k"], tmp_path, [])
    bad.write_text('{"answer": "#### 1"}\n')
    with pytest.raises(Phi3Error, match="record 1 has no field 'question'"):
        T.load_task(T.TASKS["gsm8k"], tmp_path, [])
    arc = jsonl(tmp_path / "a.jsonl", [dict(ARC_ROW, answerKey="E")])
    with pytest.raises(Phi3Error, match=r"answerKey 'E' is not one of the labels \['A', 'B', 'C'\]"):
        T.load_task(T.TASKS["arc_challenge"], tmp_path, [], arc)
    (tmp_path / "piqa").mkdir()
    jsonl(tmp_path / "piqa/valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    with pytest.raises(Phi3Error, match="valid-labels.lst: missing"):
        T.load_task(T.TASKS["piqa"], tmp_path, [])
    (tmp_path / "piqa/valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(Phi3Error, match="has more than 1 labels for 1 records"):
        T.load_task(T.TASKS["piqa"], tmp_path, [])
    (tmp_path / "mmlu/test").mkdir(parents=True)
    (tmp_path / "mmlu/dev").mkdir(parents=True)
    (tmp_path / "mmlu/test/x_test.csv").write_text("q,a,b,c,d,E\n")
    (tmp_path / "mmlu/dev/x_dev.csv").write_text("q,a,b,c,d,A\n")
    with pytest.raises(Phi3Error, match="x_test.csv: row 1 has 6 columns or answer 'E'"):
        T.load_task(T.TASKS["mmlu"], tmp_path, [])
    with pytest.raises(Phi3Error, match="mmlu has no subject 'astro'"):
        T.load_task(T.TASKS["mmlu"], data_dir, ["astro"])


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared/benchdata/bbh").is_dir(),
                    reason="../shared/benchdata is absent")
def test_the_published_files_load():
    root = Path(__file__).resolve().parents[2] / "shared/benchdata"
    assert len(T.load_task(T.TASKS["gsm8k"], root, []).examples) == 1319
    bbh = T.load_task(T.TASKS["bbh"], root, [])
    assert len(bbh.examples) == 6511 and len({e.group for e in bbh.examples}) == 27
    assert all(len([s for s in bbh.shots if s.group == g]) == 3 for g in {e.group for e in bbh.examples})
    assert len(T.load_task(T.TASKS["humaneval"], root, []).examples) == 164


def test_archives_unpacked_with_their_own_folders_are_found_and_ambiguity_is_refused(tmp_path):
    rows = [{"uid": f"u{i}", "premise": "p", "hypothesis": "h", "label": "e"} for i in range(3)]
    for rnd in ("R1", "R2", "R3"):
        jsonl(tmp_path / f"anli/anli_v1.0/{rnd}/test.jsonl", rows)
    assert len(T.load_task(T.TASKS["anli"], tmp_path, []).examples) == 9
    (tmp_path / "bbh/BIG-Bench-Hard/cot-prompts").mkdir(parents=True)
    (tmp_path / "bbh/BIG-Bench-Hard/bbh").mkdir()
    (tmp_path / "bbh/BIG-Bench-Hard/bbh/navigate.json").write_text(json.dumps({"examples": [{"input": "i", "target": "t"}]}))
    (tmp_path / "bbh/BIG-Bench-Hard/cot-prompts/navigate.txt").write_text(
        "x\n-----\nNavigate.\n\nQ: q?\nA: Let's think step by step.\nSo the answer is Yes.")
    assert [e.id for e in T.load_task(T.TASKS["bbh"], tmp_path, []).examples] == ["navigate/1"]
    mq = {"question": "q", "options": {"A": "a", "B": "b"}, "answer_idx": "A"}
    jsonl(tmp_path / "medqa/questions/US/test.jsonl", [mq])
    jsonl(tmp_path / "medqa/questions/Mainland/test.jsonl", [mq])
    with pytest.raises(Phi3Error, match=r"2 files named test.jsonl .*keep only the one for medqa"):
        T.load_task(T.TASKS["medqa"], tmp_path, [])
    jsonl(tmp_path / "medqa/questions/US/4_options/phrases_no_exclude_test.jsonl", [mq, mq])
    assert len(T.load_task(T.TASKS["medqa"], tmp_path, []).examples) == 2  # the 4-option US file first


# --- hostile files: bounded reading, lengths checked before any tokenizing ---

def test_an_overlong_jsonl_line_is_refused_without_being_read_whole(tmp_path, monkeypatch):
    """A 64 MB line against a 1 MiB bound (the default bound, 64 MiB, works the same way): refused
    with its file and line, while at most the bound is ever held (tracemalloc's peak)."""
    import tracemalloc
    line = json.dumps(dict(ARC_ROW, id="big", question={"stem": "x" * 64_000_000, "choices": ARC_ROW["question"]["choices"]}))
    plain = tmp_path / "arc/ARC-Challenge-Test.jsonl"
    plain.parent.mkdir()
    plain.write_text(json.dumps(ARC_ROW) + "\n" + line + "\n")
    packed = tmp_path / "HumanEval.jsonl.gz"  # compressed to ~60 KB: the bound holds on what is decompressed
    with gzip.open(packed, "wt", compresslevel=1) as f:
        f.write(json.dumps(ARC_ROW) + "\n" + line + "\n")
    del line
    for path in (plain, packed):
        tracemalloc.start()
        with pytest.raises(Phi3Error) as e:
            T.read_jsonl(path, max_line_bytes=2**20)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert str(e.value) == f"{path}: line 2 is longer than 1 MiB, more than any benchmark record needs; " \
                               "remove or shorten that line"
        assert peak < 4 * 2**20, peak
    monkeypatch.setattr(T, "MAX_LINE_BYTES", 2**20)  # through a task's loader, and the arc=FILE form
    with pytest.raises(Phi3Error, match=f"{plain}: line 2 is longer than 1 MiB"):
        T.load_task(T.TASKS["arc_challenge"], tmp_path, [])
    with pytest.raises(Phi3Error, match=f"{plain}: line 2 is longer than 1 MiB"):
        T.load_task(T.TASKS["arc_easy"], tmp_path, [], plain)


def test_csv_labels_and_prompt_files_are_read_with_bounds(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "MAX_LINE_BYTES", 4096)
    csv_file = tmp_path / "gpqa/gpqa_main.csv"
    csv_file.parent.mkdir()
    csv_file.write_text("Question,Correct Answer\n" + "a," * 3000 + "b\n")  # many small fields: one long line
    with pytest.raises(Phi3Error, match=f"{csv_file}: line 2 is longer than 4,096 bytes"):
        T.load_task(T.TASKS["gpqa"], tmp_path, [])
    jsonl(tmp_path / "piqa/valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 2)
    (tmp_path / "piqa/valid-labels.lst").write_text("0\n" * 100_000)  # read only up to the third label
    with pytest.raises(Phi3Error, match="valid-labels.lst: has more than 2 labels for 2 records"):
        T.load_task(T.TASKS["piqa"], tmp_path, [])
    (tmp_path / "bbh/cot-prompts").mkdir(parents=True)
    (tmp_path / "bbh/navigate.json").write_text(json.dumps({"examples": [{"input": "i", "target": "t"}]}))
    prompt = tmp_path / "bbh/cot-prompts/navigate.txt"
    prompt.write_text("Navigate.\n\nQ: q?\nA: Let's think step by step.\n" + "So. " * 2000)
    with pytest.raises(Phi3Error, match=f"{prompt}: 8,046 bytes, more than 4,096 bytes; a prompt file this long fits"):
        T.load_task(T.TASKS["bbh"], tmp_path, [])


def test_parquet_row_groups_are_bounded_before_they_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = arc_rows(3, "p")
    rows[2]["question"]["stem"] = "y" * 2**21
    path = tmp_path / "ARC-Test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1, compression="zstd")
    assert path.stat().st_size < 2**16  # small on disk, 2 MiB once read
    with pytest.raises(Phi3Error, match=r"ARC-Test.parquet: row group 2 holds 2,\d{3},\d{3} bytes uncompressed, more "
                                        r"than 1 MiB; write the file with smaller row groups, or remove the oversized"):
        T.read_parquet(path, max_group_bytes=2**20)
    data = T.load_task(T.TASKS["arc_challenge"], tmp_path, [], path)
    assert [e.id for e in data.examples] == ["p0", "p1", "p2"] and data.examples[0].source == f"{path}: record 1 (id p0)"


def test_a_record_longer_than_any_context_is_refused_when_loaded(tmp_path, monkeypatch):
    """Before anything tokenizes it, and naming the file and record; a shot as well as an example.
    (At the real bound, 16 Mi characters, through the CLI: test_eval.py.)"""
    monkeypatch.setattr(T, "MAX_RECORD_CHARS", 10_000)
    test = jsonl(tmp_path / "ARC-Easy-Test.jsonl", arc_rows(3, "t"))
    train_rows = arc_rows(3, "s")
    train_rows[1]["question"]["stem"] = "z" * 10_000
    train = jsonl(tmp_path / "ARC-Easy-Train.jsonl", train_rows)
    message = ("characters, more than any model's context holds (131,072 tokens of at most 128 characters); "
               "shorten or remove this record")
    with pytest.raises(Phi3Error) as e:
        T.load_task(T.TASKS["arc_easy"], tmp_path, [], test)
    # "Question: " + 10,000 + "\nAnswer:" + the longest choice, " steam": 10,024
    assert str(e.value) == f"{train}: record 2 (id s1): 10,024 {message}"
    train.unlink()
    rows = arc_rows(3, "t")
    rows[2]["question"]["stem"] = "z" * 10_000
    jsonl(test, rows)
    with pytest.raises(Phi3Error, match=f"^{test}: record 3 \\(id t2\\): 10,024 {re.escape(message)}$"):
        T.load_task(T.TASKS["arc_easy"], tmp_path, [], test)
