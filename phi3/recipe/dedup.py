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
from datatrove.pipeline.base import PipelineStep
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


# --- synthetic against web ------------------------------------------------------------------------
# The issue: "Generations are deduplicated among themselves and against the web data." datatrove's
# signatures, buckets and clusters (save_cluster_id) find the near-duplicate clusters over the web
# documents followed by the synthetic ones, in one task; SyntheticNearDupFilter then decides with
# the cluster ids, not with MinhashDedupFilter's choice of a cluster's survivor (union by size can
# keep a synthetic document and drop the web one it copies): web documents are never removed here
# (web-against-web is the dedup stage's work), a synthetic document whose cluster holds a web
# document goes ("near_web"), and of synthetic documents clustered only among themselves the first
# stays ("near_synthetic" for the others). Removed ones go to removed/ with their cluster id.

WEB_MARK = "_phi3_web"


def _web_adapter(self, data: dict, path: str, id_in_file: int | str) -> dict:
    from phi3.recipe.ingest import _strict_adapter
    doc = _strict_adapter(self, data, path, id_in_file)
    doc.setdefault("metadata", {})[WEB_MARK] = True
    return doc


class SyntheticNearDupFilter(PipelineStep):
    """Drops synthetic documents in a near-duplicate cluster with a web document or an earlier
    synthetic one; drops the (marked) web documents from the stream without writing them."""
    name = "🫂 synthetic near-dups"
    type = "🫂 - DEDUPS"

    def __init__(self, clusters_folder: str, exclusion_writer: JsonlWriter) -> None:
        super().__init__()
        self.clusters_folder, self.exclusion_writer = clusters_folder, exclusion_writer

    def run(self, data, rank: int = 0, world_size: int = 1):
        import struct
        path = Path(self.clusters_folder) / f"{rank:06d}.clusters"
        raw = path.read_bytes() if path.is_file() else b""
        pairs = struct.iter_unpack("<2I", raw)
        cluster = {idx: cid for idx, cid in pairs}  # document index in this task -> cluster id
        web, synthetic = set(), set()
        with self.exclusion_writer as removed:
            for idx, doc in enumerate(data):
                cid = cluster.get(idx)
                if doc.metadata.pop(WEB_MARK, False):
                    if cid is not None:
                        web.add(cid)
                    continue
                self.stat_update("synthetic")
                reason = None if cid is None else "near_web" if cid in web else "near_synthetic" if cid in synthetic else None
                if reason is None:
                    if cid is not None:
                        synthetic.add(cid)
                    self.stat_update("kept")
                    yield doc
                else:
                    doc.metadata["minhash_cluster_id"] = cid
                    self.stat_update("dropped", f"dropped_{reason}")
                    removed.write(doc, rank)


def synthetic_dedup_steps(web: Path, synthetic: Path, out: str, config: MinhashConfig) -> list[Step]:
    """MinHash of `synthetic` against itself and `web`; kept synthetic documents go to WORK/out/docs,
    removed ones to WORK/out/removed. One task: the signatures must index web then synthetic."""
    from datatrove.pipeline.readers import JsonlReader

    from phi3.recipe.ingest import docs_input
    docs_reader(web)
    docs_reader(synthetic)

    def readers() -> list:
        folder, glob = docs_input(web)
        return [JsonlReader(folder, glob_pattern=glob, adapter=_web_adapter), docs_reader(synthetic)]

    def d(work: Path, *parts: str) -> str:
        return str(work.joinpath(out, "minhash", *parts))

    return [
        Step(f"{out.replace('/', '-')}-1-signatures",
             lambda w: [*readers(), MinhashDedupSignature(output_folder=d(w, "signatures"), config=config)], tasks=1),
        Step(f"{out.replace('/', '-')}-2-buckets",
             lambda w: [MinhashDedupBuckets(input_folder=d(w, "signatures"), output_folder=d(w, "buckets"), config=config)],
             tasks=config.num_buckets),
        Step(f"{out.replace('/', '-')}-3-cluster",
             lambda w: [MinhashDedupCluster(input_folder=d(w, "buckets"), output_folder=d(w, "clusters"), config=config,
                                            save_cluster_id=True)], tasks=1),
        Step(f"{out.replace('/', '-')}-4-filter",
             lambda w: [*readers(), SyntheticNearDupFilter(d(w, "clusters"), JsonlWriter(str(w / out / "removed"))),
                        JsonlWriter(str(w / out / "docs"))], tasks=1),
    ]


def summarize_synthetic_dedup(work: Path, out: str) -> dict:
    """{"documents_in", "documents_out", "removed": {"near_web": n, "near_synthetic": n}} of the synthetic part."""
    blocks = step_stats(work, f"{out.replace('/', '-')}-4-filter")
    s = next((b["stats"] for b in blocks if "synthetic" in b["stats"]), {})
    return {"documents_in": s.get("synthetic", 0), "documents_out": s.get("kept", 0),
            "removed": {r: s.get(f"dropped_{r}", 0) for r in ("near_web", "near_synthetic")}}
