"""`phi3 eval` against lm-evaluation-harness on a small fixed sample (the full comparison, 200
multiple-choice items and 100 per generation task, is benchmarks/lm_eval_parity.py; its numbers are
in EVALUATION.md): identical prompts, the same choices picked, the same extracted answers."""

import json

import pytest

from tests.conftest import BENCHDATA


@pytest.mark.skipif(not (BENCHDATA / "gsm8k").is_dir(), reason=f"benchmark data not found at {BENCHDATA}")
def test_phi3_eval_agrees_with_lm_eval_on_a_small_sample(smollm_gguf, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is a test dependency (pip install -e '.[test]')")
    from benchmarks import lm_eval_parity
    rc = lm_eval_parity.main(["--model", str(smollm_gguf), "--benchdata", str(BENCHDATA), "--mc-limit", "8",
                              "--gen-limit", "2", "--out", str(tmp_path)])
    comparisons = {c["spec"].split("=")[0]: c for c in json.loads((tmp_path / "parity.json").read_text())}
    assert set(comparisons) == {"arc_challenge", "gsm8k", "bbh:boolean_expressions", "bbh:date_understanding",
                                "bbh:sports_understanding"}
    for c in comparisons.values():
        assert c["same_prompt"] == c["n"], c  # lm-eval saw exactly phi3's prompt
    arc = comparisons["arc_challenge"]
    assert arc["n"] == 8 and arc["same_answer"] == 8
    assert arc["phi3"] == pytest.approx(arc["lm_eval"], abs=1e-9)
    generated = [c for c in comparisons.values() if c["kind"] == "generate"]
    assert sum(c["n"] for c in generated) == 8
    assert sum(c["same_answer"] for c in generated) >= 7  # a float near-tie may flip one greedy token
    assert rc == 0 or sum(c["same_answer"] for c in generated) == 7
