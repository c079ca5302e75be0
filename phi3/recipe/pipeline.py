"""Stage folders, executors and stats: what every `phi3 data` stage shares.

A stage writes into `OUT.partial/` and renames it to `OUT` only when every task of every step has
finished, so `OUT` is never half written:

    OUT/docs/*.jsonl.gz            the documents kept (what the next stage reads)
    OUT/removed/<filter>/*.jsonl.gz  what each filter dropped (datatrove's exclusion writers)
    OUT/tokens/*.ds{,.index,.metadata}  the tokenize stage's shards
    OUT/logs/<step>/               datatrove's logging_dir: completions/, stats/, logs/
    OUT/summary.json               documents in and out, and what each filter removed

A killed stage resumes when rerun with the same command: datatrove marks each finished task in
`logs/<step>/completions/` and skips it (a rerun task rewrites its own output files from the start).
A stage whose OUT already exists is not run again.

Executors: datatrove's LocalPipelineExecutor (default), RayPipelineExecutor (a local Ray started
here with ray.init(num_cpus=workers), or --ray-address of a running cluster) and
SlurmPipelineExecutor (submits sbatch jobs and returns; rerun the command once they finish to
publish OUT).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from phi3.errors import Phi3Error

EXECUTORS = ("local", "ray", "slurm")
TERMINAL = None  # the real stderr while _quiet sends datatrove's log to a file: progress bars go there


@dataclass
class ExecOptions:
    kind: str = "local"
    tasks: int = 1  # datatrove tasks (ranks); input files are split among them
    workers: int = 1  # tasks run at once (local processes / Ray CPUs); 1 runs in this process
    ray_address: str | None = None
    slurm_partition: str | None = None
    slurm_time: str = "04:00:00"
    slurm_cpus_per_task: int = 1
    slurm_mem_per_cpu_gb: int = 2
    slurm_venv: str | None = None
    slurm_sbatch_args: dict = field(default_factory=dict)
    verbose: bool = False  # datatrove's console log on stderr; else it goes to logs/<step>/console.log only


@dataclass
class Step:
    """One datatrove run: `pipeline(work_dir)` builds its steps, run on `tasks` ranks."""
    name: str
    pipeline: Callable[[Path], list]
    tasks: int | None = None  # None: the executor's --tasks
    local_only: bool = False  # runs in this process whatever the executor (MinHash's single cluster task is cheap)
    total: int | None = None  # documents the step reads, when known: its progress bar's total (one task only)


def check_options(opts: ExecOptions) -> None:
    if opts.kind not in EXECUTORS:
        import difflib
        close = difflib.get_close_matches(opts.kind, EXECUTORS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise Phi3Error(f"--executor {opts.kind!r} is not one of {', '.join(EXECUTORS)}{hint}")
    if opts.tasks < 1 or opts.workers < 1:
        raise Phi3Error(f"--tasks {opts.tasks} and --workers {opts.workers} must be at least 1")
    if opts.kind == "slurm" and not opts.slurm_partition:
        raise Phi3Error("--executor slurm needs --slurm-partition (the partition sbatch submits to)")
    if opts.kind == "slurm" and not shutil.which("sbatch"):
        raise Phi3Error("--executor slurm needs Slurm's sbatch on PATH: run `phi3 data` on the cluster's login node")


def _executor(opts: ExecOptions, pipeline: list, tasks: int, logging_dir: Path, depends: Any = None) -> Any:
    if opts.kind == "local":
        from datatrove.executor import LocalPipelineExecutor
        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(opts.workers, tasks),
                                     logging_dir=str(logging_dir), skip_completed=True)
    if opts.kind == "ray":
        import ray
        from datatrove.executor import RayPipelineExecutor
        if not ray.is_initialized():
            if opts.ray_address:
                ray.init(address=opts.ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=opts.workers, include_dashboard=False, log_to_driver=False)
        return RayPipelineExecutor(pipeline, tasks=tasks, workers=min(opts.workers, tasks),
                                   logging_dir=str(logging_dir), skip_completed=True, cpus_per_task=1)
    from datatrove.executor import SlurmPipelineExecutor
    return SlurmPipelineExecutor(pipeline, tasks=tasks, time=opts.slurm_time, partition=opts.slurm_partition,
                                 cpus_per_task=opts.slurm_cpus_per_task, mem_per_cpu_gb=opts.slurm_mem_per_cpu_gb,
                                 workers=opts.workers if opts.workers > 1 else -1, logging_dir=str(logging_dir),
                                 job_name=f"phi3-data-{logging_dir.name}", depends=depends,
                                 venv_path=opts.slurm_venv, sbatch_args=opts.slurm_sbatch_args or None,
                                 skip_completed=True)


def _completed(logging_dir: Path, tasks: int) -> int:
    done = logging_dir / "completions"
    return sum((done / f"{r:05d}").exists() for r in range(tasks)) if done.is_dir() else 0


def _first_error(logging_dir: Path) -> str:
    """The first ERROR line datatrove logged for any task (its messages reach us only there)."""
    logs = sorted((logging_dir / "logs").glob("task_*.log")) if (logging_dir / "logs").is_dir() else []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if "| ERROR" in line or "Error:" in line:
                return line.split(" - ", 1)[-1].strip()
    return ""


def run_stage(name: str, out: Path, steps: list[Step], opts: ExecOptions,
              summarize: Callable[[Path], dict] | None = None) -> dict:
    """Run `steps` in order into OUT.partial, then publish it as OUT with summary.json."""
    out = Path(out)
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        summary["skipped"] = f"{out} exists (delete it to run {name} again)"
        return summary
    if out.exists():
        raise Phi3Error(f"{out} exists but is not a finished `phi3 data` stage folder; delete it or pick another --out")
    check_options(opts)
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    previous = None
    pending = []
    for step in steps:
        tasks = step.tasks or opts.tasks
        logging_dir = work / "logs" / step.name
        kind = ExecOptions(**{**opts.__dict__, "kind": "local"}) if step.local_only and opts.kind != "slurm" else opts
        from phi3.recipe.progress import with_progress
        blocks = with_progress(step.pipeline(work), f"{name} {step.name}" if step.name != name else name, step.total)
        executor = _executor(kind, blocks, tasks, logging_dir, depends=previous)
        try:
            if opts.verbose:
                executor.run()
            else:
                logging_dir.mkdir(parents=True, exist_ok=True)
                with _quiet(logging_dir / "console.log"):
                    executor.run()
        except Phi3Error:
            raise
        except Exception as e:  # a task failed: datatrove logs why; the finished tasks are kept
            why = _first_error(logging_dir) or f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise Phi3Error(f"{name}: step {step.name} failed ({why}); {_completed(logging_dir, tasks)} of {tasks} "
                            f"tasks finished and are kept in {work}: fix the cause and rerun the same command") from None
        if opts.kind == "slurm":
            previous = executor
        done = _completed(logging_dir, tasks)
        if done < tasks:
            pending.append(f"{step.name} {done}/{tasks}")
    if pending:
        if opts.kind == "slurm":
            return {"stage": name, "submitted": pending,
                    "note": f"jobs submitted; rerun the same command once they finish to publish {out}"}
        raise Phi3Error(f"{name}: unfinished tasks ({', '.join(pending)}) in {work}; rerun the same command to resume")
    summary = {"stage": name, **(summarize(work) if summarize else {})}
    if summary.get("documents_out") == 0 and summary.get("documents_in", 1) > 0:
        clean(work)  # a finished but empty stage is not worth resuming: leave nothing behind
        removed = ", ".join(f"{k} {v.get('dropped', 0)}" for k, v in (summary.get("removed") or {}).items())
        raise Phi3Error(f"{name} kept none of its {summary.get('documents_in')} documents"
                        f"{f' (removed: {removed})' if removed else ''}; loosen its settings or check the input")
    for meta in work.rglob("*.ds.metadata"):  # datatrove names the tokenizer by its path, here under OUT.partial
        meta.write_text(meta.read_text().replace(str(work), str(out)))
    _write_json(work / "summary.json", summary)
    os.replace(work, out)  # atomic on one filesystem: OUT appears whole or not at all
    return summary


@contextlib.contextmanager
def _quiet(log: Path):
    """datatrove logs every task to stderr (each also to its own file in logs/): send that to `log`,
    both Python's sys.stderr (loguru's sink) and file descriptor 2 (worker processes inherit it),
    so that a failing stage ends in our one error line."""
    global TERMINAL
    saved = os.dup(2)
    TERMINAL = os.fdopen(os.dup(saved), "w")
    with open(log, "a") as f:
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stderr(f):
                yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            TERMINAL.close()
            TERMINAL = None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def step_stats(work: Path, step: str) -> list[dict]:
    """datatrove's per-task stats of one step, summed over tasks: one dict per pipeline block, in
    order, {"name": block name, "stats": {metric: total}}."""
    files = sorted((work / "logs" / step / "stats").glob("*.json"))
    blocks: list[dict] = []
    for f in files:
        for i, block in enumerate(json.loads(f.read_text())):
            if i == len(blocks):
                blocks.append({"name": block["name"], "stats": {}})
            for metric, value in (block.get("stats") or {}).items():
                total = value.get("total", value) if isinstance(value, dict) else value
                if isinstance(total, (int, float)) and not isinstance(total, bool):
                    blocks[i]["stats"][metric] = blocks[i]["stats"].get(metric, 0) + total
    return blocks


def clean(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
