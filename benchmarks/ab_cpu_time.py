"""phi3 (an AVX2-only run) and llama.cpp on one GGUF, one thread each, timed in CPU time.

    python benchmarks/ab_cpu_time.py FILE [--rounds 2] [--prompt-tokens 96] [--new-tokens 24]
        [--llama-python /work/venv-llama-avx2/bin/python] [--phi3-kernels avx2]

For a machine shared with other jobs, where wall-clock tok/s of the same run swings by 2x: each
engine loads the file in a fresh process, with one thread, and `time.process_time()` is taken
around the prompt and around the greedy decoding loop (CPU time is what other processes steal
least of). The engines alternate; each round prints one JSON line per engine. A ratio measured
this way says which way phi3 ÷ llama.cpp points, not its quiet-machine two-thread value
(bench_llama_cpp.py measures that).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

AVX2_ONLY = {"PHI3_KERNELS": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def phi3_worker(path: str, prompt_tokens: int, new_tokens: int) -> dict:
    import torch

    from phi3 import quant
    from phi3.checkpoint import load
    from phi3.generate import advance
    torch.set_num_threads(1)
    model = load(path).model
    tokens = torch.randint(0, model.config.vocab_size, (1, prompt_tokens + new_tokens),
                           generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model.new_cache(1, 4096)
        t = time.process_time()
        logits = advance(model, cache, tokens[:, :prompt_tokens])
        prefill = time.process_time() - t
        n = prompt_tokens
        t = time.process_time()
        for _ in range(new_tokens):
            tokens[0, n] = logits[0, -1].argmax()
            n += 1
            logits = advance(model, cache, tokens[:, :n])
        decode = time.process_time() - t
    return {"engine": f"phi3 {quant.kernel_isa()}", "prefill_tok_s_cpu": round(prompt_tokens / prefill, 2),
            "decode_tok_s_cpu": round(new_tokens / decode, 2)}


def llama_worker(path: str, prompt_tokens: int, new_tokens: int) -> dict:
    import llama_cpp
    import numpy as np
    llm = llama_cpp.Llama(path, n_ctx=4096, n_threads=1, n_threads_batch=1, n_batch=512, verbose=False)
    tokens = np.random.default_rng(0).integers(0, llm.n_vocab(), prompt_tokens).tolist()
    t = time.process_time()
    llm.eval(tokens)
    prefill = time.process_time() - t
    t = time.process_time()
    for _ in range(new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        llm.eval([int(np.argmax(logits))])
    decode = time.process_time() - t
    return {"engine": "llama.cpp", "prefill_tok_s_cpu": round(prompt_tokens / prefill, 2),
            "decode_tok_s_cpu": round(new_tokens / decode, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--llama-python", default=sys.executable)
    ap.add_argument("--phi3-kernels", default="avx2", help="avx2 (with PyTorch kept to AVX2), avx512, portable")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(globals()[args.worker](args.file, args.prompt_tokens, args.new_tokens)))
        return 0
    if not os.path.isfile(args.file):
        ap.error(f"no file {args.file}")
    phi3_env = dict(os.environ, **(AVX2_ONLY if args.phi3_kernels == "avx2" else {"PHI3_KERNELS": args.phi3_kernels}))
    common = [__file__, args.file, "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    for _ in range(args.rounds):
        for python, worker, env in ((sys.executable, "phi3_worker", phi3_env),
                                    (args.llama_python, "llama_worker", dict(os.environ))):
            r = subprocess.run([python, *common, "--worker", worker], capture_output=True, text=True, env=env)
            if r.returncode != 0:
                sys.exit(f"{worker} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            print(r.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
