"""`phi3 data`: the Phi-3 data recipe (issue 16) on datatrove.

Each stage is a thin layer over datatrove's own readers, extractors, filters, MinHash, n-gram
decontamination and tokenizer; this package adds only what datatrove leaves to its user:
choosing the steps for an input, running them under one of datatrove's executors with atomic,
resumable outputs, offline placement of the language-ID model, the decontamination index (built
from the benchmark files `phi3 eval` reads), and one-line errors for bad input.

Modules: pipeline (stage folders, executors, stats), ingest, filters (heuristics), dedup (MinHash),
decont, tokens, cli (`phi3 data STAGE ...`).
"""
