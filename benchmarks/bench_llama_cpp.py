"""phi3 against llama.cpp (through llama-cpp-python) on the very same GGUF files, for `make bench`.

1. Speed and memory: `phi3 bench` builds a phi-3-mini-shape (and phi-3-medium-shape) Q4_0 GGUF
   with random weights and measures it; llama.cpp then runs the same file with the same threads,
   prompt length and context. Each engine runs in a fresh process (peak RSS is its own).
2. The machine's memory bandwidth, and the bandwidth-bound decode limit (weight bytes per token /
   bandwidth).
3. SmolLM2-135M-Instruct quantized by `phi3 quantize`: greedy tokens of phi3 and llama.cpp on the
   same file, next to llama.cpp's agreement with itself when only its batch size changes.
4. Perplexity on benchmarks/data/stdlib_docs.txt (fixed text, 31k tokens): the 16-bit model and each
   4/8-bit type as quantized by phi3 and by llama.cpp (both --pure: every matrix in the type), and
   whether the two quantizers wrote the same bytes.

Writes its section of BENCHMARKS.md between the bench_llama_cpp markers. Needs an idle machine:
any other busy process makes both engines slower by different amounts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import report  # benchmarks/report.py (this folder is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "benchmarks" / "data" / "stdlib_docs.txt"
START_MARK = "<!-- bench_llama_cpp:start -->"
END_MARK = "<!-- bench_llama_cpp:end -->"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a hash table is in two sentences."]
# llama_ftype; q4_k = Q4_K_S (pure: every matrix Q4_K), q4_k_m = Q4_K_M (llama.cpp's mix of Q4_K,
# Q5_0/Q6_K/Q8_0: the files people download)
LLAMA_FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k": 14, "q4_k_m": 15, "iq4_nl": 25, "iq4_xs": 30}
# What an AVX2-only machine runs, forced on a bigger one: phi3's avx2 kernels, and PyTorch's own
# ops (prompt matmuls, norms) kept to AVX2 as well.
AVX2_ONLY = {"PHI3_KERNELS": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
PHI3_ENV: dict[str, str] = {}  # set from --phi3-kernels
GIVEN_FILES: dict[str, Path] = {}  # set from --gguf: phi-3-mini-shape files made before, by type
LLAMA_PYTHON = sys.executable  # set from --llama-python


def phi3(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phi3.cli", *args], capture_output=True, text=True, check=True,
                          env=dict(os.environ, **PHI3_ENV))


# --- llama.cpp side (fresh processes) -------------------------------------------------------------

def llama_worker(path: str, prompt_tokens: int, new_tokens: int, threads: int, context: int) -> dict:
    import numpy as np
    from llama_cpp import Llama
    t = time.perf_counter()
    llm = Llama(path, n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, llm.n_vocab(), prompt_tokens).tolist()
    t = time.perf_counter()
    llm.eval(tokens)
    prefill_s = time.perf_counter() - t
    import llama_cpp

    def last_logits():
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))

    t = time.perf_counter()
    for _ in range(new_tokens):
        nxt = int(np.argmax(last_logits()))
        llm.eval([nxt])
    decode_s = time.perf_counter() - t
    return {"load_s": round(load_s, 3), "prefill_tok_s": round(prompt_tokens / prefill_s, 2),
            "decode_tok_s": round(new_tokens / decode_s, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "file_mb": round(Path(path).stat().st_size / 1e6, 1)}


def llama_greedy_worker(path: str, prompts: list[list[int]], n: int, n_batch: int = 512) -> list[list[int]]:
    from llama_cpp import Llama
    llm = Llama(path, n_ctx=1024, n_threads=2, n_batch=n_batch, n_ubatch=n_batch, verbose=False)
    out = []
    for ids in prompts:
        got = []
        for tok in llm.generate(ids, temp=0, top_k=1, reset=True):
            if tok == llm.token_eos() or len(got) >= n:
                break
            got.append(tok)
        out.append(got)
    return out


def in_fresh_process(fn: str, *args) -> object:
    r = subprocess.run([LLAMA_PYTHON, __file__, "--worker", fn, json.dumps(args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{fn} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def llama_quantize(src: Path, out: Path, qtype: str, pure: bool = True) -> None:
    if LLAMA_PYTHON != sys.executable:
        in_fresh_process("llama_quantize", str(src), str(out), qtype, pure)
        return
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[qtype]
    params.pure = pure
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {qtype}")


# --- measurements -----------------------------------------------------------------------------------

def memory_bandwidth(threads: int) -> float:
    """GB/s reading 1 GiB with `threads` threads (best of 5 sums)."""
    import torch
    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def speed(shape: str, prompt_tokens: int, new_tokens: int, threads: int, work: Path, runs: int,
          file_type: str = "q4_0") -> dict:
    """Both engines on one file, alternating runs: phi-3-*-shape random weights written by
    `phi3 bench` (q4_0), or quantized by llama.cpp's own quantizer from a 16-bit file (q4_k_m)."""
    given = GIVEN_FILES.get(file_type) if shape == "phi-3-mini" else None
    gguf = given or work / f"{shape}-{file_type}.gguf"
    args = ["--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--threads", str(threads),
            "--json"]
    ours, theirs = [], []
    if given:
        pass  # made before (--gguf): measured as it is, and kept
    elif file_type == "q4_0":
        ours.append(json.loads(phi3("bench", "--shape", shape, "--type", "q4_0", "--save-gguf", str(gguf), *args).stdout))
    else:
        f16 = work / f"{shape}-f16.gguf"
        phi3("bench", "--shape", shape, "--type", "f16", "--save-gguf", str(f16), "--new-tokens", "1",
             "--prompt-tokens", "1", "--json")
        llama_quantize(f16, gguf, file_type, pure=False)
        f16.unlink()
    phi3_type = {"q4_0": "q4_0", "q4_k_m": "q4_k"}[file_type]  # the file's general.file_type: measured as it is
    for i in range(runs):
        theirs.append(in_fresh_process("llama_worker", str(gguf), prompt_tokens, new_tokens, threads, 4096))
        if len(ours) < runs:
            ours.append(json.loads(phi3("bench", "--shape", str(gguf), "--type", phi3_type, *args).stdout))
    best = lambda rs, k: max(r[k] for r in rs) if k.endswith("tok_s") else min(r[k] for r in rs)  # noqa: E731
    keys = ("load_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "file_mb")
    result = {"shape": shape, "file": file_type, "phi3": {k: best(ours, k) for k in keys},
              "llama.cpp": {k: best(theirs, k) for k in keys}, "runs": runs, "prompt_tokens": prompt_tokens,
              "new_tokens": new_tokens, "gguf_bytes": gguf.stat().st_size,
              "kv_cache_mb": ours[0].get("kv_cache_mb"), "packed": ours[0].get("packed")}
    if not given:
        gguf.unlink()
    return result


def agreement(work: Path, n: int = 32) -> list[dict]:
    from phi3.checkpoint import default_model_path, load
    src = default_model_path()
    tok = load(src).tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    rows = []
    for qtype in ("f16", "q8_0", "q4_0", "q4_1", "q4_k", "q4_k_m"):
        path = work / f"smollm-{qtype}.gguf"
        if qtype == "q4_k_m":  # the mix people download, written by llama.cpp's own quantizer
            f16 = work / "smollm-f16-source.gguf"
            phi3("quantize", str(src), str(f16), "--type", "f16", "--json")
            llama_quantize(f16, path, qtype, pure=False)
            f16.unlink()
            info = json.loads(phi3("info", str(path), "--json").stdout)
            packed = sum(n for k, n in info["kernels"].items() if k.startswith("packed"))
            matrices = sum(n for k, n in info["kernels"].items() if not k.startswith("dense (1-D)"))
        else:
            phi3("quantize", str(src), str(path), "--type", qtype, "--json")
        ours = []
        for p in PROMPTS:
            r = phi3("generate", "--model", str(path), "--prompt", p, "--max-tokens", str(n), "--json")
            ours.append(json.loads(r.stdout)["token_ids"])
        theirs = in_fresh_process("llama_greedy_worker", str(path), prompts, n)
        # llama.cpp against itself: the same file with the prompt fed one token at a time, which
        # changes only which of its kernels run (GEMV instead of GEMM), so the order of its sums. The rate at which that
        # alone changes the tokens is the most any other engine can expect to match.
        theirs_one_by_one = in_fresh_process("llama_greedy_worker", str(path), prompts, n, 1)
        rows.append({"type": qtype + (f" (llama.cpp's quantizer; {packed}/{matrices} matrices packed)"
                                      if qtype == "q4_k_m" else ""), "prompts": len(PROMPTS),
                     "identical": sum(a == b for a, b in zip(ours, theirs)),
                     "first_difference": [_first_difference(a, b) for a, b in zip(ours, theirs)],
                     "llama_self_identical": sum(a == b for a, b in zip(theirs, theirs_one_by_one)),
                     "llama_self_first_difference": [_first_difference(a, b) for a, b in zip(theirs, theirs_one_by_one)]})
        path.unlink()
    return rows


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def same_tensor_bytes(ours: Path, theirs: Path, qtype: str) -> dict:
    """How many tensors the two files store in `qtype` with identical bytes, and which types each
    quantizer fell back to for matrices `qtype` cannot hold (rows not a multiple of its block)."""
    import numpy as np
    from gguf import GGUFReader
    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    both = [n for n in a if n in b and a[n].tensor_type.name == b[n].tensor_type.name == qtype.upper()]
    same = sum(np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8)) for n in both)

    def fallback(tensors: dict) -> list[str]:
        return sorted({t.tensor_type.name for t in tensors.values()} - {qtype.upper(), "F32"})

    return {"identical": int(same), "tensors": len(both), "fallback_phi3": fallback(a), "fallback_llama.cpp": fallback(b)}


