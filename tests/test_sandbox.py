"""phi3.sandbox: every guarantee the code benchmarks rely on, against real child processes."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from phi3.errors import Phi3Error
from phi3.sandbox import (
    OUTPUT_LIMIT,
    SandboxResult,
    humaneval_program,
    mbpp_program,
    run_program,
    run_programs,
)
from tests.conftest import BENCHDATA

HUMANEVAL = BENCHDATA / "humaneval" / "HumanEval.jsonl.gz"


def humaneval_items() -> list[dict]:
    if not HUMANEVAL.exists():
        pytest.skip(f"HumanEval not found at {HUMANEVAL} (set PHI3_SHARED to the shared/ folder)")
    with gzip.open(HUMANEVAL, "rt") as f:
        return [json.loads(line) for line in f]


def alive(pid: int) -> bool:
    """A zombie counts as gone: it runs nothing, and whether init has reaped it yet is not ours to test."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds  # SIGKILL is delivered asynchronously
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


# --- HumanEval / MBPP ---------------------------------------------------------------------------

def test_humaneval_canonical_solution_passes_and_wrong_one_fails():
    item = humaneval_items()[0]
    good = humaneval_program(item["prompt"], item["canonical_solution"], item["test"], item["entry_point"])
    assert good.endswith(f"check({item['entry_point']})\n")
    r = run_program(good)
    assert r.status == "passed", r.output
    assert r.returncode == 0
    bad = humaneval_program(item["prompt"], "    return None\n", item["test"], item["entry_point"])
    r = run_program(bad)
    assert r.status == "failed" and r.returncode == 1
    assert "AssertionError" in r.output


def test_every_humaneval_canonical_solution_passes():
    """No false failures from the sandbox's own limits and hooks, over the whole benchmark."""
    items = humaneval_items()
    programs = [humaneval_program(i["prompt"], i["canonical_solution"], i["test"], i["entry_point"]) for i in items]
    results = run_programs(programs, timeout_s=20)
    failed = {i["task_id"]: r.output[-300:] for i, r in zip(items, results) if r.status != "passed"}
    assert not failed


def test_mbpp_program():
    prog = mbpp_program("def area(r):\n    return math.pi * r * r", ["assert round(area(1), 2) == 3.14",
                                                                 "assert area(0) == 0"], "import math")
    assert prog == ("def area(r):\n    return math.pi * r * r\nimport math\nassert round(area(1), 2) == 3.14\n"
                    "assert area(0) == 0\n")
    assert run_program(prog).status == "passed"
    assert mbpp_program("x = 1", ["assert x == 1"]) == "x = 1\nassert x == 1\n"  # no blank line for no setup
    r = run_program(mbpp_program("def add(a, b):\n    return a - b", ["assert add(1, 2) == 3"]))
    assert r.status == "failed" and "AssertionError" in r.output


def test_run_programs_keeps_input_order(capsys):
    programs = ["import time; time.sleep(0.5); print('slow')", "print('fast')", "raise SystemExit(3)",
                "print('last')"]
    results = run_programs(programs, timeout_s=10, workers=2, progress=True)
    assert [r.output for r in results] == ["slow\n", "fast\n", "", "last\n"]
    assert [r.status for r in results] == ["passed", "passed", "failed", "passed"]
    assert results[2].returncode == 3
    assert "4/4" in capsys.readouterr().err  # the progress bar went to stderr
    assert run_programs([]) == []


# --- limits -------------------------------------------------------------------------------------

def test_infinite_loop_is_killed_at_the_time_limit():
    r = run_program("print('started', flush=True)\nwhile True:\n    pass\n", timeout_s=1.5)
    assert r.status == "timeout"
    assert 1.4 <= r.seconds < 1.5 + 5
    assert r.output == "started\n"  # what was printed before the kill is kept


def sandbox_processes(home: str) -> list[int]:
    """Host pids of the processes whose environment has HOME=home: a sandbox's, found from outside
    (pids printed inside are the PID namespace's own). Unreadable ones (another uid, not
    dumpable) cannot be told apart and are left out."""
    needle = f"HOME={home}".encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if needle in Path(f"/proc/{entry}/environ").read_bytes() and alive(int(entry)):
                    found.append(int(entry))
            except OSError:
                pass
    return found


