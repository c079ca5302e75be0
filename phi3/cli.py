"""The `phi3` command: chat, generate, serve, index, info, convert, quantize, perplexity, eval, mt-bench, safety, bench, fetch, train.

Bad input of any kind ends in one line `phi3: error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from phi3.errors import Phi3Error

DTYPE_HELP = ("compute precision: float32, bfloat16, float16 or auto (default). auto computes GGUF "
              "models in float32 around their packed 4/8-bit weights, and Hugging Face checkpoints in "
              "their stored dtype when that is bfloat16, else float32")
EXACT_HELP = ("multiply packed 4/8-bit GGUF weights with float activations (equal to the dequantized "
              "model; ~1.5-3x slower decoding) instead of rounding activations to int8 per block of 32 "
              "as llama.cpp does")
DEQUANTIZE_HELP = ("unpack every 4/8-bit GGUF weight to the compute dtype at load (float32: 4 bytes per "
                   "weight, ~8x a 4-bit file) instead of keeping the blocks packed in memory")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"phi3: error: {message} (see '{self.prog} --help')\n")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m",
                   help="Hugging Face folder, .gguf file or hub id (default: SmolLM2-135M-Instruct, "
                        "fetched on first use)")
    _add_compute_args(p)


def _add_compute_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help=DTYPE_HELP)
    p.add_argument("--threads", type=int, default=None,
                   help=f"CPU threads (default: all {os.cpu_count()} cores)")
    p.add_argument("--exact", action="store_true", help=EXACT_HELP)
    p.add_argument("--dequantize", action="store_true", help=DEQUANTIZE_HELP)
    p.add_argument("--kv-cache", default="auto", choices=["auto", "f32", "f16", "bf16", "q8_0"],
                   help="KV cache element type (default auto: f16 for packed GGUF weights on the CPU, as "
                        "llama.cpp; else the compute dtype). q8_0 halves f16's memory (BENCHMARKS.md: its "
                        "perplexity cost)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or mps (default auto: a GPU when PyTorch sees one, else the CPU). "
                        "On a GPU, dense checkpoints compute in bfloat16 and 4-bit GGUF weights stay packed, "
                        "unpacked a slice at a time per matmul")


def set_threads(n: int | None) -> None:
    import torch
    cores = os.cpu_count() or 1
    if n is None:
        return
    if not 1 <= n <= cores:
        raise Phi3Error(f"--threads {n} is out of range: this machine has {cores} cores (use 1 to {cores})")
    torch.set_num_threads(n)


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"new tokens at most (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_head_aware_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head-aware-cache", action="store_true",
                   help="phi-3-small: in its blocksparse layers keep only the KV blocks some head can still see "
                        "(at 8K: 22%% less KV memory and faster decoding, the same tokens)")


def _use_head_aware_cache(args: argparse.Namespace, lm: Any) -> None:
    if not getattr(args, "head_aware_cache", False):
        return
    if not hasattr(lm.model, "head_aware_cache"):
        raise Phi3Error(f"--head-aware-cache applies to phi-3-small models (blocksparse attention); "
                        f"{lm.path.name} is {lm.config.model_type}: drop the flag")
    lm.model.head_aware_cache = True
    lm.model.new_cache(1, 1)  # a cache kind it cannot hold (--kv-cache q8_0) fails here, before any prompt


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="phi3", description="Run Phi-3-family models on your own hardware.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    chat = sub.add_parser("chat", help="multi-turn chat (reads one message per line when stdin is not a TTY)")
    _add_model_args(chat)
    _add_sampling_args(chat, 512)
    _add_head_aware_arg(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--search", default=None, metavar="INDEX",
                      help="answer with passages from this index (phi3 index build) or SearxNG URL, and list them")

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP API and chat page (http://HOST:PORT/)")
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    srv.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' on every API request (visible to other users in `ps`: "
                          "prefer --api-key-file or the PHI3_API_KEY environment variable)")
    srv.add_argument("--api-key-file", default=None, metavar="PATH",
                     help="read the API key from this file (its first line)")
    srv.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                     help="without an API key, also accept requests whose Host header is NAME (a reverse proxy's "
                          "name; localhost, the --host address and IP addresses are always accepted). Repeatable")
    srv.add_argument("--max-connections", type=int, default=256,
                     help="open connections; more get HTTP 503 and are closed at once (default 256)")
    srv.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds for a request head to arrive, after connecting or after the previous response; "
                          "slower clients get 408 and are disconnected (default 10)")
    srv.add_argument("--keep-alive-timeout", type=float, default=5.0,
                     help="seconds an idle keep-alive connection stays open (default 5)")
    srv.add_argument("--body-timeout", type=float, default=60.0,
                     help="seconds for a request body to arrive; slower ones get 408 (default 60)")
    srv.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    srv.add_argument("--max-queue", type=int, default=64,
                     help="requests allowed to wait beyond those; more get HTTP 429 (default 64)")
    srv.add_argument("--search", default=None, metavar="INDEX",
                     help="search-augmented chat: an index from `phi3 index build`, or a SearxNG URL "
                          "(http://...; its JSON API). On by default for chat requests; they may send \"search\": false")
    srv.add_argument("--search-k", type=int, default=3, help="passages per answer (default 3)")
    srv.add_argument("--name", default=None, help="model id clients must send (default: the model file or folder name)")

    idx = sub.add_parser("index", help="full-text search index over your documents, for search-augmented chat")
    isub = idx.add_subparsers(dest="index_command", required=True, parser_class=_Parser)
    ib = isub.add_parser("build", help="index the .txt, .md and .html files under a folder, in passages "
                                       "(links leading outside the folder and binary files are skipped and listed)")
    ib.add_argument("docs_dir", help="folder of documents")
    ib.add_argument("--index", required=True, help="folder to write the index into")
    ib.add_argument("--passage-words", type=int, default=120, help="words per passage (default 120)")
    isr = isub.add_parser("search", help="show the best passages for a query")
    isr.add_argument("index", help="index folder (or a SearxNG URL)")
    isr.add_argument("query", help="what to look for")
    isr.add_argument("-k", type=int, default=5, help="passages to show (default 5)")
    isr.add_argument("--json", action="store_true", help="print a JSON list")

    gen = sub.add_parser("generate", help="complete one prompt")
    _add_model_args(gen)
    gen.add_argument("--prompt", "-p", required=True, help="the prompt ('-' reads it from stdin)")
    _add_sampling_args(gen, 256)
    _add_head_aware_arg(gen)
    gen.add_argument("--system", default=None, help="system prompt (chat template only)")
    gen.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object with text and token_ids (generated ids, stop token excluded)")

    info = sub.add_parser("info", help="describe a model file or folder")
    info.add_argument("path", help="Hugging Face folder or .gguf file")
    info.add_argument("--json", action="store_true")

    conv = sub.add_parser("convert", help="write a GGUF model as a Hugging Face folder transformers loads")
    conv.add_argument("gguf", help="input .gguf file")
    conv.add_argument("out_dir", help="output folder")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                      help="precision of the written weights (default float32: exact dequantized values)")

    qz = sub.add_parser("quantize", help="write a model as a GGUF file (4/8/16-bit) that phi3, llama.cpp and ollama run")
    qz.add_argument("model", help="Hugging Face folder, .gguf file or hub id")
    qz.add_argument("out", help="output .gguf file")
    qz.add_argument("--type", default="q4_0", metavar="TYPE",
                    help="q4_0 (default), q4_1, q4_k, iq4_nl, iq4_xs, q8_0, f16 or f32 (iq4_xs: 4.25 bits per "
                         "weight, the smallest; iq4_nl: 4.5 bits with non-linear levels)")
    qz.add_argument("--pure", action="store_true",
                    help="store the embedding and output matrices in TYPE too (default: q8_0 under 4-bit types)")
    qz.add_argument("--json", action="store_true", help="print a JSON summary")

    bn = sub.add_parser("bench", help="measure load time, prefill/decode speed, peak memory and file size")
    bn.add_argument("--shape", default="phi-3-mini",
                    help="phi-3-mini (default), phi-3-small or phi-3-medium: random weights of that exact shape; "
                         "or a model path")
    bn.add_argument("--layers", type=int, default=None, help="keep only the first N layers of the shape")
    bn.add_argument("--type", default="q4_0", metavar="TYPE", help="q4_0 (default), q4_1, q4_k, q8_0, f16 or f32")
    bn.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (default 512)")
    bn.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default 128)")
    bn.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads (default 2)")
    bn.add_argument("--context", type=int, default=None,
                    help="KV-cache length to allocate (default: the model's context, e.g. 4096)")
    bn.add_argument("--save-gguf", default=None, metavar="PATH", help="keep the quantized file that was measured")
    bn.add_argument("--exact", action="store_true", help=EXACT_HELP)
    _add_head_aware_arg(bn)
    bn.add_argument("--json", action="store_true",
                    help="print one JSON object (load_s, prefill_tok_s, decode_tok_s, peak_rss_mb, file_mb, ...)")

    ppl = sub.add_parser("perplexity", help="perplexity of a text file (llama.cpp's chunked method)")
    ppl.add_argument("model", help="Hugging Face folder, .gguf file or hub id")
    ppl.add_argument("text_file", help="UTF-8 text")
    ppl.add_argument("--context", type=int, default=512, help="chunk length in tokens (default 512)")
    _add_compute_args(ppl)
    ppl.add_argument("--json", action="store_true", help="print one JSON object")

    ev = sub.add_parser("eval", help="few-shot benchmarks of the report's table at temperature 0 "
                                     "(see --list-tasks)")
    _add_model_args(ev)
    ev.add_argument("--tasks", default=None,
                    help="comma-separated: mmlu,gsm8k,...; 'all'; NAME:SUB+SUB for some subjects/subtasks "
                         "(bbh:navigate+snarks); ARC-layout tasks also take NAME=FILE.jsonl")
    ev.add_argument("--data-dir", default=os.environ.get("PHI3_DATA_DIR", "data"),
                    help="folder with a sub-folder per benchmark as its authors publish it "
                         "(default $PHI3_DATA_DIR or ./data; see README 'Evaluation data')")
    ev.add_argument("--limit", type=int, default=None,
                    help="only the first N examples of each task (of each subject/subtask where it has them)")
    ev.add_argument("--shots", type=int, default=None, help="few-shot examples (default: each task's k in the report)")
    ev.add_argument("--batch-size", type=int, default=8,
                    help="examples scored in one forward pass / completions decoded together (default 8)")
    ev.add_argument("--max-tokens", type=int, default=None, help="generation tasks: new tokens at most (default: the task's)")
    ev.add_argument("--output", "-o", default="results.json",
                    help="results JSON (default results.json); beside it NAME.md, NAME.png and NAME.records/ "
                         "(per-example records, from which an interrupted run resumes)")
    ev.add_argument("--timeout", type=float, default=10.0, help="code tasks: seconds per program (default 10)")
    ev.add_argument("--memory-mb", type=int, default=1024, help="code tasks: memory per program (default 1024)")
    ev.add_argument("--fast", action="store_true",
                    help="round activations to int8 like llama.cpp around packed GGUF weights (faster, but the "
                         "scores then measure that rounding too); default: exact float activations")
    ev.add_argument("--list-tasks", action="store_true", help="list the tasks, their k and the files they read")

    from phi3 import judge  # standard library only: cheap to import for the parser
    judge.add_mt_bench_args(sub.add_parser(
        "mt-bench", help="MT-bench: a local model's answers graded 1-10 by an OpenAI-compatible judge (FastChat's prompts)"))
    judge.add_safety_args(sub.add_parser(
        "safety", help="multi-turn safety benchmark: simulated users, judged harm severity (DR-x) and ungroundedness"))

    # `phi3 train ...` is handed whole to phi3.train.trainer.main (its own parser; see main below).
    sub.add_parser("data", help="the data recipe on datatrove: ingest, heuristics, dedup, decontaminate, judge, "
                                "classify, synthetic, phases, tokenize, report, run (phi3 data --help)", add_help=False)
    sub.add_parser("train", help="train or fine-tune: pretrain, sft, dpo, longctx (alone or under torchrun; "
                                 "`phi3 train --help`)", add_help=False)

    sub.add_parser("fetch", help="download the default model (SmolLM2-135M-Instruct) into the cache "
                                 "and build the quantized CPU kernel")
    return parser


def _sampling(args: argparse.Namespace):
    from phi3.generate import SamplingParams
    return SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=tuple(args.stop))


def _load(args: argparse.Namespace):
    from phi3 import checkpoint
    set_threads(args.threads)
    if args.model is None:
        print(f"phi3: using the default model {checkpoint.DEFAULT_MODEL_FILE} "
              f"({checkpoint.default_model_path()}); pass --model to choose another", file=sys.stderr)
    return checkpoint.load(args.model, dtype=args.dtype, exact=args.exact, dequantize=args.dequantize,
                           device=args.device, kv_cache=args.kv_cache)


def cmd_generate(args: argparse.Namespace) -> int:
    from phi3.generate import generate, stream
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise Phi3Error("empty prompt: pass some text with --prompt")
    params = _sampling(args)
    params.validate()
    lm = _load(args)
    _use_head_aware_cache(args, lm)
    tok = lm.tokenizer
    if args.raw:
        ids = tok.encode(prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = tok.encode_chat(messages + [{"role": "user", "content": prompt}])
    if args.json:
        out = generate(lm.model, tok, [ids], params)[0]
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "finish_reason": out.finish_reason,
                          "prompt_tokens": out.prompt_tokens, "completion_tokens": len(out.token_ids)},
                         ensure_ascii=False))
        return 0
    s = stream(lm.model, tok, ids, params)
    for piece in s:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


CHAT_HELP = "commands: /reset (new conversation), /system TEXT (set system prompt), /quit"


def cmd_chat(args: argparse.Namespace) -> int:
    from phi3.generate import stream
    params = _sampling(args)
    params.validate()
    searcher = None
    if args.search:  # before loading the model: a wrong index path should fail in a second
        from phi3.search import open_searcher
        searcher = open_searcher(args.search)
    lm = _load(args)
    _use_head_aware_cache(args, lm)
    tok = lm.tokenizer
    interactive = sys.stdin.isatty()
    system = args.system
    history: list[dict[str, str]] = []
    if interactive:
        print(f"phi3 chat with {lm.config.name} ({lm.path.name}). {CHAT_HELP}", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input(">>> ")
            except EOFError:
                print()
                return 0
        else:
            line = sys.stdin.readline()
            if not line:
                return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit", "/bye"):
            return 0
        if line == "/reset":
            history.clear()
            print("(conversation reset)", file=sys.stderr)
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history.clear()
            print(f"(system prompt {'set' if system else 'cleared'}; conversation reset)", file=sys.stderr)
            continue
        if line.startswith("/") and line.split()[0] not in ("/reset", "/system", "/quit"):
            print(f"unknown command {line.split()[0]}; {CHAT_HELP}", file=sys.stderr)
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": line})
        passages = []
        if searcher is not None:
            from phi3.search import augment
            passages = searcher.search(line, 3)
            messages = augment(messages, passages)  # this turn only: history keeps the plain question
        ids = tok.encode_chat(messages)
        try:
            s = stream(lm.model, tok, ids, params)
            for piece in s:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except Phi3Error as e:
            print(f"phi3: error: {e} (use /reset to start over)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        for i, p in enumerate(passages, 1):
            sys.stdout.write(f"  [{i}] {p.title} <{p.url}>\n")
        sys.stdout.flush()
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": s.completion.text}]


def cmd_info(args: argparse.Namespace) -> int:
    from phi3.checkpoint import describe
    info = describe(Path(args.path))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            value = "; ".join(f"{k}: {v}" if isinstance(v, str) else f"{k} x{v}" for k, v in value.items())
        if key.endswith("bytes") and isinstance(value, int):
            value = f"{value:,} ({value / 2**20:.1f} MiB)"
        if key == "parameters":
            value = f"{value:,} ({value / 1e9:.3f} B)"
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from phi3.checkpoint import load_gguf, save_hf_folder
    src = Path(args.gguf)
    if not src.exists():
        raise Phi3Error(f"no such file: {src}")
    lm = load_gguf(src, dtype=args.dtype, keep_quantized=False)
    save_hf_folder(lm, Path(args.out_dir))
    print(f"wrote {args.out_dir} (config.json, safetensors weights, tokenizer files)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from phi3 import export, quant
    if args.type not in quant.WRITE_TYPES:
        raise Phi3Error(f"unsupported quantization type {args.type!r}; choose one of {', '.join(quant.WRITE_TYPES)}")
    out = Path(args.out)
    if out.is_dir():
        raise Phi3Error(f"{out} is a folder; give the output .gguf file's path")
    summary = export.write_gguf(export.open_source(Path(args.model)), out, args.type, pure=args.pure,
                                progress=not args.json)
    if args.json:
        print(json.dumps(summary))
    else:
        types = ", ".join(f"{n} {k}" for k, n in summary["tensor_types"].items())
        print(f"wrote {out} ({summary['file_bytes'] / 1e6:.1f} MB, arch {summary['arch']}; tensors: {types})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from phi3.bench import bench
    set_threads(args.threads)
    result = bench(args.shape, args.layers, args.type, args.prompt_tokens, args.new_tokens, args.threads,
                   Path(args.save_gguf) if args.save_gguf else None, args.context, quiet=args.json, exact=args.exact,
                   head_aware=args.head_aware_cache)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']}, {result['type']}, {result['threads']} threads: load {result['load_s']} s, "
              f"prefill {result['prefill_tok_s']} tok/s ({result['prompt_tokens']} tokens), "
              f"decode {result['decode_tok_s']} tok/s ({result['new_tokens']} tokens), "
              f"peak RSS {result['peak_rss_mb']} MB, file {result['file_mb']} MB")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from phi3.checkpoint import load
    from phi3.eval import perplexity, read_text
    text = read_text(args.text_file)
    set_threads(args.threads)
    lm = load(args.model, dtype=args.dtype, exact=args.exact, dequantize=args.dequantize, device=args.device,
              kv_cache=args.kv_cache)
    result = perplexity(lm, text, context=args.context, progress=not args.json)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens_scored} tokens "
              f"({result.chunks} chunks of {result.context}; {result.method})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from phi3 import tasks
    if args.list_tasks:
        for t in tasks.TASKS.values():
            print(f"{t.name:15} {t.title:17} {t.kind:9} k={t.shots:<3} {t.layout}\n{'':15} from {t.source}")
        return 0
    if not args.tasks:
        raise Phi3Error("no tasks given: pass --tasks, e.g. --tasks gsm8k,arc_challenge (--list-tasks lists them)")
    from phi3 import checkpoint
    from phi3.eval import EvalSettings, evaluate
    settings = EvalSettings(shots=args.shots, limit=args.limit, batch_size=args.batch_size, max_tokens=args.max_tokens,
                            timeout_s=args.timeout, memory_mb=args.memory_mb)
    settings.validate()
    data_dir = Path(args.data_dir)
    from phi3.eval import load_tasks
    loaded = load_tasks(args.tasks, data_dir)  # bad data fails before the model loads
    set_threads(args.threads)
    if args.model is None:
        print(f"phi3: using the default model {checkpoint.DEFAULT_MODEL_FILE}; pass --model to choose another",
              file=sys.stderr)
    lm = checkpoint.load(args.model, dtype=args.dtype, exact=not args.fast, dequantize=args.dequantize,
                         device=args.device, kv_cache=args.kv_cache)
    model_id = Path(args.model).name if args.model else checkpoint.DEFAULT_MODEL_FILE
    output = Path(args.output)
    output = output if output.suffix == ".json" else output.with_suffix(".json")
    evaluate(lm, args.tasks, data_dir, settings, output, model_id, progress=True, loaded=loaded)
    print(output.with_suffix(".md").read_text(), end="")
    written = [output, output.with_suffix(".md")] + [p for p in [output.with_suffix(".png")] if p.exists()]
    print(f"phi3: wrote {', '.join(map(str, written))} and {output.with_suffix('.records')}/", file=sys.stderr)
    return 0


def cmd_mt_bench(args: argparse.Namespace) -> int:
    from phi3.judge import cmd_mt_bench as run
    return run(args)


def cmd_safety(args: argparse.Namespace) -> int:
    from phi3.judge import cmd_safety as run
    return run(args)


def cmd_fetch(args: argparse.Namespace) -> int:
    from phi3 import quant
    from phi3.checkpoint import fetch_default_model
    print(fetch_default_model())
    if not quant.kernel_available():  # built now rather than on the first chat
        print(f"phi3: no compiled CPU kernel ({quant.kernel_error()}); 4-bit GGUF weights stay packed and are "
              "unpacked a slice at a time per matmul (slower, same memory)", file=sys.stderr)
    return 0


API_KEY_ENV = "PHI3_API_KEY"


def serve_api_key(api_key: str | None, api_key_file: str | None, environ: dict | None = None) -> str | None:
    """The key `phi3 serve` requires: --api-key, else the first line of --api-key-file, else
    $PHI3_API_KEY, else none. A key on the command line shows in `ps` to every user of the
    machine; a file or the environment does not."""
    environ = os.environ if environ is None else environ
    if api_key is not None and api_key_file is not None:
        raise Phi3Error("give the API key once: --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            lines = Path(api_key_file).expanduser().read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise Phi3Error(f"--api-key-file {api_key_file}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
        api_key = lines[0].strip() if lines else ""
        where = f"--api-key-file {api_key_file}"
    elif api_key is not None:
        where = "--api-key"
    else:
        api_key, where = environ.get(API_KEY_ENV), API_KEY_ENV
    if api_key is None:
        return None
    api_key = api_key.strip()
    if not api_key or not api_key.isprintable() or not api_key.isascii() or " " in api_key:
        raise Phi3Error(f"the API key from {where} is empty or holds spaces or non-ASCII characters; "
                        "use a random printable ASCII string (e.g. `openssl rand -hex 32`)")
    return api_key


def exposure_warning(host: str, has_key: bool) -> str | None:
    """One line for stderr when the server is reachable from other machines without a key."""
    import ipaddress
    if has_key:
        return None
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host.lower() == "localhost"
    if loopback:
        return None
    return (f"phi3: warning: --host {host} accepts connections from other machines and there is no API key: anyone "
            f"who can reach it can use the model (set {API_KEY_ENV} or --api-key-file)")


def cmd_serve(args: argparse.Namespace) -> int:
    from phi3.server import Limits, check_port, serve
    if not 0 < args.port < 65536:
        raise Phi3Error(f"--port {args.port} is out of range (1 to 65535)")
    api_key = serve_api_key(args.api_key, args.api_key_file)
    limits = Limits(max_connections=args.max_connections, header_timeout=args.header_timeout,
                    keep_alive_timeout=args.keep_alive_timeout, body_timeout=args.body_timeout)
    limits.check()
    _check_fd_limit(args.max_connections)
    check_port(args.host, args.port)
    if args.max_batch < 1 or args.max_queue < 0 or args.search_k < 1:
        raise Phi3Error("--max-batch and --search-k must be at least 1, --max-queue at least 0")
    searcher = None
    if args.search:  # before loading the model: a wrong index path should fail in a second
        from phi3.search import open_searcher
        searcher = open_searcher(args.search)
    warning = exposure_warning(args.host, api_key is not None)
    if warning:
        print(warning, file=sys.stderr)
    lm = _load(args)
    name = args.name or lm.path.name
    auth = "; API key required" if api_key else ""
    print(f"phi3: serving {name} on http://{args.host}:{args.port}/ (OpenAI API under /v1{auth}); Ctrl-C stops",
          file=sys.stderr)
    serve(lm, host=args.host, port=args.port, api_key=api_key, max_batch=args.max_batch,
          max_queue=args.max_queue, searcher=searcher, search_k=args.search_k, model_id=name, limits=limits,
          allowed_hosts=args.allow_host)
    return 0


def _check_fd_limit(max_connections: int) -> None:
    """Each connection is a file descriptor: raise the soft limit to fit --max-connections (plus
    64 for model files and the like) where the hard limit allows, else refuse with the fix."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    need = max_connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        return
    raise Phi3Error(f"--max-connections {max_connections} needs {need} file descriptors but this process may open "
                    f"{hard} (ulimit -n); lower --max-connections or raise the limit")


