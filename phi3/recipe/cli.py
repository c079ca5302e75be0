"""`phi3 data STAGE ...`: the data recipe's stages, one verb each.

    phi3 data ingest INPUT... --out DIR          WARC/WET, folders of HTML, jsonl/parquet -> documents
    phi3 data heuristics IN --out DIR            language ID, Gopher, C4, FineWeb quality filters
    phi3 data dedup IN --out DIR                 MinHash (datatrove's four stages)
    phi3 data decontaminate IN --out DIR --data-dir BENCH   13-gram overlap with benchmark test sets
    phi3 data tokenize IN --out DIR --tokenizer SPEC         token shards for `phi3 train`
    phi3 data judge IN --out DIR --url URL --model M         an LLM scores a sample for educational value
    phi3 data classify IN --judgments J --embedder M --out DIR  a head on the judge's scores; scores every document
    phi3 data phases IN --out DIR --t1 2 --t2 3 [--synthetic S]  the two pretraining phases + mixture.toml
    phi3 data synthetic --out DIR --url URL --model M --topics F  textbook passages and exercises, with provenance
    phi3 data report STAGE_DIR... --out REPORT.md  documents/tokens per stage, removals, histograms, examples
    phi3 data run RECIPE.toml                    the stages a recipe names, in order (see load_recipe)

IN is a previous stage's --out folder (its docs/) or jsonl(.gz) documents. Every stage takes
--executor local|ray|slurm, --tasks and --workers. Bad input: one line `phi3: error: ...`, exit 2,
and no OUT folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from phi3.errors import Phi3Error


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, as the rest of phi3
        self.exit(2, f"phi3: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="phi3 data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True, parser_class=_Parser)

    def common(sp: argparse.ArgumentParser, needs_input: bool = True) -> None:
        if needs_input:
            sp.add_argument("input", help="a previous stage's --out folder, or jsonl(.gz) documents")
        sp.add_argument("--out", required=True, help="the stage's folder (written as OUT.partial, renamed when done)")
        g = sp.add_argument_group("executor")
        g.add_argument("--executor", default="local", help="local (default), ray or slurm")
        g.add_argument("--tasks", type=int, default=1, help="datatrove tasks; input files are split among them")
        g.add_argument("--workers", type=int, default=1, help="tasks run at once (1: in this process)")
        g.add_argument("--ray-address", help="a running Ray cluster (default: start one with --workers CPUs)")
        g.add_argument("--slurm-partition")
        g.add_argument("--slurm-time", default="04:00:00")
        g.add_argument("--slurm-venv", help="venv activated in the jobs")
        sp.add_argument("--json", action="store_true", help="print the summary as JSON")
        sp.add_argument("--verbose", action="store_true", help="show datatrove's log (else only in OUT/logs/)")

    sp = sub.add_parser("ingest", help="read WARC/WET, HTML folders, jsonl/parquet into documents")
    sp.add_argument("inputs", nargs="+", help="files or folders; each folder holds one kind of file")
    sp.add_argument("--text-key", default="text", help="jsonl/parquet field holding the text")
    sp.add_argument("--id-key", default="id", help="jsonl/parquet field holding the id (else FILE/N)")
    sp.add_argument("--source", action="append", help="a name per input for metadata.source (default: its name)")
    common(sp, needs_input=False)

    sp = sub.add_parser("heuristics", help="language ID + Gopher, C4 and FineWeb quality filters")
    sp.add_argument("--languages", default="en", help="comma-separated ISO codes to keep (lid.176)")
    sp.add_argument("--language-threshold", type=float, default=0.65, help="minimum lid.176 score (datatrove's default)")
    sp.add_argument("--filters", default="language,gopher_repetition,gopher_quality,c4,fineweb",
                    help="which filters to run (always in FineWeb's order)")
    common(sp)

    sp = sub.add_parser("dedup", help="MinHash near-duplicate removal")
    sp.add_argument("--ngrams", type=int, default=5, help="words per shingle")
    sp.add_argument("--buckets", type=int, default=14, help="LSH bands")
    sp.add_argument("--hashes-per-bucket", type=int, default=8, help="minhashes per band")
    sp.add_argument("--seed", type=int, default=1)
    common(sp)

    sp = sub.add_parser("decontaminate", help="drop documents sharing an n-gram with benchmark test sets")
    sp.add_argument("--data-dir", required=True, help="benchmark files laid out as `phi3 eval` reads them")
    sp.add_argument("--ngrams", type=int, default=13, help="words per n-gram (13, as GPT-3 / lm-eval)")
    sp.add_argument("--benchmarks", help="comma-separated task names (default: every one found in --data-dir)")
    common(sp)

    sp = sub.add_parser("judge", help="an LLM scores a sample of documents for educational value, 0-5")
    sp.add_argument("input", help="a previous stage's --out folder, or jsonl(.gz) documents")
    sp.add_argument("--out", required=True)
    sp.add_argument("--url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (phi3 serve)")
    sp.add_argument("--model", required=True, help="the judge model's name at that endpoint")
    sp.add_argument("--api-key-file", help="file holding the API key (default: $OPENAI_API_KEY, or none)")
    sp.add_argument("--sample", type=int, default=1000, help="documents to judge (a fixed sample by --seed)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--max-tokens", type=int, default=256, help="of each judgment")
    sp.add_argument("--max-chars", type=int, default=3000,
                    help="characters of each document shown to the judge (a small model on a CPU: 1,000-1,500)")
    sp.add_argument("--prompt", default="full", choices=("full", "brief"),
                    help="full: FineWeb-Edu-style additive rubric, justification, then the score; brief: the scale "
                         "in four lines and the score alone (small judges on a CPU: --max-tokens 12)")
    sp.add_argument("--method", default="digit", choices=("digit", "yesno", "contrast", "additive"),
                    help="digit (default): the --prompt rubric, the score one digit; yesno: 5 P(yes) to \"would this "
                         "page teach a student something?\"; contrast: 2.5 + 2.5 (P(yes) to that - P(yes) to \"is it only "
                         "a log, list or record?\"); additive: FineWeb-Edu's 5 criteria as 5 yes/no questions, "
                         "P(yes) summed. The yes/no methods suit small judges (see DATA.md); --prompt is the digit's")
    sp.add_argument("--ask", default="end", choices=("end", "both"),
                    help="the yes/no methods' question after the page (end), or before and after it (both)")
    sp.add_argument("--shots", type=int, default=0, choices=(0, 2),
                    help="2: a short high-value and a low-value example, answered, before the page (few-shot). "
                         "--method yesno --ask both --shots 2 is the best SmolLM2-135M judge measured (DATA.md)")
    sp.add_argument("--scoring", default="auto", choices=("auto", "logprobs", "text"),
                    help="logprobs: the expected score over the digits 0-5 from the reply's token log-probabilities "
                         "(G-Eval; the answer is one digit); text: parse \"Educational score: N\"; auto (default): "
                         "logprobs when the endpoint returns them, else text")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--no-progress", action="store_true")

    sp = sub.add_parser("classify", help="train a regression head on the judge's scores and score every document")
    sp.add_argument("--judgments", required=True, help="a finished `phi3 data judge` --out folder")
    sp.add_argument("--embedder", required=True, help="minilm (all-MiniLM-L6-v2, 15 docs/CPU-s), minilm-static (model2vec distilled "
                    "from it once, 5,000 docs/CPU-s) or a model2vec static model folder")
    sp.add_argument("--threshold", type=float, default=3, help="score counted as educational in the held-out F1")
    sp.add_argument("--holdout", type=float, default=0.2, help="share of the judged documents held out")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--alpha", type=float, default=1.0, help="Ridge regularization")
    common(sp)

    sp = sub.add_parser("phases", help="phase 1 (score >= t1) and phase 2 (score >= t2 + synthetic), tokenized, + mixture.toml")
    sp.add_argument("--t1", type=float, default=2, help="phase 1 keeps edu_int_score >= t1 (a fractional t1: "
                    "edu_score >= t1, for judges whose scores crowd into one unit)")
    sp.add_argument("--t2", type=float, default=3, help="phase 2 keeps edu_int_score >= t2 (FineWeb-Edu's 3; "
                    "fractional: edu_score >= t2)")
    sp.add_argument("--synthetic", help="synthetic documents added to phase 2 (a stage's --out folder or jsonl)")
    sp.add_argument("--tokenizer", default="default", help="as for tokenize")
    sp.add_argument("--eos", help="as for tokenize")
    sp.add_argument("--seed", type=int, default=0)
    common(sp)

    sp = sub.add_parser("synthetic", help="textbook passages and exercises from topic x audience x style seeds")
    sp.add_argument("--out", required=True)
    sp.add_argument("--url", required=True, help="OpenAI-compatible base URL (phi3 serve is one)")
    sp.add_argument("--model", required=True)
    sp.add_argument("--api-key-file", help="file holding the API key (default: $OPENAI_API_KEY, or none)")
    sp.add_argument("--topics", required=True, help="a text file, one topic a line")
    sp.add_argument("--audiences", default="young children,high school students,college students,professionals")
    sp.add_argument("--styles", default="textbook,exercises")
    sp.add_argument("--n", type=int, default=100, help="generations (seeds drawn from the product)")
    sp.add_argument("--temperature", type=float, default=0.8)
    sp.add_argument("--max-tokens", type=int, default=1024)
    sp.add_argument("--seed", type=int, default=0, help="which seeds, in which order")
    sp.add_argument("--batch", type=int, default=8, help="requests in flight at once")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--no-progress", action="store_true")

    sp = sub.add_parser("report", help="a markdown page (+ score histogram PNG) over finished stages")
    sp.add_argument("stages", nargs="+", help="stage folders, or a folder of them (as `phi3 data run` writes)")
    sp.add_argument("--out", required=True, help="the report's .md path")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("run", help="run the stages a recipe TOML names, in order, each into OUT/<stage>")
    sp.add_argument("recipe", help="recipe file (see phi3/recipe/cli.py's docstring)")
    sp.add_argument("--json", action="store_true", help="print the summaries as JSON")
    sp.add_argument("--verbose", action="store_true", help="show datatrove's log")

    sp = sub.add_parser("tokenize", help="token shards (.ds) with the target model's tokenizer")
    sp.add_argument("--tokenizer", default="default",
                    help="GGUF, Hugging Face folder, tokenizer.json (with --eos) or 'default' (fetched SmolLM2)")
    sp.add_argument("--eos", help="token appended after every document (default: the tokenizer's EOS)")
    sp.add_argument("--seed", type=int, default=0, help="shuffle seed of documents within a shard")
    sp.add_argument("--max-tokens-per-file", type=int, default=None)
    common(sp)
    return p


STAGES = ("ingest", "heuristics", "dedup", "decontaminate", "synthetic", "judge", "classify", "phases", "tokenize")
DOC_STAGES = ("ingest", "heuristics", "dedup", "decontaminate")  # each reads the one before it
NOT_IN_RECIPES = {"help", "input", "out", "json", "verbose", "stage", "executor", "tasks", "workers", "ray_address",
                  "slurm_partition", "slurm_time", "slurm_venv", "no_progress"}
EXECUTOR_KEYS = {"kind": str, "tasks": int, "workers": int, "ray_address": str, "slurm_partition": str,
                 "slurm_time": str, "slurm_venv": str}


def _close(key: str, valid) -> str:
    import difflib
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _stage_keys(parser: argparse.ArgumentParser, stage: str) -> dict[str, argparse.Action]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[stage]
    return {a.dest: a for a in sub._actions if a.dest not in NOT_IN_RECIPES}


def _option_strings(parser: argparse.ArgumentParser, stage: str) -> set[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[stage]
    return {o for a in sub._actions for o in a.option_strings}


def load_recipe(path: Path) -> tuple[dict, list[list[str]]]:
    """A recipe TOML -> (summary of what it asks, argv of each stage in order). Every table and key
    is checked against the stages' own options, with the closest name on a typo:

        out = "work/data"                      # each stage writes out/<stage>
        [executor]                             # kind = "local"|"ray"|"slurm", tasks, workers, ray_address, slurm_*
        [ingest]        inputs = ["crawl/", "pages/"]   (text_key, id_key, source = [...])
        [heuristics]    languages = ["en"], language_threshold = 0.65, filters = [...]
        [dedup]         ngrams = 5, buckets = 14, hashes_per_bucket = 8, seed = 1
        [decontaminate] data_dir = "bench", ngrams = 13, benchmarks = ["gsm8k"]
        [synthetic]     url, model, topics = "topics.txt", n, temperature, seed, batch, styles, audiences
        [judge]         url, model, sample = 1000, seed, method = "digit" (or yesno, contrast, additive),
                        ask = "end" (or "both"), shots = 0 (or 2), prompt, scoring = "auto" (logprobs or text)
        [classify]      embedder = "minilm-static" (or "minilm", or a model2vec folder), threshold = 3
        [phases]        t1 = 2, t2 = 3, tokenizer
        [tokenize]      tokenizer = "default", eos = "...", seed = 0

    Stages run in that order (those present). ingest, heuristics, dedup and decontaminate each read
    the one before; judge, classify and tokenize read the last of those; classify takes the judge's
    scores, phases the classifier's documents plus the synthetic ones. A recipe that starts after
    ingest names its documents with `input = "..."` at the top."""
    import tomllib
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise Phi3Error(f"{path}: no such recipe file") from None
    except tomllib.TOMLDecodeError as e:
        raise Phi3Error(f"{path}: not valid TOML ({e})") from None
    top = {"out": str, "input": str, "executor": dict, **{s: dict for s in STAGES}}
    for key, value in raw.items():
        if key not in top:
            raise Phi3Error(f"{path}: unknown key {key!r}{_close(key, top)}; a recipe has {', '.join(top)}")
        if not isinstance(value, top[key]):
            raise Phi3Error(f"{path}: {key} must be a {'table' if top[key] is dict else 'string'}")
    if "out" not in raw:
        raise Phi3Error(f"{path}: no `out = \"FOLDER\"` (where each stage writes out/<stage>)")
    stages = [s for s in STAGES if s in raw]
    if not stages:
        raise Phi3Error(f"{path}: no stage tables; give one or more of [{'], ['.join(STAGES)}]")
    needs_docs = [st for st in stages if st not in ("ingest", "synthetic")]
    if "ingest" not in stages and needs_docs and "input" not in raw:
        raise Phi3Error(f"{path}: starts at [{needs_docs[0]}] with no ingest: say which documents with `input = \"...\"`")
    ex = raw.get("executor", {})
    common = []
    for key, value in ex.items():
        if key not in EXECUTOR_KEYS:
            raise Phi3Error(f"{path}: unknown key executor.{key}{_close(key, EXECUTOR_KEYS)}")
        if not isinstance(value, EXECUTOR_KEYS[key]) or isinstance(value, bool):
            raise Phi3Error(f"{path}: executor.{key} must be {'an integer' if EXECUTOR_KEYS[key] is int else 'a string'}")
        common += ["--executor" if key == "kind" else "--" + key.replace("_", "-"), str(value)]
    parser = build_parser()
    out = Path(raw["out"])
    previous = raw.get("input")
    argvs = []
    for stage in stages:
        keys = _stage_keys(parser, stage)
        argv = [stage]
        positional = []
        for key, value in raw[stage].items():
            if key not in keys:
                raise Phi3Error(f"{path}: unknown key {stage}.{key}{_close(key, keys)}; [{stage}] takes {', '.join(keys)}")
            action = keys[key]
            many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
            listy = many or key in ("languages", "filters", "benchmarks", "audiences", "styles")
            items = value if isinstance(value, list) and listy else [value]
            want = action.type or str
            for v in items:
                ok = isinstance(v, bool) is False and (isinstance(v, want) or (want is float and isinstance(v, int)))
                if not ok or (isinstance(value, list) and not listy):
                    kind = {int: "an integer", float: "a number", str: "a string"}.get(want, "a string")
                    raise Phi3Error(f"{path}: {stage}.{key} must be {kind}{' or a list of them' if listy else ''}, "
                                    f"not {value!r}")
            if not action.option_strings:  # ingest's inputs
                positional += [str(v) for v in items]
            elif isinstance(action, argparse._AppendAction):
                for v in items:
                    argv += [action.option_strings[0], str(v)]
            else:
                argv += [action.option_strings[0], ",".join(str(v) for v in items)]
        if stage == "ingest" and not positional:
            raise Phi3Error(f"{path}: [ingest] needs inputs = [\"...\"] (WARC/WET, HTML folders, jsonl/parquet)")
        given = set(raw[stage])
        if stage == "classify" and "judgments" not in given:
            if "judge" not in stages:
                raise Phi3Error(f"{path}: [classify] needs the judge's scores: add a [judge] table or judgments = \"...\"")
            argv += ["--judgments", str(out / "judge")]
            given.add("judgments")
        if stage == "phases" and "synthetic" in stages and "synthetic" not in given:
            argv += ["--synthetic", str(out / "synthetic")]
        for key, action in keys.items():
            if action.required and action.option_strings and key not in given:
                raise Phi3Error(f"{path}: [{stage}] needs {key} = ... ({action.help})")
        if stage == "ingest":
            argv += positional
        elif stage == "phases":
            if "classify" not in stages:
                raise Phi3Error(f"{path}: [phases] splits the classifier's scores: add a [classify] table")
            argv += [str(out / "classify")]
        elif stage != "synthetic":
            argv += [str(previous)]
        argv += ["--out", str(out / stage)]
        if "--executor" in _option_strings(parser, stage):
            argv += common
        argvs.append(argv)
        if stage in DOC_STAGES:
            previous = out / stage
    return {"out": str(out), "stages": stages}, argvs


def run_recipe(args: argparse.Namespace) -> list[dict]:
    info, argvs = load_recipe(Path(args.recipe))
    parser = build_parser()
    parsed = [parser.parse_args(a + (["--verbose"] if args.verbose else [])) for a in argvs]  # all checked first
    summaries = []
    for stage_args in parsed:
        summary = dispatch(stage_args)
        _print(summary, args.json)
        summaries.append(summary)
    return summaries


def dispatch(args: argparse.Namespace) -> dict:
    if args.stage == "judge":
        return run_judge_stage(args)
    if args.stage == "synthetic":
        return run_synthetic_stage(args)
    return run(args)


def _endpoint(args: argparse.Namespace, temperature: float):
    import os

    from phi3.judge import Endpoint, chat_endpoint
    chat_endpoint(args.url)  # a bad URL is refused before anything is read
    key = os.environ.get("OPENAI_API_KEY")
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise Phi3Error(f"--api-key-file {args.api_key_file}: cannot read it ({e.strerror})") from None
    return Endpoint(args.url, args.model, api_key=key or None, max_tokens=args.max_tokens, temperature=temperature)


def run_judge_stage(args: argparse.Namespace) -> dict:
    from phi3.recipe.judge import run_judge
    return run_judge(Path(args.input), Path(args.out), _endpoint(args, 0.0), args.sample, args.seed,
                     progress=not args.no_progress, max_chars=args.max_chars, prompt=args.prompt,
                     scoring=args.scoring, method=args.method, shots=args.shots, ask=args.ask)


def run_synthetic_stage(args: argparse.Namespace) -> dict:
    from phi3.recipe.synth import run_synthetic
    if not 0 <= args.temperature <= 2:
        raise Phi3Error(f"--temperature {args.temperature} is not in [0, 2]")
    try:
        topics = [t.strip() for t in Path(args.topics).read_text(encoding="utf-8").splitlines() if t.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise Phi3Error(f"--topics {args.topics}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    return run_synthetic(Path(args.out), _endpoint(args, args.temperature), topics, split(args.audiences),
                         split(args.styles), args.n, args.seed, args.batch, progress=not args.no_progress)


def _options(args: argparse.Namespace):
    from phi3.recipe.pipeline import ExecOptions, check_options
    opts = ExecOptions(kind=args.executor, tasks=args.tasks, workers=args.workers, ray_address=args.ray_address,
                       slurm_partition=args.slurm_partition, slurm_time=args.slurm_time, slurm_venv=args.slurm_venv,
                       verbose=args.verbose)
    check_options(opts)
    return opts


def run(args: argparse.Namespace) -> dict:
    """Run one stage; returns its summary."""
    from phi3.recipe.pipeline import run_stage
    opts = _options(args)
    out = Path(args.out)
    if args.stage == "ingest":
        from phi3.recipe.ingest import ingest_steps
        if args.source and len(args.source) != len(args.inputs):
            raise Phi3Error(f"{len(args.source)} --source names for {len(args.inputs)} inputs; give one per input")
        steps = ingest_steps([Path(i) for i in args.inputs], args.text_key, args.id_key, args.source, opts.tasks)

        def summarize(work: Path) -> dict:
            from phi3.recipe.pipeline import step_stats
            per = {}
            for s in steps:
                blocks = step_stats(work, s.name)
                per[s.name.removeprefix("ingest-")] = {
                    "read": next((b["stats"].get("documents", 0) for b in blocks if "documents" in b["stats"]), 0),
                    "written": blocks[-1]["stats"].get("total", 0) if blocks else 0}
            return {"sources": per, "documents_out": sum(v["written"] for v in per.values())}
        return run_stage("ingest", out, steps, opts, summarize)
    src = Path(args.input)
    if args.stage == "heuristics":
        from phi3.recipe.filters import heuristics_steps, summarize_filters
        filters = tuple(x.strip() for x in args.filters.split(",") if x.strip())
        steps = heuristics_steps(src, [x.strip() for x in args.languages.split(",") if x.strip()],
                                 args.language_threshold, filters)
        return run_stage("heuristics", out, steps, opts, lambda w: summarize_filters(w, "heuristics", filters))
    if args.stage == "dedup":
        from phi3.recipe.dedup import dedup_steps, minhash_config, summarize_dedup
        cfg = minhash_config(args.ngrams, args.buckets, args.hashes_per_bucket, args.seed)
        return run_stage("dedup", out, dedup_steps(src, cfg, opts.tasks), opts, summarize_dedup)
    if args.stage == "decontaminate":
        from phi3.recipe.decont import decont_steps, shutil_rm, summarize_decont
        only = [x.strip() for x in args.benchmarks.split(",") if x.strip()] if args.benchmarks else None
        steps, cfg, built = decont_steps(src, Path(args.data_dir), args.ngrams, only)
        try:
            return run_stage("decontaminate", out, steps, opts, lambda w: summarize_decont(w, cfg))
        finally:
            shutil_rm(built)
    if args.stage == "classify":
        from phi3.recipe.classify import classify_steps, summarize_classify, train_head
        if (out / "summary.json").is_file():
            return run_stage("classify", out, [], opts)
        head = train_head(src, Path(args.judgments), args.embedder, args.threshold, args.holdout, args.seed, args.alpha)
        return run_stage("classify", out, classify_steps(src, head), opts, summarize_classify)
    if args.stage == "phases":
        from phi3.recipe.phases import phases_steps, summarize_phases
        syn = Path(args.synthetic) if args.synthetic else None
        steps = phases_steps(src, args.t1, args.t2, args.tokenizer, args.eos, syn, args.seed)
        return run_stage("phases", out, steps, opts, lambda w: summarize_phases(w, out, args.t1, args.t2, syn is not None))
    from phi3.recipe.tokens import summarize_tokens, tokenize_steps
    steps = tokenize_steps(src, args.tokenizer, args.eos, args.seed, args.max_tokens_per_file)
    return run_stage("tokenize", out, steps, opts, summarize_tokens)


def _print(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=1, ensure_ascii=False))
        return
    if "skipped" in summary:
        print(summary["skipped"])
        return
    if "note" in summary:
        print(summary["note"])
        return
    stage = summary.get("stage")
    line = f"{stage}: "
    if "documents_in" in summary:
        line += f"{summary['documents_in']} documents in, "
    if "documents_out" in summary:
        line += f"{summary['documents_out']} out"
    if isinstance(summary.get("tokens"), int):
        line += f"{summary['tokens']:,} tokens in {len(summary['shards'])} shards"
    elif isinstance(summary.get("tokens"), dict):
        line += "; tokens: " + ", ".join(f"{k} {v:,}" for k, v in summary["tokens"].items())
    print(line.rstrip(", "))
    for name, r in (summary.get("removed") or {}).items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted((r.get("reasons") or {}).items(), key=lambda kv: -kv[1]))
        print(f"  {name}: removed {r.get('dropped', 0)}" + (f" ({reasons})" if reasons else ""))
    if "histogram" in summary:
        print(f"  scores {' '.join(f'{k}:{v}' for k, v in summary['histogram'].items())}"
              + (f", unparsable {summary['unparsable']}" if "unparsable" in summary else ""))
    if "heldout_f1" in summary:
        print(f"  held out ({summary['heldout']} judged documents) at score >= {summary['threshold']}: precision "
              f"{summary['heldout_precision']:.3f} recall {summary['heldout_recall']:.3f} F1 {summary['heldout_f1']:.3f}")
    for hit in summary.get("hits", []):
        print(f"  hit: {hit['id']} shares {hit['ngram']!r} with {hit['task']} ({hit['benchmark_record']})")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help (0) or a usage error, already printed as one line (2)
        return int(e.code or 0)
    try:
        if args.stage == "run":
            run_recipe(args)
        elif args.stage == "report":
            from phi3.recipe.report import write_report
            summary = write_report([Path(p) for p in args.stages], Path(args.out))
            print(json.dumps(summary) if args.json else f"report: {summary['report']} ({', '.join(summary['stages'])})")
        else:
            _print(dispatch(args), args.json)
        return 0
    except Phi3Error as e:
        print(f"phi3: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # datatrove or one of its extras is not installed
        print(f"phi3: error: `phi3 data {args.stage}` needs {e.name}: pip install 'phi3[data]'"
              f"{' (or phi3[data-ray] for --executor ray)' if e.name == 'ray' else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
