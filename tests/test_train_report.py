"""phi3/train/report.py: metrics.jsonl read back line by line, metrics.png drawn atomically."""

from __future__ import annotations

import json

import pytest

from phi3.errors import Phi3Error
from phi3.train import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def records(n=20, dpo=False):
    out = []
    for s in range(1, n + 1):
        r = {"step": s, "loss": 10.0 / s, "lr": 1e-3 * min(1.0, s / 5), "tokens": 512 * s,
             "tokens_per_s": 1000.0 + s, "grad_norm": 1.0 / s, "elapsed": 0.5 * s}
        if dpo:
            r.update({"rewards/chosen": 0.01 * s, "rewards/rejected": -0.01 * s,
                      "rewards/margins": 0.02 * s, "rewards/accuracies": min(1.0, s / 10)})
        r["phase"] = "phase1" if s <= n // 2 else "phase2"
        out.append(r)
    return out


@pytest.mark.parametrize("dpo", [False, True])
def test_png_written(tmp_path, dpo):
    m = write_metrics(tmp_path / "metrics.jsonl", records(dpo=dpo))
    out = report.plot_metrics(m)
    assert out == tmp_path / "metrics.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    # the temporary file was renamed, not left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "metrics.png"]
    # 3 panels, or 4 with DPO's rewards: 2.2 inches each at 100 dpi
    import struct
    height = struct.unpack(">I", data[20:24])[0]
    assert height == (4 if dpo else 3) * 220


def test_phase_starts():
    rs = [{"step": s, "loss": 1.0, "phase": "web" if s <= 3 else "web+synthetic"} for s in range(1, 6)]
    assert report.phase_starts(rs) == [(1, "web"), (4, "web+synthetic")]
    assert report.phase_starts([{"step": 1, "loss": 2.0}]) == []


def test_read_keeps_last_record_of_a_step_and_sorts(tmp_path):
    rs = records(5)
    again = dict(rs[3], loss=0.123)  # step 4 logged again after a resume
    m = write_metrics(tmp_path / "metrics.jsonl", rs + [again], extra_lines=[""])
    got = report.read_metrics(m)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    assert got[3]["loss"] == 0.123


@pytest.mark.parametrize("line,expected", [
    ('{"step": 3, "loss": 1.0', "line 3 is not valid JSON"),
    ('[1, 2]', "line 3 holds a JSON list"),
    ('{"loss": 1.0}', "line 3: 'step' is None"),
    ('{"step": 3, "loss": "nan?"}', "line 3: 'loss' is 'nan?', not a number"),
])
def test_bad_line_names_it(tmp_path, line, expected):
    m = write_metrics(tmp_path / "metrics.jsonl", records(2), extra_lines=[line])
    with pytest.raises(Phi3Error, match="metrics.jsonl " + expected.replace("?", r"\?").replace("[", r"\[")) as e:
        report.plot_metrics(m)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "metrics.png").exists()


def test_missing_and_empty(tmp_path):
    with pytest.raises(Phi3Error, match="no metrics file"):
        report.read_metrics(tmp_path / "nope.jsonl")
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(Phi3Error, match="no records to plot"):
        report.plot_metrics(tmp_path / "metrics.jsonl")


def test_tensorboard_optional(tmp_path, capsys, monkeypatch):
    try:
        import tensorboard  # noqa: F401
        have = True
    except ImportError:
        have = False
    logger = report.tensorboard_logger(tmp_path / "tb")
    if have:
        assert logger is not None
        logger.close()
    else:
        assert logger is None
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "tensorboard is not installed" in err

    class Fake:
        def __init__(self):
            self.calls = []

        def add_scalar(self, *args):
            self.calls.append(args)

        def flush(self):
            pass

        def close(self):
            pass

    fake = Fake()
    report.TensorBoardLogger(fake).log({"step": 7, "loss": 2.5, "lr": None, "note": "x", "rewards/margins": 0.5})
    assert fake.calls == [("loss", 2.5, 7), ("rewards/margins", 0.5, 7)]
