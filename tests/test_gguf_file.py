"""phi3's GGUF reader: the same fields and tensor bytes as gguf-py's GGUFReader on real and
exported files, and one line (exit 2 from the CLI) with bounded memory on crafted ones."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from phi3.checkpoint import open_gguf
from phi3.errors import Phi3Error
from tests.conftest import ROOT

# --- crafted files -------------------------------------------------------------------------------


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return u64(len(raw)) + raw


def crafted(kv: list[bytes] = (), tensors: list[bytes] = (), n_kv: int | None = None, n_tensors: int | None = None,
         data: bytes = b"", version: int = 3) -> bytes:
    """A GGUF file from raw metadata pairs and tensor infos, data aligned at 32 bytes."""
    head = b"GGUF" + u32(version) + u64(len(tensors) if n_tensors is None else n_tensors)
    head += u64(len(kv) if n_kv is None else n_kv) + b"".join(kv) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32) + data if data else head


def tensor_info(name: str, dims: list[int], ggml_type: int, offset: int = 0, n_dims: int | None = None) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return s(name) + u32(n) + b"".join(u64(d) for d in dims) + u32(ggml_type) + u64(offset)


def array_kv(key: str, etype: int, count: int, payload: bytes = b"") -> bytes:
    return s(key) + u32(V.ARRAY) + u32(etype) + u64(count) + payload


def f32_tensor(n: int) -> bytes:
    return tensor_info("w", [n], Q.F32)


# name -> (file bytes, a fragment of the one error line)
CRAFTED = {
    # the memory bombs: gguf-py looped over each of these counts (7.6 GB after 120 s)
    "u8_array_2e24": (crafted([array_kv("a", V.UINT8, 2**24)]), "16,777,216 UINT8 elements"),
    "u8_array_2e40": (crafted([array_kv("a", V.UINT8, 2**40)]), "1,099,511,627,776 UINT8 elements"),
    "string_array_2e40": (crafted([array_kv("a", V.STRING, 2**40)]), "1,099,511,627,776 strings"),
    "nested_arrays": (crafted([array_kv("a", V.ARRAY, 2**24, u32(V.UINT8) + u64(2**24))]), "array of arrays"),
    "tensor_count_2e60": (crafted(n_tensors=2**60), "1,152,921,504,606,846,976 tensors"),
    "kv_count_2e60": (crafted(n_kv=2**60), "1,152,921,504,606,846,976 metadata keys"),
    # counts the file could hold, each a few hundred bytes of Python objects: capped
    "tensor_count_past_cap": (crafted(n_tensors=2**16 + 1) + b"\0" * (24 << 17), "at most 65,536"),
    "strings_past_cap": (crafted([array_kv("a", V.STRING, 2**20, u64(0) * 2**20),
                                  array_kv("b", V.STRING, 2**20 + 1, u64(0) * (2**20 + 1))]), "at most 2,097,152"),
    "tensor_count_past_bytes": (crafted(n_tensors=1000) + b"\0" * 1000, "1,000 tensors but only 1,000 bytes"),
    # lengths and sizes past the end
    "string_past_end": (crafted([s("k") + u32(V.STRING) + u64(1000) + b"abc"]), "1,000-byte string"),
    "key_past_end": (crafted([u64(2**62) + b"k" * 16]), "metadata key #0 (4,611,686,018,427,387,904-byte"),
    "string_in_array_past_end": (crafted([array_kv("a", V.STRING, 2, s("ok") + u64(500))]), "a'[1] (500-byte string)"),
    "truncated_header": (b"GGUF" + u32(3) + u64(0)[:4], "header is 12 bytes"),
    "tensor_past_end": (crafted(tensors=[f32_tensor(1024)], data=b"\0" * 64), "truncated: tensor 'w'"),
    # tensor infos a loader must not trust
    "n_dims_1000": (crafted(tensors=[tensor_info("w", [1] * 4, Q.F32, n_dims=1000)]), "1,000 dimensions"),
    "dims_overflow_int64": (crafted(tensors=[tensor_info("w", [2**32, 2**32], Q.F32)], data=b"\0" * 64),
                            "overflows int64"),
    "unknown_type": (crafted(tensors=[tensor_info("w", [32], 1000)], data=b"\0" * 128), "unknown type id 1000"),
    "misaligned_offset": (crafted(tensors=[tensor_info("w", [4], Q.F32, offset=4)], data=b"\0" * 64),
                          "not a multiple of the alignment 32"),
    "row_not_whole_blocks": (crafted(tensors=[tensor_info("w", [33], Q.Q4_0)], data=b"\0" * 64), "32-value block"),
    "duplicate_tensor": (crafted(tensors=[f32_tensor(4), f32_tensor(4)], data=b"\0" * 64), "'w' appears twice"),
    # header and metadata
    "duplicate_key": (crafted([s("k") + u32(V.UINT8) + b"\1"] * 2), "'k' appears twice"),
    "bad_alignment": (crafted([s("general.alignment") + u32(V.UINT32) + u32(24)]), "not a power of two"),
    "unknown_value_type": (crafted([s("k") + u32(99) + b"\0" * 8]), "unknown value type 99"),
    "key_not_utf8": (crafted([s(b"\xff\xfe") + u32(V.UINT8) + b"\1"]), "not valid UTF-8"),
    "version_1": (crafted(version=1), "version 1"),
    "big_endian": (crafted(version=3 << 24), "big-endian"),  # 3 written big-endian
}

BOMBS = ["u8_array_2e24", "u8_array_2e40", "string_array_2e40", "nested_arrays", "tensor_count_2e60", "kv_count_2e60"]

# `phi3 info` under a 2 GiB address-space limit (it describes SmolLM2 within 1.5 GiB) and a 120 s CPU
# limit: a reader that allocates per declared element dies of either instead of taking the machine.
_CHILD = """
import contextlib, io, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
resource.setrlimit(resource.RLIMIT_CPU, (120, 120))
from phi3.cli import main
out = {}
for path in sys.argv[1:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["info", path])
    out[path] = [rc, err.getvalue()]
