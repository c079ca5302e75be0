"""dedup: MinHash near-duplicate removal, datatrove's four stages, with FineWeb's parameters.

Parameters (datatrove's MinhashConfig defaults, which FineWeb used):
- shingles of `n_grams` = 5 words (datatrove's word tokenizer for the language, after TextNormConfig:
  lowercase, punctuation and whitespace folded, numbers normalized);
- `num_buckets` = 14 bands of `hashes_per_bucket` = 8 hashes (112 64-bit xxhash minhashes).
  Two documents with Jaccard similarity s share a band with probability 1-(1-s^8)^14:
  56 % at s = 0.7, 77 % at 0.75, 92 % at 0.8, 98.8 % at 0.85 (threshold about 0.72).
- seed 1: the same hash functions on every worker.

The four steps: signatures (one task per input shard) -> buckets (one task per bucket) -> cluster
(one task, in memory: 25 GB x 8 CPUs for a whole Common Crawl dump in FineWeb's run) -> filter (the
same tasks and reader as the signatures: removal ids are per rank). In each cluster of duplicates
the first document (lowest rank, then position) is kept; the others go to OUT/removed/minhash.
"""

from __future__ import annotations

from pathlib import Path

from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig

from phi3.errors import Phi3Error
from phi3.recipe.ingest import docs_reader
from phi3.recipe.pipeline import Step, step_stats


def minhash_config(n_grams: int = 5, num_buckets: int = 14, hashes_per_bucket: int = 8, seed: int = 1) -> MinhashConfig:
    if min(n_grams, num_buckets, hashes_per_bucket) < 1:
        raise Phi3Error(f"MinHash needs n_grams, buckets and hashes per bucket of at least 1 "
                        f"(got {n_grams}, {num_buckets}, {hashes_per_bucket})")
    return MinhashConfig(n_grams=n_grams, num_buckets=num_buckets, hashes_per_bucket=hashes_per_bucket, seed=seed,
                         hash_config=HashConfig(precision=64, hash_fc="xxhash"))


def dedup_steps(src: Path, config: MinhashConfig, tasks: int) -> list[Step]:
    docs_reader(src)  # checks the input now

    def sigs(work: Path) -> str:
        return str(work / "minhash" / "signatures")

    def buckets(work: Path) -> str:
        return str(work / "minhash" / "buckets")

    def remove_ids(work: Path) -> str:
        return str(work / "minhash" / "remove_ids")

    return [
        Step("1-signatures", lambda w: [docs_reader(src), MinhashDedupSignature(output_folder=sigs(w), config=config)],
             tasks=tasks),
        Step("2-buckets", lambda w: [MinhashDedupBuckets(input_folder=sigs(w), output_folder=buckets(w), config=config)],
             tasks=config.num_buckets),
        Step("3-cluster", lambda w: [MinhashDedupCluster(input_folder=buckets(w), output_folder=remove_ids(w),
                                                         config=config)], tasks=1),
        Step("4-filter", lambda w: [docs_reader(src),
                                    MinhashDedupFilter(input_folder=remove_ids(w),
                                                       exclusion_writer=JsonlWriter(str(w / "removed" / "minhash"))),
                                    JsonlWriter(str(w / "docs"))], tasks=tasks),
    ]


def summarize_dedup(work: Path) -> dict:
    blocks = step_stats(work, "4-filter")
    s = {b["name"]: b["stats"] for b in blocks}
    reader = next((b["stats"] for b in blocks if "documents" in b["stats"]), {})
    dropped = next((b["stats"].get("dropped", 0) for b in blocks if "forwarded" in b["stats"] or "dropped" in b["stats"]), 0)
    return {"documents_in": reader.get("documents", 0), "documents_out": blocks[-1]["stats"].get("total", 0) if blocks else 0,
            "removed": {"minhash": {"dropped": dropped}}, "blocks": s}