def cmd_index(args: argparse.Namespace) -> int:
    from phi3 import search
    if args.index_command == "build":
        if args.passage_words < 10:
            raise Phi3Error(f"--passage-words {args.passage_words} is too small (use 10 or more)")
        stats = search.build_index(Path(args.docs_dir), Path(args.index), passage_words=args.passage_words)
        for rel, why in stats.skipped:  # links leading out of the folder, binary files: said, not silent
            print(f"phi3: skipped {rel}: {why}", file=sys.stderr)
        print(f"indexed {stats.documents} documents in {stats.passages} passages into {stats.path}"
              + (f" (skipped {len(stats.skipped)}, listed above)" if stats.skipped else ""))
        return 0
    if args.k < 1:
        raise Phi3Error(f"-k {args.k} must be at least 1")
    hits = search.open_searcher(args.index).search(args.query, args.k)
    if args.json:
        print(json.dumps([{"title": h.title, "url": h.url, "source": h.source, "score": h.score, "text": h.text}
                          for h in hits], ensure_ascii=False))
        return 0
    if not hits:
        print("no passages match", file=sys.stderr)
    for i, h in enumerate(hits, 1):
        print(f"[{i}] {h.title} ({h.source}, score {h.score:.2f})\n    {h.text[:300]}")
    return 0


COMMANDS = {"chat": cmd_chat, "serve": cmd_serve, "index": cmd_index, "generate": cmd_generate, "info": cmd_info, "convert": cmd_convert,
            "perplexity": cmd_perplexity, "eval": cmd_eval, "mt-bench": cmd_mt_bench,
            "safety": cmd_safety, "quantize": cmd_quantize, "bench": cmd_bench,
            "fetch": cmd_fetch}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # a verb module with its own parser (and torchrun's process group)
        from phi3.train.trainer import main as train_main
        return train_main(argv[1:])
    if argv[:1] == ["data"]:  # the data recipe on datatrove, a verb module with its own parser
        from phi3.recipe.cli import main as data_main
        return data_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except Phi3Error as e:
        print(f"phi3: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        if os.environ.get("PHI3_DEBUG"):
            raise
        print(f"phi3: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _entry() -> Any:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
