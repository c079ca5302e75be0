"""Tokenizers and chat templates.

Every vocabulary ends up as a `tokenizers.Tokenizer`: tokenizer.json directly; a SentencePiece
tokenizer.model or a SentencePiece-style GGUF vocabulary as a byte-fallback BPE whose merges are
ranked by piece score (how SentencePiece's BPE picks merges, and how Hugging Face converts Llama
tokenizers); a GPT-2-style GGUF vocabulary as byte-level BPE with its stored merges.
Chat templates are rendered with jinja2 the way transformers renders them.
"""

from __future__ import annotations

import json
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


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus what chat needs: BOS policy, stop ids and the chat template."""

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

    @property
    def bos_id(self) -> int | None:
        return self.tk.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def eos_id(self) -> int | None:
        return self.tk.token_to_id(self.eos_token) if self.eos_token else None

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return render_chat(self.chat_template or PHI3_CHAT_TEMPLATE, messages,
                           add_generation_prompt=add_generation_prompt,
                           bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                           **{k: v for k, v in self.special_tokens.items() if k not in ("bos_token", "eos_token")})

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        # The template writes BOS itself where the model wants one (as apply_chat_template does).
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)


class StreamDecoder:
    """Turns a growing list of token ids into text pieces without ever splitting a multi-byte
    character: text is held back while the newest bytes decode to an incomplete character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
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


def tokenizer_from_gguf(fields: dict[str, Any], arch: str) -> Tokenizer:
    """Build the tokenizer stored in a GGUF file's metadata (`fields`: key -> python value)."""
    model = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise Phi3Error("GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing)")
    types = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
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
        raise Phi3Error(f"unsupported GGUF tokenizer model {model!r} (phi3 reads 'llama' and 'gpt2')")

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


def load_tokenizer(folder: str | Path, eos_ids: Iterable[int] = ()) -> Tokenizer:
    """From a Hugging Face folder: tokenizer.json (preferred) or tokenizer.model, with
    tokenizer_config.json (added tokens, BOS policy, chat template) and generation_config.json."""
    folder = Path(folder)
    config: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").exists():
        try:
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except json.JSONDecodeError as e:
            raise Phi3Error(f"{folder / 'tokenizer_config.json'} is not valid JSON ({e.msg} at line {e.lineno})") from None
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
