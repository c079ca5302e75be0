"""phi3.train.data: token sources, packing, resumable mixtures, SFT masks (against TRL's) and DPO pairs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from phi3.errors import Phi3Error
from phi3.tokenizer import PHI3_CHAT_TEMPLATE, Tokenizer
from phi3.train import data as D
from phi3.train.data import (IGNORE, PackedStream, global_step_batches, open_documents, open_pairs, open_sft,
                             pair_batches, render_sft)
from tests.conftest import need_assets, tiny_tokenizer_json

CHATS = [
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there, friend."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?\nOnly the number."},
     {"role": "assistant", "content": "6, of course."}],
    [{"role": "user", "content": "Name a café"}, {"role": "assistant", "content": " Café Ünïcode 🦙\n\nTwo lines."},
     {"role": "user", "content": "thanks"}],
    [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "ok"},
     {"role": "assistant", "content": "  spaced  "}],
]


@pytest.fixture(scope="module")
def tiny_tok() -> Tokenizer:
    """Byte-level, no merges (one token per byte) plus Phi-3's chat specials: vocab 261 (< 320)."""
    from tokenizers import Tokenizer as HFTokenizer
    return Tokenizer(tk=HFTokenizer.from_str(tiny_tokenizer_json(320)), eos_token="<|endoftext|>",
                     chat_template=PHI3_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def phi3_tok() -> Tokenizer:
    from phi3.checkpoint import gguf_fields, open_gguf
    from phi3.tokenizer import tokenizer_from_gguf
    tok = tokenizer_from_gguf(gguf_fields(open_gguf(need_assets() / "vocab" / "ggml-vocab-phi-3.gguf")), "phi3")
    # The released Phi-3 template (the vocab GGUF stores an older revision); TRL's phi3.jinja is this.
    return replace(tok, chat_template=PHI3_CHAT_TEMPLATE)


def write_ds(path: Path, docs: list[list[int]], dtype=np.uint16, metadata: str | None = None) -> Path:
    np.concatenate([np.asarray(d, dtype=dtype) for d in docs]).astype(dtype).tofile(path)
    np.cumsum([len(d) for d in docs]).astype(np.uint64).tofile(str(path) + ".index")
    if metadata is not None:
        Path(str(path) + ".metadata").write_text(metadata)
    return path


class ListSource(D.DocumentSource):
    """Documents given as lists; counts what was read (to check that resuming re-reads nothing)."""

    def __init__(self, docs, name="list", whole=False):
        self.docs, self.name, self.whole, self.reads = docs, name, whole, 0

    def __len__(self):
        return len(self.docs)

    def get_many(self, indices):
        self.reads += len(indices)
        return [self.docs[i] for i in indices]


def rows_as_documents(batch: D.Batch) -> list[list[int]]:
    """The pieces of documents in the rows, in order (padding and its document left out)."""
    out = []
    for ids, docs, labels in zip(batch.input_ids.tolist(), batch.document_ids.tolist(), batch.labels.tolist()):
        for d in sorted(set(docs)):
            piece = [i for i, x in zip(ids, docs) if x == d]
            out.append(piece)
    return out


# --- Sources -----------------------------------------------------------------------------------------

def test_ds_shard_is_memory_mapped_and_ends_each_document_with_eos(tmp_path, tiny_tok):
    eos = tiny_tok.eos_id
    path = write_ds(tmp_path / "00000_unshuffled.ds", [[5, 6, 7, eos], [8, eos], [9, 10]])
    src = open_documents(path, tiny_tok)
    assert isinstance(src.tokens, np.memmap) and src.tokens.dtype == np.dtype("<u2")
    assert len(src) == 3
    assert [src[i].tolist() for i in range(3)] == [[5, 6, 7, eos], [8, eos], [9, 10, eos]]  # EOS only where missing
    # uint32 when .ds.metadata says 4 bytes (vocabularies over 65,536)
    big = write_ds(tmp_path / "big.ds", [[70000, 3], [4]], dtype=np.uint32, metadata="some/tokenizer|4\n3\n3\n")
    assert [d.tolist() for d in open_documents(big, None).get_many([0, 1])] == [[70000, 3], [4]]
    # older datatrove metadata (tokenizer name only) means uint16; a .ds.loss mask comes with each document
    old = write_ds(tmp_path / "old.ds", [[5, 6, eos], [7, 8]], metadata="gpt2\n5\n5\n")
    np.array([1, 0, 1, 1, 0], dtype=np.bool_).tofile(str(old) + ".loss")
    got = open_documents(old, tiny_tok).get_many([0, 1])
    assert [(i.tolist(), m.tolist()) for i, m in got] == [([5, 6, eos], [1, 0, 1]), ([7, 8, eos], [1, 0, 1])]
    # a folder of shards and text is one source, files in sorted order
    folder = tmp_path / "mix"
    folder.mkdir()
    write_ds(folder / "a.ds", [[1, 2], [3]])
    (folder / "b.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    both = open_documents(folder, tiny_tok)
    assert [d.tolist() for d in both.get_many([2, 0, 1])] == [tiny_tok.encode("hi") + [eos], [1, 2, eos], [3, eos]]


def test_text_sources_tokenize_on_the_fly(tmp_path, tiny_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    eos = tiny_tok.eos_id
    texts = ["first document", "second\n\nwith a blank line", "ünï"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" + "\n" for t in texts))  # blank lines skipped
    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text(texts[1])
    want = [tiny_tok.encode(t, add_bos=False) + [eos] for t in texts]
    for name in ("a.jsonl", "a.parquet"):
        src = open_documents(tmp_path / name, tiny_tok, text_key="body")
        assert [d.tolist() for d in src.get_many([0, 1, 2])] == want, name
    assert open_documents(tmp_path / "a.txt", tiny_tok)[0].tolist() == want[1]  # a .txt file is ONE document


# --- Packing -----------------------------------------------------------------------------------------

def test_packing_labels_and_document_ids_exact():
    src = ListSource([[30, 31, 32, 33, 34, 35, 36], [10, 11, 12], [20, 21]])
    stream = PackedStream([src], [1.0], seq_len=4, seed=0)
    order = [int(i) for i in np.random.default_rng([0, 0, 0]).permutation(3)]
    assert order == [2, 0, 1]  # the test below is written for this order
    b = stream.next_rows(3)
    X = IGNORE
    assert b.input_ids.tolist() == [[20, 21, 30, 31], [32, 33, 34, 35], [36, 10, 11, 12]]
    assert b.document_ids.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]]
    # -100 on each document's last token; a document split at a row's end keeps its next token as the label
    assert b.labels.tolist() == [[21, X, 31, 32], [33, 34, 35, 36], [X, 11, 12, X]]
    assert stream.epoch == [1] and stream.pos == [0] and stream.carry is None
    assert b.input_ids.dtype == b.labels.dtype == b.document_ids.dtype == torch.int64


def test_nothing_is_dropped_and_long_documents_split():
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 300, int(n)).tolist() for n in rng.integers(1, 30, 40)]
    stream = PackedStream([ListSource(docs)], [1.0], seq_len=16, seed=3)
    total = sum(map(len, docs))
    b = stream.next_rows(total // 16 + 1)
    flat = b.input_ids.flatten().tolist()[:total]
    order = np.random.default_rng([3, 0, 0]).permutation(len(docs))
    assert flat == [t for i in order for t in docs[i]]  # every token, in order
    lab = b.labels.flatten().tolist()[:total]
    ends = np.cumsum([len(docs[i]) for i in order]) - 1
    want = [flat[k + 1] if k + 1 < total else IGNORE for k in range(total)]
    for e in ends:
        want[e] = IGNORE
    assert lab == want


def test_mixture_shares_tokens_by_weight_and_is_seeded():
    a = ListSource([[1] * n for n in range(1, 20)], "a")
    b = ListSource([[2] * n for n in range(1, 8)], "b")
    stream = PackedStream([a, b], [3.0, 1.0], seq_len=32, seed=5)
    rows = stream.next_rows(64)
    ones, twos = int((rows.input_ids == 1).sum()), int((rows.input_ids == 2).sum())
    assert abs(ones / (ones + twos) - 0.75) < 20 / (ones + twos)  # within one document of exact
    assert stream.epoch[1] > 1  # the small source cycled (new permutation per epoch)
    again = PackedStream([a, b], [3.0, 1.0], seq_len=32, seed=5).next_rows(64)
    other = PackedStream([a, b], [3.0, 1.0], seq_len=32, seed=6).next_rows(64)
    assert torch.equal(rows.input_ids, again.input_ids) and torch.equal(rows.labels, again.labels)
    assert not torch.equal(rows.input_ids, other.input_ids)


@pytest.mark.parametrize("whole", [False, True])
def test_resume_is_exact_and_rereads_nothing(whole):
    rng = np.random.default_rng(2)
    docs = [rng.integers(0, 300, int(n)).tolist() for n in rng.integers(1, 40, 300)]
    if whole:  # SFT-like items (ids, mask)
        docs = [(np.array(d), (np.arange(len(d)) % 3 > 0).astype(np.int8)) for d in docs]
    make = lambda: [ListSource(docs[:200], "a", whole), ListSource(docs[200:], "b", whole)]  # noqa: E731
    straight = PackedStream(make(), [2.0, 1.0], seq_len=24, seed=9)
    want = straight.next_rows(40)
    first = PackedStream(make(), [2.0, 1.0], seq_len=24, seed=9)
    head = first.next_rows(17)
    state = json.loads(json.dumps(first.state_dict()))
    assert len(json.dumps(state)) < 500
    sources = make()
    resumed = PackedStream(sources, [2.0, 1.0], seq_len=24, seed=9)
    resumed.load_state_dict(state)
    tail = resumed.next_rows(23)
    for field in ("input_ids", "labels", "document_ids"):
        assert torch.equal(torch.cat([getattr(head, field), getattr(tail, field)]), getattr(want, field))
    # the resumed stream read only what it consumed after the resume point, plus at most one prefetch
    used = sum((e - s["epoch"]) * len(src) + p - s["position"]
               for e, p, s, src in zip(resumed.epoch, resumed.pos, state["sources"], sources))
    assert sum(s.reads for s in sources) <= used + 1 + 2 * D.PREFETCH  # +1: the document split at the resume point
    assert sources[0].reads < 200  # not everything from the start


def test_global_order_is_the_same_for_any_world_size():
    docs = [list(range(n, n + 7)) for n in range(50)]
    seen = {}
    for world in (1, 2, 4):
        streams = [PackedStream([ListSource(docs)], [1.0], 8, seed=1) for _ in range(world)]
        steps = []
        for _ in range(3):
            per_rank = [global_step_batches(s, 8, 2, world, r) for r, s in enumerate(streams)]
            micro = [None] * 4
            for r, mbs in enumerate(per_rank):
                for k, mb in enumerate(mbs):
                    micro[r + k * world] = mb.input_ids
            steps.append(torch.cat(micro))
        seen[world] = torch.cat(steps)
    assert torch.equal(seen[1], seen[2]) and torch.equal(seen[1], seen[4])
    with pytest.raises(Phi3Error, match="multiple of micro_batch_size"):
        global_step_batches(PackedStream([ListSource(docs)], [1.0], 8, 0), 6, 4, 1, 0)


def test_packed_documents_give_the_same_logits_as_each_document_alone():
    from phi3.model import Transformer
    from tests.conftest import tiny_config
    cfg = tiny_config("medium")  # grouped-query attention, no sliding window
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    docs = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (5, 9, 7)]
    stream = PackedStream([ListSource(docs)], [1.0], seq_len=24, seed=0)
    b = stream.next_rows(1)
    assert (b.document_ids[0] == 3).sum() == 3  # padding after the three documents
    with torch.no_grad():
        packed = model(b.input_ids, document_ids=b.document_ids)[0]
        t = 0
        for d in np.random.default_rng([0, 0, 0]).permutation(3):
            doc = torch.tensor([docs[d]])
            alone = model(doc)[0]
            assert torch.equal(b.input_ids[0, t:t + len(docs[d])], doc[0])
            assert (packed[t:t + len(docs[d])] - alone).abs().max().item() <= 1e-5
            t += len(docs[d])


