"""phases: the Phi-3 report's two pretraining phases from classified documents (issue 16, stage 6).

Phase 1 is the documents whose edu_int_score (from `phi3 data classify`) is at least t1 ("mostly
filtered web"); phase 2 is the stricter subset at or above t2, plus the synthetic data. Each part is
tokenized with the target model's tokenizer (as `phi3 data tokenize`), and OUT/mixture.toml lists
the phases as `phi3 train` recipes take them ([[phases]] with [[phases.sources]] path and weight,
and each phase's token count), to paste into a training recipe.

    OUT/phase1/tokens/*.ds          phase 1 (web, score >= t1)
    OUT/phase2/web/tokens/*.ds      phase 2's web part (score >= t2)
    OUT/phase2/synthetic/tokens/*.ds  phase 2's synthetic part (when --synthetic is given)
    OUT/phase2/synthetic/removed/   synthetic documents near-duplicate to web text or to each other
    OUT/mixture.toml, OUT/summary.json

The synthetic documents are MinHash-deduplicated against the web documents (all of IN, whatever
their score) and among themselves before they are tokenized (dedup.synthetic_dedup_steps, with
the dedup stage's parameters), as the issue asks of the generations.
"""

from __future__ import annotations

import json
from pathlib import Path

from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.tokens import DocumentTokenizer
from datatrove.pipeline.writers import JsonlWriter

from phi3.errors import Phi3Error
from phi3.recipe.ingest import docs_reader
from phi3.recipe.pipeline import Step, step_stats
from phi3.recipe.tokens import load_target_tokenizer


def threshold(t: float) -> int | float:
    """A whole-number threshold compares FineWeb-Edu's edu_int_score (the rounded score: 3 keeps
    scores from 2.5); a fractional one, such as 2.87, compares the classifier's edu_score itself.
    The second is for judges whose scores crowd into one unit (SmolLM2-135M's expected scores in
    `make data-demo` lie within 2.1-3.3, so every document's int score is 2 or 3)."""
    return int(t) if float(t).is_integer() else float(t)


class ScoreFilter(BaseFilter):
    """Keeps documents whose score is at least `minimum` (see `threshold` for which score)."""
    name = "🎓 edu score >= t"

    def __init__(self, minimum: float) -> None:
        super().__init__()
        self.minimum = threshold(minimum)
        self.key = "edu_int_score" if isinstance(self.minimum, int) else "edu_score"

    def filter(self, doc) -> bool | tuple[bool, str]:
        score = doc.metadata.get(self.key)
        if score is None:
            raise Phi3Error(f"document {doc.id!r} has no {self.key}: give phases the output of `phi3 data classify`")
        return True if score >= self.minimum else (False, f"below_{self.minimum}")


def check_thresholds(src: Path, t1: float, t2: float) -> dict:
    """Refuse thresholds that leave a phase empty, from classify's histogram (or, for a fractional
    threshold, its documents' edu_score), before anything runs."""
    if not 0 <= t1 <= t2 <= 5:
        raise Phi3Error(f"thresholds --t1 {t1} --t2 {t2}: need 0 <= t1 <= t2 <= 5 (phase 2 is the stricter subset)")
    summary = Path(src) / "summary.json"
    hist = json.loads(summary.read_text()).get("histogram") if summary.is_file() else None
    if hist is None or json.loads(summary.read_text()).get("stage") != "classify":
        raise Phi3Error(f"{src}: not a finished `phi3 data classify` folder (its documents carry the edu scores)")
    scores = None
    for name, t in (("--t1", threshold(t1)), ("--t2", threshold(t2))):
        if isinstance(t, int):
            kept = sum(v for k, v in hist.items() if int(k) >= t)
        else:
            if scores is None:
                from phi3.recipe.ingest import docs_input
                from phi3.recipe.judge import read_documents
                scores = [d.get("metadata", {}).get("edu_score") for d in read_documents(*docs_input(src)).values()]
            kept = sum(1 for x in scores if x is not None and x >= t)
        if kept == 0:
            top = f"highest edu_score {max(x for x in scores if x is not None):.3f}" if scores else \
                "scores: " + ", ".join(f"{k}: {v}" for k, v in hist.items())
            raise Phi3Error(f"{name} {t} leaves no documents ({top}); lower it")
    return hist


