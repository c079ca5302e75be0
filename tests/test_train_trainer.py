"""`phi3 train` end to end on tiny models, through the command line in-process: a text learned by
heart, the final/ folder loaded by transformers and quantized to a GGUF that generates, SFT (full
and LoRA), DPO, and the one-line errors (exit 2, nothing written)."""

from __future__ import annotations

import json
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