# --- SFT ---------------------------------------------------------------------------------------------

def learned_text(tok: Tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The learned spans, each decoded with specials kept."""
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return [tok.decode(s, skip_special=False) for s in spans]


def test_sft_mask_on_phi3_template_with_tiny_vocab(tiny_tok):
    ids, mask = render_sft(tiny_tok, CHATS[1])
    assert ids == tiny_tok.encode_chat(CHATS[1], add_generation_prompt=False)
    # <|end|> swallows the "\n" after it (rstrip), the last answer also learns the closing <|endoftext|>
    assert learned_text(tiny_tok, ids, mask) == ["4<|end|>", "6, of course.<|end|><|endoftext|>"]


def test_sft_mask_equals_trl_phi3_training_template(phi3_tok):
    from transformers import PreTrainedTokenizerFast
    from trl.chat_template_utils import phi3_chat_template, phi3_training_chat_template
    assert phi3_chat_template == PHI3_CHAT_TEMPLATE  # TRL maps exactly this template to its training variant
    hf = PreTrainedTokenizerFast(tokenizer_object=phi3_tok.tk, bos_token=phi3_tok.bos_token,
                                 eos_token=phi3_tok.eos_token, chat_template=phi3_training_chat_template)
    for messages in CHATS:
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = render_sft(phi3_tok, messages)
        assert ids == list(out["input_ids"])
        assert mask == list(out["assistant_masks"]), messages
        # and through the packer: labels are TRL's labels shifted by one (the model predicts t+1 at t)
        trl_labels = [i if m else IGNORE for i, m in zip(out["input_ids"], out["assistant_masks"])]
        stream = PackedStream([ListSource([(np.array(ids), np.array(mask, dtype=np.int8))], whole=True)], [1.0],
                              seq_len=len(ids), seed=0)
        row = stream.next_rows(1)
        assert row.labels[0].tolist() == trl_labels[1:] + [IGNORE]


def test_sft_mask_on_smollm2_chatml_template(smollm_gguf):
    from phi3.checkpoint import gguf_fields, open_gguf
    from phi3.tokenizer import tokenizer_from_gguf
    tok = tokenizer_from_gguf(gguf_fields(open_gguf(smollm_gguf)), "llama")
    assert "<|im_start|>" in tok.chat_template
    for messages in CHATS:
        ids, mask = render_sft(tok, messages)
        assert ids == tok.encode_chat(messages, add_generation_prompt=False)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        # An answer opening with two spaces shares its first token with the header's "\n" (GPT-2's
        # pre-tokenizer makes "\n " one token); that token is learned, as TRL's mask does.
        assert learned_text(tok, ids, mask) == [("\n" if a[:2].isspace() else "") + a + "<|im_end|>\n" for a in answers]


def test_sft_file_packs_whole_conversations(tmp_path, tiny_tok):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    src = open_sft(path, tiny_tok)
    items = [src[i] for i in range(len(src))]
    T = max(len(ids) for ids, _ in items) + 5
    stream = PackedStream([src], [1.0], seq_len=T, seed=0, pad_id=0)
    b = stream.next_rows(6)
    assert stream.cut_conversations == 0
    conversations = 0
    for ids, docs, labels in zip(b.input_ids.tolist(), b.document_ids.tolist(), b.labels.tolist()):
        for d in sorted(set(docs)):
            at = [t for t, x in enumerate(docs) if x == d]
            piece = [ids[t] for t in at]
            match = [k for k, (i, _) in enumerate(items) if i.tolist() == piece]
            if not match:  # padding: the row's last document, learning nothing
                assert at[-1] == T - 1 and set(piece) == {0} and all(labels[t] == IGNORE for t in at)
                continue
            conversations += 1
            mask = items[match[0]][1].tolist()
            assert [labels[t] for t in at] == [i if m else IGNORE for i, m in zip(piece[1:], mask[1:])] + [IGNORE]
    assert conversations >= 6  # none was cut
    # a conversation longer than a row is split like a document (and counted, for the trainer to warn)
    long = PackedStream([ListSource([(np.arange(10), np.ones(10, np.int8))], whole=True)], [1.0], 4, 0)
    assert long.next_rows(3).input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
    assert long.cut_conversations == 1


# --- DPO ---------------------------------------------------------------------------------------------

def write_pairs(path: Path, n: int, long: int = 0) -> Path:
    lines = []
    for i in range(n):
        lines.append(json.dumps({"prompt": [{"role": "user", "content": f"question {i}"}],
                                 "chosen": {"role": "assistant", "content": f"good {i}" + "!" * long},
                                 "rejected": f"bad {i}"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_dpo_pairs_mask_the_prompt_and_resume(tmp_path, tiny_tok):
    pairs = open_pairs(write_pairs(tmp_path / "p.jsonl", 7), tiny_tok, max_len=64)
    batch = D.collate_pairs(pairs[:2], pad_id=0)
    P = 2
    assert batch.input_ids.shape[0] == 2 * P and batch.index.tolist() == [0, 1]
    for r, want in enumerate(["good 0<|end|><|endoftext|>", "good 1<|end|><|endoftext|>",
                              "bad 0<|end|><|endoftext|>", "bad 1<|end|><|endoftext|>"]):
        lab = batch.labels[r]
        got = [int(t) for t in lab if t != IGNORE]
        assert tiny_tok.decode(got, skip_special=False) == want
        n = int(batch.attention_mask[r].sum())
        assert lab[n - 1:].eq(IGNORE).all()  # last real token and padding learn nothing
        prompt = tiny_tok.encode_chat([{"role": "user", "content": f"question {r % 2}"}])
        assert batch.input_ids[r, :len(prompt)].tolist() == prompt
        assert lab[:len(prompt) - 1].eq(IGNORE).all()
    stream = pair_batches(pairs, 3, seed=4)
    want = [stream.next_batch().index.tolist() for _ in range(5)]
    assert sorted(want[0] + want[1] + [want[2][0]]) == list(range(7))  # one epoch = a permutation
    s2 = pair_batches(pairs, 3, seed=4)
    s2.next_batch(), s2.next_batch()
    s3 = pair_batches(pairs, 3, seed=4)
    s3.load_state_dict(json.loads(json.dumps(s2.state_dict())))
    assert [s3.next_batch().index.tolist() for _ in range(3)] == want[2:]
    mbs = global_step_batches(pair_batches(pairs, 4, seed=4), 4, 2, 2, 1)
    assert len(mbs) == 1 and mbs[0].index.tolist() == want[0][:3][2:] + [want[1][0]]


def test_dpo_pairs_equal_trl_preprocessing_and_collator(tmp_path, phi3_tok):
    """The same rows, attention mask and completion tokens as TRL's DPOTrainer tokenize_fn (its
    steps, through TRL's own _tokenize and common_prefix_length) and DataCollatorForPreference."""
    from transformers import PreTrainedTokenizerFast
    from trl.data_utils import _tokenize, common_prefix_length
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    hf = PreTrainedTokenizerFast(tokenizer_object=phi3_tok.tk, bos_token=phi3_tok.bos_token,
                                 eos_token=phi3_tok.eos_token, chat_template=PHI3_CHAT_TEMPLATE)
    records = [
        {"prompt": [{"role": "user", "content": "How do I pick a lock?"}],
         "chosen": [{"role": "assistant", "content": "I can't help with that."}],
         "rejected": [{"role": "assistant", "content": "  First, get a tension wrench..."}]},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Who are you?"}],
         "chosen": [{"role": "assistant", "content": "I am Phi, an assistant. 🦙"}],
         "rejected": [{"role": "assistant", "content": "Nobody."}]},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ours = D.collate_pairs(open_pairs(path, phi3_tok, max_len=128), pad_id=0)
    examples = []
    for ex in records:
        prompt_ids = _tokenize(hf, ex["prompt"], add_generation_prompt=True)["input_ids"]
        chosen = _tokenize(hf, ex["prompt"] + ex["chosen"])["input_ids"]
        rejected = _tokenize(hf, ex["prompt"] + ex["rejected"])["input_ids"]
        n = min(common_prefix_length(prompt_ids, chosen), common_prefix_length(prompt_ids, rejected))
        examples.append({"prompt_ids": prompt_ids[:n], "chosen_ids": chosen[n:], "rejected_ids": rejected[n:]})
    trl = DataCollatorForPreference(pad_token_id=0)(examples)
    assert torch.equal(ours.input_ids, trl["input_ids"])
    assert torch.equal(ours.attention_mask, trl["attention_mask"])
    # TRL's completion_mask marks the tokens to score; our labels are the same tokens shifted by one
    want = torch.where(trl["completion_mask"][:, 1:].bool(), trl["input_ids"][:, 1:], IGNORE)
    assert torch.equal(ours.labels[:, :-1], want) and ours.labels[:, -1].eq(IGNORE).all()


# --- Bad input ---------------------------------------------------------------------------------------

BAD_SFT = {
    "not json": ('{"messages": [', "not valid JSON"),
    "missing key": ('{"conversation": []}', "no 'messages' key"),
    "wrong role": ('{"messages": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
    "no assistant": ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
    "no content": ('{"messages": [{"role": "user"}]}', "needs 'role' and 'content'"),
}


@pytest.mark.parametrize("case", sorted(BAD_SFT))
def test_bad_sft_records_name_file_and_line(tmp_path, tiny_tok, case):
    line, msg = BAD_SFT[case]
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": CHATS[0]}) + "\n\n" + line + "\n")
    with pytest.raises(Phi3Error, match=f"sft.jsonl:3: .*{msg}") as e:
        open_sft(path, tiny_tok)
    assert "\n" not in str(e.value)


def test_bad_sources_and_mixtures(tmp_path, tiny_tok):
    with pytest.raises(Phi3Error, match="no such file"):
        open_documents(tmp_path / "missing.jsonl", tiny_tok)
    (tmp_path / "t.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(Phi3Error, match=r"t.jsonl:2: no 'text' key"):
        open_documents(tmp_path / "t.jsonl", tiny_tok)
    (tmp_path / "m.jsonl").write_text(json.dumps({"messages": CHATS[0]}) + "\n")
    with pytest.raises(Phi3Error, match="use the sft stage"):
        open_documents(tmp_path / "m.jsonl", tiny_tok)
    write_ds(tmp_path / "x.ds", [[1, 2, 3]])
    Path(str(tmp_path / "x.ds") + ".index").write_bytes(np.array([5], np.uint64).tobytes())
    with pytest.raises(Phi3Error, match="do not belong together"):
        open_documents(tmp_path / "x.ds", tiny_tok)
    write_ds(tmp_path / "y.ds", [[1, 300, 3]])
    with pytest.raises(Phi3Error, match="document 0 holds token id 300"):
        open_documents(tmp_path / "y.ds", tiny_tok)[0]
    src = ListSource([[1, 2]])
    with pytest.raises(Phi3Error, match="empty mixture"):
        PackedStream([], [], 8, 0)
    for w in (0.0, -1.0, float("nan")):
        with pytest.raises(Phi3Error, match="weights must be positive"):
            PackedStream([src], [w], 8, 0)
    stream = PackedStream([src], [1.0], 8, 0)
    with pytest.raises(Phi3Error, match="resume with the same data"):
        stream.load_state_dict(PackedStream([src, src], [1.0, 1.0], 8, 0).state_dict())


def test_over_long_dpo_pair_is_an_error_naming_the_record(tmp_path, tiny_tok):
    path = write_pairs(tmp_path / "p.jsonl", 3, long=100)
    with pytest.raises(Phi3Error, match=r"p.jsonl:1: this pair needs \d+ tokens, over max_len 64; raise seq_len"):
        open_pairs(path, tiny_tok, max_len=64)
    path.write_text(json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": {"role": "user", "content": "a"},
                                "rejected": "b"}) + "\n")
    with pytest.raises(Phi3Error, match=r"p.jsonl:1: 'chosen' should be an assistant message"):
        open_pairs(path, tiny_tok, max_len=64)


def test_a_datatrove_task_with_no_documents_leaves_an_empty_shard_that_a_folder_skips(tmp_path, tiny_tok):
    # datatrove writes a 0-byte .ds and .ds.index for a task that got no documents (phases with tasks=2)
    eos = tiny_tok.eos_id
    folder = tmp_path / "tokens"
    folder.mkdir()
    write_ds(folder / "00000_unshuffled.ds", [[5, 6, eos], [7, eos]])
    (folder / "00001_unshuffled.ds").write_bytes(b"")
    (folder / "00001_unshuffled.ds.index").write_bytes(b"")
    src = open_documents(folder, tiny_tok)
    assert len(src) == 2 and [src[i].tolist() for i in range(2)] == [[5, 6, eos], [7, eos]]
    (folder / "00000_unshuffled.ds").unlink()
    (folder / "00000_unshuffled.ds.index").unlink()
    with pytest.raises(Phi3Error, match="holds no documents"):
        open_documents(folder, tiny_tok)
    with pytest.raises(Phi3Error, match="holds no documents"):
        open_documents(folder / "00001_unshuffled.ds", tiny_tok)


def test_a_mixture_of_empty_documents_is_an_error():
    with pytest.raises(Phi3Error, match="every document in the mixture is empty"):
        PackedStream([ListSource([[], []])], [1.0], 4, 0).next_rows(1)
    b = PackedStream([ListSource([[], [7, 8]])], [1.0], 4, 0).next_rows(1)  # empty ones are skipped
    assert b.input_ids.tolist() == [[7, 8, 7, 8]] and b.document_ids.tolist() == [[0, 0, 1, 1]]
