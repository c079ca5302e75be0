"""`phi3 train` end to end on tiny models, through the command line in-process: a text learned by
heart, the final/ folder loaded by transformers and quantized to a GGUF that generates, SFT (full
and LoRA), DPO, and the one-line errors (exit 2, nothing written)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from phi3.cli import main as cli_main
from tests.conftest import run_cli, tiny_tokenizer_json

# 63 characters + EOS = 64 tokens = seq_len: each row holds the text exactly once, from its start,
# so every label is determined by the tokens before it and the loss can go to 0.
TEXT = "Phi-3 learns this line by heart: seven foxes nap under one oak."
MODEL = "phi-3-mini:layers=2,hidden=64,heads=4,intermediate=128,vocab=320,context=128"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and this machine's 2 cores are shared: with 2
    threads under load, 60 steps took 32 s instead of 1.3 s (spinning OpenMP workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokenizer_folder(root: Path) -> Path:
    """The byte-level tokenizer of the tiny models, with Phi-3's chat template."""
    from phi3.tokenizer import PHI3_CHAT_TEMPLATE
    folder = root / "tok"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json(320))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": PHI3_CHAT_TEMPLATE}))
    return folder


def train(*args: str) -> int:
    return cli_main(["train", *args, "--no-progress"])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("memorise")
    assert len(TEXT.encode()) + 1 == 64
    (root / "text.txt").write_text(TEXT)
    out = root / "run"
    rc = train("pretrain", "--model", MODEL, "--tokenizer", str(tokenizer_folder(root)), "--data", str(root / "text.txt"),
               "--out", str(out), "--set", "seq_len=64", "--set", "micro_batch_size=2", "--set", "global_batch_size=2",
               "--set", "phases.0.steps=60", "--set", "optim.lr=1e-2", "--set", "optim.min_lr=1e-3",
               "--set", "optim.warmup_steps=10", "--set", "save_every=30")
    assert rc == 0
    return out


def test_pretrain_learns_a_text_by_heart(memorised):
    recs = metrics(memorised)
    assert [r["step"] for r in recs] == list(range(1, 61))
    assert recs[0]["loss"] > 5.0  # ~ln(320) at init
    assert recs[-1]["loss"] < 0.05, recs[-1]
    assert recs[-1]["tokens"] == 60 * 2 * 64
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (memorised / "final" / name).exists(), name
    assert (memorised / "metrics.png").stat().st_size > 1000
    assert sorted(p.name for p in memorised.glob("step_*")) == ["step_000030", "step_000060"]


