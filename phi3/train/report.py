"""What a training run shows: `metrics.jsonl` read back (checked line by line), `metrics.png` with
loss, learning-rate and throughput panels (and DPO's rewards when the run logged them), and an
optional TensorBoard writer.

metrics.jsonl holds one JSON object per logged optimizer step, written by rank 0 of the trainer:
`step` (int, required), and numbers such as `loss`, `lr`, `tokens` (tokens seen so far),
`tokens_per_s`, `grad_norm`, `elapsed` (seconds), `phase` (its name), plus TRL's DPO names (`rewards/chosen`,
`rewards/rejected`, `rewards/margins`, `rewards/accuracies`) in the dpo stage. Other keys are kept
and ignored by the plot.

The PNG is drawn with matplotlib's object API (`matplotlib.figure.Figure`, which renders with Agg)
rather than pyplot, so plotting never switches the process-wide backend or needs a display.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from phi3.errors import Phi3Error

DPO_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in step order. A step logged twice (a run resumed from a
    checkpoint older than its last logged step logs those steps again) keeps its LAST record: that
    is the one the continuing run produced. Blank lines are skipped; any other line that is not a
    JSON object with an integer `step` and numeric values for the known keys raises Phi3Error
    naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise Phi3Error(f"no metrics file at {path}; a training run writes DIR/metrics.jsonl")
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise Phi3Error(f"{where} is not valid JSON ({e.msg}); each line must be one JSON object "
                                f"(a run killed mid-write leaves a torn last line: delete it)") from None
            if not isinstance(record, dict):
                raise Phi3Error(f"{where} holds a JSON {type(record).__name__}, not an object with a 'step'")
            step = record.get("step")
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise Phi3Error(f"{where}: 'step' is {step!r}, not a non-negative integer")
            for key in ("loss", "lr", "tokens", "tokens_per_s", "grad_norm", "elapsed") + DPO_KEYS:
                if key in record and not _number(record[key]):
                    raise Phi3Error(f"{where}: {key!r} is {record[key]!r}, not a number")
            by_step[step] = record
    return [by_step[s] for s in sorted(by_step)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if v is not None and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def phase_starts(records: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(first step, phase name) of each run of equal `phase` values, in step order."""
    out: list[tuple[int, str]] = []
    for r in records:
        name = r.get("phase")
        if isinstance(name, str) and (not out or out[-1][1] != name):
            out.append((r["step"], name))
    return out


def plot_metrics(metrics: str | Path, out: str | Path | None = None, title: str | None = None) -> Path:
    """Draw metrics.jsonl (`metrics`) as a PNG (default: metrics.png beside it) with panels for the
    loss, the learning rate and the throughput (tokens/s), plus a DPO rewards panel when the run
    logged rewards. Written to a temporary file in the same folder and renamed over `out`, so a
    kill mid-draw never leaves a truncated PNG. Returns the PNG's path."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    metrics = Path(metrics)
    out = Path(out) if out is not None else metrics.with_name("metrics.png")
    records = read_metrics(metrics)
    if not records:
        raise Phi3Error(f"{metrics} has no records to plot; it fills as the run logs steps")
    dpo = any(k in r for r in records for k in DPO_KEYS)
    panels = 4 if dpo else 3
    fig = Figure(figsize=(6.4, 2.2 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, sharex=True)
    fig.suptitle(title or f"{metrics.parent.name or metrics.name}")

    xs, ys = _series(records, "loss")
    axes[0].plot(xs, ys, color="tab:blue", linewidth=1)
    axes[0].set_ylabel("loss")
    # Loss spans orders of magnitude over a run (10 at init, < 0.05 memorised): log scale keeps the
    # tail readable.
    if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        axes[0].set_yscale("log")
    xs, ys = _series(records, "lr")
    axes[1].plot(xs, ys, color="tab:orange", linewidth=1)
    axes[1].set_ylabel("learning rate")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    xs, ys = _series(records, "tokens_per_s")
    axes[2].plot(xs, ys, color="tab:green", linewidth=1)
    axes[2].set_ylabel("tokens/s")
    if dpo:
        for key, color in zip(DPO_KEYS, ("tab:green", "tab:red", "tab:purple", "tab:gray")):
            xs, ys = _series(records, key)
            if xs:
                axes[3].plot(xs, ys, color=color, linewidth=1, label=key.removeprefix("rewards/"))
        axes[3].set_ylabel("DPO rewards")
        axes[3].legend(fontsize="small", loc="best")
    axes[-1].set_xlabel("optimizer step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no 2.5 on short runs
    for ax in axes:
        ax.grid(True, alpha=0.3)
    # Where a pretraining phase starts (records carry "phase" when the recipe has several): the
    # loss often jumps there as the new mixture arrives.
    for step, name in phase_starts(records)[1:]:
        for ax in axes:
            ax.axvline(step - 0.5, color="gray", linestyle="--", linewidth=0.8)
        axes[0].annotate(name, (step - 0.5, 1), xycoords=("data", "axes fraction"), xytext=(3, -3),
                         textcoords="offset points", va="top", fontsize="small", color="gray")

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".metrics-", suffix=".png", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


class TensorBoardLogger:
    """Scalars to TensorBoard through torch.utils.tensorboard (needs the `tensorboard` package).
    Every numeric key of a record but `step` becomes a scalar at that step."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and _number(value) and value is not None:
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def tensorboard_logger(log_dir: str | Path, quiet: bool = False) -> TensorBoardLogger | None:
    """A TensorBoardLogger writing event files under `log_dir`, or None with a one-line note on
    stderr when `tensorboard` is not installed (TensorBoard is optional: metrics.jsonl and
    metrics.png are always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises ImportError when the tensorboard package is absent
        if not quiet:
            print("phi3: tensorboard is not installed; no TensorBoard logs (pip install tensorboard); "
                  "metrics.jsonl and metrics.png are still written", file=sys.stderr)
        return None
    return TensorBoardLogger(SummaryWriter(log_dir=str(log_dir)))
