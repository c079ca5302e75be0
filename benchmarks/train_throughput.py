"""Training throughput (tokens/s) and peak RSS of `phi3 train` against HF Trainer, litgpt and
nanoGPT's train.py, on the same token stream, shapes, seq len, micro-batch, threads and steps.

    .venv/bin/python benchmarks/train_throughput.py --quick --write TRAINING.md   # < 8 min, quiet machine
    .venv/bin/python benchmarks/train_throughput.py --write TRAINING.md           # more rounds and steps

Models (vocabulary 49,152, the SmolLM2 tokenizer's, for every trainer):
  phi3-shape    phi-3-mini resized to 4 layers x 512 hidden, 8 heads (no GQA), SwiGLU 1376
                (8/3 x 512, so an MLP holds as many weights as GPT-2's 4x MLP), untied head; random init.
                nanoGPT runs the GPT-2 block of the same width/depth (bias=False, tied head: its
                code always ties).
  smollm2-135m  the fetched SmolLM2-135M GGUF converted to float32 (`phi3 convert`) for phi3 and HF
                Trainer; litgpt's SmolLM2-135M config with random init; nanoGPT 30 x 576, 9 heads
                (its MLP has SmolLM2's weight count; full MHA instead of 3 KV heads: +13M).

Data: every tracked *.md and *.py file of this repository (sorted), tokenized with the SmolLM2
tokenizer, EOS after each file, written once as nanoGPT's train.bin (uint16 stream) and as a
datatrove .ds shard with the file boundaries for phi3 (which masks attention at them; the others
attend across). HF Trainer and litgpt read consecutive seq_len windows of the stream in order;
nanoGPT's train.py samples random windows of it (unmodified); phi3 packs the files in its seeded
order. Same tokens, same seq_len x micro-batch per optimizer step, no accumulation.

Timing: each trainer runs in its own process with OMP/MKL threads = --threads; the time of a step
is from the end of the previous optimizer step to the end of this one (data, forward, backward,
clip, AdamW); the first --warmup steps are left out (allocator warm-up, nanoGPT's first eval,
litgpt's sanity-check validation). tokens/s of a run = timed tokens / timed seconds. Rounds
interleave the trainers (A B C D, then B C D A, ...) so that load from other processes falls on
all of them alike; tables show the median over rounds and the spread. Peak RSS is the child's
ru_maxrss (startup, model and optimizer state included).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINES = ROOT / "benchmarks" / "train_baselines"
VENV_PY = ROOT / ".venv" / "bin" / "python"
PHI3_CLI = ROOT / ".venv" / "bin" / "phi3"
MARK_BEGIN = "<!-- bench-train:begin (written by benchmarks/train_throughput.py) -->"
MARK_END = "<!-- bench-train:end -->"

TRAINERS = ("phi3", "hf", "litgpt", "nanogpt")
LABELS = {"phi3": "phi3 train", "hf": "HF Trainer", "litgpt": "litgpt pretrain", "nanogpt": "nanoGPT train.py"}

SHAPES = {
    # name: (layers, hidden, heads, kv_heads, intermediate, vocab)
    "phi3-shape": (4, 512, 8, 8, 1376, 49152),
    "smollm2-135m": (30, 576, 9, 3, 1536, 49152),
}


@dataclass
class Run:
    trainer: str
    model: str
    precision: str
    round: int
    ok: bool
    tokens_per_s: float | None = None
    step_times: list[float] = field(default_factory=list)
    peak_rss_mib: float | None = None
    wall_s: float = 0.0
    loadavg_before: str = ""
    params: int | None = None
    cpu_s: float | None = None  # user + system CPU seconds of the whole run (~ quiet wall x threads)
    tokens_per_cpu_s: float | None = None  # timed tokens / CPU seconds of the timed steps
    step_cpu_s: list[float] = field(default_factory=list)
    error: str = ""


# --- environment -----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def die(msg: str) -> None:
    print(f"train_throughput: {msg}", file=sys.stderr)
    sys.exit(2)


# --- data and models -------------------------------------------------------------------------------

def gguf_path() -> Path:
    out = subprocess.run([str(PHI3_CLI), "fetch"], capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    if out.returncode != 0 or not lines or not Path(lines[-1].strip()).exists():
        die(f"`phi3 fetch` did not give the SmolLM2 GGUF ({out.stderr.strip()[-200:]}); run it by hand first")
    return Path(lines[-1].strip())


def prepare(work: Path) -> dict:
    """The HF folder of SmolLM2-135M, the token stream (nanoGPT layout) and the .ds shard; cached in
    `work` (rebuilt when missing)."""
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = work / "smollm2-135m"
    if not (hf_dir / "config.json").exists():
        tmp = work / "smollm2-135m.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        print("converting the SmolLM2-135M GGUF to a float32 HF folder ...", flush=True)
        subprocess.run([str(PHI3_CLI), "convert", str(gguf_path()), str(tmp)], check=True, timeout=1200)
        tmp.rename(hf_dir)
    data = work / "data" / "bench"
    stream, ds = data / "train.bin", work / "phi3-data" / "repo.ds"
    if not (stream.exists() and ds.exists() and Path(str(ds) + ".index").exists()):
        import numpy as np
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
        eos = tok.token_to_id("<|im_end|>") if tok.token_to_id("<|endoftext|>") is None else tok.token_to_id("<|endoftext|>")
        files = subprocess.run(["git", "ls-files", "*.md", "*.py"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
        ids: list[int] = []
        ends: list[int] = []
        for f in sorted(files):
            text = (ROOT / f).read_text(errors="replace")
            if not text.strip():
                continue
            ids.extend(tok.encode(text, add_special_tokens=False).ids)
            ids.append(eos)
            ends.append(len(ids))
        arr = np.asarray(ids, dtype=np.uint16)
        data.mkdir(parents=True, exist_ok=True)
        ds.parent.mkdir(parents=True, exist_ok=True)
        arr.tofile(stream)
        arr[-max(len(arr) // 10, 4096):].tofile(data / "val.bin")
        with open(data / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": 49152}, f)
        arr.tofile(ds)
        np.asarray(ends, dtype="<u8").tofile(str(ds) + ".index")
        print(f"data: {len(files)} files, {len(arr):,} tokens", flush=True)
    import numpy as np
    n_tokens = int(np.memmap(stream, dtype=np.uint16, mode="r").shape[0])
    return {"hf_dir": hf_dir, "stream": stream, "ds": ds, "n_tokens": n_tokens, "gguf": None}


def hf_config_json(work: Path, model: str) -> Path:
    """config.json for HF Trainer's Phi3ForCausalLM of the resized shape (phi3's own to_hf_dict)."""
    sys.path.insert(0, str(ROOT))
    from phi3.train.recipe import preset_config

    cfg, _ = preset_config(phi3_spec(model))
    out = work / f"hf-config-{model}"
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.to_hf_dict()
    d["sliding_window"] = None  # 2047 never binds at these lengths
    (out / "config.json").write_text(json.dumps(d, indent=1))
    return out


def phi3_params(env: dict) -> dict[str, int]:
    sys.path.insert(0, str(ROOT))
    from phi3.config import load_config
    from phi3.train.recipe import preset_config

    out = {m: preset_config(phi3_spec(m))[0].num_parameters() for m in SHAPES if m != "smollm2-135m"}
    out["smollm2-135m"] = load_config(env["hf_dir"]).num_parameters()
    return out


def phi3_spec(model: str) -> str:
    L, H, nh, kv, inter, vocab = SHAPES[model]
    # Tied head: nanoGPT's GPT always ties it, so every trainer here ties it and all four step
    # AdamW over the same ~38M weights (phi-3-mini itself has an untied head).
    return (f"phi-3-mini:layers={L},hidden={H},heads={nh},kv_heads={kv},intermediate={inter},vocab={vocab},"
            "tie_word_embeddings=true")


def nanogpt_src(arg: str, work: Path) -> tuple[Path | None, str]:
    """nanoGPT's model.py, train.py and configurator.py, unmodified, in work/nanogpt (from a git
    directory without a work tree, e.g. the fetched mirror, or from a checkout)."""
    src = Path(arg)
    dst = work / "nanogpt"
    dst.mkdir(parents=True, exist_ok=True)
    names = ("model.py", "train.py", "configurator.py")
    if (src / "train.py").exists():
        for n in names:
            shutil.copy(src / n, dst / n)
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True).stdout.strip()
        return dst, rev or "checkout"
    if (src / "HEAD").exists() or (src / "objects").exists():
        rev = subprocess.run(["git", "--git-dir", str(src), "rev-parse", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        for n in names:
            out = subprocess.run(["git", "--git-dir", str(src), "show", f"HEAD:{n}"], capture_output=True)
            if out.returncode != 0:
                return None, ""
            (dst / n).write_bytes(out.stdout)
        return dst, rev
    return None, ""


# --- one run ---------------------------------------------------------------------------------------

def command(trainer: str, model: str, precision: str, a: argparse.Namespace, env: dict, out: Path
            ) -> tuple[list[str], Path]:
    T, B, N = a.seq_len, a.batch[model], a.steps
    L, H, nh, kv, inter, vocab = SHAPES[model]
    if trainer == "phi3":
        m = str(env["hf_dir"]) if model == "smollm2-135m" else phi3_spec(model)
        cmd = [str(PHI3_CLI), "train", "pretrain", "--model", m, "--tokenizer", str(env["hf_dir"]),
               "--data", str(env["ds"]), "--out", str(out), "--no-progress",
               "--set", f"seq_len={T}", "--set", f"micro_batch_size={B}", "--set", f"global_batch_size={B}",
               "--set", f"precision={precision}", "--set", "parallel=none", "--set", "save_every=0",
               "--set", "log_every=1", "--set", "seed=0", "--set", f"phases.0.steps={N}",
               "--set", "phases.0.tokens=none",
               "--set", "optim.lr=3e-4", "--set", "optim.min_lr=3e-5", "--set", "optim.schedule=cosine",
               "--set", "optim.warmup_steps=1", "--set", "optim.weight_decay=0.1", "--set", "optim.grad_clip=1.0"]
        for kv_ in a.phi3_set:
            cmd += ["--set", kv_]
        return cmd, out
    if trainer == "hf":
        cmd = [str(VENV_PY), str(BASELINES / "hf_trainer.py"), "--tokens", str(env["stream"]),
               "--seq-len", str(T), "--batch", str(B), "--steps", str(N), "--precision", precision, "--out", str(out)]
        cmd += ["--model-dir", str(env["hf_dir"])] if model == "smollm2-135m" else \
               ["--config-json", str(env["hf_config"][model])]
        return cmd, out
    if trainer == "litgpt":
        cmd = [a.litgpt_python, str(BASELINES / "litgpt_pretrain.py"), "--tokens", str(env["stream"]),
               "--seq-len", str(T), "--batch", str(B), "--steps", str(N), "--precision", precision, "--out", str(out),
               "--model", model, "--layers", str(L), "--hidden", str(H), "--heads", str(nh),
               "--intermediate", str(inter), "--vocab", str(vocab)]
        return cmd, out
    if trainer == "nanogpt":
        # train.py runs iterations 0..max_iters inclusive; device cpu means no autocast (its ctx is a
        # nullcontext on CPU), so it has no bfloat16 run here.
        cmd = [str(VENV_PY), "train.py", "--device=cpu", "--compile=False", "--dtype=float32", "--dataset=bench",
               f"--out_dir={out}", f"--batch_size={B}", f"--block_size={T}", "--gradient_accumulation_steps=1",
               f"--n_layer={L}", f"--n_head={nh}", f"--n_embd={H}", "--bias=False", "--dropout=0.0",
               f"--max_iters={N - 1}", "--eval_interval=1000000", "--eval_iters=1", "--log_interval=1",
               "--always_save_checkpoint=False", "--learning_rate=0.0003", "--min_lr=3e-05",
               "--warmup_iters=1", f"--lr_decay_iters={N}", "--weight_decay=0.1", "--beta2=0.95",
               "--grad_clip=1.0"]
        return cmd, out
    raise ValueError(trainer)


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def count_steps(trainer: str, out: Path, log_path: Path) -> int:
    """Optimizer steps finished so far, from the trainer's own output."""
    try:
        if trainer == "phi3":
            p = out / "metrics.jsonl"
            return p.read_text().count("\n") if p.exists() else 0
        text = log_path.read_text(errors="replace")
    except OSError:
        return 0
    return len((NANO_RE if trainer == "nanogpt" else STEP_RE).findall(text))