def test_final_folder_loads_in_transformers_and_quantizes(memorised, tmp_path):
    """Done-when 7: transformers' logits equal phi3's within 1e-4; the GGUF generates the text."""
    from transformers import AutoModelForCausalLM

    from phi3.checkpoint import load
    final = memorised / "final"
    from phi3.tokenizer import load_tokenizer
    text_ids = load_tokenizer(final).encode(TEXT)
    assert len(text_ids) == 63
    ids = torch.tensor([text_ids[:40]])
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32, attn_implementation="eager").eval()
    ours = load(str(final), dtype="float32").model.eval()
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids)
    assert (a - b).abs().max().item() < 1e-4
    # It learned the text: greedy continuation of its first 20 characters is the rest.
    assert a[0, 19:39].argmax(-1).tolist() == text_ids[20:40]
    gguf = tmp_path / "out.gguf"
    res = run_cli("quantize", str(final), str(gguf), "--type", "q8_0")
    assert res.returncode == 0, res.stderr
    res = run_cli("generate", "--model", str(gguf), "--raw", "--prompt", TEXT[:20], "--max-tokens", "12")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(TEXT[20:26]), res.stdout


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    tok = tokenizer_folder(tmp_path)
    out = tmp_path / "run"
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    base = ["pretrain", "--model", MODEL, "--tokenizer", str(tok), "--out", str(out), "--set", "phases.0.steps=2",
            "--set", "seq_len=64", "--set", "global_batch_size=2", "--set", "micro_batch_size=1"]
    text = ["--data", str(tmp_path / "text.txt")]
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
        (["--data", str(tmp_path / "bad.jsonl")], "bad.jsonl:2"),
        ([*text, "--set", "optim.lrr=1"], "lrr"),
        ([*text, "--set", "seq_len=4096"], "seq_len 4096 is over the model's context"),
        ([*text, "--set", "global_batch_size=3", "--set", "micro_batch_size=2"], "global_batch_size 3 is not a multiple"),
    ]
    for extra, expected in cases:
        assert train(*base, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("phi3: error:") and expected in err, err
        assert not out.exists()


def test_resume_refuses_what_it_cannot_continue(memorised, tmp_path, capsys):
    text = memorised.parent / "text.txt"
    tok = memorised.parent / "tok"
    run = tmp_path / "run"
    common = ["--tokenizer", str(tok), "--data", str(text), "--out", str(run), "--set", "seq_len=64",
              "--set", "micro_batch_size=2", "--set", "global_batch_size=2"]
    assert train("pretrain", "--model", MODEL, *common, "--set", "phases.0.steps=2", "--resume") == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert train("pretrain", "--model", MODEL, *common, "--set", "phases.0.steps=2") == 0
    assert train("pretrain", "--model", MODEL, *common, "--set", "phases.0.steps=2") == 2
    assert "pass --resume" in capsys.readouterr().err
    wider = MODEL.replace("intermediate=128", "intermediate=96")
    assert train("pretrain", "--model", wider, *common, "--set", "phases.0.steps=4", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model shape differs (intermediate_size differ)" in err, err
    # Allowed: another micro-batch size (same rows per step) and more steps... of the same phases.
    assert train("pretrain", "--model", MODEL, *common, "--set", "phases.0.steps=2",
                 "--set", "micro_batch_size=1", "--resume") == 0


def chat_data(root: Path) -> Path:
    path = root / "chat.jsonl"
    convs = [[{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Tiny."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name?"},
              {"role": "assistant", "content": "Tiny."}, {"role": "user", "content": "Sure?"},
              {"role": "assistant", "content": "Yes."}]]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    return path


def test_sft_full_and_lora_merged_at_export(tmp_path):
    from safetensors.torch import load_file
    tok = tokenizer_folder(tmp_path)
    data = chat_data(tmp_path)
    common = ["--model", MODEL, "--tokenizer", str(tok), "--data", str(data), "--set", "seq_len=64",
              "--set", "micro_batch_size=2", "--set", "global_batch_size=2", "--set", "save_every=0",
              "--set", "optim.lr=1e-2", "--set", "optim.warmup_steps=2"]
    assert train("sft", *common, "--out", str(tmp_path / "full"), "--set", "phases.0.steps=25") == 0
    recs = metrics(tmp_path / "full")
    # Only assistant tokens (and their <|end|>) carry loss: a few tokens, learned fast.
    assert recs[-1]["loss"] < 0.2 * recs[0]["loss"], (recs[0]["loss"], recs[-1]["loss"])
    assert train("sft", *common, "--out", str(tmp_path / "lora"), "--set", "phases.0.steps=3",
                 "--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "lora.targets=[\"qkv_proj\"]") == 0
    merged = load_file(str(tmp_path / "lora" / "final" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in merged)
    # The same seed builds the same initial model: everything but the adapted qkv_proj is untouched.
    from phi3.train.recipe import Recipe, build_model
    initial, _, _ = build_model(Recipe(stage="sft", model=MODEL, tokenizer=str(tok), seq_len=64))
    for k, v in initial.state_dict().items():
        if k == "lm_head.weight" and k not in merged:
            continue
        if "qkv_proj" in k:
            assert not torch.equal(merged[k], v), k
        else:
            assert torch.equal(merged[k], v), k


def test_dpo_logs_rewards_and_starts_at_log2(tmp_path):
    tok = tokenizer_folder(tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": {"role": "assistant", "content": "I can't help with that."},
             "rejected": {"role": "assistant", "content": a}}
            for q, a in (("How to pick a lock?", "Use a pin."), ("Make poison?", "Mix it."), ("Hack a site?", "Try admin."),
                         ("Steal a car?", "Hotwire it."))]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "dpo"
    assert train("dpo", "--model", MODEL, "--tokenizer", str(tok), "--data", str(pairs), "--out", str(out),
                 "--set", "seq_len=64", "--set", "micro_batch_size=1", "--set", "global_batch_size=2",
                 "--set", "phases.0.steps=6", "--set", "optim.lr=3e-3", "--set", "optim.warmup_steps=1",
                 "--set", "save_every=0") == 0
    recs = metrics(out)
    # The policy starts as the reference: every log-ratio is 0, the loss ln 2.
    assert abs(recs[0]["loss"] - 0.6931471805599453) < 1e-6
    assert recs[0]["rewards/margins"] == 0.0
    assert recs[-1]["rewards/margins"] > 0 and recs[-1]["loss"] < recs[0]["loss"]
    for r in recs:
        assert 0.0 <= r["rewards/accuracies"] <= 1.0
        assert set(r) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "lr"}
    assert (out / "final" / "model.safetensors").exists() and (out / "metrics.png").exists()


def test_longctx_writes_longrope_config_and_resumes_without_searching(memorised, tmp_path, monkeypatch):
    """From the 128-token memorised model to 256 tokens: the search runs once, final/config.json
    carries the longrope factors, and a resume takes them from the checkpoint."""
    docs = tmp_path / "long.jsonl"
    docs.write_text("".join(json.dumps({"text": (TEXT + " ") * 5}) + "\n" for _ in range(4)))
    out = tmp_path / "long"
    args = ["longctx", "--model", str(memorised), "--data", str(docs), "--out", str(out), "--set", "seq_len=256",
            "--set", "micro_batch_size=1", "--set", "global_batch_size=1", "--set", "phases.0.steps=2",
            "--set", "longctx.target_len=256", "--set", "longctx.population=2", "--set", "longctx.iterations=1",
            "--set", "longctx.search_documents=1", "--set", "save_every=1"]
    assert train(*args) == 0
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 256 and cfg["original_max_position_embeddings"] == 128
    assert cfg["rope_scaling"]["type"] == "longrope" and len(cfg["rope_scaling"]["long_factor"]) == 8
    first = metrics(out)
    # As if killed after step 1's checkpoint: --resume replays step 2 with the checkpoint's rope
    # (same loss bit for bit), and the search does not run again.
    import shutil

    import phi3.train.longrope as longrope
    shutil.rmtree(out / "step_000002")
    shutil.rmtree(out / "final")
    monkeypatch.setattr(longrope, "run_longctx_search", lambda *a, **k: pytest.fail("searched again"))
    assert train(*args, "--resume") == 0
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in first]
    assert json.loads((out / "final" / "config.json").read_text())["rope_scaling"] == cfg["rope_scaling"]


def test_continues_a_hugging_face_folder_and_exports_its_layout(tmp_path):
    """--model a Hugging Face folder of SmolLM2's layout (llama, GQA, tied head): continued
    pretraining, then final/ in the same layout (q/k/v and gate/up unfused, no lm_head), equal in
    transformers within 1e-4."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from phi3.checkpoint import load
    from tests.conftest import hf_reference, save_hf_model
    from tests.test_model import packing_config
    cfg = packing_config("llama")
    src = save_hf_model(hf_reference(cfg), cfg, tmp_path / "base")
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "run"
    assert train("pretrain", "--model", str(src), "--data", str(tmp_path / "text.txt"), "--out", str(out),
                 "--set", "seq_len=32", "--set", "micro_batch_size=1", "--set", "global_batch_size=2",
                 "--set", "phases.0.steps=3", "--set", "save_every=0") == 0
    names = set(load_file(str(out / "final" / "model.safetensors")))
    assert "model.layers.0.self_attn.q_proj.weight" in names and "lm_head.weight" not in names
    ids = torch.tensor([[5, 80, 81, 90, 17, 3, 44]])
    hf = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32, attn_implementation="eager").eval()
    ours = load(str(out / "final"), dtype="float32").model.eval()
    before = load(str(src), dtype="float32").model.eval()
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids)
        assert not torch.allclose(b, before(ids), atol=1e-3)  # it trained
    assert (a - b).abs().max().item() < 1e-4


# --- Epoch budgets ----------------------------------------------------------------------------------

def packer_rows(stream, need: dict[int, int]) -> int:
    """Rows the real PackedStream produces until each source s in `need` has had need[s] documents
    drawn and the last of them laid out in full (only one document is ever in flight: `carry`)."""
    rows = 0
    while True:
        done = True
        for s, n in need.items():
            drawn = stream.epoch[s] * len(stream.sources[s]) + stream.pos[s]
            in_flight = stream.carry is not None and stream.carry[0] == s and drawn == n
            done &= drawn >= n and not in_flight
        if done:
            return rows
        stream.next_rows(1)
        rows += 1


@pytest.mark.parametrize("whole", [False, True])
def test_epoch_rows_replays_the_packer_row_for_row(whole):
    """epoch_rows counts on document lengths alone what PackedStream does: the mixture's picks,
    the seeded per-epoch orders, documents cut at row ends, conversations moved whole to a new row."""
    import numpy as np

    from phi3.train.data import PackedStream
    from phi3.train.trainer import document_lengths, epoch_rows
    from tests.test_train_data import ListSource
    rng = np.random.default_rng(0)
    T = 16
    a = ListSource([list(range(1, int(n) + 1)) for n in rng.integers(1, 40, 23)], "a", whole)  # some > T
    b = ListSource([[7] * int(n) for n in rng.integers(1, 12, 9)], "b", whole)
    cases = [([a], [1.0], 1.0, None), ([a], [1.0], 2.0, None), ([a], [1.0], 0.5, None), ([a], [1.0], 1.3, None),
             ([a, b], [1.0, 3.0], 1.0, None), ([a, b], [2.0, 1.0], 2.0, None), ([a, b], [1.0, 1.0], 1.0, [0])]
    for sources, weights, epochs, counted in cases:
        lengths = [document_lengths(s) for s in sources]
        assert [list(x) for x in lengths] == [[len(d) for d in s.docs] for s in sources]
        got = epoch_rows(lengths, [whole] * len(sources), weights, T, 3, epochs, counted)
        need = {k: math.ceil(epochs * len(s) - 1e-9) for k, s in enumerate(sources) if counted is None or k in counted}
        want = packer_rows(PackedStream(sources, weights, T, 3), need)
        assert got == want, (len(sources), weights, epochs, got, want)


def test_ds_shard_lengths_come_from_its_index(tmp_path):
    """A .ds shard's document lengths are read from its index, with the EOS the packer appends to a
    document that lacks one, without reading a token more than each document's last."""
    from phi3.train.data import open_documents
    from phi3.train.trainer import document_lengths
    from tests.test_train_data import write_ds

    class Tok:
        vocab_size, eos_id = 320, 0
    path = write_ds(tmp_path / "s.ds", [[5, 6, 0], [7], [8, 9, 10, 0], [11, 12]])
    source = open_documents(path, Tok())
    assert list(document_lengths(source)) == [len(d) for d in source.get_many(range(4))] == [3, 2, 4, 3]


def test_sft_without_a_budget_trains_exactly_one_epoch(tmp_path, capsys):
    """No --epochs/--steps/--tokens: one epoch, i.e. the fewest whole steps whose rows hold every
    conversation's assistant tokens; one line says how many steps that is."""
    from phi3.train import ckpt
    from phi3.train.data import PackedStream, open_sft
    from phi3.tokenizer import load_tokenizer
    tok = tokenizer_folder(tmp_path)
    data = tmp_path / "chat.jsonl"
    convs = [[{"role": "user", "content": f"Question {i}?" * (1 + i % 3)},
              {"role": "assistant", "content": f"Answer number {i}." * (1 + i % 4)}] for i in range(13)]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in convs))
    G, T = 4, 64
    out = tmp_path / "run"
    assert train("sft", "--model", MODEL, "--tokenizer", str(tok), "--data", str(data), "--out", str(out),
                 "--set", f"seq_len={T}", "--set", "micro_batch_size=2", "--set", f"global_batch_size={G}",
                 "--set", "save_every=1000") == 0
    # Independently: the assistant tokens of one epoch, and the rows the packer needs to hold them.
    source = open_sft(data, load_tokenizer(tok))
    assistant = sum(int(m[1:].sum()) for _, m in source.get_many(range(13)))  # labels: mask of the NEXT token
    stream = PackedStream([source], [1.0], T, 0)
    labels, steps = 0, 0
    while labels < assistant:
        labels += int((stream.next_rows(G).labels != -100).sum())
        steps += 1
    recs = metrics(out)
    assert [r["step"] for r in recs] == list(range(1, steps + 1)) and steps > 2
    err = capsys.readouterr().err
    assert (f"phi3 train: no budget given (--epochs, --steps or --tokens), training 1 epoch = {steps} steps of "
            f"{G} rows (warmup 0 steps)") in err
    # The trainer's stream at the end: one epoch done, and at most the last step's rows into the next.
    state = ckpt.read_state(out / f"step_{steps:06d}")["data"]["sources"][0]
    epochs = state["epoch"] + state["position"] / state["documents"]
    assert state["documents"] == 13 and 1.0 <= epochs < 1.0 + G / 13, state
    assert stream.epochs[0] == epochs


