"""tokenize: documents -> datatrove token shards with the target model's tokenizer.

datatrove's DocumentTokenizer writes, per task, `<rank>_doc_shuffled.ds` (little-endian uint16 ids
when the vocabulary fits, else uint32), `.ds.index` (uint64 cumulative document ends) and
`.ds.metadata`; EOS follows every document (its post-processor "$A <EOS>"), and documents are
shuffled within a shard with `seed`, so every executor writes the same bytes. phi3.train.data's
`open_documents(OUT/tokens)` reads them.

The tokenizer is whatever `phi3 train` takes (a GGUF file, a Hugging Face folder, "default" for the
fetched SmolLM2) or a bare tokenizer.json with --eos. It is saved to OUT/tokenizer.json with its
truncation and padding turned off first: DocumentTokenizer honours a tokenizer.json's truncation,
and MiniLM's (128) silently cut every document to 128 tokens (78 documents gave 9,984 tokens instead
of 2.27 M when measured).
"""

from __future__ import annotations

from pathlib import Path

from datatrove.pipeline.tokens import DocumentTokenizer

from phi3.errors import Phi3Error
from phi3.recipe.ingest import docs_reader
from phi3.recipe.pipeline import Step, step_stats


def load_target_tokenizer(spec: str, eos: str | None = None):
    """(tokenizers.Tokenizer with truncation and padding off, EOS token text)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        from tokenizers import Tokenizer
        try:
            tk = Tokenizer.from_file(str(path))
        except Exception as e:
            raise Phi3Error(f"{path}: not a tokenizers tokenizer.json ({str(e).splitlines()[0][:120]})") from None
        eos_token = eos
        if eos_token is None:
            raise Phi3Error(f"{path}: a bare tokenizer.json does not say which token ends a document; pass --eos "
                            "(e.g. --eos '<|endoftext|>'), or give the model's folder or GGUF")
    else:
        from phi3.train.recipe import load_tokenizer_spec
        tok, _ = load_tokenizer_spec(spec)
        # The tokenizers form of any phi3 tokenizer (Phi-3-small's tiktoken vocabulary converts exactly):
        # datatrove's tokenizer step takes a tokenizers.Tokenizer.
        from tokenizers import Tokenizer
        tk, eos_token = Tokenizer.from_str(tok.to_tokenizers_json()), eos or tok.eos_token
        if eos_token is None:
            raise Phi3Error(f"tokenizer {spec} names no EOS token; pass --eos")
    if tk.token_to_id(eos_token) is None:
        raise Phi3Error(f"--eos {eos_token!r} is not a token of the tokenizer {spec}")
    tk.no_truncation()
    tk.no_padding()
    return tk, eos_token


def tokenize_steps(src: Path, tokenizer_spec: str, eos: str | None = None, seed: int = 0,
                   max_tokens_per_file: int | None = None) -> list[Step]:
    docs_reader(src)
    tk, eos_token = load_target_tokenizer(tokenizer_spec, eos)

    def pipeline(work: Path) -> list:
        work.mkdir(parents=True, exist_ok=True)
        tk_path = work / "tokenizer.json"
        if not tk_path.is_file():
            tk.save(str(tk_path.with_name("tokenizer.json.tmp")))
            tk_path.with_name("tokenizer.json.tmp").replace(tk_path)
        return [docs_reader(src),
                DocumentTokenizer(output_folder=str(work / "tokens"), tokenizer_name_or_path=str(tk_path),
                                  eos_token=eos_token, seed=seed, max_tokens_per_file=max_tokens_per_file)]
    return [Step("tokenize", pipeline)]


def summarize_tokens(work: Path) -> dict:
    blocks = step_stats(work, "tokenize")
    reader = next((b["stats"] for b in blocks if "documents" in b["stats"]), {})
    tokens = sum(b["stats"].get("tokens", 0) for b in blocks)
    shards = sorted(p.name for p in (work / "tokens").glob("*.ds")) if (work / "tokens").is_dir() else []
    return {"documents_in": reader.get("documents", 0), "tokens": tokens, "shards": shards}
