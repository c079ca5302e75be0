"""Decode speed of SmolLM2-135M-Instruct on CPU: phi3 against transformers.

Run it from the repository root with the project's virtualenv (`make bench` does exactly this):

    .venv/bin/python benchmarks/bench_decode.py --write BENCHMARKS.md

Engines, each in float32 and bfloat16:

  phi3                phi3.checkpoint.load(GGUF) + phi3.generate.generate
  transformers-gguf   AutoModelForCausalLM.from_pretrained(dir, gguf_file=name) + generate
  transformers-dense  the Hugging Face folder `phi3 convert GGUF DIR` writes, + generate

Every engine gets the same prompt token ids (the chat-templated prompt, encoded by phi3's
tokenizer), the same thread count, greedy decoding and no stop tokens, so each run produces
exactly the number of tokens asked for. Generating 1 token costs the prefill (plus one sampling
step); generating N costs the prefill plus N-1 decode steps, so

    decode tok/s = (N - 1) / (t_N - t_1)

excludes the prefill. Each figure is the median over --repeats runs, after a warm-up run.
Every engine+dtype runs in a fresh subprocess (this script with the hidden `--worker ENGINE
DTYPE` flag, which prints one JSON line) so that one engine's memory, thread pools and caches
cannot affect another's numbers. On a small machine other processes' CPU use ruins the numbers
(on 2 cores, one busy core made decode 6x slower), so the script measures it from /proc/stat
around every worker, reruns a disturbed engine+dtype up to --retries times, and reports it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

ENGINES = ("phi3", "transformers-gguf", "transformers-dense")
DTYPES = ("float32", "bfloat16")
PROMPT = "Write a long story about a dragon."
START_MARK = "<!-- bench_decode:start -->"
END_MARK = "<!-- bench_decode:end -->"
BUSY_WARNING = 0.05  # background CPU share above which a run is flagged as disturbed

# A generate call: (prompt ids, number of new tokens) -> number of tokens it produced.
GenerateFn = Callable[[list[int], int], int]


@dataclass
class Result:
    engine: str
    dtype: str
    prefill_ms: float | None = None
    decode_tok_s: float | None = None
    error: str | None = None
    background_load: float = 0.0  # share of all CPUs busy with other processes during the run


# --- Worker side: one engine, one dtype, in its own process ---------------------------------------

def _describe_weights(model: torch.nn.Module) -> None:
    """Say on stderr how the weights are held (module class / dtype), so a GGUF path that keeps
    them quantized, or dequantizes them, is visible next to its numbers."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if list(module.children()):
            continue
        # Packed layers may keep their blocks in a buffer or under another name than `weight`.
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if tensors:
            key = f"{type(module).__name__}/{str(tensors[0].dtype).removeprefix('torch.')}"
            counts[key] = counts.get(key, 0) + 1
    print("  weights: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())), file=sys.stderr)


def _phi3_generate_fn(model_path: Path, dtype: str) -> GenerateFn:
    from phi3.checkpoint import load
    from phi3.generate import SamplingParams, generate

    lm = load(model_path, dtype=dtype)
    _describe_weights(lm.model)

    def run(prompt_ids: list[int], n: int) -> int:
        # Empty stop_ids: the model may emit EOS early, and we want exactly n tokens every time.
        out = generate(lm.model, lm.tokenizer, [prompt_ids], SamplingParams(max_new_tokens=n), stop_ids=set())
        return len(out[0].token_ids)

    return run


def _transformers_generate_fn(folder: Path, gguf_file: str | None, dtype: str) -> GenerateFn:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep warnings readable; the bars say nothing we report
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype), **kwargs).eval()
    _describe_weights(model)
    pad_id = model.generation_config.pad_token_id
    if pad_id is None:  # otherwise generate warns on every call that it picks one itself
        eos = model.generation_config.eos_token_id
        pad_id = eos[0] if isinstance(eos, list) else eos

    def run(prompt_ids: list[int], n: int) -> int:
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        with torch.inference_mode():
            # min_new_tokens = max_new_tokens suppresses EOS, so exactly n tokens come out.
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 min_new_tokens=n, max_new_tokens=n, pad_token_id=pad_id)
        return out.shape[1] - ids.shape[1]

    return run


def _timed(fn: GenerateFn, prompt_ids: list[int], n: int) -> float:
    start = time.perf_counter()
    produced = fn(prompt_ids, n)
    elapsed = time.perf_counter() - start
    if produced != n:  # a short run would inflate tokens/s silently
        raise RuntimeError(f"asked for {n} new tokens, got {produced}")
    return elapsed