def phases_steps(src: Path, t1: int, t2: int, tokenizer_spec: str, eos: str | None = None,
                 synthetic: Path | None = None, seed: int = 0, minhash=None) -> list[Step]:
    check_thresholds(src, t1, t2)
    if synthetic is not None:
        docs_reader(synthetic)
    tk, eos_token = load_target_tokenizer(tokenizer_spec, eos)

    def tokenizer_path(work: Path) -> str:
        work.mkdir(parents=True, exist_ok=True)
        path = work / "tokenizer.json"
        if not path.is_file():
            tk.save(str(work / "tokenizer.json.tmp"))
            (work / "tokenizer.json.tmp").replace(path)
        return str(path)

    def tokenize(part: str, source_of) -> Step:
        return Step(f"{part.replace('/', '-')}-tokenize", lambda w: [
            docs_reader(source_of(w)),
            DocumentTokenizer(output_folder=str(w / part / "tokens"), tokenizer_name_or_path=tokenizer_path(w),
                              eos_token=eos_token, seed=seed)])

    steps = [
        Step("phase1-filter", lambda w: [docs_reader(src), ScoreFilter(t1), JsonlWriter(str(w / "phase1" / "docs"))]),
        Step("phase2-filter", lambda w: [docs_reader(src), ScoreFilter(t2), JsonlWriter(str(w / "phase2" / "web" / "docs"))]),
        tokenize("phase1", lambda w: w / "phase1" / "docs"),
        tokenize("phase2/web", lambda w: w / "phase2" / "web" / "docs"),
    ]
    if synthetic is not None:
        from phi3.recipe.dedup import minhash_config, synthetic_dedup_steps
        steps += synthetic_dedup_steps(src, Path(synthetic), "phase2/synthetic", minhash or minhash_config())

        def kept_synthetic(w: Path) -> Path:
            if not any((w / "phase2" / "synthetic" / "docs").glob("*.jsonl.gz")):
                raise Phi3Error(f"every synthetic document of {synthetic} is a near-duplicate of web text or of another "
                                f"(see {w / 'phase2' / 'synthetic' / 'removed'}); generate more varied text")
            return w / "phase2" / "synthetic" / "docs"
        steps.append(tokenize("phase2/synthetic", kept_synthetic))
    return steps


def _tokens(work: Path, step: str) -> int:
    return sum(b["stats"].get("tokens", 0) for b in step_stats(work, step))


def summarize_phases(work: Path, out: Path, t1: float, t2: float, synthetic: bool) -> dict:
    """Token counts per phase and OUT/mixture.toml (paths as they will be once OUT is published)."""
    parts = {"phase1": _tokens(work, "phase1-tokenize"), "phase2/web": _tokens(work, "phase2-web-tokenize")}
    if synthetic:
        parts["phase2/synthetic"] = _tokens(work, "phase2-synthetic-tokenize")
    docs = {p: step_stats(work, f"{p}-filter")[-1]["stats"].get("total", 0) for p in ("phase1", "phase2")}
    extra = {}
    if synthetic:
        from phi3.recipe.dedup import summarize_synthetic_dedup
        extra["synthetic_dedup"] = sd = summarize_synthetic_dedup(work, "phase2/synthetic")
        extra["removed"] = {f"synthetic_{k}": {"dropped": v, "kept": sd["documents_out"]} for k, v in sd["removed"].items()}
    lines = [f"# phi3 data phases: phase 1 = edu score >= {threshold(t1)}, phase 2 = score >= {threshold(t2)}"
             + (" + synthetic" if synthetic else "") + "; paste into a `phi3 train pretrain` recipe and set",
             "# each phase's token budget (these are the tokens on disk; a budget above them repeats data)."]
    for phase in ("phase1", "phase2"):
        members = [p for p in parts if p.split("/")[0] == phase]
        lines += ["", "[[phases]]", f'name = "{phase}"', f"tokens = {sum(parts[p] for p in members)}"]
        for p in members:
            # weights proportional to tokens: each document is seen about equally often
            lines += ["[[phases.sources]]", f'path = "{out / p / "tokens"}"', f"weight = {max(parts[p], 1)}"]
    (work / "mixture.toml").write_text("\n".join(lines) + "\n")
    return {"documents_out": docs["phase1"], "phase_documents": docs, "tokens": parts, "t1": threshold(t1),
            "t2": threshold(t2), **extra}