def perplexities(work: Path, context: int = 512) -> dict:
    from phi3.checkpoint import default_model_path

    def ppl(path: Path) -> float:
        r = phi3("perplexity", str(path), str(TEXT), "--context", str(context), "--json")
        return json.loads(r.stdout)["perplexity"]

    f16 = work / "smollm-f16.gguf"
    phi3("quantize", str(default_model_path()), str(f16), "--type", "f16", "--json")
    out = {"f16": ppl(f16), "tokens": None, "types": []}
    for qtype in ("q4_0", "q4_1", "q4_k", "iq4_nl", "iq4_xs", "q8_0"):
        ours, theirs = work / f"ours-{qtype}.gguf", work / f"llama-{qtype}.gguf"
        phi3("quantize", str(f16), str(ours), "--type", qtype, "--pure", "--json")
        llama_quantize(f16, theirs, qtype)
        row = {"type": qtype, "phi3": ppl(ours), "llama.cpp": ppl(theirs),
               "phi3_mb": round(ours.stat().st_size / 1e6, 1), "llama.cpp_mb": round(theirs.stat().st_size / 1e6, 1),
               "bytes": same_tensor_bytes(ours, theirs, qtype)}
        out["types"].append(row)
        ours.unlink()
        theirs.unlink()
    f16.unlink()
    return out