def run_worker(engine: str, dtype: str, args: argparse.Namespace) -> dict:
    import torch

    # Before loading: some libraries size their thread pools on first use.
    torch.set_num_threads(args.threads)
    prompt_ids = [int(x) for x in args.prompt_ids.split(",")]
    model_path = Path(args.model)
    if engine == "phi3":
        fn = _phi3_generate_fn(model_path, dtype)
    elif engine == "transformers-gguf":
        fn = _transformers_generate_fn(model_path.parent, model_path.name, dtype)
    elif engine == "transformers-dense":
        fn = _transformers_generate_fn(Path(args.dense_dir), None, dtype)
    else:
        raise ValueError(f"unknown engine {engine!r}")

    n = args.new_tokens
    # Warm-up: first calls pay for lazy initialisation (oneDNN primitives, allocator growth).
    _timed(fn, prompt_ids, n)
    prefill, decode = [], []
    for _ in range(args.repeats):
        t1 = _timed(fn, prompt_ids, 1)
        tn = _timed(fn, prompt_ids, n)
        prefill.append(t1)
        decode.append((n - 1) / (tn - t1))
    return {"engine": engine, "dtype": dtype, "threads": torch.get_num_threads(),
            "prefill_ms": statistics.median(prefill) * 1000, "decode_tok_s": statistics.median(decode)}


# --- Parent side: prepare inputs, spawn workers, report --------------------------------------------

def prompt_token_ids(model_path: Path) -> list[int]:
    """The chat-templated prompt, encoded by phi3's tokenizer (read from the GGUF, no weights)."""
    from phi3.checkpoint import gguf_fields, open_gguf
    from phi3.tokenizer import tokenizer_from_gguf

    fields = gguf_fields(open_gguf(model_path))
    tokenizer = tokenizer_from_gguf(fields, fields["general.architecture"])
    return tokenizer.encode_chat([{"role": "user", "content": PROMPT}])


def phi3_command() -> list[str]:
    """The venv's `phi3` script, next to this interpreter; the module as a fallback."""
    script = Path(sys.executable).parent / "phi3"
    if script.exists():
        return [str(script)]
    found = shutil.which("phi3")
    return [found] if found else [sys.executable, "-m", "phi3.cli"]


def convert_to_dense(model_path: Path, out_dir: Path) -> None:
    subprocess.run(phi3_command() + ["convert", str(model_path), str(out_dir)], check=True,
                   stdout=subprocess.DEVNULL)


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have spent busy since boot (0 if unknown)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def spawn_worker(engine: str, dtype: str, args: argparse.Namespace, prompt_ids: list[int],
                 dense_dir: Path | None) -> Result:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, dtype,
           "--model", str(args.model), "--threads", str(args.threads),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--prompt-ids", ",".join(map(str, prompt_ids))]
    if dense_dir is not None:
        cmd += ["--dense-dir", str(dense_dir)]
    # stderr passes through so library warnings stay visible; stdout carries the JSON line.
    # TQDM_DISABLE silences transformers' legacy GGUF loader bar, which ignores its own switch.
    env = {**os.environ, "TQDM_DISABLE": "1"}
    # With only a few cores, anything else running wrecks the numbers (a descheduled thread
    # stalls every parallel matmul), so measure how much CPU others used meanwhile and say so.
    busy0, ours0, wall0 = machine_busy_seconds(), children_cpu_seconds(), time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    others = (machine_busy_seconds() - busy0) - (children_cpu_seconds() - ours0)
    background = max(0.0, others / ((time.monotonic() - wall0) * (os.cpu_count() or 1)))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return Result(engine, dtype, error=f"worker exited with {proc.returncode}", background_load=background)
    data = json.loads(lines[-1])
    if background > BUSY_WARNING:
        print(f"  warning: other processes kept {background:.0%} of the CPUs busy during this run; "
              f"its numbers are not trustworthy", file=sys.stderr)
    return Result(engine, dtype, data["prefill_ms"], data["decode_tok_s"], background_load=background)


def measure(engine: str, dtype: str, args: argparse.Namespace, prompt_ids: list[int],
            dense_dir: Path | None) -> Result:
    """One engine+dtype, rerun (up to --retries times) while other processes disturb it: on a
    shared 2-core machine a burst of background work can cut throughput several times over."""
    best: Result | None = None
    for attempt in range(args.retries + 1):
        print(f"running {engine} {dtype}" + (f" (retry {attempt})" if attempt else "") + " ...", file=sys.stderr)
        result = spawn_worker(engine, dtype, args, prompt_ids, dense_dir)
        if result.error:
            return result  # a crash is not noise: running it again will not help
        if best is None or result.background_load < best.background_load:
            best = result
        if best.background_load <= BUSY_WARNING:
            break
    assert best is not None
    return best


