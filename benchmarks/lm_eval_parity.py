"""`phi3 eval` against lm-evaluation-harness on the same model, data and prompts.

lm-eval runs its HF backend, which loads the same GGUF file through transformers (dequantized to
float32), on custom tasks that read the same local files (YAML written here). phi3 runs
`phi3.eval` with exact float activations. Compared, item by item:
- multiple choice (ARC layout, tests/data/arc_phi3): acc and acc_norm, and the chosen answer;
- GSM-8K (8-shot chain of thought) and three BBH subtasks (3-shot chain of thought) from
  ../shared/benchdata: exact match, and the extracted answer of every item.
The prompts themselves are checked too: lm-eval's logged prompt must equal phi3's, character for
character, so a difference in scores can only come from the models' arithmetic.

    python benchmarks/lm_eval_parity.py                        # 200 MC items, 100 per generation task
    python benchmarks/lm_eval_parity.py --write EVALUATION.md  # and put the table there
    python benchmarks/lm_eval_parity.py --mc-limit 20 --gen-limit 5 --tasks arc   # a quick look

Needs the test extra (lm-eval, transformers). Speed of each side (examples/s, evaluation only,
after the model is loaded) is reported for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from phi3 import checkpoint  # noqa: E402
from phi3 import tasks as T  # noqa: E402

ARC_FILE = REPO / "tests" / "data" / "arc_phi3" / "ARC-Phi3-Test.jsonl"
BBH_SUBTASKS = ("boolean_expressions", "date_understanding", "sports_understanding")


def default_benchdata() -> Path:
    return Path(os.environ.get("PHI3_BENCHDATA", REPO.parent / "shared" / "benchdata"))


# --- lm-eval's side: custom tasks on the local files ----------------------------------------------

UTILS_PY = '''
def process_arc(dataset):
    """ARC's published layout -> query, choices, gold (the same prompt phi3 builds)."""
    def convert(doc):
        choices = doc["question"]["choices"]
        if isinstance(choices, dict):  # datasets may turn a list of structs into a struct of lists
            texts, labels = list(choices["text"]), list(choices["label"])
        else:
            texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
        return {"query": "Question: " + doc["question"]["stem"].strip() + "\\nAnswer:",
                "options": texts, "gold": labels.index(str(doc["answerKey"]))}
    return dataset.map(convert)