# --- report -----------------------------------------------------------------------------------------

def section(command: str, bw: float, speeds: list[dict], agree: list[dict], ppls: dict | None) -> str:
    lines = [START_MARK, "", "## phi3 vs llama.cpp on the same GGUF files", "",
             f"Command: `{command}` · {platform.processor() or platform.machine()}, {os.cpu_count()} cores · "
             f"llama.cpp via llama-cpp-python {_llama_version()} · "
             f"measured memory bandwidth {bw:.1f} GB/s (1 GiB sum, 2 threads)", ""]
    lines += [f"phi3 kernels: {speeds[0]['phi3'].get('kernels', '?')}"
              + (f" (environment {' '.join(f'{k}={v}' for k, v in PHI3_ENV.items())})" if PHI3_ENV else "")
              + f"; llama.cpp from `{LLAMA_PYTHON}`.", ""]
    lines += ["| shape, file (random weights) | engine | load s | prefill tok/s | decode tok/s | peak RSS MB | file MB |",
              "|---|---|---|---|---|---|---|"]
    for s in speeds:
        for engine in ("phi3", "llama.cpp"):
            r = s[engine]
            lines.append(f"| {s['shape']}, {s.get('file', 'q4_0')} ({s['prompt_tokens']} prompt, {s['new_tokens']} new) | "
                         f"{engine} | {r['load_s']} | {r['prefill_tok_s']} | {r['decode_tok_s']} | {r['peak_rss_mb']} | "
                         f"{r['file_mb']} |")
        p, q = s["phi3"], s["llama.cpp"]
        bound = bw * 1e9 / s["gguf_bytes"]
        lines.append(f"| | **phi3 ÷ llama.cpp** | | **{p['prefill_tok_s'] / q['prefill_tok_s']:.2f}x** | "
                     f"**{p['decode_tok_s'] / q['decode_tok_s']:.2f}x** | {p['peak_rss_mb'] / q['peak_rss_mb']:.2f}x | |")
        lines.append(f"| | bandwidth bound ({s['gguf_bytes'] / 1e9:.2f} GB per token) | | | {bound:.1f} | | |")
        if s.get("kv_cache_mb") is not None:
            budget = p["file_mb"] + s["kv_cache_mb"] + 350
            lines.append(f"| | phi3 memory target: file + KV cache ({s['kv_cache_mb']} MB) + 350 MB | | | | "
                         f"{budget:.0f} ({'met' if p['peak_rss_mb'] <= budget else 'missed'}) | |")
            lines.append(f"| | phi3 packed | {s['packed']} | | | | |")
    lines += ["", f"Best of {speeds[0]['runs']} runs per engine, taking turns; context 4096 allocated by both.", ""]
    if agree:
        lines += ["Greedy tokens, SmolLM2-135M-Instruct written by `phi3 quantize`, 32 new tokens, same file. "
                  "llama.cpp against itself: its prompt in one batch (as above) against the same prompt fed one "
                  "token at a time; only the order of its float sums differs.", "",
                  "| type | phi3 = llama.cpp (prompts) | first differing position | llama.cpp = itself, token by token "
                  "| first differing position |", "|---|---|---|---|---|"]
        for a in agree:
            lines.append(f"| {a['type']} | {a['identical']}/{a['prompts']} | {a['first_difference']} | "
                         f"{a['llama_self_identical']}/{a['prompts']} | {a['llama_self_first_difference']} |")
    if ppls:
        lines += ["", f"Perplexity of SmolLM2-135M-Instruct on `{TEXT.relative_to(ROOT)}` (chunks of 512, "
                  f"llama.cpp's method; computed by `phi3 perplexity` for every file). 16-bit: {ppls['f16']:.4f}.", "",
                  "| type (--pure) | phi3 quantize | Δ | MB | llama.cpp quantize | Δ | MB |",
                  "|---|---|---|---|---|---|---|"]
        for t in ppls["types"]:
            lines.append(f"| {t['type']} | {t['phi3']:.4f} | {t['phi3'] - ppls['f16']:+.4f} | {t['phi3_mb']} | "
                         f"{t['llama.cpp']:.4f} | {t['llama.cpp'] - ppls['f16']:+.4f} | {t['llama.cpp_mb']} |")
        lines += ["", "The same two files, tensor by tensor:", "",
                  "| type | tensors in that type with identical bytes | fallback type (phi3) | fallback type (llama.cpp) |",
                  "|---|---|---|---|"]
        for t in ppls["types"]:
            b = t["bytes"]
            lines.append(f"| {t['type']} | {b['identical']}/{b['tensors']} | {', '.join(b['fallback_phi3']) or '-'} | "
                         f"{', '.join(b['fallback_llama.cpp']) or '-'} |")
    lines += ["", END_MARK]
    return "\n".join(lines)


