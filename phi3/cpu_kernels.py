"""phi3's compiled CPU kernels (phi3/kernels/): which build this machine runs, building it on first
use with torch.utils.cpp_extension, and loading it.

One build per instruction set, from the same sources (quant_core.h's arithmetic, quant_cpu.cpp's
torch binding): `avx512` (AVX-512 VNNI), `avx2` (AVX2 + FMA + F16C, with AVX-VNNI where the CPU has
it) and `neon` (aarch64, with the dot-product instructions where the CPU has them). Each is its own
module in its own cache folder, so that tests and benchmarks can load two in one process.

Everything that calls a kernel asks `kernel()`: the best build this CPU runs, or the one that
PHI3_KERNELS names (avx512, avx2, neon; `portable` for none). None means no compiled kernel
(portable, no compiler, an unsupported CPU) and callers use plain PyTorch ops instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch

_KERNELS = Path(__file__).parent / "kernels"
_BINDING = _KERNELS / "quant_cpu.cpp"
_SOURCES = (_BINDING, _KERNELS / "quant_core.h")
_X86 = ("x86_64", "AMD64")
_ARM = ("aarch64", "arm64")
# name -> (the machines it runs on, the /proc/cpuinfo flags it needs); best first.
_BUILDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512": (_X86, ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma")),
    "avx2": (_X86, ("avx2", "fma", "f16c")),
    "neon": (_ARM, ("asimd",)),
}
_CHOICES = (*_BUILDS, "portable")  # what PHI3_KERNELS accepts
_MODULE_PREFIX = "phi3_quant_"
_ext: Any = None
_ext_error: str | None = None
_loaded: dict[str, Any] = {}  # build name -> module, once built and imported


def _cpu_flags() -> set[str] | None:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None


def _unsupported(name: str) -> str | None:
    """Why this CPU cannot run build `name`, or None when it can."""
    machines, needed = _BUILDS[name]
    if platform.machine() not in machines:
        return f"the {name} kernels run on {machines[0]} CPUs, not {platform.machine()}"
    flags = _cpu_flags()
    if flags is None:
        return f"the {name} kernels need {', '.join(needed)}, and there is no /proc/cpuinfo to check them"
    missing = [f for f in needed if f not in flags]
    return f"the {name} kernels need {', '.join(missing)}, which this CPU lacks" if missing else None


def _compiler_flags(name: str) -> list[str]:
    flags = _cpu_flags() or set()
    if name == "avx512":
        isa = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma"]
    elif name == "avx2":
        isa = ["-mavx2", "-mfma", "-mf16c"] + (["-mavxvnni"] if "avx_vnni" in flags else [])
    else:
        isa = ["-march=armv8.2-a+dotprod" if "asimddp" in flags else "-march=armv8-a"]
    return ["-O3", *isa, "-fopenmp"]  # without OpenMP, at::parallel_for compiles to a serial loop


def supported_builds() -> list[str]:
    """The kernel builds this CPU can run, best first."""
    return [name for name in _BUILDS if _unsupported(name) is None]


def load_build(name: str) -> Any:
    """Kernel build `name` (one of avx512, avx2, neon), compiled on first use (about 20 s, cached
    afterwards); RuntimeError when this CPU cannot run it or it does not compile."""
    if name not in _BUILDS:
        raise RuntimeError(f"no kernel build {name!r}; the builds are {', '.join(_BUILDS)}")
    reason = _unsupported(name)
    if reason:
        raise RuntimeError(reason)
    if name in _loaded:
        return _loaded[name]
    try:
        module = _build_and_import(name)
    except Exception as e:  # no compiler, no headers, no ninja
        raise RuntimeError(f"the {name} kernels did not build: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}") from e
    _loaded[name] = module
    return module


def _build_and_import(name: str) -> Any:
    from torch.utils.cpp_extension import load
    # pip installs ninja next to this interpreter, which is not on PATH unless the venv is active.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    flags = _compiler_flags(name)
    module_name = _MODULE_PREFIX + name
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in _SOURCES) + torch.__version__.encode()
                          + " ".join(flags).encode())
    build = Path(os.environ.get("PHI3_CACHE") or Path.home() / ".cache" / "phi3") / "kernels" / (
        f"{name}-{digest.hexdigest()[:10]}")
    build.mkdir(parents=True, exist_ok=True)
    library = build / f"{module_name}.so"
    if library.exists():
        # Built before (the folder's name covers sources, flags and torch): import it directly. Not
        # through cpp_extension.load, whose lock file, left behind by a process killed in the
        # second it is held, makes every later run wait for ever.
        return _import_library(module_name, library)
    with open(build / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # one builder at a time; released if it dies
        if library.exists():  # another process built it while we waited
            return _import_library(module_name, library)
        (build / "lock").unlink(missing_ok=True)  # torch's lock from a killed build
        print(f"phi3: compiling the {name} CPU kernels (first use only) ...", file=sys.stderr)
        return load(name=module_name, sources=[str(_BINDING)], build_directory=str(build), extra_cflags=flags,
                    extra_ldflags=["-fopenmp"], verbose=False)


def _import_library(module_name: str, path: Path) -> Any:
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.ExtensionFileLoader(module_name, str(path))
    spec = importlib.util.spec_from_file_location(module_name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _choice() -> str:
    """The build PHI3_KERNELS asks for ("" for the best); PHI3_NO_KERNELS=1 means portable."""
    forced = os.environ.get("PHI3_KERNELS", "").strip()
    if not forced and os.environ.get("PHI3_NO_KERNELS"):
        return "portable"
    return forced


def kernel() -> Any:
    """The compiled extension this process uses (see the module's docstring), or None."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    choice = _choice()
    if choice == "portable":
        _ext_error = "PHI3_KERNELS=portable" if os.environ.get("PHI3_KERNELS") else "PHI3_NO_KERNELS=1 (portable)"
        return None
    if choice and choice not in _BUILDS:
        _ext_error = f"PHI3_KERNELS={choice!r} is not one of {', '.join(_CHOICES)}"
        return None
    if not choice:
        supported = supported_builds()
        if not supported:
            ours = [n for n in _BUILDS if platform.machine() in _BUILDS[n][0]]
            _ext_error = "; ".join(_unsupported(n) for n in ours) or f"no kernel build for {platform.machine()} CPUs"
            return None
        choice = supported[0]
    try:
        _ext = load_build(choice)
    except RuntimeError as e:
        _ext_error = str(e)
    return _ext


def kernel_isa() -> str | None:
    """The name of the build `kernel()` returns (avx512, avx2, neon), or None."""
    ext = kernel()
    return ext.__name__.removeprefix(_MODULE_PREFIX) if ext is not None else None


def kernel_available() -> bool:
    return kernel() is not None


def kernel_error() -> str | None:
    kernel()
    return _ext_error