def wait_no_processes(home: str, seconds: float = 5.0) -> list[int]:
    """Polls until the sandbox has no process left (SIGKILL and the PID namespace's teardown are
    asynchronous to our wait on its first process); returns those still alive at the deadline."""
    deadline = time.monotonic() + seconds
    while (left := sandbox_processes(home)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def test_forked_child_is_killed_with_the_program():
    code = ("import os, time\n"
            "print(os.getcwd(), flush=True)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    while True: time.sleep(0.05)\n"
            "while True: time.sleep(0.05)\n")
    r = run_program(code, timeout_s=3)
    assert r.status == "timeout"
    home = r.output.split()[0]
    assert not wait_no_processes(home), "a forked child survived the timeout"


def test_forked_child_is_killed_after_a_normal_exit():
    # the child keeps the output pipe open: the run must still end when the program exits
    code = ("import os, time\n"
            "print(os.getcwd(), flush=True)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    time.sleep(60)\n"
            "    os._exit(0)\n")
    r = run_program(code, timeout_s=10)
    assert r.status == "passed", r.output
    assert r.seconds < 5
    assert not wait_no_processes(r.output.split()[0])


@pytest.mark.parametrize("code", ["x = bytearray(10**10)\n",
                                  "x = []\nwhile True:\n    x.append(' ' * 10**6)\n"])
def test_memory_bomb_hits_the_memory_limit(code):
    r = run_program(code, timeout_s=20, memory_mb=256)
    assert r.status == "memory", r.output
    assert "MemoryError" in r.output


def test_memory_limit_leaves_room_for_ordinary_programs():
    r = run_program("x = bytearray(100 * 2**20)\nprint(len(x))\n", memory_mb=256)
    assert r.status == "passed", r.output


def test_output_is_capped():
    r = run_program("print('x' * 10**6)\nprint('END')\n")
    assert r.status == "passed"
    assert r.output.endswith("x\nEND\n")  # the tail is kept: that is where tracebacks are
    assert "earlier bytes of output dropped" in r.output
    assert len(r.output) < OUTPUT_LIMIT + 100


def test_endless_output_never_blocks_and_stays_capped():
    r = run_program("while True:\n    print('spam' * 100)\n", timeout_s=1)
    assert r.status == "timeout"
    assert r.seconds < 1 + 5
    assert len(r.output) < OUTPUT_LIMIT + 100


# --- isolation ----------------------------------------------------------------------------------

def test_fresh_directory_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("PHI3_SECRET", "s3cret")
    outside = tmp_path / "escape.txt"
    code = ("import json, os, sys\n"
            "open('out.txt', 'w').write('hello')\n"
            "os.makedirs('sub/dir')\n"
            "print(json.dumps({'cwd': os.getcwd(), 'env': dict(os.environ), 'flags': [sys.flags.isolated,"
            " sys.flags.dont_write_bytecode], 'exists': os.path.exists('out.txt')}))\n")
    r = run_program(code)
    assert r.status == "passed", r.output
    info = json.loads(r.output)
    cwd = Path(info["cwd"])
    assert info["exists"]
    assert cwd.name.startswith("phi3-sandbox-")
    assert cwd.parent == Path(tempfile.gettempdir()).resolve()
    assert not cwd.exists()  # removed, files and all
    env = info["env"]
    assert env["HOME"] == env["TMPDIR"] == str(cwd)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert not any("proxy" in k.lower() for k in env)
    assert "PHI3_SECRET" not in env
    assert info["flags"] == [1, 1]
    # and nothing may be written outside it
    r = run_program(f"open({str(outside)!r}, 'w').write('x')\n")
    assert r.status == "failed" and "outside the sandbox directory" in r.output
    assert not outside.exists()


def test_removes_a_directory_the_program_made_unwritable():
    r = run_program("import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nos.chmod('a/b', 0)\n"
                    "os.chmod('a', 0o500)\nprint(os.getcwd())\n")
    assert r.status == "passed", r.output
    assert not Path(r.output.strip()).exists()


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.setblocking(False)
    yield server
    server.close()


def test_no_connection_to_a_live_local_server(listener):
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.1", port), timeout=5):  # it does accept connections
        pass
    listener.accept()[0].close()
    code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=5)\n"
            "print('connected')\n")
    r = run_program(code)
    assert r.status == "failed", r.output
    assert "connected" not in r.output
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing got through
    # the raw socket calls too, not only the convenience function
    code = (f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
            f"s.connect(('127.0.0.1', {port}))\n")
    assert run_program(code).status == "failed"


