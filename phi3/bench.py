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
            exact: bool = False, head_aware: bool = False, progress: bool = False) -> dict[str, Any]:
    """Load `path` and time a prompt and greedy decoding (run in a fresh process: see bench()).
    `head_aware`: phi3small's head-aware KV cache instead of the full one; `progress`: a bar on
    stderr per layer of the prompt's forward and per decoded token."""
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
        if head_aware and not hasattr(model, "head_aware_cache"):
            raise Phi3Error("--head-aware-cache applies to phi-3-small models (blocksparse attention); "
                            f"{path} is {getattr(model.config, 'model_type', '?')}")
        # a whole context's cache, as llama.cpp's n_ctx allocates
        cache = model.new_cache(1, ctx, head_aware=True) if head_aware else model.new_cache(1, ctx)
        # CPU seconds beside wall seconds: on a shared machine the wall clock also counts other
        # processes' turns, CPU time only this one's work (for all its threads together).
        load_avg = os.getloadavg()
        bar, hooks = _layer_progress(model, f"prefill {prompt_tokens} tokens", None, progress)
        t, c = time.perf_counter(), time.process_time()
        logits = advance(model, cache, tokens[:, :prompt_tokens])
        prefill_s, prefill_cpu_s = time.perf_counter() - t, time.process_time() - c
        bar.close()
        for h in hooks:
            h.remove()
        length = prompt_tokens
        from tqdm import tqdm
        t, c = time.perf_counter(), time.process_time()
        for _ in tqdm(range(new_tokens), desc="decode", unit="tok", disable=not progress, file=sys.stderr):
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
                             * kv_bytes / 1e6, 1) if not head_aware else None,
        # the head-aware cache allocates its sparse layers' stores whole: their bytes, and the dense layers'
        "kv_cache_allocated_mb": round(getattr(cache, "nbytes", 2 * cache.k.numel() * cache.k.element_size())
                                       / 1e6, 1),
        "head_aware_cache": head_aware,
        "packed": f"{sum(isinstance(m, quant.QuantLinear) for m in linears)}/{len(linears)} matrices",
        "kernels": quant.kernel_isa() if quant.kernel_available() else f"none ({quant.kernel_error()})",
    }