'''


def _yaml(config: dict, functions: dict[str, str] | None = None) -> str:
    """YAML with every value written as JSON (YAML 1.2 reads JSON scalars), plus !function tags."""
    lines = [f"{k}: {json.dumps(v)}" for k, v in config.items()]
    lines += [f"{k}: !function {v}" for k, v in (functions or {}).items()]
    return "\n".join(lines) + "\n"


def write_lm_eval_tasks(folder: Path, benchdata: Path, arc_file: Path) -> dict[str, str]:
    """Task YAMLs for lm-eval; returns {phi3 task spec: lm-eval task name}."""
    (folder / "utils.py").write_text(UTILS_PY)
    names = {}
    arc_train = arc_file.with_name(arc_file.name.replace("-Test", "-Train"))
    (folder / "phi3_arc.yaml").write_text(_yaml({
        "task": "phi3_arc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(arc_train), "test": str(arc_file)}},
        "fewshot_split": "train", "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "{{query}}", "doc_to_choice": "{{options}}", "doc_to_target": "{{gold}}",
        "target_delimiter": " ", "fewshot_delimiter": "\n\n", "num_fewshot": 10,
        "fewshot_config": {"sampler": "first_n"},
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    }, {"process_docs": "utils.process_arc"}))
    names[f"arc_challenge={arc_file}"] = "phi3_arc"
    gsm = benchdata / "gsm8k"
    gen = {"do_sample": False, "temperature": 0.0}
    (folder / "phi3_gsm8k.yaml").write_text(_yaml({
        "task": "phi3_gsm8k", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(gsm / "train.jsonl"), "test": str(gsm / "test.jsonl")}},
        "fewshot_split": "train", "test_split": "test", "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{answer}}",
        "target_delimiter": " ", "fewshot_delimiter": "\n\n", "num_fewshot": 8,
        "fewshot_config": {"sampler": "first_n"},
        "generation_kwargs": {"until": ["Question:", "\n\n"], "max_gen_toks": 256, **gen},
        "filter_list": [{"name": "last-number", "filter": [
            {"function": "regex", "regex_pattern": T.NUMBER.pattern, "group_select": -1},
            {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}],
    }))
    names["gsm8k"] = "phi3_gsm8k"
    bbh_task = T.TASKS["bbh"]
    data = T.load_task(bbh_task, benchdata, list(BBH_SUBTASKS))
    for sub in BBH_SUBTASKS:
        example = next(e for e in data.examples if e.group == sub)
        prefix = T.context(example, data, 3, query="")  # description and the 3 published CoT shots
        (folder / f"phi3_bbh_{sub}.yaml").write_text(_yaml({
            "task": f"phi3_bbh_{sub}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(benchdata / "bbh" / f"{sub}.json")}, "field": "examples"},
            "test_split": "test", "output_type": "generate_until",
            "description": prefix, "doc_to_text": T.BBH_QUERY.replace("{input}", "{{input}}"),
            "doc_to_target": "{{target}}", "target_delimiter": " ", "fewshot_delimiter": "\n\n", "num_fewshot": 0,
            "generation_kwargs": {"until": list(T.TASKS["bbh"].stop), "max_gen_toks": 256, **gen},
            "filter_list": [{"name": "answer-is", "filter": [
                {"function": "regex", "regex_pattern": T.ANSWER_IS.pattern, "group_select": 0},
                {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True}],
        }))
        names[f"bbh:{sub}"] = f"phi3_bbh_{sub}"
    return names


class LmEvalRunner:
    """lm-eval's HF backend loaded once; one simple_evaluate per task, so that each task gets its
    own limit and timing."""

    def __init__(self, model_path: Path, folder: Path, batch_size: int) -> None:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        self.lm = HFLM(pretrained=str(model_path.parent), gguf_file=model_path.name, dtype="float32",
                       batch_size=batch_size, device="cpu")
        self.manager = TaskManager(include_path=str(folder))
        self.batch_size = batch_size

    def run(self, name: str, limit: int):
        """(metrics, samples sorted by doc_id, seconds)"""
        import lm_eval
        started = time.perf_counter()
        res = lm_eval.simple_evaluate(model=self.lm, tasks=[name], task_manager=self.manager, limit=limit,
                                      log_samples=True, batch_size=self.batch_size, random_seed=0,
                                      numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
        seconds = time.perf_counter() - started
        return res["results"][name], sorted(res["samples"][name], key=lambda x: x["doc_id"]), seconds


# --- phi3's side ---------------------------------------------------------------------------------

def run_phi3(lm, model_path: Path, benchdata: Path, spec: str, limit: int, batch_size: int, out_dir: Path):
    """(TaskResult, records and prompts in example order, seconds) of one task."""
    from phi3.eval import EvalSettings, evaluate_task, select
    task, subsets, file = T.parse_tasks(spec)[0]
    settings = EvalSettings(limit=limit, batch_size=batch_size)
    started = time.perf_counter()
    result = evaluate_task(lm, task, subsets, file, benchdata, settings, out_dir / "records", model_path.name,
                           progress=True)
    seconds = time.perf_counter() - started
    data = T.load_task(task, benchdata, subsets, file)
    examples = select(data.examples, limit)
    records = _read_records(out_dir / "records", result.name)
    prompts = [T.context(ex, data, result.shots) for ex in examples]
    return result, [records[ex.id] for ex in examples], prompts, seconds


def _read_records(folder: Path, name: str) -> dict[str, dict]:
    from phi3.eval import records_name
    path = folder / records_name(name)
    by_id: dict[str, dict] = {}
    for line in path.read_text().splitlines()[1:]:
        rec = json.loads(line)
        by_id.setdefault(rec["id"], {}).update(rec)
    return by_id


# --- comparison ----------------------------------------------------------------------------------

@dataclass
class Comparison:
    spec: str
    kind: str
    n: int
    phi3: dict[str, float]
    lm_eval: dict[str, float]
    same_answer: int  # items where the chosen choice / extracted answer is the same
    same_prompt: int
    phi3_s: float
    lm_eval_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        return self.same_answer / self.n if self.n else float("nan")

    @property
    def max_gap(self) -> float:
        return max(abs(self.phi3[m] - self.lm_eval[m]) for m in self.phi3)

    def passes(self) -> bool:
        ok = self.max_gap <= 0.01 + 1e-9 and self.same_prompt == self.n
        return ok and (self.kind == "choice" or self.agreement >= 0.97)


def _lm_prompt(sample: dict) -> str:
    args = sample["arguments"]
    first = args[0] if isinstance(args, list) else next(iter(args.values()))
    if isinstance(first, dict):
        first = first.get("arg_0", next(iter(first.values())))
    return first[0] if isinstance(first, (list, tuple)) else first


def compare(spec: str, phi3_side, lm_side) -> Comparison:
    result, records, prompts, phi3_s = phi3_side
    metrics, samples, lm_s = lm_side
    n = min(len(records), len(samples))
    same_prompt = sum(_lm_prompt(s) == p for s, p in zip(samples, prompts))
    notes = []
    if result.kind == "choice":
        phi3_m = {"acc": result.metrics["acc"]["value"], "acc_norm": result.metrics["acc_norm"]["value"]}
        lm_m = {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"]}
        same = 0
        for rec, s in zip(records, samples):
            lm_lls = [float(r[0]) for r in s["filtered_resps"]]
            same += max(range(len(lm_lls)), key=lm_lls.__getitem__) == max(range(len(rec["lls"])), key=rec["lls"].__getitem__)
        gaps = [abs(a - float(r[0])) for rec, s in zip(records, samples) for a, r in zip(rec["lls"], s["filtered_resps"])]
        notes.append(f"log-likelihoods differ by {max(gaps):.2e} at most, {sum(gaps) / len(gaps):.2e} on average")
    else:
        key = next(k for k in metrics if k.startswith("exact_match,"))
        phi3_m = {"exact_match": result.metrics["exact_match"]["value"]}
        lm_m = {"exact_match": metrics[key]}
        same = 0
        for rec, s in zip(records, samples):
            theirs = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
            theirs = "" if theirs == "[invalid]" else theirs
            same += T.clean_number(theirs) == rec["answer"] if spec == "gsm8k" else theirs == rec["answer"]
    return Comparison(spec, result.kind, n, phi3_m, lm_m, same, same_prompt, phi3_s, lm_s, notes)


def markdown(comparisons: list[Comparison], command: str, model: str) -> str:
    lines = [f"Model: `{model}` (phi3: packed Q4_1 with exact float activations; lm-eval 0.4.13: its HF "
             "backend, transformers' GGUF loader, float32). Made by:", "", f"    {command}", "",
             "| task | items | metric | phi3 | lm-eval | gap (points) | same answer | same prompt | "
             "phi3 ex/s | lm-eval ex/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        for i, m in enumerate(c.phi3):
            gap = 100 * abs(c.phi3[m] - c.lm_eval[m])
            lead = (f"| {c.spec.split('=')[0] if '=' not in c.spec else 'ARC layout (tests/data/arc_phi3)'} | {c.n} |"
                    if i == 0 else "| | |")
            tail = (f"{c.same_answer}/{c.n} ({100 * c.agreement:.0f}%) | {c.same_prompt}/{c.n} | "
                    f"{c.n / c.phi3_s:.2f} | {c.n / c.lm_eval_s:.2f} |" if i == 0 else " | | | |")
            lines.append(f"{lead} {m} | {100 * c.phi3[m]:.2f} | {100 * c.lm_eval[m]:.2f} | {gap:.2f} | {tail}")
    for c in comparisons:
        for note in c.notes:
            lines.append(f"\n{c.spec.split('=')[0]}: {note}.")
    verdict = all(c.passes() for c in comparisons)
    lines.append(f"\nAll within 1 point, with the same extracted answer on at least 97% of generation items "
                 f"and identical prompts: **{'yes' if verdict else 'no'}**.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the SmolLM2 model phi3 fetches)")
    ap.add_argument("--benchdata", default=str(default_benchdata()))
    ap.add_argument("--tasks", default="arc,gsm8k,bbh", help="any of arc, gsm8k, bbh")
    ap.add_argument("--mc-limit", type=int, default=200)
    ap.add_argument("--gen-limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "parity-results"), help="records and results JSON go here")
    ap.add_argument("--write", default=None, metavar="EVALUATION.md", help="put the table into this file")
    ap.add_argument("--write-speed", default=None, metavar="BENCHMARKS.md",
                    help="put the multiple-choice throughput (examples/s of each side) into this file")
    args = ap.parse_args(argv)
    model_path = Path(args.model) if args.model else checkpoint.fetch_default_model(quiet=True)
    benchdata = Path(args.benchdata)
    wanted = {t.strip() for t in args.tasks.split(",")}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = ("python benchmarks/lm_eval_parity.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    import shutil
    shutil.rmtree(out_dir / "records", ignore_errors=True)  # a fresh phi3 run, timed from scratch
    lm = checkpoint.load(str(model_path), exact=True)
    comparisons: list[Comparison] = []
    with tempfile.TemporaryDirectory() as tmp:
        names = write_lm_eval_tasks(Path(tmp), benchdata, ARC_FILE)
        specs = [s for s in names if (s.split("=")[0].split(":")[0].replace("arc_challenge", "arc")) in wanted]
        runner = LmEvalRunner(model_path, Path(tmp), args.batch_size)
        for spec in specs:  # one task at a time, results written after each: a long run keeps what it finished
            limit = args.mc_limit if spec.startswith("arc") else args.gen_limit
            theirs = runner.run(names[spec], limit)
            ours = run_phi3(lm, model_path, benchdata, spec, limit, args.batch_size, out_dir)
            comparisons.append(compare(spec, ours, theirs))
            report(comparisons, command, model_path, out_dir, args)
    return 0 if all(c.passes() for c in comparisons) else 1


def report(comparisons: list[Comparison], command: str, model_path: Path, out_dir: Path, args) -> None:
    table = markdown(comparisons, command, model_path.name)
    print(table)
    (out_dir / "parity.json").write_text(json.dumps([c.__dict__ for c in comparisons], indent=2, default=str))
    from benchmarks.report import write_section
    if args.write:
        start, end = "<!-- lm-eval parity: start -->", "<!-- lm-eval parity: end -->"
        write_section(Path(args.write), f"{start}\n{table}{end}", start, end)
    if args.write_speed:
        start, end = "<!-- eval speed: start -->", "<!-- eval speed: end -->"
        write_section(Path(args.write_speed), f"{start}\n{speed_table(comparisons, command, args.batch_size)}{end}", start, end)


def speed_table(comparisons: list[Comparison], command: str, batch_size: int) -> str:
    import torch
    rows = [c for c in comparisons if c.kind == "choice"]
    lines = ["## Log-likelihood evaluation speed: phi3 eval and lm-evaluation-harness", "",
             f"The same {rows[0].n if rows else 0} ARC-layout items (10-shot, 4 choices mostly), the same GGUF "
             f"(SmolLM2-135M-Instruct Q4_1), {torch.get_num_threads()} threads, evaluation time after loading "
             f"(lm-eval: its HF backend in float32; phi3: exact float activations; batch size {batch_size} on both "
             "sides). Made by:", "",
             f"    {command}", "", "| task | items | phi3 ex/s | lm-eval ex/s | ratio |", "|---|---|---|---|---|"]
    for c in rows:
        ours, theirs = c.n / c.phi3_s, c.n / c.lm_eval_s
        lines.append(f"| ARC layout | {c.n} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.1f}x |")
    lines += ["", "phi3 computes the shots shared by every prompt once and keeps them in the KV cache, scores each "
              "example's question once for all its answers, and takes logits only where answer tokens are "
              "predicted; lm-eval runs every (context, answer) pair in full and computes the head over every "
              "position."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
