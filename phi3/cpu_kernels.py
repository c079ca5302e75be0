"""phi3's compiled CPU kernels (phi3/kernels/): which build this machine runs, building it on first
use with torch.utils.cpp_extension, and loading it.

Everything that calls a kernel asks `kernel()`; None means no compiled kernel (no compiler, an
unsupported CPU, or PHI3_NO_KERNELS set) and callers use plain PyTorch ops instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import torch

_SOURCE = Path(__file__).parent / "kernels" / "quant_cpu.cpp"
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma")
_ext: Any = None
_ext_error: str | None = None


def _missing_cpu_flags() -> list[str]:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ["(no /proc/cpuinfo)"]
    return [f for f in _CPU_FLAGS if f not in flags]


def kernel() -> Any:
    """The compiled extension, building it on first use (about 20 s, cached afterwards)."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    if os.environ.get("PHI3_NO_KERNELS"):
        _ext_error = "disabled by PHI3_NO_KERNELS"
        return None
    missing = _missing_cpu_flags()
    if missing:
        _ext_error = f"this CPU lacks {', '.join(missing)}"
        return None
    try:
        from torch.utils.cpp_extension import load
        # pip installs ninja next to this interpreter, which is not on PATH unless the venv is active.
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma",
                 "-fopenmp"]  # without OpenMP, at::parallel_for compiles to a serial loop
        src = _SOURCE.read_bytes()
        tag = hashlib.sha1(src + torch.__version__.encode() + " ".join(flags).encode()).hexdigest()[:10]
        build = Path(os.environ.get("PHI3_CACHE") or Path.home() / ".cache" / "phi3") / "kernels" / tag
        build.mkdir(parents=True, exist_ok=True)
        library = build / "phi3_quant_cpu.so"
        if library.exists():
            # Built before (the tag covers source, flags and torch): import it directly. Not
            # through cpp_extension.load, whose lock file, left behind by a process killed in the
            # second it is held, makes every later run wait for ever.
            _ext = _import_library(library)
        else:
            with open(build / "build.flock", "w") as held:
                fcntl.flock(held, fcntl.LOCK_EX)  # one builder at a time; released if it dies
                if library.exists():  # another process built it while we waited
                    _ext = _import_library(library)
                else:
                    (build / "lock").unlink(missing_ok=True)  # torch's lock from a killed build
                    print("phi3: compiling the quantized matmul kernel (first use only) ...", file=sys.stderr)
                    _ext = load(name="phi3_quant_cpu", sources=[str(_SOURCE)], build_directory=str(build),
                                extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers, no ninja: fall back to dense weights
        _ext_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        _ext = None
    return _ext


def _import_library(path: Path) -> Any:
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.ExtensionFileLoader("phi3_quant_cpu", str(path))
    spec = importlib.util.spec_from_file_location("phi3_quant_cpu", str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def kernel_available() -> bool:
    return kernel() is not None


def kernel_error() -> str | None:
    kernel()
    return _ext_error