def bench(shape: str = "phi-3-mini", layers: int | None = None, qtype: str = "q4_0", prompt_tokens: int = 512,
          new_tokens: int = 128, threads: int = 2, save_gguf: Path | None = None, context: int | None = None,
          quiet: bool = False, exact: bool = False, head_aware: bool = False) -> dict[str, Any]:
    """Measure `shape` (see _prepare) in a fresh process. Unless `quiet`, the worker's progress bars
    (per layer of the prompt, per decoded token: a 32-layer 8K prompt takes many minutes) show on stderr."""
    if prompt_tokens < 1 or new_tokens < 1:
        raise Phi3Error("--prompt-tokens and --new-tokens must be at least 1")
    if head_aware and shape in SHAPES and shape != "phi-3-small":
        # say so before minutes of building a file, not from the worker afterwards
        raise Phi3Error(f"--head-aware-cache applies to phi-3-small (blocksparse attention), not {shape}: "
                        "drop the flag or use --shape phi-3-small")
    path, info = _prepare(shape, layers, qtype, save_gguf, quiet)
    try:
        args = json.dumps([str(path), prompt_tokens, new_tokens, threads, context, exact, head_aware, not quiet])
        r = subprocess.run([sys.executable, "-c", "import sys; from phi3.bench import _worker; _worker(sys.argv[1])",
                            args], stdout=subprocess.PIPE, stderr=subprocess.PIPE if quiet else None, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        if r.returncode != 0:
            lines = [ln for ln in (r.stderr or "").strip().splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit {r.returncode}, see above"
            raise Phi3Error(f"the measuring process failed: {why}")
        result = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        if save_gguf is None and path.name.startswith("bench-") and path.parent.name.startswith("phi3-bench-"):
            path.unlink(missing_ok=True)
            path.parent.rmdir()
    result.update(info)
    result["gguf"] = str(save_gguf or (path if info.get("quantize_s") == 0.0 else "")) or None
    return result


def _worker(args: str) -> None:
    path, prompt_tokens, new_tokens, threads, context, exact, head_aware, progress = json.loads(args)
    try:
        print(json.dumps(measure(Path(path), prompt_tokens, new_tokens, threads, context, exact, head_aware,
                                 progress)))
    except Phi3Error as e:
        print(f"phi3: error: {e}", file=sys.stderr)
        sys.exit(2)


# --- Contexts of a long-context model: issue 17's phi-3-small figures ---------------------------------

class _StopPrefill(Exception):
    """Raised by a layer hook to end a partial (dry-run) prefill after a number of layers."""


def _layer_progress(model: Any, desc: str, stop_after: int | None, show: bool) -> tuple[Any, list[Any]]:
    """A tqdm bar that moves once per decoder layer of a forward pass (a 32-layer prefill of 8K tokens
    takes many minutes on 2 cores), showing the process's CPU seconds; and, with `stop_after`, a hook
    that ends the pass after that many layers."""
    from tqdm import tqdm
    layers = list(model.model.layers)
    total = stop_after or len(layers)
    bar = tqdm(total=total, desc=desc, unit="layer", disable=not show, file=sys.stderr)
    start = time.process_time()

    def done(module: Any, inputs: Any, output: Any) -> None:
        bar.update(1)
        bar.set_postfix(cpu_s=round(time.process_time() - start, 1), refresh=False)
        if stop_after is not None and bar.n >= stop_after:
            raise _StopPrefill

    return bar, [layer.register_forward_hook(done) for layer in layers]


def _fill_cache(cache: Any, n: int, seed: int = 0) -> None:
    """A full cache holding `n` positions of random keys and values, as if a prompt had run: decode
    speed at a context depends on how many keys attention reads, not on their values."""
    import torch
    g = torch.Generator().manual_seed(seed)
    for t in (cache.k, cache.v):
        for layer in range(t.shape[0]):  # a layer at a time: no float32 copy of the whole cache
            t[layer, :, :, :n] = (torch.randn(t[layer, :, :, :n].shape, generator=g) * 0.5).to(t.dtype)
    cache.valid[:, :n] = True
    cache.next_position.fill_(n)
    cache.length = n


def measure_context(path: Path, context: int, new_tokens: int = 32, threads: int = 2, head_aware: bool = True,
                    dry_run: bool = False, prefill_layers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Load `path` and run measure_model on it (in a fresh process: see bench_contexts)."""
    import torch

    from phi3.checkpoint import load
    torch.set_num_threads(threads)
    t = time.perf_counter()
    lm = load(path)
    info = {"load_s": round(time.perf_counter() - t, 1), "file_mb": round(path.stat().st_size / 1e6, 1),
            "rss_after_load_mb": peak_rss_mb()}
    return {**info, **measure_model(lm.model, context, new_tokens, threads, head_aware, dry_run, prefill_layers,
                                    progress)}


def measure_model(model: Any, context: int, new_tokens: int = 32, threads: int = 2, head_aware: bool = True,
                  dry_run: bool = False, prefill_layers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Prefill a random prompt of `context - new_tokens` tokens into a full cache of `context`
    positions (one forward, as `phi3 generate` runs a prompt; timed, wall and CPU), decode
    `new_tokens` greedily, then (`head_aware`, phi3small only) copy the prompt's keys into a head-aware
    cache and decode the same tokens again. Peak RSS (VmHWM) is read after each phase.

    `dry_run`: the prompt runs through the first `prefill_layers` layers only (the time is for those
    layers and extrapolated in `prefill_cpu_s_estimated`), and decoding starts from a cache filled
    with random keys and values: decode speed at that context, and the prefill's cost, without
    paying for a whole prefill."""
    import torch
    cfg = model.config
    if head_aware and getattr(cfg, "model_type", None) != "phi3small":
        raise Phi3Error(f"the head-aware KV cache is phi3small's; this model is {getattr(cfg, 'model_type', '?')} "
                        "(run without the head-aware cache)")
    prompt = context - new_tokens
    if prompt < 1:
        raise Phi3Error(f"context {context} leaves no prompt before {new_tokens} new tokens; raise the context")
    n_layers = cfg.num_hidden_layers
    if dry_run and not 1 <= prefill_layers <= n_layers:
        raise Phi3Error(f"--prefill-layers {prefill_layers} is out of range (1 to {n_layers})")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (1, context), generator=g)
    out: dict[str, Any] = {"context": context, "prompt_tokens": prompt, "new_tokens": new_tokens, "threads": threads,
                           "layers": n_layers, "dry_run": dry_run}
    new_cache = (lambda ha: model.new_cache(1, context, head_aware=ha)) if head_aware else \
        (lambda ha: model.new_cache(1, context))

    def decode(cache: Any, logits: Any, desc: str, forced: list[int] | None = None
               ) -> tuple[list[int], list[Any], float, float]:
        """Greedy ids (or the `forced` ones fed in), each step's last logits, wall and CPU seconds."""
        from tqdm import tqdm

        from phi3.generate import advance
        seq = tokens.clone()
        ids, steps = [], []
        t, c = time.perf_counter(), time.process_time()
        for i in tqdm(range(new_tokens), desc=desc, unit="tok", disable=not progress, file=sys.stderr):
            ids.append(forced[i] if forced is not None else int(logits[0, -1].argmax()))
            seq[0, cache.length] = ids[-1]
            logits = advance(model, cache, seq[:, :cache.length + 1])
            steps.append(logits[0, -1])
        return ids, steps, time.perf_counter() - t, time.process_time() - c

    with torch.inference_mode():
        from phi3.generate import advance
        full = new_cache(False)
        out["load_avg_before"] = list(os.getloadavg())
        bar, hooks = _layer_progress(model, f"prefill {prompt} tokens", prefill_layers if dry_run else None, progress)
        t, c = time.perf_counter(), time.process_time()
        try:
            logits = advance(model, full, tokens[:, :prompt])
        except _StopPrefill:
            logits = None
        prefill_s, prefill_cpu = time.perf_counter() - t, time.process_time() - c
        bar.close()
        for h in hooks:
            h.remove()
        out["rss_after_prefill_mb"] = peak_rss_mb()
        if dry_run:
            # The layers alternate (blocksparse, dense): an even count is a whole number of pairs.
            out.update(prefill_layers=prefill_layers, prefill_partial_s=round(prefill_s, 1),
                       prefill_partial_cpu_s=round(prefill_cpu, 1),
                       prefill_cpu_s_estimated=round(prefill_cpu * n_layers / prefill_layers, 0))
            full.reset()
            _fill_cache(full, prompt)
            logits = torch.zeros(1, 1, cfg.vocab_size)
            logits[0, 0, int(tokens[0, prompt])] = 1.0  # the first new token: the next random one
        else:
            out.update(prefill_s=round(prefill_s, 1), prefill_cpu_s=round(prefill_cpu, 1),
                       prefill_tok_s=round(prompt / prefill_s, 2), prefill_tok_per_cpu_s=round(prompt / prefill_cpu, 2))
        first = logits
        ids, steps, dec_s, dec_cpu = decode(full, first, f"decode at {prompt}, full cache")
        out.update(decode_tok_s=round(new_tokens / dec_s, 3), decode_cpu_s_per_token=round(dec_cpu / new_tokens, 3),
                   rss_after_decode_mb=peak_rss_mb(),
                   kv_bytes_full=(full.k.numel() * full.k.element_size() * 2))
        if head_aware:
            from phi3.model_small import kv_cache_bytes
            ha = new_cache(True)
            t = time.perf_counter()
            ha.copy_prefix(full, prompt)  # the prompt's keys: positions 0:prompt, as engine.Prefix does
            ha.valid[:, :prompt] = True
            ha.next_position.fill_(prompt)
            ha.length = prompt
            copy_s = time.perf_counter() - t
            # The full run's ids fed in (not its own greedy choice): random weights give near-flat
            # logits, where float16-cache rounding in another summation order can flip a greedy
            # argmax and every later step would then differ (1K, 32 layers: it did). The logits of
            # the same inputs are what must agree.
            _, steps_ha, dec_s, dec_cpu = decode(ha, first, f"decode at {prompt}, head-aware cache", forced=ids)
            a, b = torch.stack(steps), torch.stack(steps_ha)
            out.update(ha_copy_s=round(copy_s, 2), ha_decode_tok_s=round(new_tokens / dec_s, 3),
                       ha_decode_cpu_s_per_token=round(dec_cpu / new_tokens, 3),
                       ha_same_argmax=f"{int((a.argmax(-1) == b.argmax(-1)).sum())}/{new_tokens}",
                       ha_max_logit_diff=float((a - b).abs().max()),
                       logit_std=round(float(a[:, :cfg.vocab_size][a > torch.finfo(a.dtype).min].std()), 5),
                       rss_after_ha_decode_mb=peak_rss_mb(), kv_bytes_head_aware=ha.nbytes,
                       kv_bytes_formula=[kv_cache_bytes(cfg, 1, context, full.k.element_size(), h)
                                         for h in (False, True)])
        out["load_avg_after"] = list(os.getloadavg())
    out["peak_rss_mb"] = peak_rss_mb()
    out["cpu_s_total"] = round(time.process_time(), 1)
    return out


def _context_worker(args: str) -> None:
    kwargs = json.loads(args)
    kwargs["path"] = Path(kwargs["path"])
    try:
        print(json.dumps(measure_context(**kwargs)))
    except Phi3Error as e:
        print(f"phi3: error: {e}", file=sys.stderr)
        sys.exit(2)


def bench_contexts(path: Path, contexts: list[int], new_tokens: int = 32, threads: int = 2, head_aware: bool = True,
                   dry_run: bool = False, prefill_layers: int = 2, progress: bool = True) -> list[dict[str, Any]]:
    """measure_context for each context, each in a fresh process (its own VmHWM), progress on stderr."""
    for context in contexts:  # before minutes of loading
        if context - new_tokens < 1:
            raise Phi3Error(f"context {context} leaves no prompt before {new_tokens} new tokens; raise the context")
    results = []
    for context in contexts:
        args = json.dumps({"path": str(path), "context": context, "new_tokens": new_tokens, "threads": threads,
                           "head_aware": head_aware, "dry_run": dry_run, "prefill_layers": prefill_layers,
                           "progress": progress})
        r = subprocess.run([sys.executable, "-c", "import sys; from phi3.bench import _context_worker; "
                            "_context_worker(sys.argv[1])", args], stdout=subprocess.PIPE, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        if r.returncode != 0:
            raise Phi3Error(f"the measuring process for context {context} failed (exit {r.returncode}; "
                            "its error is above)")
        results.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return results