def _llama_version() -> str:
    try:
        import llama_cpp
        return llama_cpp.__version__
    except ImportError:
        return "?"


def write_section(path: Path, text: str) -> None:
    report.write_section(path, text, START_MARK, END_MARK)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="update this markdown file's section")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--skip-medium", action="store_true", help="phi-3-medium takes ~10 minutes more")
    ap.add_argument("--skip-perplexity", action="store_true")
    ap.add_argument("--phi3-kernels", choices=["auto", "avx512", "avx2", "neon", "portable"], default="auto",
                    help="phi3's kernel build; avx2 also keeps PyTorch's own ops to AVX2 (an AVX2-only machine)")
    ap.add_argument("--llama-python", default=sys.executable,
                    help="the Python whose llama-cpp-python runs llama.cpp (e.g. one built with -DGGML_AVX512=OFF)")
    ap.add_argument("--files", default="q4_0",
                    help="comma-separated: q4_0 (written by phi3) and/or q4_k_m (written by llama.cpp's quantizer)")
    ap.add_argument("--only-speed", action="store_true", help="skip greedy agreement and perplexity")
    ap.add_argument("--gguf", action="append", default=[], metavar="TYPE=PATH",
                    help="use this phi-3-mini-shape file for TYPE (q4_0 or q4_k_m) instead of making one "
                         "(making the Q4_K_M writes a 7.6 GB 16-bit file first); kept afterwards")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        fn, fn_args = args.worker
        print(json.dumps(globals()[fn](*json.loads(fn_args))))
        return 0
    global LLAMA_PYTHON, START_MARK, END_MARK
    LLAMA_PYTHON = args.llama_python
    for item in args.gguf:
        kind, _, path = item.partition("=")
        if kind not in ("q4_0", "q4_k_m") or not Path(path).is_file():
            ap.error(f"--gguf {item}: expected q4_0=PATH or q4_k_m=PATH naming an existing phi-3-mini-shape GGUF")
        GIVEN_FILES[kind] = Path(path)
    if args.phi3_kernels != "auto":
        PHI3_ENV.update(AVX2_ONLY if args.phi3_kernels == "avx2" else {"PHI3_KERNELS": args.phi3_kernels})
        # one section per build, so that runs of different builds sit side by side
        START_MARK, END_MARK = (f"<!-- bench_llama_cpp:{args.phi3_kernels}:start -->",
                                f"<!-- bench_llama_cpp:{args.phi3_kernels}:end -->")
    command = "python " + " ".join([str(Path(__file__).relative_to(ROOT))] + (argv if argv is not None else sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="phi3-vs-llama-", dir=os.environ.get("PHI3_BENCH_TMP")) as tmp:
        work = Path(tmp)
        bw = memory_bandwidth(args.threads)
        print(f"memory bandwidth {bw:.1f} GB/s", file=sys.stderr)
        speeds = []
        for file_type in args.files.split(","):
            speeds.append(speed("phi-3-mini", 512, 128, args.threads, work, args.runs, file_type))
            print(json.dumps(speeds[-1]), file=sys.stderr)
        if not args.skip_medium:
            speeds.append(speed("phi-3-medium", 128, 32, args.threads, work, 1))
            print(json.dumps(speeds[-1]), file=sys.stderr)
        agree = [] if args.only_speed else agreement(work)
        print(json.dumps(agree), file=sys.stderr)
        ppls = None if args.skip_perplexity or args.only_speed else perplexities(work)
        print(json.dumps(ppls), file=sys.stderr)
    text = section(command, bw, speeds, agree, ppls)
    print(text)
    if args.write:
        write_section(args.write, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
