"""`phi3 train` under torchrun: DDP and FSDP2 on 2 gloo processes equal 1 process with twice the
gradient accumulation, and a kill -9 followed by --resume continues bit for bit.

Every run is the same command line, `phi3 train pretrain ...` (a tiny Phi-3, a jsonl corpus),
alone or under `torchrun --standalone --nproc-per-node 2 -m phi3.cli train ...`. Each torchrun
costs ~15 s on an idle 2-core machine (imports and rendezvous), so there are four of them.

`toy_job` (a model and a toy in-memory stream, no recipe or data files) drives `run` directly in
test_train_parallel's precision tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STEPS = 5
GLOBAL_BATCH, MICRO_BATCH, SEQ = 4, 2, 24


# --- The worker -----------------------------------------------------------------------------------

@dataclass
class ToyBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    document_ids: torch.Tensor


class ToyStream:
    """Row i is a pure function of (seed, i): two documents per row, labels shifted, -100 on each
    document's last token (the packer's convention)."""

    def __init__(self, vocab: int, seq: int, seed: int) -> None:
        self.vocab, self.seq, self.seed, self.next = vocab, seq, seed, 0

    def row(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        # Tokens from a 24-token subset: a distribution the model can learn in 5 steps.
        toks = torch.randint(0, 24, (self.seq + 1,), generator=g) * (self.vocab // 24)
        cut = int(torch.randint(4, self.seq - 4, (1,), generator=g))
        docs = torch.tensor([0] * cut + [1] * (self.seq - cut))
        labels = toks[1:].clone()
        labels[cut - 1] = -100
        labels[-1] = -100
        return toks[:-1], labels, docs

    def next_rows(self, n: int) -> ToyBatch:
        rows = [self.row(self.next + k) for k in range(n)]
        self.next += n
        return ToyBatch(*(torch.stack(t) for t in zip(*rows)))

    def state_dict(self) -> dict:
        return {"next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.next = state["next"]


def toy_recipe(parallel: str, save_every: int = 0) -> SimpleNamespace:
    optim = SimpleNamespace(lr=3e-3, min_lr=3e-4, schedule="cosine", warmup_steps=2, decay_fraction=0.2,
                            weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0)
    return SimpleNamespace(stage="pretrain", seq_len=SEQ, micro_batch_size=MICRO_BATCH,
                           global_batch_size=GLOBAL_BATCH, optim=optim, precision="float32", parallel=parallel,
                           activation_checkpointing=True, compile=False, seed=0, save_every=save_every,
                           keep_last=2, log_every=1, tensorboard=False)


def toy_job(parallel: str, save_every: int = 0, cfg=None):
    from phi3.model import Transformer
    from phi3.tokenizer import Tokenizer
    from phi3.train.trainer import Job, PhasePlan
    from tests.conftest import tiny_config, tiny_tokenizer_json
    from tokenizers import Tokenizer as HFTokenizer

    cfg = cfg or tiny_config("mini-4k")
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    tok = Tokenizer(tk=HFTokenizer.from_str(tiny_tokenizer_json(cfg.vocab_size)), eos_token="<|endoftext|>",
                    stop_ids={259})
    phases = [PhasePlan("toy", STEPS, lambda: ToyStream(cfg.vocab_size, SEQ, seed=1), describe="toy")]
    return Job(stage="pretrain", recipe=toy_recipe(parallel, save_every), model=model, config=cfg,
               tokenizer=tok, phases=phases)


# --- Helpers for the tests ------------------------------------------------------------------------

def corpus(root: Path) -> tuple[Path, Path]:
    """A tokenizer folder and 48 documents of seeded pseudo-words over 8 letters (learnable: the
    loss falls from ln 320 toward ln 9 within a few steps)."""
    import random

    from tests.test_train_trainer import tokenizer_folder
    rng = random.Random(0)
    docs = [" ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6)))
                     for _ in range(rng.randint(4, 14))) for _ in range(48)]
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return tokenizer_folder(root), path


def cli_args(root: Path, out: Path, parallel: str, save_every: int = 0, resume: bool = False) -> list[str]:
    from tests.test_train_trainer import MODEL
    tok, data = root / "tok", root / "corpus.jsonl"
    args = ["train", "pretrain", "--model", MODEL, "--tokenizer", str(tok), "--data", str(data), "--out", str(out),
            "--no-progress", "--set", f"seq_len={SEQ}", "--set", f"micro_batch_size={MICRO_BATCH}",
            "--set", f"global_batch_size={GLOBAL_BATCH}", "--set", f"phases.0.steps={STEPS}",
            "--set", "optim.lr=3e-3", "--set", "optim.min_lr=3e-4", "--set", "optim.schedule=cosine",
            "--set", "optim.warmup_steps=2", "--set", "activation_checkpointing=true",
            "--set", f"parallel={parallel}", "--set", f"save_every={save_every}"]
    return args + (["--resume"] if resume else [])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    corpus(root)
    return root


def launch(root: Path, out: Path, parallel: str, nproc: int, resume: bool = False, save_every: int = 0,
           env: dict | None = None, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """The CLI in a new process: alone (nproc 1) or under torchrun, one thread per process."""
    args = ["-m", "phi3.cli", *cli_args(root, out, parallel, save_every, resume)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    res = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=300)
    if expect_ok:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def losses(out: Path) -> list[float]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1))
    return [r["loss"] for r in recs]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def single(data_root, tmp_path_factory) -> Path:
    """1 process, no process group, 2 micro-batches of 2 rows per step (in-process, on one thread
    as the launched processes)."""
    from phi3.cli import main
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(cli_args(data_root, out, "none")) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def fsdp_run(data_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    launch(data_root, out, "fsdp", 2, save_every=2)
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == STEPS
    for x, y in zip(la, lb):
        assert abs(x - y) <= 1e-5 * abs(y), (la, lb)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=1e-5), (k, (wa[k] - wb[k]).abs().max())


def test_fsdp_two_processes_equal_one_process_with_accumulation(single, fsdp_run):
    _assert_same_run(fsdp_run, single)
    # The loss actually moved: these are 5 real optimizer steps.
    assert losses(single)[-1] < losses(single)[0] - 0.3, losses(single)


def test_ddp_two_processes_equal_one_process_with_accumulation(single, data_root, tmp_path):
    launch(data_root, tmp_path, "ddp", 2)
    _assert_same_run(tmp_path, single)


@pytest.fixture(scope="module")
def killed_fsdp(fsdp_run, data_root, tmp_path_factory) -> Path:
    """Both ranks SIGKILL themselves after step 3, the checkpoint of step 2 on disk."""
    out = tmp_path_factory.mktemp("killed")
    res = launch(data_root, out, "fsdp", 2, save_every=2, env={"PHI3_TRAIN_KILL_AFTER_STEP": "3"}, expect_ok=False)
    assert res.returncode != 0
    assert losses(out) == losses(fsdp_run)[:3]
    assert not (out / "final").exists()
    return out


def test_kill_and_resume_two_processes_is_bit_exact(fsdp_run, killed_fsdp, data_root, tmp_path):
    """--resume under a new torchrun replays steps 3..5 with the uninterrupted run's exact losses
    and weights."""
    out = tmp_path / "run"
    shutil.copytree(killed_fsdp, out)
    launch(data_root, out, "fsdp", 2, save_every=2, resume=True)
    assert losses(out) == losses(fsdp_run)
    wa, wb = final_weights(out), final_weights(fsdp_run)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_on_another_world_size(fsdp_run, killed_fsdp, data_root, tmp_path):
    """DCP reshards: the 2-process FSDP2 checkpoint of step 2 resumes in 1 process without a
    process group; the losses stay within 1e-5 of the 2-process run."""
    out = tmp_path / "run"
    shutil.copytree(killed_fsdp, out)
    launch(data_root, out, "none", 1, save_every=2, resume=True)
    assert json.loads((out / "step_000004" / "trainer_state.json").read_text())["world_size"] == 1
    assert losses(out)[:3] == losses(fsdp_run)[:3]
    for x, y in zip(losses(out), losses(fsdp_run)):
        assert abs(x - y) <= 1e-5 * abs(y)


def test_kill_and_resume_one_process_is_bit_exact(single, data_root, tmp_path):
    res = launch(data_root, tmp_path, "none", 1, save_every=2, env={"PHI3_TRAIN_KILL_AFTER_STEP": "3"}, expect_ok=False)
    assert res.returncode == -9
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_000002"]
    launch(data_root, tmp_path, "none", 1, save_every=2, resume=True)
    assert losses(tmp_path) == losses(single)
    wa, wb = final_weights(tmp_path), final_weights(single)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kill_during_save_leaves_previous_checkpoint(single, data_root, tmp_path):
    """SIGKILL inside the save of step 4 (files written, not yet renamed): step_000002 is intact,
    step_000004.tmp is ignored, and the resume from step 2 gives the uninterrupted run."""
    res = launch(data_root, tmp_path, "none", 1, save_every=2, env={"PHI3_TRAIN_KILL_IN_SAVE": "4"}, expect_ok=False)
    assert res.returncode == -9
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert names == ["step_000002", "step_000004.tmp"]
    from phi3.train.ckpt import latest_checkpoint, read_state
    assert latest_checkpoint(tmp_path).name == "step_000002"
    assert read_state(tmp_path / "step_000002")["step"] == 2
    launch(data_root, tmp_path, "none", 1, save_every=2, resume=True)
    assert losses(tmp_path) == losses(single)
    assert not (tmp_path / "step_000004.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_")) == ["step_000004", "step_000005"]



def test_resume_restores_dropout_rng(tmp_path):
    """With dropout (and activation checkpointing's recomputation), a resume is still bit-exact:
    each rank's RNG state is in the checkpoint (in-process, 1 process)."""
    from phi3.train.parallel import DistContext
    from phi3.train.trainer import run
    from tests.conftest import tiny_config
    cfg = tiny_config("mini-4k").with_(attention_dropout=0.1, resid_pdrop=0.1, embd_pdrop=0.1)

    def job():
        j = toy_job("none", save_every=2, cfg=cfg)
        j.recipe.keep_last = 5
        return j

    full = tmp_path / "full"
    run(job(), DistContext(), full, export=False, progress=False)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for name in ("step_000004", "step_000005"):
        shutil.rmtree(part / name)
    run(job(), DistContext(), part, resume=True, export=False, progress=False)
    assert losses(part) == losses(full)
    # And the dropout did act: the same run without it gives other losses.
    plain = tmp_path / "plain"
    j = toy_job("none", cfg=tiny_config("mini-4k"))
    run(j, DistContext(), plain, export=False, progress=False)
    assert losses(plain) != losses(full)
