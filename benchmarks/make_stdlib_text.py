"""Write benchmarks/data/stdlib_docs.txt: English text every machine has (the Python standard
library's docstrings), for perplexity comparisons. The committed file is the fixed text; this
script only documents how it was made (docstrings change between Python versions)."""

import importlib
import inspect
import sys
from pathlib import Path

MODULES = ["argparse", "collections", "json", "pathlib", "re", "string", "textwrap", "itertools", "functools",
           "datetime", "decimal", "fractions", "statistics", "random", "heapq", "bisect", "csv", "logging",
           "subprocess", "threading", "typing", "dataclasses", "enum", "inspect", "shutil", "tempfile",
           "zipfile", "tarfile", "io", "os", "contextlib", "difflib", "pickle", "socket", "unittest"]
TARGET_CHARS = 120_000


def docs() -> list[str]:
    out = []
    for name in MODULES:
        mod = importlib.import_module(name)
        if mod.__doc__:
            out.append(inspect.cleandoc(mod.__doc__))
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                out.append(doc)
    return out


def main() -> None:
    text, seen = [], set()
    for d in docs():
        if d not in seen:
            seen.add(d)
            text.append(d)
        if sum(len(t) for t in text) >= TARGET_CHARS:
            break
    path = Path(__file__).parent / "data" / "stdlib_docs.txt"
    path.write_text("\n\n".join(text) + "\n")
    print(f"{path}: {path.stat().st_size} bytes from Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
