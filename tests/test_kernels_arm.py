"""quant_core.h's SIMD kernels against its plain C++ reference, through the C++ driver
phi3/kernels/test_core.cpp: for aarch64 (NEON with and without the dot-product instructions),
cross-compiled and run under qemu, and natively for each x86 instruction set this CPU has, so the
driver itself is tested everywhere. The driver ends with "N passed, M failed"."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DRIVER = Path(__file__).resolve().parent.parent / "phi3" / "kernels" / "test_core.cpp"


def run_driver(compile_cmd: list[str], run_prefix: list[str], binary: Path) -> list[str]:
    """Compile the driver, run it, and return its output lines after checking none failed."""
    # 600 s: the compile takes ~20 s alone, but over 120 s on a 2-core machine shared with 8 jobs.
    built = subprocess.run([*compile_cmd, "-std=c++17", "-O2", str(DRIVER), "-o", str(binary)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([*run_prefix, str(binary)], capture_output=True, text=True, timeout=120)
    lines = ran.stdout.splitlines()
    failures = [line for line in lines if line.startswith("FAIL")]
    assert lines and re.fullmatch(r"\d+ passed, 0 failed", lines[-1]), "\n".join(failures) or ran.stdout + ran.stderr
    assert ran.returncode == 0
    return lines


@pytest.mark.parametrize("march, build", [("armv8.2-a+dotprod", "neon dotprod"), ("armv8-a", "neon")])
def test_neon_kernels_under_qemu(march, build, tmp_path):
    compiler = shutil.which("aarch64-linux-gnu-g++")
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if not compiler or not qemu:
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (Debian: apt-get install g++-aarch64-linux-gnu "
                    "qemu-user; `make test` installs them)")
    lines = run_driver([compiler, "-static", f"-march={march}"], [qemu, "-cpu", "max"], tmp_path / "test_core")
    assert lines[0] == f"build: {build}"


X86_BUILDS = {  # build line -> (compiler flags, /proc/cpuinfo flags needed to run it)
    "portable": ([], ()),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], ("avx2", "fma", "f16c")),
    "avx2 avxvnni": (["-mavx2", "-mfma", "-mf16c", "-mavxvnni"], ("avx2", "fma", "f16c", "avx_vnni")),
    "avx512": (["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma"],
               ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma")),
}


@pytest.mark.parametrize("build", X86_BUILDS)
def test_x86_kernels_natively(build, tmp_path):
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("not an x86_64 CPU")
    compiler = shutil.which("g++")
    if not compiler:
        pytest.skip("needs g++")
    flags, needed = X86_BUILDS[build]
    missing = [f for f in needed if f not in Path("/proc/cpuinfo").read_text().split()]
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)}")
    lines = run_driver([compiler, *flags], [], tmp_path / "test_core")
    assert lines[0] == f"build: {build}"