@pytest.mark.parametrize("code", ["import socket\nprint(socket.getaddrinfo('localhost', 80))\n",
                                  "import socket\nprint(socket.gethostbyname('example.com'))\n"])
def test_no_name_lookups(code):
    r = run_program(code)
    assert r.status == "failed", r.output
    assert "is not allowed" in r.output


def test_network_namespace_when_the_kernel_allows_one():
    """The audit hook is the only layer the tests above can see; this checks the kernel layer under
    it, wherever a plain child process may unshare."""
    probe_code = "import ctypes, sys\nsys.exit(ctypes.CDLL(None).unshare(0x10000000 | 0x40000000) != 0)"
    probe = subprocess.run([sys.executable, "-I", "-c", probe_code], check=False)
    if probe.returncode != 0:
        pytest.skip("this kernel refuses unshare(CLONE_NEWUSER | CLONE_NEWNET): the audit hook is the network guard")
    r = run_program("import os\nprint(os.readlink('/proc/self/ns/net'))\nprint(open('/proc/self/net/dev').read())\n")
    assert r.status == "passed", r.output
    ns, devices = r.output.split("\n", 1)
    assert ns != os.readlink("/proc/self/ns/net")
    assert [line.split(":")[0].strip() for line in devices.splitlines() if ":" in line] == ["lo"]


@pytest.mark.parametrize("code", ["import subprocess\nsubprocess.run(['true'])\n",
                                  "import os\nos.system('true')\n",
                                  "import os\nos.execv('/bin/true', ['true'])\n",
                                  "import os\nos.kill(os.getppid(), 0)\n"])
def test_no_new_programs_and_no_signals_outside(code):
    r = run_program(code)
    assert r.status == "failed", r.output
    assert "is not allowed" in r.output


def test_ordinary_code_still_works():
    """The hooks must not break what solutions legitimately use."""
    code = ("import asyncio, multiprocessing, os, tempfile, threading\n"
            "asyncio.run(asyncio.sleep(0))\n"  # socketpair() inside
            "with multiprocessing.Pool(2) as pool:\n"  # fork, pipes, SIGTERM to its own workers
            "    assert pool.map(abs, [-1, 2]) == [1, 2]\n"
            "with tempfile.NamedTemporaryFile('w') as f:\n"
            "    f.write('x')\n"
            "d = tempfile.mkdtemp()\n"
            "os.rename(d, d + '2')\n"
            "os.rmdir(d + '2')\n"
            "t = threading.Thread(target=print, args=('thread',))\n"
            "t.start(); t.join()\n"
            "open('/dev/null', 'w').write('x')\n"
            "if __name__ == '__main__':\n"
            "    print('main')\n")
    r = run_program(code)
    assert r.status == "passed", r.output
    assert r.output == "thread\nmain\n"


def test_syntax_error_is_a_failure():
    r = run_program("def f(:\n    pass\n")
    assert r.status == "failed" and "SyntaxError" in r.output


# --- arguments ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, word", [({"timeout_s": 0}, "timeout_s"), ({"timeout_s": -1}, "timeout_s"),
                                          ({"timeout_s": float("nan")}, "timeout_s"),
                                          ({"memory_mb": 32}, "memory_mb")])
def test_bad_limits_are_user_errors(kwargs, word):
    with pytest.raises(Phi3Error, match=word) as e:
        run_program("pass", **kwargs)
    assert "\n" not in str(e.value) and "pass e.g." in str(e.value)
    with pytest.raises(Phi3Error, match=word):
        run_programs(["pass"], **kwargs)
    with pytest.raises(Phi3Error, match="workers"):
        run_programs(["pass"], workers=0)


def test_could_not_start_is_an_error(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    r = run_program("pass")
    assert r == SandboxResult("error", None, r.output, r.seconds)
    assert "could not start" in r.output
