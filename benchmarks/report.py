"""Shared by the benchmark scripts: replace one marked section of a markdown file."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, text: str, start_mark: str, end_mark: str) -> None:
    """Put text (which begins with start_mark and ends with end_mark) in place of the old section,
    or append it when the file has none."""
    old = path.read_text() if path.exists() else ""
    start, end = old.find(start_mark), old.find(end_mark)
    new = old[:start] + text + old[end + len(end_mark):] if start != -1 and end > start else old.rstrip() + "\n\n" + text + "\n"
    path.write_text(new)
