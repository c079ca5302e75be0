"""report: one markdown page over finished stages: documents and tokens in and out of each, what
each filter removed and why, the judge's and the classifier's score histograms (a PNG), and
examples kept and dropped at each score threshold and by each filter (issue 16, `phi3 data report`).

It reads only what the stages wrote (summary.json, removed/, docs/, head.json), so it can be rerun
at any time; the page and the PNG are written atomically.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from phi3.errors import Phi3Error

ORDER = ("ingest", "heuristics", "dedup", "decontaminate", "judge", "classify", "synthetic", "phases", "tokenize")
EXAMPLE_CHARS = 300


def find_stages(paths: list[Path]) -> list[tuple[str, Path, dict]]:
    """(stage, folder, summary) of every finished stage among `paths` (a stage folder, or a folder
    of them as `phi3 data run` writes), in pipeline order."""
    found = []
    for p in map(Path, paths):
        candidates = [p] if (p / "summary.json").is_file() else sorted(q for q in p.iterdir() if (q / "summary.json").is_file()) if p.is_dir() else []
        if not candidates:
            raise Phi3Error(f"{p}: no finished `phi3 data` stage here (no summary.json in it or its folders)")
        for c in candidates:
            s = json.loads((c / "summary.json").read_text())
            found.append((s.get("stage", c.name), c, s))
    return sorted(found, key=lambda x: ORDER.index(x[0]) if x[0] in ORDER else len(ORDER))


def _first_docs(folder: Path, n: int = 1) -> list[dict]:
    out = []
    for f in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                out.append(json.loads(line))
                if len(out) >= n:
                    return out
    return out


def _snippet(doc: dict) -> str:
    text = " ".join(doc.get("text", "").split())
    cut = text[:EXAMPLE_CHARS] + (" ..." if len(text) > EXAMPLE_CHARS else "")
    return f"`{doc.get('id')}`: {cut}"


def _histogram_png(path: Path, histograms: dict[str, dict[str, int]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(histograms), figsize=(4 * len(histograms), 3), squeeze=False)
    for ax, (title, hist) in zip(axes[0], histograms.items()):
        keys = [str(k) for k in range(6)]
        ax.bar(keys, [hist.get(k, 0) for k in keys], color="#4a7fb5")
        ax.set_title(title)
        ax.set_xlabel("educational score")
        ax.set_ylabel("documents")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def write_report(paths: list[Path], out: Path) -> dict:
    out = Path(out)
    if out.suffix != ".md":
        raise Phi3Error(f"--out {out}: give the report's .md path (the histogram PNG goes next to it)")
    stages = find_stages(paths)
    lines = ["# Data recipe report", "", "| stage | documents in | documents out | tokens | folder |", "|---|---|---|---|---|"]
    for name, folder, s in stages:
        tokens = s.get("tokens")
        tok = f"{tokens:,}" if isinstance(tokens, int) else ", ".join(f"{k} {v:,}" for k, v in tokens.items()) if isinstance(tokens, dict) else ""
        lines.append(f"| {name} | {s.get('documents_in', s.get('sample', ''))} | {s.get('documents_out', '')} | {tok} | `{folder}` |")
    histograms = {}
    for name, folder, s in stages:
        removed = s.get("removed") or {}
        if removed:
            lines += ["", f"## {name}: what was removed", "", "| filter | removed | kept | reasons |", "|---|---|---|---|"]
            for f, r in removed.items():
                reasons = ", ".join(f"{k} {v}" for k, v in sorted((r.get("reasons") or {}).items(), key=lambda kv: -kv[1]))
                lines.append(f"| {f} | {r.get('dropped', 0)} | {r.get('kept', '')} | {reasons} |")
            for f in removed:
                ex = _first_docs(folder / "removed" / f)
                if ex:
                    lines += ["", f"Removed by {f}, e.g. {_snippet(ex[0])}"]
        if name == "decontaminate" and s.get("hits"):
            lines += ["", "Contamination hits:", ""]
            lines += [f"- `{h['id']}` shares \"{h['ngram']}\" with {h['task']} ({h['benchmark_record']})" for h in s["hits"]]
        if name == "judge":
            histograms["judge (sample)"] = s["histogram"]
            lines += ["", f"## judge: {s['sample']} documents scored by {s['model']}, {s['unparsable']} unparsable"
                      + (f" (method {s['method']})" if s.get("method", "digit") != "digit" else "")
                      + (f"; scores from token probabilities ({'G-Eval' if s.get('method', 'digit') == 'digit' else 'P(yes)'}), "
                         f"expected score {s['expected_score']['min']:.2f}-"
                         f"{s['expected_score']['max']:.2f}, mean {s['expected_score']['mean']:.2f}"
                         if s.get("scoring") == "logprobs" and s.get("expected_score") else "")]
        if name == "classify":
            histograms["classifier (all documents)"] = s["histogram"]
            lines += ["", f"## classify: held-out ({s['heldout']} judged documents) at score >= {s['threshold']}: "
                      f"precision {s['heldout_precision']:.3f}, recall {s['heldout_recall']:.3f}, F1 {s['heldout_f1']:.3f}"]
            docs = []
            for f in sorted((folder / "docs").glob("*.jsonl.gz")):
                with gzip.open(f, "rt", encoding="utf-8") as fh:
                    docs += [json.loads(line) for line in fh]
            # the whole-number thresholds on edu_int_score, and the phases' fractional ones on edu_score
            phase_ts = sorted({p[2][k] for p in stages if p[0] == "phases" for k in ("t1", "t2")
                               if isinstance(p[2].get(k), float)})
            for t in [*range(1, 6), *phase_ts]:
                key = "edu_int_score" if isinstance(t, int) else "edu_score"
                above = sorted((d for d in docs if d["metadata"][key] >= t), key=lambda d: d["metadata"]["edu_score"])
                below = sorted((d for d in docs if d["metadata"][key] < t), key=lambda d: -d["metadata"]["edu_score"])
                if above and below:
                    lines += ["", f"### threshold {t}{' (edu_score, a phase threshold)' if key == 'edu_score' else ''}: "
                              f"{len(above)} kept, {len(below)} dropped",
                              f"- kept, lowest score {above[0]['metadata']['edu_score']:.2f}: {_snippet(above[0])}",
                              f"- dropped, highest score {below[0]['metadata']['edu_score']:.2f}: {_snippet(below[0])}"]
    if histograms:
        png = out.with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        _histogram_png(png, histograms)
        lines += ["", f"![score histograms]({png.name})"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)
    return {"stage": "report", "stages": [n for n, _, _ in stages], "report": str(out)}
