"""classify: scale the judge's educational scores to the whole corpus (issue 16, stage 5).

As FineWeb-Edu and phi-1 do: the costly LLM labels a sample (`phi3 data judge`), a frozen embedding
model turns each document into a vector, and a regression head trained on the judge's scores
predicts a score for every document. FineWeb-Edu trains a linear regression head on a frozen
encoder and thresholds the rounded score at 3 (F1 82 % against its annotator); this is the same with
scikit-learn's Ridge on a model2vec static embedding (numpy + tokenizers: a 256-d model distilled from
all-MiniLM-L6-v2 encoded 405 documents/s here, 75x MiniLM itself; see
shared/reference/training-and-data.md §5.2 for the offline distillation). Held-out precision,
recall and F1 at the threshold, against the judge, are reported and kept in OUT/head.json with the
head's weights (JSON, not pickle: it is loaded by every worker).

Scoring runs as a datatrove step under the chosen executor, in batches, writing every document with
metadata edu_score (the regression output) and edu_int_score (round(clip(score, 0, 5)), FineWeb-Edu's
int_score).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.batching import batched

from phi3.errors import Phi3Error
from phi3.recipe.ingest import docs_input, docs_reader
from phi3.recipe.judge import MAX_DOC_CHARS, read_documents
from phi3.recipe.pipeline import Step, step_stats


def load_embedder(path: str):
    try:
        from model2vec import StaticModel
    except ImportError:
        raise Phi3Error("the edu classifier needs model2vec: pip install 'phi3[data]'") from None
    p = Path(path)
    if not (p / "config.json").is_file():
        raise Phi3Error(f"--embedder {path}: not a model2vec model folder (config.json, model.safetensors, "
                        "tokenizer.json); distill one from all-MiniLM-L6-v2 with model2vec.distill")
    try:
        return StaticModel.from_pretrained(str(p))
    except Exception as e:
        raise Phi3Error(f"--embedder {path}: cannot load it ({str(e).splitlines()[0][:160]})") from None


def embed(model, texts: list[str]) -> np.ndarray:
    return np.asarray(model.encode([t[:MAX_DOC_CHARS] for t in texts], max_length=512), dtype=np.float32)


def train_head(src: Path, judge_dir: Path, embedder: str, threshold: int = 3, holdout: float = 0.2,
               seed: int = 0, alpha: float = 1.0) -> dict:
    """Fit the head on the judge's labels; returns head.json's content (weights and held-out metrics)."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import mean_squared_error, precision_recall_fscore_support
    from sklearn.model_selection import train_test_split

    judge_dir = Path(judge_dir)
    if not (judge_dir / "summary.json").is_file():
        raise Phi3Error(f"--judgments {judge_dir}: not a finished `phi3 data judge` folder (no summary.json)")
    if not 0 < holdout < 1:
        raise Phi3Error(f"--holdout {holdout} must be between 0 and 1")
    records = [json.loads(line) for line in (judge_dir / "judgments.jsonl").open() if line.strip()]
    labeled = [(r["id"], r["score"]) for r in records if r.get("score") is not None]
    docs = read_documents(*docs_input(src))
    missing = [i for i, _ in labeled if i not in docs]
    if missing:
        raise Phi3Error(f"--judgments {judge_dir}: {len(missing)} judged ids are not in {src} (e.g. {missing[0]!r}); "
                        "give the documents the judge read")
    y = np.array([s for _, s in labeled], dtype=np.float32)
    positives = int((y >= threshold).sum())
    if len(labeled) < 10 or positives < 2 or positives > len(y) - 2:
        raise Phi3Error(f"--judgments {judge_dir}: {len(labeled)} parsable judgments, {positives} at or above "
                        f"{threshold}: too few of one side to train and test a classifier; judge a bigger --sample")
    model = load_embedder(embedder)
    X = embed(model, [docs[i]["text"] for i, _ in labeled])
    classes = np.unique(y, return_counts=True)
    stratify = y if classes[1].min() >= 2 else (y >= threshold)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=holdout, random_state=seed, stratify=stratify)
    head = Ridge(alpha=alpha).fit(X[tr], y[tr])
    pred = head.predict(X[te])
    p, r, f1, _ = precision_recall_fscore_support(y[te] >= threshold, pred >= threshold, average="binary",
                                                  zero_division=0)
    return {"embedder": str(Path(embedder).resolve()), "dims": int(X.shape[1]), "alpha": alpha,
            "coef": head.coef_.astype(float).tolist(), "intercept": float(head.intercept_),
            "threshold": threshold, "train": len(tr), "heldout": len(te),
            "heldout_precision": float(p), "heldout_recall": float(r), "heldout_f1": float(f1),
            "heldout_mse": float(mean_squared_error(y[te], pred)),
            "heldout_ids": [labeled[i][0] for i in te]}


class EduScorer(PipelineStep):
    """Adds metadata edu_score and edu_int_score to every document, embedding them in batches."""
    name = "🎓 edu score"
    type = "📊 - ANNOTATE"

    def __init__(self, head_path: str, batch_size: int = 256) -> None:
        super().__init__()
        self.head_path, self.batch_size = head_path, batch_size

    def run(self, data, rank: int = 0, world_size: int = 1):
        head = json.loads(Path(self.head_path).read_text())
        model = load_embedder(head["embedder"])
        coef, bias = np.asarray(head["coef"], dtype=np.float32), head["intercept"]
        for batch in batched(data, self.batch_size):
            with self.track_time(unit="batch"):
                scores = embed(model, [d.text for d in batch]) @ coef + bias
            for doc, s in zip(batch, scores):
                doc.metadata["edu_score"] = round(float(s), 4)
                doc.metadata["edu_int_score"] = int(round(min(5.0, max(0.0, float(s)))))
                self.stat_update(f"int_score_{doc.metadata['edu_int_score']}")
                yield doc


def classify_steps(src: Path, head: dict, batch_size: int = 256) -> list[Step]:
    docs_reader(src)

    def pipeline(work: Path) -> list:
        work.mkdir(parents=True, exist_ok=True)
        path = work / "head.json"
        if not path.is_file():
            tmp = path.with_name("head.json.tmp")
            tmp.write_text(json.dumps(head))
            tmp.replace(path)
        return [docs_reader(src), EduScorer(str(path), batch_size), JsonlWriter(str(work / "docs"))]
    return [Step("classify", pipeline)]


def summarize_classify(work: Path) -> dict:
    blocks = step_stats(work, "classify")
    head = json.loads((work / "head.json").read_text())
    scorer = next((b["stats"] for b in blocks if any(k.startswith("int_score_") for k in b["stats"])), {})
    reader = next((b["stats"] for b in blocks if "documents" in b["stats"]), {})
    return {"documents_in": reader.get("documents", 0), "documents_out": blocks[-1]["stats"].get("total", 0),
            "histogram": {str(s): scorer.get(f"int_score_{s}", 0) for s in range(6)},
            **{k: head[k] for k in ("threshold", "train", "heldout", "heldout_precision", "heldout_recall",
                                    "heldout_f1", "heldout_mse")}}
