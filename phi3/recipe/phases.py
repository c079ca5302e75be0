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


class ScoreFilter(BaseFilter):
    """Keeps documents whose metadata edu_int_score is at least `minimum`."""
    name = "🎓 edu score >= t"

    def __init__(self, minimum: int) -> None:
        super().__init__()
        self.minimum = minimum

    def filter(self, doc) -> bool | tuple[bool, str]:
        score = doc.metadata.get("edu_int_score")
        if score is None:
            raise Phi3Error(f"document {doc.id!r} has no edu_int_score: give phases the output of `phi3 data classify`")
        return True if score >= self.minimum else (False, f"below_{self.minimum}")


def check_thresholds(src: Path, t1: int, t2: int) -> dict:
    """Refuse thresholds that leave a phase empty, from classify's histogram, before anything runs."""
    if not 0 <= t1 <= t2 <= 5:
        raise Phi3Error(f"thresholds --t1 {t1} --t2 {t2}: need 0 <= t1 <= t2 <= 5 (phase 2 is the stricter subset)")
    summary = Path(src) / "summary.json"
    hist = json.loads(summary.read_text()).get("histogram") if summary.is_file() else None
    if hist is None or json.loads(summary.read_text()).get("stage") != "classify":
        raise Phi3Error(f"{src}: not a finished `phi3 data classify` folder (its documents carry the edu scores)")
    for name, t in (("--t1", t1), ("--t2", t2)):
        if sum(v for k, v in hist.items() if int(k) >= t) == 0:
            raise Phi3Error(f"{name} {t} leaves no documents (scores: {', '.join(f'{k}: {v}' for k, v in hist.items())}); "
                            "lower it")
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


def summarize_phases(work: Path, out: Path, t1: int, t2: int, synthetic: bool) -> dict:
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
    lines = [f"# phi3 data phases: phase 1 = edu score >= {t1}, phase 2 = score >= {t2}"
             + (" + synthetic" if synthetic else "") + "; paste into a `phi3 train pretrain` recipe and set",
             "# each phase's token budget (these are the tokens on disk; a budget above them repeats data)."]
    for phase in ("phase1", "phase2"):
        members = [p for p in parts if p.split("/")[0] == phase]
        lines += ["", "[[phases]]", f'name = "{phase}"', f"tokens = {sum(parts[p] for p in members)}"]
        for p in members:
            # weights proportional to tokens: each document is seen about equally often
            lines += ["[[phases.sources]]", f'path = "{out / p / "tokens"}"', f"weight = {max(parts[p], 1)}"]
    (work / "mixture.toml").write_text("\n".join(lines) + "\n")
    return {"documents_out": docs["phase1"], "phase_documents": docs, "tokens": parts, "t1": t1, "t2": t2, **extra}
