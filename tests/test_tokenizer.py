"""Tokenizers against llama.cpp's test vectors, and chat templates against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phi3.checkpoint import gguf_fields, open_gguf
from phi3.tokenizer import (PHI3_CHAT_TEMPLATE, StreamDecoder, Tokenizer, load_tokenizer, render_chat,
                            tokenizer_from_gguf)
from tests.conftest import need_assets

VOCABS = ["phi-3", "llama-spm", "gpt-2"]

CHATS = {
    "no_system": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "What is 2 + 2?\nAnswer briefly."},
    ],
    "system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, please  "},
    ],
}


def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    base = need_assets() / "vocab" / f"ggml-vocab-{name}.gguf"
    texts = base.with_name(base.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts = texts[:-1]
    outs = base.with_name(base.name + ".out").read_text(encoding="utf-8").split("\n")
    if outs and outs[-1] == "":
        outs = outs[:-1]
    assert len(texts) == len(outs), (len(texts), len(outs))
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


def gguf_tokenizer(name: str) -> Tokenizer:
    reader = open_gguf(need_assets() / "vocab" / f"ggml-vocab-{name}.gguf")
    fields = gguf_fields(reader)
    return tokenizer_from_gguf(fields, fields["general.architecture"])


@pytest.fixture(scope="module")
def phi3_tok() -> Tokenizer:
    return gguf_tokenizer("phi-3")


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vectors(name):
    tok = gguf_tokenizer(name)
    cases = vocab_cases(name)
    assert len(cases) >= 40
    failures = [(t, want, tok.encode(t, add_bos=False)) for t, want in cases if tok.encode(t, add_bos=False) != want]
    assert not failures, failures[:3]


def test_phi3_special_tokens(phi3_tok):
    ids = {t: phi3_tok.token_to_id(t) for t in ("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")}
    assert ids == {"<|endoftext|>": 32000, "<|assistant|>": 32001, "<|system|>": 32006, "<|end|>": 32007,
                   "<|user|>": 32010}
    assert {32000, 32007} <= phi3_tok.stop_ids
    # rstrip: the newline after <|user|> is absorbed, as in Phi-3's tokenizer_config.
    assert phi3_tok.encode("<|user|>\nHi<|end|>\n", add_bos=False)[:2] == [32010, 6324]


def write_sentencepiece_model(tok_gguf: Path, out: Path) -> None:
    """A SentencePiece tokenizer.model made from the GGUF vocabulary (the first 32000 pieces),
    plus tokenizer_config.json with Phi-3's added tokens, as a Hugging Face folder has them."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    fields = gguf_fields(open_gguf(tok_gguf))
    proto = sp_pb2.ModelProto()
    proto.trainer_spec.model_type = 2
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id = 0
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    for piece, score, kind in list(zip(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"],
                                       fields["tokenizer.ggml.token_type"]))[:32000]:
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, score, kind
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    added = {str(i): {"content": fields["tokenizer.ggml.tokens"][i], "special": True, "rstrip": i != 32000,
                      "lstrip": False, "normalized": False, "single_word": False} for i in range(32000, 32011)}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added, "bos_token": "<s>", "eos_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": PHI3_CHAT_TEMPLATE}))


def test_sentencepiece_model_matches_vectors(tmp_path):
    write_sentencepiece_model(need_assets() / "vocab" / "ggml-vocab-phi-3.gguf", tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.kind.startswith("tokenizer.model")
    for text, want in vocab_cases("phi-3"):
        assert tok.encode(text, add_bos=False) == want, text
    assert tok.token_to_id("<|end|>") == 32007


def transformers_tokenizer(tok: Tokenizer, template: str):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok.tk, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                   chat_template=template)


@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_phi3_template_matches_transformers(phi3_tok, chat, add_generation_prompt):
    phi3_tok.chat_template = PHI3_CHAT_TEMPLATE
    hf = transformers_tokenizer(phi3_tok, PHI3_CHAT_TEMPLATE)
    messages = CHATS[chat]
    text = phi3_tok.apply_chat_template(messages, add_generation_prompt)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    expected_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                          return_dict=False)
    assert phi3_tok.encode_chat(messages, add_generation_prompt) == list(expected_ids)
    if add_generation_prompt:
        assert text.endswith("<|end|>\n<|assistant|>\n")


def test_phi3_gguf_template_matches_transformers(phi3_tok):
    """The template stored in the vocab GGUF (older Phi-3 revision, with BOS) renders the same too."""
    template = gguf_fields(open_gguf(need_assets() / "vocab" / "ggml-vocab-phi-3.gguf"))["tokenizer.chat_template"]
    hf = transformers_tokenizer(phi3_tok, template)
    messages = CHATS["no_system"]
    ours = render_chat(template, messages, bos_token="<s>", eos_token="<|endoftext|>")
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.startswith("<s><|user|>\nHello!<|end|>\n<|assistant|>\n")


@pytest.mark.parametrize("chat", sorted(CHATS))
def test_smollm_template_matches_transformers(smollm_gguf, chat):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)
    tok = tokenizer_from_gguf(gguf_fields(open_gguf(smollm_gguf)), "llama")
    messages = CHATS[chat]
    text = tok.apply_chat_template(messages)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.encode_chat(messages) == list(hf.apply_chat_template(messages, tokenize=True,
                                                                   add_generation_prompt=True, return_dict=False))
    assert tok.encode("Héllo wörld 123 ünïcode 🦙", add_bos=False) == hf.encode("Héllo wörld 123 ünïcode 🦙",
                                                                             add_special_tokens=False)


def test_stream_decoder_never_splits_characters(phi3_tok):
    text = "naïve 🦙 café — 日本語"
    ids = phi3_tok.encode(text, add_bos=False)
    assert any(phi3_tok.tk.id_to_token(i).startswith("<0x") for i in ids)  # byte-fallback pieces
    dec = StreamDecoder(phi3_tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_empty_chat_is_an_error(phi3_tok):
    from phi3.errors import Phi3Error
    with pytest.raises(Phi3Error, match="empty conversation"):
        phi3_tok.apply_chat_template([])


def test_token_bytes_on_sentencepiece_and_byte_level_spellings():
    # what the server's logprobs report as `bytes`: SentencePiece's "\u2581" and "<0xNN>" (Phi-3-mini),
    # GPT-2 byte-level spellings (SmolLM2, cl100k)
    from tokenizers import Tokenizer as HF, models
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "<0xC3>": 4, "\u2581hi": 5, "x": 6}
    spm = Tokenizer(HF(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>")))
    assert [spm.token_bytes(i) for i in range(3, 7)] == [b"\n", b"\xc3", b" hi", b"x"]
    level = Tokenizer(HF(models.BPE(vocab={"\u0120w": 0, "\u00c3\u00b6": 1, "\u010a": 2}, merges=[])))
    assert [level.token_bytes(i) for i in range(3)] == [b" w", b"\xc3\xb6", b"\n"]