def test_dpo_epochs_are_pairs_over_the_global_batch(tmp_path, capsys):
    """dpo: 1 epoch = ceil(pairs / global_batch_size) steps (no budget given), --epochs 2 =
    ceil(2 * pairs / global_batch_size); resuming with another budget is refused, like steps."""
    tok = tokenizer_folder(tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Bad request {i}?"}],
             "chosen": {"role": "assistant", "content": "I can't help with that."},
             "rejected": {"role": "assistant", "content": f"Sure, step {i}."}} for i in range(5)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", MODEL, "--tokenizer", str(tok), "--data", str(pairs), "--set", "seq_len=64",
              "--set", "micro_batch_size=1", "--set", "global_batch_size=2", "--set", "save_every=1"]
    assert train("dpo", *common, "--out", str(tmp_path / "one")) == 0
    assert len(metrics(tmp_path / "one")) == 3  # ceil(5 / 2)
    assert "training 1 epoch = 3 steps of 2 pairs" in capsys.readouterr().err
    assert train("dpo", *common, "--out", str(tmp_path / "two"), "--epochs", "2") == 0
    assert len(metrics(tmp_path / "two")) == 5  # ceil(10 / 2)
    assert "phi3 train: 2 epochs = 5 steps of 2 pairs" in capsys.readouterr().err
    # Resume: the same budget continues; another one is refused in one line.
    assert train("dpo", *common, "--out", str(tmp_path / "two"), "--epochs", "3", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "phases (sources and budgets) differs" in err, err
    import shutil
    shutil.rmtree(tmp_path / "two" / "step_000005")
    assert train("dpo", *common, "--out", str(tmp_path / "two"), "--epochs", "2", "--resume") == 0
    assert [r["step"] for r in metrics(tmp_path / "two")] == [1, 2, 3, 4, 5]


def test_budget_flag_errors_are_one_line(tmp_path, capsys):
    tok = tokenizer_folder(tmp_path)
    (tmp_path / "text.txt").write_text(TEXT)
    two = tmp_path / "two.toml"
    two.write_text(f'stage = "pretrain"\nmodel = "{MODEL}"\n[[phases]]\nsteps = 2\n[[phases.sources]]\n'
                   f'path = "{tmp_path / "text.txt"}"\n[[phases]]\nsteps = 2\n[[phases.sources]]\n'
                   f'path = "{tmp_path / "text.txt"}"\n')
    base = ["pretrain", "--model", MODEL, "--tokenizer", str(tok), "--out", str(tmp_path / "run"), "--set", "seq_len=64"]
    cases = [
        (["--data", str(tmp_path / "text.txt"), "--epochs", "1", "--steps", "3"], "argument --steps: not allowed with argument --epochs"),
        (["--data", str(tmp_path / "text.txt"), "--epochs", "0"], "argument --epochs: '0' must be a positive number"),
        (["--data", str(tmp_path / "text.txt"), "--tokens", "1.5"], "argument --tokens: '1.5' must be a whole number"),
        (["--recipe", str(two), "--epochs", "2"], "--epochs sets the budget of a single phase but two.toml has 2; use --set phases.K.epochs=N"),
        (["--data", str(tmp_path / "text.txt"), "--steps", "3", "--set", "phases.0.epochs=1"], "sets both steps and epochs"),
    ]
    for extra, expected in cases:
        with pytest.raises(SystemExit) if "argument" in expected else contextlib.nullcontext():
            assert train(*base, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("phi3: error:") and expected in err, err
        assert not (tmp_path / "run").exists()
    # --tokens takes 2e3 or 2_000 as a whole number (here 2,048 tokens = 16 steps of 2 rows of 64)
    assert train(*base, "--data", str(tmp_path / "text.txt"), "--tokens", "2e3", "--set", "global_batch_size=2",
                 "--set", "micro_batch_size=2", "--set", "save_every=0") == 0
    assert len(metrics(tmp_path / "run")) == 16


def test_cpu_training_reuses_freed_memory_and_restores_malloc():
    """Inside the training loop (CPU) glibc serves a large tensor from its heap, where freed memory
    is kept for the next step, not from a fresh mmap that every step faults in again (phi3-shape
    bf16: ~300,000 page faults and 0.7 s of system time per step)."""
    import ctypes
    import sys

    from phi3.train.trainer import _reuse_freed_memory
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt: Linux only")
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        pytest.skip("no glibc >= 2.33 (mallinfo2)")

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                    "fsmblks", "uordblks", "fordblks", "keepcost")]
    mallinfo2.restype = Info

    def mapped_for_64mib() -> int:
        before = mallinfo2().hblkhd  # bytes in mmap-served blocks
        t = torch.empty(16 << 20)
        grew = mallinfo2().hblkhd - before
        del t
        return grew

    with _reuse_freed_memory(torch.device("cpu")):
        inside = mapped_for_64mib()
    assert inside == 0
    # after the loop glibc's default thresholds are back, but whether a 64 MiB block then comes from
    # mmap depends on the free heap the rest of the suite left (0 in a full run at 20:09): not asserted
