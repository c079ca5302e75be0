"""Reading GGUF files: header, metadata and tensor infos, with tensor data as views of one
read-only memory map.

Why phi3 has its own reader instead of gguf-py's `GGUFReader` (whose constants it uses):
- Memory bombs. gguf-py loops once per array element and its reads past the end of the file
  return empty arrays instead of failing, so a 49-byte file whose one metadata key claims a
  UINT8 array of 2^24 elements (or 2^40, or a tensor count of 2^60) ran until the kernel killed
  it (7.6 GB after 120 s). Here every count and length is checked against the bytes left in the
  file *before* anything is read or allocated, and the numbers of tensors and keys are capped
  (MAX_TENSORS, MAX_KEYS), so a crafted file costs little more memory than its own size and
  fails with one line (`Phi3Error`).
- Speed. gguf-py builds several numpy objects per array element: SmolLM2's 49k-token vocabulary
  and 48k merges took 2.3 s to parse (0.9 s for phi-3-mini's 32k vocabulary). Numeric arrays here
  are numpy views over the map, and string arrays are one pass of struct reads.

Beyond bounds, it checks what llama.cpp's own loader checks: the version (2 or 3), arrays of
arrays (llama.cpp rejects them), duplicate keys and tensor names, at most GGML_MAX_DIMS (4) dims
whose product fits int64, a known tensor type whose block divides the row, offsets aligned to
`general.alignment`, and every tensor's bytes inside the file.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from array import array
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from phi3.errors import Phi3Error

VERSIONS = (2, 3)  # version 1 (August 2023) had 32-bit counts; gguf-py and llama.cpp dropped it too
MAX_DIMS = 4  # GGML_MAX_DIMS
INT64_MAX = 2**63 - 1

V = GGUFValueType
# Little-endian numpy types of the scalar value types (the same mapping gguf-py uses).
SCALAR_DTYPES: dict[GGUFValueType, np.dtype] = {
    V.UINT8: np.dtype("<u1"), V.INT8: np.dtype("<i1"), V.UINT16: np.dtype("<u2"), V.INT16: np.dtype("<i2"),
    V.UINT32: np.dtype("<u4"), V.INT32: np.dtype("<i4"), V.FLOAT32: np.dtype("<f4"), V.BOOL: np.dtype(np.bool_),
    V.UINT64: np.dtype("<u8"), V.INT64: np.dtype("<i8"), V.FLOAT64: np.dtype("<f8"),
}
# Tensor types whose data is typed elements rather than blocks of bytes (as gguf-py views them).
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F32: np.dtype("<f4"), GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.F64: np.dtype("<f8"), GGMLQuantizationType.I8: np.dtype("<i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"), GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}
# Caps on the number of tensors and metadata keys. Each costs a few hundred bytes of Python
# objects and tens of microseconds to parse, ~10x its bytes in the file: 131,072 minimal tensor
# infos (4.6 MiB of file) took 46 MiB and 2.1 s on a busy 2-core machine. Real files are far below
# the caps: Llama 3.1 405B has 1,138 tensors, SmolLM2 33 metadata keys.
MAX_TENSORS = 2**16
MAX_KEYS = 2**16
# Strings in arrays, all arrays together: each is a struct read (~0.5 us) and, when decoded, a
# Python str; 2^20 of them took 0.56 s to parse and 0.47 s to decode on the same busy machine.
# The largest vocabularies have ~262k tokens, and merges lists ~500k.
MAX_STRINGS = 2**21
_U32, _U64, _TYPE_OFFSET = (struct.Struct(f).unpack_from for f in ("<I", "<Q", "<IQ"))
# Tensor type ids gguf knows with a block size (a dict: the Enum call costs ~3 us per tensor).
_GGML_TYPES = {t.value: t for t in GGMLQuantizationType if t in GGML_QUANT_SIZES}
# Fewest bytes one tensor info can take: name length (8), n_dims (4), type (4), offset (8).
_MIN_TENSOR_INFO = 24
# Fewest bytes one metadata pair can take: key length (8), value type (4), a 1-byte value.
_MIN_KV = 13


class Field:
    """One metadata value. `types` is [type] or [ARRAY, element type] as in gguf-py; `contents()`
    gives the Python value (str, int, float, bool, or a list of them); `array` is the numpy view
    of a numeric array."""

    __slots__ = ("name", "types", "offset", "_value", "array", "_starts", "_lengths", "_mm", "_path")

    def __init__(self, name: str, types: list[GGUFValueType], offset: int) -> None:
        self.name, self.types, self.offset = name, types, offset
        self._value: Any = None
        self.array: np.ndarray | None = None
        self._starts: array | None = None
        self._lengths: array | None = None
        self._mm: Any = None
        self._path = ""

    def __len__(self) -> int:
        if self.array is not None:
            return len(self.array)
        if self._starts is not None:
            return len(self._starts)
        return 1

    def contents(self) -> Any:
        if self.array is not None:
            return self.array.tolist()
        if self._starts is not None:
            mm, out = self._mm, []
            for i, (s, n) in enumerate(zip(self._starts, self._lengths)):
                try:
                    out.append(str(mm[s:s + n], "utf-8"))
                except UnicodeDecodeError:
                    raise Phi3Error(f"{self._path}: GGUF metadata {self.name}[{i}] is not valid UTF-8 "
                                    f"(the file is corrupt)") from None
            return out
        return self._value


class Tensor:
    """One tensor: `shape` in GGUF order (fastest-varying dimension first), `data` a read-only
    view of its bytes (typed elements for F32/F16/..., else uint8 rows of blocks, as gguf-py
    shapes them), `data_offset` its absolute position in the file. The view is made on first
    use: two numpy objects per tensor were most of the ~900 bytes each tensor cost to parse."""

    __slots__ = ("name", "tensor_type", "shape", "n_elements", "n_bytes", "data_offset", "_mm", "_data")

    def __init__(self, name: str, tensor_type: GGMLQuantizationType, shape: tuple[int, ...], n_elements: int,
                 n_bytes: int, data_offset: int, mm: mmap.mmap) -> None:
        self.name, self.tensor_type, self.shape = name, tensor_type, shape
        self.n_elements, self.n_bytes, self.data_offset = n_elements, n_bytes, data_offset
        self._mm, self._data = mm, None

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            np_shape = tuple(reversed(self.shape))
            dt = _ELEMENT_DTYPES.get(self.tensor_type)
            if dt is not None:
                data = np.frombuffer(self._mm, dt, self.n_elements, self.data_offset).reshape(np_shape)
            else:
                block, type_size = GGML_QUANT_SIZES[self.tensor_type]
                byte_shape = (*np_shape[:-1], np_shape[-1] // block * type_size) if np_shape else (self.n_bytes,)
                data = np.frombuffer(self._mm, np.uint8, self.n_bytes, self.data_offset).reshape(byte_shape)
            self._data = data
        return self._data

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.tensor_type.name}, shape={self.shape})"


class GGUFFile:
    """A parsed GGUF file. `fields` maps every metadata key (plus gguf-py's pseudo-keys
    GGUF.version, GGUF.tensor_count and GGUF.kv_count) to a Field; `tensors` lists the tensors in
    file order; `mmap` is the read-only map every array and tensor view points into."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            if self.size < 24:  # magic, version, two counts
                raise self._bad(f"header is {self.size} bytes, shorter than GGUF's 24 "
                                f"(the file is truncated or not GGUF)")
            self.mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        self._strings_left = MAX_STRINGS
        self.fields: dict[str, Field] = {}
        self.tensors: list[Tensor] = []
        self._parse()

    # --- primitives: each checks the bytes left before it reads ---

    def _bad(self, what: str) -> Phi3Error:
        return Phi3Error(f"{self.path} is not a valid GGUF file: {what}")

    def _need(self, n: int, what: str) -> None:
        if n > self.size - self._pos:
            raise self._bad(f"{what} needs {n:,} bytes at offset {self._pos:,} but only "
                            f"{self.size - self._pos:,} remain (the file is truncated or corrupt)")

    def _u32(self, what: str) -> int:
        self._need(4, what)
        (v,) = struct.unpack_from("<I", self.mmap, self._pos)
        self._pos += 4
        return v

    def _u64(self, what: str) -> int:
        self._need(8, what)
        (v,) = struct.unpack_from("<Q", self.mmap, self._pos)
        self._pos += 8
        return v

    def _str(self, what: str) -> str:
        n = self._u64(f"{what} length")
        self._need(n, f"{what} ({n:,}-byte string)")
        raw = self.mmap[self._pos:self._pos + n]
        self._pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise self._bad(f"{what} is not valid UTF-8 (the file is corrupt)") from None

    def _value_type(self, what: str) -> GGUFValueType:
        raw = self._u32(f"{what} type")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self._bad(f"{what} has unknown value type {raw} (the file is corrupt)") from None

    # --- structure ---

    def _parse(self) -> None:
        if self.mmap[:4] != b"GGUF":
            raise self._bad("it does not start with the GGUF magic")
        self._pos = 4
        version = self._u32("version")
        if version not in VERSIONS:
            if int.from_bytes(version.to_bytes(4, "little"), "big") in VERSIONS:
                raise self._bad("it is big-endian; phi3 reads little-endian GGUF (convert it with llama.cpp's "
                                "gguf-py/gguf/scripts/gguf_convert_endian.py)")
            raise self._bad(f"version {version}; phi3 reads GGUF versions {' and '.join(map(str, VERSIONS))} "
                            f"(re-convert it with a current llama.cpp)")
        n_tensors = self._u64("tensor count")
        n_kv = self._u64("metadata count")
        for name, value in (("GGUF.version", version), ("GGUF.tensor_count", n_tensors), ("GGUF.kv_count", n_kv)):
            f = Field(name, [V.UINT32 if name == "GGUF.version" else V.UINT64], 0)
            f._value = value
            self.fields[name] = f
        left = self.size - self._pos
        if n_kv > MAX_KEYS:
            raise self._bad(f"header declares {n_kv:,} metadata keys; phi3 reads at most {MAX_KEYS:,} "
                            f"(SmolLM2 has 33)")
        if n_kv > left // _MIN_KV:
            raise self._bad(f"header declares {n_kv:,} metadata keys but {left:,} bytes remain "
                            f"(the file is truncated or corrupt)")
        for i in range(n_kv):
            offset = self._pos
            key = self._str(f"metadata key #{i}")
            if key in self.fields:
                raise self._bad(f"metadata key {key!r} appears twice")
            self.fields[key] = self._field(key, offset)
        left = self.size - self._pos
        if n_tensors > MAX_TENSORS:
            raise self._bad(f"header declares {n_tensors:,} tensors; phi3 reads at most {MAX_TENSORS:,} "
                            f"(Llama 3.1 405B has 1,138)")
        if n_tensors > left // _MIN_TENSOR_INFO:
            raise self._bad(f"header declares {n_tensors:,} tensors but only {left:,} bytes remain for their "
                            f"descriptions (at least {_MIN_TENSOR_INFO} bytes each; the file is truncated or corrupt)")
        infos = [self._tensor_info(i) for i in range(n_tensors)]
        self.alignment = self._alignment()
        self.data_offset = -(-self._pos // self.alignment) * self.alignment
        names: set[str] = set()
        for name, dims, ggml_type, offset in infos:
            if name in names:
                raise self._bad(f"tensor {name!r} appears twice")
            names.add(name)
            self.tensors.append(self._tensor(name, dims, ggml_type, offset))

    def _field(self, key: str, offset: int) -> Field:
        vtype = self._value_type(f"metadata {key!r}")
        if vtype != V.ARRAY:
            f = Field(key, [vtype], offset)
            if vtype == V.STRING:
                f._value = self._str(f"metadata {key!r}")
            else:
                dt = SCALAR_DTYPES[vtype]
                self._need(dt.itemsize, f"metadata {key!r}")
                f._value = np.frombuffer(self.mmap, dt, 1, self._pos)[0].item()
                self._pos += dt.itemsize
            return f
        etype = self._value_type(f"metadata {key!r} element")
        if etype == V.ARRAY:
            raise self._bad(f"metadata {key!r} is an array of arrays, which GGUF readers (llama.cpp's too) "
                            f"do not accept")
        count = self._u64(f"metadata {key!r} element count")
        f = Field(key, [V.ARRAY, etype], offset)
        if etype == V.STRING:
            # each string is at least its 8-byte length: check the count against that first
            self._need(count * 8, f"metadata {key!r} ({count:,} strings)")
            if count > self._strings_left:
                raise self._bad(f"metadata {key!r} declares {count:,} strings; phi3 reads at most {MAX_STRINGS:,} "
                                f"strings in all (the largest vocabularies have ~262k tokens)")
            self._strings_left -= count
            starts, lengths = array("Q"), array("Q")
            mm, pos, end, unpack = self.mmap, self._pos, self.size, struct.Struct("<Q").unpack_from
            for i in range(count):
                if end - pos < 8:
                    self._pos = pos
                    self._need(8, f"metadata {key!r}[{i}] length")
                (n,) = unpack(mm, pos)
                pos += 8
                if n > end - pos:
                    self._pos = pos
                    self._need(n, f"metadata {key!r}[{i}] ({n:,}-byte string)")
                starts.append(pos)
                lengths.append(n)
                pos += n
            self._pos = pos
            f._starts, f._lengths, f._mm, f._path = starts, lengths, mm, str(self.path)
            return f
        dt = SCALAR_DTYPES[etype]
        self._need(count * dt.itemsize, f"metadata {key!r} ({count:,} {etype.name} elements)")
        f.array = np.frombuffer(self.mmap, dt, count, self._pos)
        self._pos += count * dt.itemsize
        return f

    def _tensor_info(self, i: int) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
        # Inline reads (error text built only on failure): with the generic helpers this loop was
        # most of the time a 65,536-tensor file takes to refuse or parse.
        mm, end, pos = self.mmap, self.size, self._pos
        if end - pos < 8:
            self._need(8, f"tensor #{i} name length")
        (n,) = _U64(mm, pos)
        pos += 8
        if n > end - pos:
            self._pos = pos
            self._need(n, f"tensor #{i} name ({n:,}-byte string)")
        try:
            name = str(mm[pos:pos + n], "utf-8")
        except UnicodeDecodeError:
            raise self._bad(f"tensor #{i} name is not valid UTF-8 (the file is corrupt)") from None
        pos += n
        if end - pos < 4:
            self._pos = pos
            self._need(4, f"tensor {name!r} dimension count")
        (n_dims,) = _U32(mm, pos)
        pos += 4
        if n_dims > MAX_DIMS:
            raise self._bad(f"tensor {name!r} has {n_dims:,} dimensions; GGUF tensors have at most {MAX_DIMS}")
        if end - pos < 8 * n_dims + 12:
            self._pos = pos
            self._need(8 * n_dims + 12, f"tensor {name!r} dimensions, type and offset")
        dims = struct.unpack_from(f"<{n_dims}Q", mm, pos)
        raw, offset = _TYPE_OFFSET(mm, pos + 8 * n_dims)
        self._pos = pos + 8 * n_dims + 12
        ggml_type = _GGML_TYPES.get(raw)
        if ggml_type is None:
            raise self._bad(f"tensor {name!r} has unknown type id {raw} (the file is corrupt, or made by a "
                            f"newer llama.cpp than the installed gguf package knows)")
        return name, dims, ggml_type, offset

    def _alignment(self) -> int:
        f = self.fields.get("general.alignment")
        if f is None:
            return GGUF_DEFAULT_ALIGNMENT
        if f.types != [V.UINT32]:
            raise self._bad(f"general.alignment is a {'/'.join(t.name for t in f.types)}, not a UINT32")
        a = f.contents()
        if a == 0 or a & (a - 1):
            raise self._bad(f"general.alignment {a} is not a power of two")
        return a

    def _tensor(self, name: str, dims: tuple[int, ...], ggml_type: GGMLQuantizationType, offset: int) -> Tensor:
        n_elements = math.prod(dims)  # Python ints: no overflow before the check
        if n_elements > INT64_MAX or (n_elements == 0 and max(dims) > INT64_MAX):
            raise self._bad(f"tensor {name!r} has dimensions {list(dims)} whose product overflows int64")
        block, type_size = GGML_QUANT_SIZES[ggml_type]
        row = dims[0] if dims else 1
        if row % block:
            raise self._bad(f"tensor {name!r} ({ggml_type.name}) has rows of {row} values, not a multiple "
                            f"of its {block}-value block")
        n_bytes = n_elements // block * type_size
        if offset % self.alignment:
            raise self._bad(f"tensor {name!r} starts at data offset {offset:,}, not a multiple of the "
                            f"alignment {self.alignment}")
        start = self.data_offset + offset
        if start + n_bytes > self.size:
            raise Phi3Error(f"{self.path} is truncated: tensor {name!r} ({n_bytes:,} bytes at offset {start:,}) "
                            f"ends past the end of the file ({self.size:,} bytes)")
        return Tensor(name, ggml_type, tuple(dims), n_elements, n_bytes, start, self.mmap)

    # --- access ---

    def values(self) -> dict[str, Any]:
        """Every metadata value as plain Python (strings decoded, arrays as lists), without the
        GGUF.* pseudo-keys."""
        return {k: f.contents() for k, f in self.fields.items() if not k.startswith("GGUF.")}

    def __iter__(self) -> Iterator[Tensor]:
        return iter(self.tensors)


def open_gguf_file(path: str | Path) -> GGUFFile:
    """Parse `path`; any problem with it is one Phi3Error line."""
    try:
        return GGUFFile(path)
    except OSError as e:
        raise Phi3Error(f"cannot read {path}: {e.strerror or e}") from None

