"""phi3's kernel builds and llama.cpp, taking turns on the same phi-3-mini-shape files.

For each round and file: `phi3 bench` once per build named (avx2 runs as an AVX2-only machine
would: PHI3_KERNELS=avx2 and PyTorch's own ops kept to AVX2 too), then llama.cpp through the
Python given by --llama-python (e.g. a llama-cpp-python built with -DGGML_AVX512=OFF). Prints one
JSON line per run. Files: a Q4_0 file written by `phi3 bench` (random weights), and any GGUF given
with --file NAME=PATH (e.g. a Q4_K_M made by llama.cpp's quantizer). Needs an idle machine.

    python benchmarks/bench_builds.py --builds avx2,avx512 --llama-python .venv-llama-avx2/bin/python \\
        --file q4_k_m=/tmp/mini-q4km.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_llama_cpp as llama  # benchmarks/ is on sys.path when run as a script


def phi3_bench(path: Path, file_type: str, build: str, prompt: int, new: int, threads: int) -> dict:
    env = dict(os.environ, **(llama.AVX2_ONLY if build == "avx2" else {"PHI3_KERNELS": build}))
    r = subprocess.run([sys.executable, "-m", "phi3.cli", "bench", "--shape", str(path), "--type", file_type,
                        "--prompt-tokens", str(prompt), "--new-tokens", str(new), "--threads", str(threads), "--json"],
                       capture_output=True, text=True, env=env, check=True)
    return json.loads(r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--builds", default="avx2,avx512", help="phi3 kernel builds, comma-separated (or portable)")
    ap.add_argument("--llama-python", default=sys.executable)
    ap.add_argument("--file", action="append", default=[], metavar="NAME=PATH",
                    help="another GGUF to measure (its general.file_type decides phi3 bench's --type)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    llama.LLAMA_PYTHON = args.llama_python
    with tempfile.TemporaryDirectory(prefix="phi3-builds-") as tmp:
        files = {"q4_0": Path(tmp) / "mini-q4_0.gguf"}
        subprocess.run([sys.executable, "-m", "phi3.cli", "bench", "--shape", "phi-3-mini", "--type", "q4_0",
                        "--save-gguf", str(files["q4_0"]), "--prompt-tokens", "1", "--new-tokens", "1", "--json"],
                       check=True, capture_output=True)
        for spec in args.file:
            name, _, path = spec.partition("=")
            files[name] = Path(path)
        for r in range(args.rounds):
            for name, path in files.items():
                file_type = "q4_k" if name.startswith("q4_k") else name  # Q4_K_M's file type is q4_k's
                for build in args.builds.split(","):
                    j = phi3_bench(path, file_type, build, args.prompt_tokens, args.new_tokens, args.threads)
                    keys = ("load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "file_mb", "kv_cache_mb",
                            "packed", "kernels")
                    print(json.dumps({"round": r, "file": name, "engine": f"phi3 {build}", **{k: j[k] for k in keys}}),
                          flush=True)
                j = llama.in_fresh_process("llama_worker", str(path), args.prompt_tokens, args.new_tokens,
                                           args.threads, 4096)
                print(json.dumps({"round": r, "file": name, "engine": "llama.cpp", **j}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