# VmHWM: this process's own peak (ru_maxrss would include the parent's resident set at fork)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"results": out, "peak": int(status["VmHWM"].split()[0]) * 1024}))
"""


def phi3_info_many(paths: list[Path]) -> tuple[dict[str, tuple[int, str]], int]:
    """`phi3 info` on each path in one child process (one torch import, not one per file), under
    the limits of _CHILD: str(path) -> (exit code, stderr), and the child's peak resident set in
    bytes."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, *map(str, paths)], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PHI3_DEBUG=""))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    out = json.loads(proc.stdout)
    return {k: tuple(v) for k, v in out["results"].items()}, out["peak"]


def assert_one_line(rc: int, err: str, fragment: str) -> None:
    assert rc == 2, (rc, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("phi3: error: "), err
    assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> tuple[dict[str, tuple[int, str]], int]:
    """Every crafted file through `phi3 info`: name -> (exit code, stderr), and peak RSS."""
    folder = tmp_path_factory.mktemp("crafted")
    paths = {}
    for name, (data, _) in CRAFTED.items():
        paths[name] = folder / f"{name}.gguf"
        paths[name].write_bytes(data)
    results, peak = phi3_info_many(list(paths.values()))
    return {name: results[str(p)] for name, p in paths.items()}, peak


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_file_gives_one_line(cli_results, name):
    assert_one_line(*cli_results[0][name], CRAFTED[name][1])


def test_crafted_files_keep_memory_bounded(cli_results):
    # all of them together peak at ~230 MiB (importing torch and phi3); gguf-py on the first bomb
    # alone grew past 7 GB
    assert cli_results[1] < 800 * 2**20, cli_results[1]


@pytest.mark.parametrize("name", BOMBS)
def test_bombs_fail_in_process_too(tmp_path, name):
    path = tmp_path / "bomb.gguf"
    path.write_bytes(CRAFTED[name][0])
    with pytest.raises(Phi3Error, match="GGUF") as e:
        open_gguf(path)
    assert "\n" not in str(e.value) and CRAFTED[name][1] in str(e.value)


# --- same answers as gguf-py ---------------------------------------------------------------------


def assert_same_as_gguf_py(path: Path) -> None:
    import gguf
    ours, ref = open_gguf(path), gguf.GGUFReader(str(path))
    assert list(ours.fields) == list(ref.fields)
    for key, field in ref.fields.items():
        a, b = ours.fields[key].contents(), field.contents()
        assert a == b and type(a) is type(b), key
        if isinstance(a, list):
            assert [type(x) for x in a] == [type(x) for x in b], key
        assert ours.fields[key].types == field.types, key
    assert (ours.alignment, ours.data_offset) == (ref.alignment, ref.data_offset)
    assert len(ours.tensors) == len(ref.tensors)
    for a, b in zip(ours.tensors, ref.tensors):
        assert (a.name, a.tensor_type, a.shape, a.n_elements, a.n_bytes, a.data_offset) == (
            b.name, b.tensor_type, tuple(int(d) for d in b.shape), b.n_elements, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name
        assert not a.data.flags.writeable


def test_same_fields_and_tensors_as_gguf_py_on_smollm(smollm_gguf):
    assert_same_as_gguf_py(smollm_gguf)


def test_same_fields_and_tensors_as_gguf_py_on_an_export(tmp_path):
    from phi3 import export
    from tests.conftest import tiny_config
    cfg = tiny_config("mini-128k").with_(vocab_size=512)  # longrope factors: 1-D F32 tensors too
    out = tmp_path / "tiny.gguf"
    export.write_gguf(export.random_source(cfg), out, "q4_k", progress=False)
    assert_same_as_gguf_py(out)
    # and every value type the writer has, arrays of each included
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "types.gguf"), "llama")
    for i, (vt, value) in enumerate([(V.UINT8, 200), (V.INT8, -100), (V.UINT16, 60000), (V.INT16, -30000),
                                     (V.UINT32, 2**32 - 1), (V.INT32, -2**31), (V.FLOAT32, 0.1), (V.BOOL, True),
                                     (V.STRING, "héllo"), (V.UINT64, 2**64 - 1), (V.INT64, -2**63),
                                     (V.FLOAT64, 1e-300)]):
        w.add_key_value(f"k{i}", value, vt)
        w.add_key_value(f"a{i}", [value, value], V.ARRAY, vt)
    w.add_tensor("bf16", np.zeros((2, 64), np.uint8), raw_dtype=Q.BF16)
    w.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same_as_gguf_py(tmp_path / "types.gguf")
