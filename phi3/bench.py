"""`phi3 bench`: load time, prefill and decode speed, peak memory and file size of a quantized model.

Without a checkpoint it builds a model of a preset's exact shape with random weights (speed does
not depend on weight values) and quantizes it to a GGUF file, which `--save-gguf` keeps so that
other tools (llama.cpp) can run the very same file. The measurement runs in a fresh process, so
that its peak resident memory is the model's and not the quantizer's.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from phi3.errors import Phi3Error

SHAPES = {"phi-3-mini": "phi-3-mini-4k-instruct", "phi-3-medium": "phi-3-medium-4k-instruct",
          "phi-3-small": "phi-3-small-8k-instruct"}


def _prepare(shape: str, layers: int | None, qtype: str, save: Path | None, quiet: bool) -> tuple[Path, dict[str, Any]]:
    """The GGUF file to measure, and what making it took."""
    from phi3 import export, quant
    from phi3.config import get_preset
    if qtype not in quant.WRITE_TYPES:
        raise Phi3Error(f"unsupported quantization type {qtype!r}; choose one of {', '.join(quant.WRITE_TYPES)}")
    info: dict[str, Any] = {"type": qtype}
    if shape in SHAPES:
        cfg = get_preset(SHAPES[shape])
        if layers is not None:
            if not 1 <= layers <= cfg.num_hidden_layers:
                raise Phi3Error(f"--layers {layers} is out of range for {shape} (1 to {cfg.num_hidden_layers})")
            cfg = cfg.with_(num_hidden_layers=layers)
        source = export.random_source(cfg.with_(name=f"{shape} (random weights)"))
        info["model"] = f"{shape} shape, {cfg.num_hidden_layers} layers, random weights"
    else:
        path = Path(shape)
        if not path.exists():
            raise Phi3Error(f"--shape {shape!r} is neither {' nor '.join(SHAPES)} nor an existing model path")
        if layers is not None:
            raise Phi3Error("--layers applies to the named shapes only, not to a checkpoint")
        info["model"] = str(path)
        if path.is_file() and _gguf_file_type(path) == export.FILE_TYPES[qtype]:
            info["quantize_s"] = 0.0  # already of that type: measure the very file
            if save is not None and save.resolve() != path.resolve():
                import shutil
                shutil.copyfile(path, save)
            return path, info
        source = export.open_source(path)
    out = save or Path(tempfile.mkdtemp(prefix="phi3-bench-")) / f"bench-{qtype}.gguf"
    t = time.perf_counter()
    # pure: every matrix in the type measured, as the report's 4-bit size assumes
    export.write_gguf(source, out, qtype, pure=True, progress=not quiet)
    info["quantize_s"] = round(time.perf_counter() - t, 2)
    return out, info


def _gguf_file_type(path: Path) -> int | None:
    from phi3.checkpoint import _is_gguf, open_gguf
    if not _is_gguf(path):
        return None
    field = open_gguf(path).fields.get("general.file_type")
    return int(field.contents()) if field is not None else None


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss across exec, so a worker spawned by a parent that had just quantized a 7B model
    reported the parent's 3.5 GB (measured: a child of a 1.5 GB parent gets ru_maxrss 1511 MB and
    VmHWM 11 MB). VmHWM belongs to the new process's own memory map."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # macOS: bytes there, but no /proc


def measure(path: Path, prompt_tokens: int, new_tokens: int, threads: int, context: int | None,
            exact: bool = False) -> dict[str, Any]:
    """Load `path` and time a prompt and greedy decoding (run in a fresh process: see bench())."""
    import torch

    from phi3.checkpoint import load
    from phi3.generate import advance
    torch.set_num_threads(threads)
    t = time.perf_counter()
    lm = load(path, exact=exact)
    load_s = time.perf_counter() - t
    model = lm.model
    ctx = context or model.config.max_position_embeddings
    if prompt_tokens + new_tokens > ctx:
        raise Phi3Error(f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the context of {ctx}")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (1, prompt_tokens + new_tokens), generator=g)
    with torch.inference_mode():
        cache = model.new_cache(1, ctx)  # a whole context's cache, as llama.cpp's n_ctx allocates
        # CPU seconds beside wall seconds: on a shared machine the wall clock also counts other
        # processes' turns, CPU time only this one's work (for all its threads together).
        load_avg = os.getloadavg()
        t, c = time.perf_counter(), time.process_time()
        logits = advance(model, cache, tokens[:, :prompt_tokens])
        prefill_s, prefill_cpu_s = time.perf_counter() - t, time.process_time() - c
        length = prompt_tokens
        t, c = time.perf_counter(), time.process_time()
        for _ in range(new_tokens):
            tokens[0, length] = logits[0, -1].argmax()
            length += 1
            logits = advance(model, cache, tokens[:, :length])
        decode_s, decode_cpu_s = time.perf_counter() - t, time.process_time() - c
    from phi3 import quant
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, quant.QuantLinear))]
    kv_bytes = cache.k.element_size() + (cache.k_scale.element_size() / 32 if cache.quantized else 0)
    cfg = model.config
    return {
        "load_s": round(load_s, 3),
        "prefill_tok_s": round(prompt_tokens / prefill_s, 2),
        "decode_tok_s": round(new_tokens / decode_s, 2),
        "prefill_cpu_s": round(prefill_cpu_s, 2), "decode_cpu_s_per_token": round(decode_cpu_s / new_tokens, 3),
        "load_avg": [round(x, 2) for x in (*load_avg, *os.getloadavg())],  # 1/5/15 min, before and after
        "peak_rss_mb": peak_rss_mb(),
        "file_mb": round(path.stat().st_size / 1e6, 1),
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "threads": threads, "context": ctx,
        # What the cache holds for the positions used (its pages are committed only as they fill).
        "kv_cache_mb": round(2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.dim_per_head * length
                             * kv_bytes / 1e6, 1),
        "packed": f"{sum(isinstance(m, quant.QuantLinear) for m in linears)}/{len(linears)} matrices",
        "kernels": quant.kernel_isa() if quant.kernel_available() else f"none ({quant.kernel_error()})",
    }


def bench(shape: str = "phi-3-mini", layers: int | None = None, qtype: str = "q4_0", prompt_tokens: int = 512,
          new_tokens: int = 128, threads: int = 2, save_gguf: Path | None = None, context: int | None = None,
          quiet: bool = False, exact: bool = False) -> dict[str, Any]:
    if prompt_tokens < 1 or new_tokens < 1:
        raise Phi3Error("--prompt-tokens and --new-tokens must be at least 1")
    path, info = _prepare(shape, layers, qtype, save_gguf, quiet)
    try:
        args = json.dumps([str(path), prompt_tokens, new_tokens, threads, context, exact])
        r = subprocess.run([sys.executable, "-c", "import sys; from phi3.bench import _worker; _worker(sys.argv[1])",
                            args], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
            raise Phi3Error(f"the measuring process failed: {lines[-1] if lines else r.returncode}")
        result = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        if save_gguf is None and path.name.startswith("bench-") and path.parent.name.startswith("phi3-bench-"):
            path.unlink(missing_ok=True)
            path.parent.rmdir()
    result.update(info)
    result["gguf"] = str(save_gguf or (path if info.get("quantize_s") == 0.0 else "")) or None
    return result


def _worker(args: str) -> None:
    path, prompt_tokens, new_tokens, threads, context, exact = json.loads(args)
    try:
        print(json.dumps(measure(Path(path), prompt_tokens, new_tokens, threads, context, exact)))
    except Phi3Error as e:
        print(f"phi3: error: {e}", file=sys.stderr)
        sys.exit(2)
