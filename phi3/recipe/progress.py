"""A progress bar for every datatrove step of `phi3 data` that reads documents (tqdm, on the terminal).

pipeline.run_stage puts a Progress block after each step's readers. In this process (--workers 1,
the default) the bar goes to the real terminal, not to datatrove's log (pipeline._quiet sends
stderr there); in worker processes it goes to their log. It is shown only on a TTY, so tests and
logs keep one line per error. It records no stats: the stage summaries read the other blocks'.
"""

from __future__ import annotations

import sys

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers.base import BaseReader


def progress_bar(desc: str, total: int | None = None, unit: str = "doc"):
    from tqdm import tqdm

    from phi3.recipe import pipeline
    return tqdm(total=total, desc=desc, unit=unit, file=pipeline.TERMINAL or sys.stderr, disable=None,
                mininterval=1.0, dynamic_ncols=True)


class Progress(PipelineStep):
    """Counts the documents flowing from the readers to the first working block."""
    name = "⏳ progress"
    type = "📊 - STATS"

    def __init__(self, desc: str, total: int | None = None) -> None:
        super().__init__()
        self.desc, self.total = desc, total

    def run(self, data, rank: int = 0, world_size: int = 1):
        one = world_size == 1
        bar = progress_bar(self.desc if one else f"{self.desc} [task {rank}/{world_size}]", self.total if one else None)
        try:
            for doc in data:
                bar.update(1)
                yield doc
        finally:
            bar.close()


def with_progress(blocks: list, desc: str, total: int | None = None) -> list:
    """`blocks` with a Progress block after its leading readers (unchanged when it reads nothing)."""
    n = 0
    while n < len(blocks) and isinstance(blocks[n], BaseReader):
        n += 1
    return blocks if n == 0 else blocks[:n] + [Progress(desc, total)] + blocks[n:]