def results_table(results: list[Result]) -> str:
    phi3_rate = {r.dtype: r.decode_tok_s for r in results if r.engine == "phi3" and r.decode_tok_s}
    rows = ["| engine | dtype | prefill ms | decode tok/s | ratio phi3 / engine |",
            "|---|---|---:|---:|---:|"]
    for r in results:
        if r.error:
            rows.append(f"| {r.engine} | {r.dtype} | failed | failed | n/a |")
            continue
        base = phi3_rate.get(r.dtype)
        ratio = f"{base / r.decode_tok_s:.2f}" if base else "n/a"
        rows.append(f"| {r.engine} | {r.dtype} | {r.prefill_ms:.1f} | {r.decode_tok_s:.1f} | {ratio} |")
    return "\n".join(rows)


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    # bfloat16 speed on CPU hinges on these instructions, so name the ones present.
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flags and f in flags.group(1).split()]
    name = match.group(1).strip() if match else platform.machine()
    return f"{name} ({', '.join(isa)})" if isa else name


def machine_line() -> str:
    import torch
    import transformers
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"transformers {transformers.__version__}")


def report_section(command: str, args: argparse.Namespace, prompt_len: int, table: str,
                   background: float) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        START_MARK,
        f"Command: `{command}`",
        "",
        f"- Date: {date}",
        f"- Machine: {machine_line()}",
        f"- Model: {Path(args.model).name}; prompt of {prompt_len} tokens (chat template, \"{PROMPT}\"); "
        f"{args.new_tokens} new tokens, greedy, no stop tokens; {args.threads} threads; "
        f"median of {args.repeats} runs after a warm-up",
        f"- decode tok/s = ({args.new_tokens} - 1) / (t({args.new_tokens} tokens) - t(1 token)); "
        f"prefill ms = t(1 token)",
        f"- Other processes' CPU use during the runs: at most {background:.0%} of the machine",
        "",
        table,
        END_MARK,
    ])


def write_section(path: Path, section: str) -> None:
    """Replace the delimited section in place, or append it, leaving the rest of the file alone."""
    text = path.read_text() if path.exists() else ""
    start, end = text.find(START_MARK), text.find(END_MARK)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(END_MARK):]
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + section + "\n"
    path.write_text(text)


def run_all(args: argparse.Namespace) -> int:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    prompt_ids = prompt_token_ids(Path(args.model))
    print(f"model {args.model}, prompt {len(prompt_ids)} tokens, {args.new_tokens} new tokens, "
          f"{args.threads} threads, {args.repeats} repeats", file=sys.stderr)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        dense_dir = None
        if "transformers-dense" in engines:
            # float32 (convert's default) holds the exact dequantized values; bfloat16 runs cast at load.
            dense_dir = Path(tmp) / "dense"
            convert_to_dense(Path(args.model), dense_dir)
        for engine in engines:
            for dtype in dtypes:
                results.append(measure(engine, dtype, args, prompt_ids, dense_dir))
    table = results_table(results)
    print(table)
    if any(r.error for r in results):
        print("some runs failed; not writing the report", file=sys.stderr)
        return 1
    if args.write:
        command = "python " + shlex.join(sys.argv)
        write_section(Path(args.write), report_section(command, args, len(prompt_ids), table,
                                                          max(r.background_load for r in results)))
        print(f"wrote the bench_decode section of {args.write}", file=sys.stderr)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the cached SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every engine (default 2)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per timed run (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma list of {', '.join(DTYPES)}")
    p.add_argument("--retries", type=int, default=2,
                   help="reruns of an engine+dtype disturbed by other processes' CPU use (default 2)")
    p.add_argument("--write", default=None, metavar="FILE",
                   help="replace (or append) the bench_decode section of this markdown file")
    # Internal: how the parent starts one measurement in a fresh process.
    p.add_argument("--worker", nargs=2, metavar=("ENGINE", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    p.add_argument("--dense-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed is measured against a 1-token run)")
    if args.repeats < 1 or args.threads < 1 or args.retries < 0:
        p.error("--repeats and --threads must be at least 1, --retries at least 0")
    for name, given, allowed in (("--engines", args.engines, ENGINES), ("--dtypes", args.dtypes, DTYPES)):
        unknown = [x for x in given.split(",") if x.strip() and x.strip() not in allowed]
        if unknown:
            p.error(f"{name}: unknown {', '.join(unknown)} (choose from {', '.join(allowed)})")
    if args.model is None:
        from phi3.checkpoint import resolve_model_path
        args.model = str(resolve_model_path(None))  # fetches the default model if it is missing
    elif not Path(args.model).is_file():
        p.error(f"--model: no such GGUF file: {args.model}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(*args.worker, args)), flush=True)
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