STEP_RE = re.compile(r"^STEP (\d+) ([0-9.]+)$", re.M)
NANO_RE = re.compile(r"^iter (\d+): loss [^,]+, time ([0-9.]+)ms", re.M)


def step_times(trainer: str, out: Path, log: str, seq: int, batch: int) -> list[float]:
    if trainer == "phi3":
        path = out / "metrics.jsonl"
        if not path.exists():
            return []
        recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
        return [seq * batch / r["tokens_per_s"] for r in recs]
    if trainer == "nanogpt":
        return [float(ms) / 1000 for _, ms in NANO_RE.findall(log)]
    return [float(s) for _, s in STEP_RE.findall(log)]


def param_count(trainer: str, log: str) -> int | None:
    pats = {"phi3": r"([\d,]+) parameters", "hf": r"PARAMS (\d+)", "litgpt": r"Total parameters: ([\d,]+)",
            "nanogpt": r"number of parameters: ([\d.]+)M"}
    m = re.search(pats[trainer], log)
    if not m:
        return None
    v = m.group(1).replace(",", "")
    return int(float(v) * 1e6) if trainer == "nanogpt" else int(v)


def run_one(trainer: str, model: str, precision: str, rnd: int, a: argparse.Namespace, env: dict) -> Run:
    out = Path(a.workdir) / "runs" / f"{trainer}-{model}-{precision}-r{rnd}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd, _ = command(trainer, model, precision, a, env, out)
    cwd = env["nanogpt_dir"] if trainer == "nanogpt" else ROOT
    threads = str(a.threads)
    penv = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    run = Run(trainer, model, precision, rnd, ok=False, loadavg_before=loadavg())
    log_path = out / "log.txt"
    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=cwd, env=penv, stdout=logf, stderr=subprocess.STDOUT)
        deadline = t0 + a.run_timeout
        status, usage = 0, None
        # CPU seconds of the child at each step's end (steps counted as their lines appear, polled
        # every 0.1 s; a step takes seconds): user + system time does not grow while the
        # scheduler runs other people's work, so it is far steadier than wall time on a busy machine.
        cpu_marks: list[float] = []
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                run.error = f"timed out after {a.run_timeout} s"
                break
            n = count_steps(trainer, out, log_path)
            if n > len(cpu_marks):
                c = proc_cpu(proc.pid)
                cpu_marks += [c] * (n - len(cpu_marks))
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
    run.wall_s = time.perf_counter() - t0
    run.peak_rss_mib = usage.ru_maxrss / 1024 if usage else None
    run.cpu_s = usage.ru_utime + usage.ru_stime if usage else None
    log = log_path.read_text(errors="replace")
    times = step_times(trainer, out, log, a.seq_len, a.batch[model])
    run.step_times = times
    run.params = param_count(trainer, log) if trainer != "phi3" else env["phi3_params"][model]
    if proc.returncode != 0 and not run.error:
        tail = [ln for ln in log.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        run.error = f"exit {proc.returncode}: {tail[0][:200]}"
    timed = times[a.warmup:]
    if not run.error and len(times) >= a.steps and timed:
        run.ok = True
        run.tokens_per_s = len(timed) * a.seq_len * a.batch[model] / sum(timed)
        # The last mark can be missed when a trainer exits right after its last step: then the
        # CPU figure covers the timed steps up to the one before.
        last = min(len(cpu_marks), a.steps) - 1
        if a.warmup >= 1 and last >= a.warmup:
            cpu = cpu_marks[last] - cpu_marks[a.warmup - 1]
            run.step_cpu_s = [b - c for c, b in zip(cpu_marks, cpu_marks[1:])][a.warmup - 1:last]
            run.tokens_per_cpu_s = (last - a.warmup + 1) * a.seq_len * a.batch[model] / cpu if cpu > 0 else None
    elif not run.error:
        run.error = f"{len(times)} step times for {a.steps} steps (see {log_path})"
    if a.keep_runs is False:
        for p in out.iterdir():
            if p.name not in ("log.txt", "metrics.jsonl"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return run


# --- report ----------------------------------------------------------------------------------------

def table(runs: list[Run], model: str, precision: str, a: argparse.Namespace) -> list[str]:
    rows = []
    by = {t: [r for r in runs if r.trainer == t and r.model == model and r.precision == precision] for t in a.trainers}
    med = {t: statistics.median([r.tokens_per_s for r in rs if r.ok]) for t, rs in by.items()
           if any(r.ok for r in rs)}
    best_other = max((v for t, v in med.items() if t != "phi3"), default=None)
    loads = [r.loadavg_before.split()[0] for rs in by.values() for r in rs if r.loadavg_before]
    L, H, nh, kv, inter, vocab = SHAPES[model]
    rows.append(f"**{model}**, {precision}: {L} layers x {H} hidden, {nh} heads ({kv} KV), MLP {inter}, vocab "
                f"{vocab:,}; seq {a.seq_len} x micro-batch {a.batch[model]} = {a.seq_len * a.batch[model]:,} tokens/step; "
                f"{a.steps} steps, first {a.warmup} untimed; {a.threads} threads; {a.rounds} interleaved round(s). "
                f"1-min load average before each run: {', '.join(loads) or 'n/a'}.")
    rows.append("")
    medc = {t: statistics.median([r.tokens_per_cpu_s for r in rs if r.ok and r.tokens_per_cpu_s])
            for t, rs in by.items() if any(r.ok and r.tokens_per_cpu_s for r in rs)}
    # Best timed step: other jobs only ever add time to a step, so the fastest step is the least
    # disturbed estimate on a busy machine (a trainer's own steps differed by up to 2x there).
    best = {t: max(a.seq_len * a.batch[model] / min(r.step_times[a.warmup:]) for r in rs if r.ok)
            for t, rs in by.items() if any(r.ok for r in rs)}
    rows.append("| trainer | params | tokens/s (median) | min-max | phi3 / this | tokens/s, best step | phi3 / this, best | "
                "tokens per CPU-s (median) | phi3 / this, CPU | peak RSS MiB | runs ok |")
    rows.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in a.trainers:
        rs = by[t]
        ok = [r for r in rs if r.ok]
        if not rs:
            continue
        if not ok:
            err = next((r.error for r in rs if r.error), "failed")
            rows.append(f"| {LABELS[t]} | | failed: {err[:120]} | | | | | | | | 0/{len(rs)} |")
            continue
        tps = [r.tokens_per_s for r in ok]
        ratio = med["phi3"] / med[t] if "phi3" in med else None
        ratio_c = medc["phi3"] / medc[t] if "phi3" in medc and t in medc else None
        ratio_b = best["phi3"] / best[t] if "phi3" in best else None
        params = next((r.params for r in ok if r.params), None)
        rss = statistics.median([r.peak_rss_mib for r in ok if r.peak_rss_mib])
        rows.append(f"| {LABELS[t]} | {f'{params / 1e6:.1f}M' if params else '?'} | {med[t]:,.0f} | "
                    f"{min(tps):,.0f}-{max(tps):,.0f} | {f'{ratio:.2f}x' if ratio else 'n/a'} | "
                    f"{best[t]:,.0f} | {f'{ratio_b:.2f}x' if ratio_b else 'n/a'} | "
                    f"{f'{medc[t]:,.1f}' if t in medc else 'n/a'} | {f'{ratio_c:.2f}x' if ratio_c else 'n/a'} | "
                    f"{rss:,.0f} | {len(ok)}/{len(rs)} |")
    if precision != "float32" and "nanogpt" in a.trainers:
        rows.append(f"| {LABELS['nanogpt']} | | n/a: train.py takes no autocast on a CPU (its ctx is a nullcontext) "
                    "| | | | | | | | |")
    if "phi3" in med and best_other:
        best_c = max((v for t, v in medc.items() if t != "phi3"), default=None)
        rows.append("")
        best_b = max(v for t, v in best.items() if t != "phi3")
        rows.append(f"phi3 / fastest other: **{med['phi3'] / best_other:.2f}x** by median wall time, "
                    f"**{best['phi3'] / best_b:.2f}x** by best step"
                    + (f", **{medc['phi3'] / best_c:.2f}x** by CPU time" if best_c and "phi3" in medc else "")
                    + " (target >= 1.0x).")
    return rows


def write_md(path: Path, runs: list[Run], a: argparse.Namespace, env: dict, argv: list[str], t_total: float) -> None:
    busy = a.busy_note
    lines = [MARK_BEGIN, "",
             f"Command: `.venv/bin/python benchmarks/train_throughput.py {shlex.join(argv)}`  ",
             f"Date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}; total wall {t_total / 60:.1f} min  ",
             f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs visible; AVX-512 BF16: "
             f"{'yes' if 'avx512_bf16' in cpu_flags() else 'no'}; torch threads per trainer: {a.threads}  ",
             f"Load average (1, 5, 15 min) at start: {env['load_start']}; at end: {loadavg()}  ",
             f"Data: {env['n_tokens']:,} tokens (this repository's *.md and *.py, SmolLM2 tokenizer)  ",
             f"nanoGPT: karpathy/nanoGPT {env.get('nanogpt_rev', '?')[:12]} (model.py, train.py, configurator.py unmodified)"]
    if busy:
        lines += ["", f"**{busy}**"]
    for model in a.models:
        for prec in a.precisions:
            if any(r.model == model and r.precision == prec for r in runs):
                lines += [""] + table(runs, model, prec, a)
    lines += ["", MARK_END]
    block = "\n".join(lines) + "\n"
    old = path.read_text() if path.exists() else "# Training throughput\n\n"
    if MARK_BEGIN in old and MARK_END in old:
        head, rest = old.split(MARK_BEGIN, 1)
        new = head + block.rstrip("\n") + rest.split(MARK_END, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


# --- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="4 steps (2 untimed), bfloat16 on phi3-shape only, rounds while they fit in 7.5 min "
                         "(one round takes about 5 min on a quiet 2-core machine)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--steps", type=int, help="optimizer steps per run (warmup included)")
    ap.add_argument("--warmup", type=int, help="untimed first steps")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-phi3-shape", type=int, default=4, help="micro-batch rows for phi3-shape")
    ap.add_argument("--batch-smollm2", type=int, default=1, help="micro-batch rows for smollm2-135m")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--models", default="phi3-shape,smollm2-135m")
    ap.add_argument("--precisions", default=None, help="float32,bfloat16 (bfloat16 only where the CPU has AVX-512 BF16)")
    ap.add_argument("--bf16-models", default=None,
                    help="models that also get a bfloat16 run (default: all; --quick: phi3-shape)")
    ap.add_argument("--budget-min", type=float, default=None,
                    help="start no new round when the last round's time would end past this many minutes "
                         "(--quick: 7.5); the first round always runs whole")
    ap.add_argument("--trainers", default=",".join(TRAINERS))
    ap.add_argument("--workdir", default="/tmp/phi3-train-bench")
    ap.add_argument("--litgpt-python", default="/work/venv-litgpt/bin/python")
    ap.add_argument("--nanogpt-src", default="/work/.mirror/karpathy+nanoGPT/repo",
                    help="nanoGPT git directory (bare mirror) or checkout")
    ap.add_argument("--phi3-set", action="append", default=[], help="extra --set for phi3 train (e.g. compile=true)")
    ap.add_argument("--run-timeout", type=int, default=900)
    ap.add_argument("--write", help="put the tables into this markdown file (between markers)")
    ap.add_argument("--busy-note", default="", help="a line printed above the tables (e.g. that the machine was busy)")
    ap.add_argument("--keep-runs", action="store_true")
    ap.add_argument("--from-results", help="write the tables from a results.jsonl of an earlier run (same flags) "
                                           "instead of training")
    a = ap.parse_args(argv)
    a.rounds = a.rounds or 3
    a.steps = a.steps or (4 if a.quick else 6)
    a.budget_min = a.budget_min if a.budget_min is not None else (7.5 if a.quick else None)
    a.bf16_models = (a.bf16_models or ("phi3-shape" if a.quick else ",".join(SHAPES))).split(",")
    a.warmup = a.warmup if a.warmup is not None else 2
    if a.steps <= a.warmup:
        die(f"--steps {a.steps} leaves nothing to time after --warmup {a.warmup}; raise --steps")
    a.models = [m for m in a.models.split(",") if m]
    for m in a.models:
        if m not in SHAPES:
            die(f"unknown model {m!r}; choose from {', '.join(SHAPES)}")
    a.trainers = [t for t in a.trainers.split(",") if t]
    for t in a.trainers:
        if t not in TRAINERS:
            die(f"unknown trainer {t!r}; choose from {', '.join(TRAINERS)}")
    bf16 = "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()
    a.precisions = a.precisions.split(",") if a.precisions else (["float32", "bfloat16"] if bf16 else ["float32"])
    a.batch = {"phi3-shape": a.batch_phi3_shape, "smollm2-135m": a.batch_smollm2}
    work = Path(a.workdir)

    env = prepare(work)
    env["load_start"] = loadavg()
    env["hf_config"] = {m: hf_config_json(work, m) for m in a.models if m != "smollm2-135m"}
    env["phi3_params"] = phi3_params(env)
    if "litgpt" in a.trainers and not Path(a.litgpt_python).exists():
        print(f"litgpt: {a.litgpt_python} not found (make a venv: python -m venv /work/venv-litgpt && "
              "/work/venv-litgpt/bin/pip install torch==2.13.0 litgpt==0.5.13); skipping litgpt", file=sys.stderr)
        a.trainers.remove("litgpt")
    if "nanogpt" in a.trainers:
        nd, rev = nanogpt_src(a.nanogpt_src, work)
        if nd is None:
            print(f"nanoGPT: no source at {a.nanogpt_src} (a nanoGPT checkout or git directory); skipping nanoGPT",
                  file=sys.stderr)
            a.trainers.remove("nanogpt")
        else:
            env["nanogpt_dir"], env["nanogpt_rev"] = nd, rev
            bench = nd / "data" / "bench"
            bench.mkdir(parents=True, exist_ok=True)
            for n in ("train.bin", "val.bin", "meta.pkl"):
                shutil.copy(env["stream"].parent / n, bench / n)

    print(f"CPU: {cpu_model()}; load {env['load_start']}; trainers {a.trainers}; models {a.models}; "
          f"precisions {a.precisions}; {a.rounds} rounds x {a.steps} steps ({a.warmup} untimed)", flush=True)
    runs: list[Run] = []
    results = work / "results.jsonl"
    t_start = time.perf_counter()
    t_round = 0.0
    if a.from_results:
        runs = [Run(**json.loads(ln)) for ln in Path(a.from_results).read_text().splitlines() if ln.strip()]
        a.rounds = len({r.round for r in runs})
        # The header then describes the recorded run (its start load, its summed run times).
        env["load_start"] = runs[0].loadavg_before if runs else env["load_start"]
    for rnd in range(0 if a.from_results else a.rounds):
        elapsed = time.perf_counter() - t_start
        if rnd and a.budget_min and elapsed + t_round > a.budget_min * 60:
            print(f"stopping after {rnd} round(s): another would end past {a.budget_min} min", flush=True)
            a.rounds = rnd
            break
        r0 = time.perf_counter()
        order = a.trainers[rnd % len(a.trainers):] + a.trainers[:rnd % len(a.trainers)]
        for model in a.models:
            for prec in a.precisions:
                for t in order:
                    if prec != "float32" and (t == "nanogpt" or model not in a.bf16_models):
                        continue
                    r = run_one(t, model, prec, rnd, a, env)
                    runs.append(r)
                    with open(results, "a") as f:
                        f.write(json.dumps(asdict(r)) + "\n")
                    tps = f"{r.tokens_per_s:,.0f} tok/s" if r.ok else f"FAILED ({r.error})"
                    rss = f"{r.peak_rss_mib:,.0f} MiB" if r.peak_rss_mib else "?"
                    print(f"round {rnd} {model:13s} {prec:8s} {LABELS[t]:17s} {tps:>14s}  peak RSS {rss}  "
                          f"wall {r.wall_s:.0f} s  cpu {r.cpu_s or 0:.0f} s  load {r.loadavg_before}", flush=True)
        t_round = time.perf_counter() - r0
    total = sum(r.wall_s for r in runs) if a.from_results else time.perf_counter() - t_start
    for model in a.models:
        for prec in a.precisions:
            if any(r.model == model and r.precision == prec for r in runs):
                print("\n" + "\n".join(table(runs, model, prec, a)))
    cpu = sum(r.cpu_s or 0 for r in runs)
    print(f"\ntotal {total / 60:.1f} min wall, {cpu / 60:.1f} min CPU (a quiet {a.threads}-core machine needs about "
          f"{cpu / a.threads / 60:.1f} min); load average now {loadavg()}")
    if a.write:
        write_md(ROOT / a.write if not Path(a.write).is_absolute() else Path(a.write), runs, a, env, argv, total)
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
