"""Inference speed of two phi3 revisions, measured alternately with `phi3 bench --json`.

    python benchmarks/ab_revisions.py BEFORE_REV [--after PATH] [--rounds 7] [--threads 1] [--out FILE.jsonl]

BEFORE_REV is cloned from this repository into a temporary folder and checked out there; the
after side is the working tree at --after (default: this checkout). Both run with this venv's
Python, the package picked by PYTHONPATH, so the same torch and compiler build each side's kernels.
Cases: SmolLM2-135M-Instruct (the fetched GGUF, quantized to Q4_0 by phi3 bench), and phi-3-mini's
shape cut to 8 layers (random Q4_0 weights). Rounds alternate which side goes first. On a machine
shared with other jobs single runs swing by +-20% (2026-12-02, load 2): read medians over >= 7
rounds, and the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF = Path(os.path.expanduser("~/.cache/phi3/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
CASES = {
    "smollm2-135m": ["--shape", str(GGUF), "--prompt-tokens", "128", "--new-tokens", "64"],
    "phi-3-mini, 8 layers": ["--shape", "phi-3-mini", "--layers", "8", "--prompt-tokens", "256",
                             "--new-tokens", "32", "--context", "1024"],
}


def bench(tree: Path, args: list[str], threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    # cwd outside both trees, so `import phi3` resolves through PYTHONPATH only.
    p = subprocess.run([sys.executable, "-m", "phi3", "bench", *args, "--threads", str(threads), "--json"],
                       env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"ab_revisions: phi3 bench failed in {tree}: {p.stderr.strip().splitlines()[-1:]}")
    return {"wall_s": time.time() - t0, "load": os.getloadavg()[0], **json.loads(p.stdout.strip().splitlines()[-1])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", help="git revision of the 'before' side")
    ap.add_argument("--after", default=str(ROOT), help="checkout of the 'after' side (default: this one)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="append each run as a JSON line here")
    args = ap.parse_args()
    if not GGUF.is_file():
        print(f"ab_revisions: {GGUF} is missing: run `phi3 fetch` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="phi3-ab-") as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(before)], check=True)
        subprocess.run(["git", "-C", str(before), "checkout", "-q", args.before], check=True)
        trees = {"before": before, "after": Path(args.after)}
        results: list[dict] = []
        out = open(args.out, "a") if args.out else None
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for case, case_args in CASES.items():
                for side in order:
                    rec = {"round": r, "case": case, "side": side, **bench(trees[side], case_args, args.threads)}
                    results.append(rec)
                    if out:
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
                    print(f"round {r} {case:22s} {side:6s} prefill {rec['prefill_tok_s']:7.1f} tok/s  "
                          f"decode {rec['decode_tok_s']:6.2f} tok/s  load {rec['load']:.1f}", flush=True)
    print(f"\n| case | metric | before (median, min-max) | after | after / before |\n|---|---|---|---|---:|")
    for case in CASES:
        for key in ("prefill_tok_s", "decode_tok_s"):
            b = [x[key] for x in results if x["case"] == case and x["side"] == "before"]
            a = [x[key] for x in results if x["case"] == case and x["side"] == "after"]
            mb, ma = statistics.median(b), statistics.median(a)
            print(f"| {case} | {key} | {mb:.1f} ({min(b):.1f}-{max(b):.1f}) | {ma:.1f} ({min(a):.1f}-{max(a):.1f}) "
                  f"| {ma / mb:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
