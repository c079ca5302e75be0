"""phi3.sandbox: every guarantee the code benchmarks rely on, against real child processes."""

from __future__ import annotations

import gzip
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from phi3 import sandbox
from phi3.errors import Phi3Error
from phi3.sandbox import (
    MAX_PROCESSES,
    OUTPUT_LIMIT,
    SANDBOX_ID,
    SandboxResult,
    active_layers,
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


# --- the kernel boundary: each escape that got around the audit hook -----------------------------

KERNEL_LAYERS = {"user-ns", "mount-ns", "pid-ns", "net-ns", "private-root", "uid-nonroot", "no-caps", "seccomp"}


@pytest.fixture
def kernel_sandbox() -> None:
    missing = KERNEL_LAYERS - set(active_layers())
    if missing:
        pytest.skip(f"this machine refuses sandbox layers {sorted(missing)} (e.g. a container without user "
                    "namespaces): the sandbox falls back to the audit hook, which these escapes get around")


@pytest.fixture(params=["host-id", "own-uid"])
def id_mapping(request, monkeypatch) -> str:
    """Both ways the program gets its uid: "host-id" (phi3 as root maps it to HOST_ID outside;
    the same as "own-uid" when not root) and "own-uid" (a nested user namespace maps it to phi3's
    own uid, what a normal user gets; as root that is uid 0 outside, still without capabilities)."""
    if request.param == "own-uid":
        monkeypatch.setattr(sandbox, "HOST_ID", None)
    return request.param


@pytest.fixture
def outside(tmp_path, monkeypatch, kernel_sandbox, id_mapping) -> Path:
    """A world-writable folder holding a world-writable file, made visible inside the sandbox the
    way /usr and the interpreter are: so only the read-only mount can stop a write, not file
    permissions and not the path being absent."""
    folder = tmp_path / "outside"
    folder.mkdir()
    folder.chmod(0o777)
    victim = folder / "victim.txt"
    victim.write_text("original\n")
    victim.chmod(0o666)
    paths = sandbox._readonly_paths
    monkeypatch.setattr(sandbox, "_readonly_paths", lambda: [*paths(), str(folder)])
    return folder


def snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), sorted(os.listxattr(p)), p.stat().st_mode) for p in folder.iterdir()}


def escape(folder: Path, code: str, **kwargs) -> SandboxResult:
    """Runs an escape attempt aimed at `folder` (OUTSIDE in the code) and checks that the folder
    is exactly as it was: no file added, changed, re-moded or given an attribute."""
    before = snapshot(folder)
    prelude = ("import errno, os\n"
               f"OUTSIDE = {str(folder)!r}\n"
               "def attempt(name, f):\n"
               "    try:\n"
               "        f()\n"
               "        print(name, 'WROTE', flush=True)\n"
               "    except OSError as e:\n"
               "        print(name, errno.errorcode.get(e.errno, e.errno), flush=True)\n")
    r = run_program(prelude + code, **kwargs)
    assert snapshot(folder) == before, r.output
    assert "WROTE" not in r.output, r.output
    return r


def test_the_folder_is_visible_inside(outside):
    """The escapes below would write: the folder is there and readable, only not writable."""
    r = escape(outside, "print(sorted(os.listdir(OUTSIDE)), open(OUTSIDE + '/victim.txt').read())\n")
    assert r.status == "passed", r.output
    assert r.output == "['victim.txt'] original\n\n"


def test_escape_dir_fd_and_opener(outside):
    code = ("fd = os.open(OUTSIDE, os.O_RDONLY)\n"
            "attempt('dir_fd', lambda: os.open('new.txt', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))\n"
            "attempt('dir_fd-trunc', lambda: os.open('victim.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=fd))\n"
            "opener = lambda path, flags: os.open(path, flags, dir_fd=fd)\n"
            "attempt('opener', lambda: open('new.txt', 'w', opener=opener).write('x'))\n"
            "attempt('opener-append', lambda: open('victim.txt', 'a', opener=opener).write('x'))\n")
    r = escape(outside, code)
    assert r.output.split("\n")[:4] == ["dir_fd EROFS", "dir_fd-trunc EROFS", "opener EROFS", "opener-append EROFS"]


def test_escape_sqlite(outside):
    code = ("import sqlite3\n"
            "try:\n"
            "    sqlite3.connect(OUTSIDE + '/db.sqlite').execute('create table t (x)')\n"
            "    print('WROTE')\n"
            "except sqlite3.Error as e:\n"
            "    print(type(e).__name__, e)\n")
    r = escape(outside, code)
    assert r.output in ("OperationalError unable to open database file\n",
                        "OperationalError attempt to write a readonly database\n")


@pytest.mark.parametrize("call", ["os.mkfifo(OUTSIDE + '/fifo')",
                                  "os.mknod(OUTSIDE + '/node', 0o600 | __import__('stat').S_IFREG)",
                                  "os.setxattr(OUTSIDE + '/victim.txt', 'user.pwned', b'1')",
                                  "os.removexattr(OUTSIDE + '/victim.txt', 'user.x')",
                                  "os.mkfifo('fifo-inside')"])
def test_escape_mknod_mkfifo_xattr(outside, call):
    """Denied by the seccomp filter before the path is even looked at (EPERM), inside the
    program's own folder too."""
    r = escape(outside, f"attempt('call', lambda: {call})\n")
    assert r.output == "call EPERM\n"


def test_escape_posixsubprocess_fork_exec(outside):
    """_posixsubprocess.fork_exec raises no audit event: /bin/sh runs, inside the sandbox."""
    code = ("from multiprocessing import util\n"  # carries fork_exec's signature for this Python
            "script = f'echo pwned > {OUTSIDE}/sh.txt; echo pwned >> {OUTSIDE}/victim.txt; id -u'\n"
            "pid = util.spawnv_passfds(b'/bin/sh', ['sh', '-c', script], [])\n"
            "print('shell exit', os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n")
    r = escape(outside, code)
    assert r.status == "passed", r.output
    assert r.output.count("Read-only file system") == 2
    assert f"{SANDBOX_ID}\nshell exit 0\n" in r.output  # the shell ran, as the sandbox's user


def test_escape_multiprocessing_spawn_child(outside):
    """A 'spawn' child is a fresh interpreter without the audit hook."""
    code = ("import multiprocessing as mp\n"
            "def write():\n"
            "    open(OUTSIDE + '/spawn.txt', 'w').write('pwned')\n"
            "if __name__ == '__main__':\n"
            "    p = mp.get_context('spawn').Process(target=write)\n"
            "    p.start()\n"
            "    p.join()\n"
            "    print('child exit', p.exitcode)\n")
    r = escape(outside, code, timeout_s=30)
    assert r.status == "passed", r.output
    assert "OSError: [Errno 30] Read-only file system" in r.output
    assert r.output.endswith("child exit 1\n")


def test_escape_clearing_the_hook_through_gc(outside):
    """The program rewrites the audit hook's closure so that every path counts as inside."""
    code = ("import gc\n"
            "for f in gc.get_objects():\n"
            "    if getattr(f, '__name__', None) == 'inside' and getattr(f, '__closure__', None):\n"
            "        for cell in f.__closure__:\n"
            "            if isinstance(cell.cell_contents, str) and cell.cell_contents.endswith('/'):\n"
            "                cell.cell_contents = '/'\n"
            "                print('hook disarmed')\n"
            "attempt('open', lambda: open(OUTSIDE + '/victim.txt', 'w').write('pwned'))\n"
            "attempt('remove', lambda: os.remove(OUTSIDE + '/victim.txt'))\n")
    r = escape(outside, code)
    assert r.output == "hook disarmed\nopen EROFS\nremove EROFS\n"  # the kernel, not the hook, said no


def test_escape_ctypes(outside):
    code = ("import ctypes\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "for name, flags in (('ctypes.txt', os.O_WRONLY | os.O_CREAT), ('victim.txt', os.O_WRONLY | os.O_TRUNC)):\n"
            "    fd = libc.open(f'{OUTSIDE}/{name}'.encode(), flags, 0o644)\n"
            "    print(name, fd, errno.errorcode[ctypes.get_errno()])\n")
    r = escape(outside, code)
    assert r.output == "ctypes.txt -1 EROFS\nvictim.txt -1 EROFS\n"


def test_without_the_audit_hook_the_kernel_still_holds(outside, monkeypatch):
    """The hook is a second layer: with it off, the ordinary calls fail in the kernel."""
    monkeypatch.setattr(sandbox, "_AUDIT_HOOK", False)
    victim = "OUTSIDE + '/victim.txt'"
    code = (f"attempt('open', lambda: open({victim}, 'w'))\n"
            f"attempt('remove', lambda: os.remove({victim}))\n"
            f"attempt('rename', lambda: os.rename({victim}, OUTSIDE + '/x'))\n"
            f"attempt('chmod', lambda: os.chmod({victim}, 0o777))\n"
            f"attempt('mkdir', lambda: os.mkdir(OUTSIDE + '/d'))\n"
            "attempt('etc', lambda: open('/etc/passwd', 'a'))\n"
            "attempt('usr', lambda: open('/usr/pwned', 'w'))\n"
            "attempt('root', lambda: open('/pwned', 'w'))\n"
            "import socket\n"
            "attempt('socket', lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))\n")
    r = escape(outside, code)
    assert r.status == "passed", r.output
    assert "audit-hook" not in r.layers
    words = r.output.split()
    assert words[:10] == ["open", "EROFS", "remove", "EROFS", "rename", "EROFS", "chmod", "EROFS", "mkdir", "EROFS"]
    # the root's own files belong to the namespace's root: permissions may answer before the mount does
    assert words[10:16:2] == ["etc", "usr", "root"] and set(words[11:16:2]) <= {"EROFS", "EACCES"}
    assert words[16:] == ["socket", "EPERM"]


def test_setsid_and_double_forked_children_die_with_the_sandbox(kernel_sandbox):
    """A child that leaves the process group (setsid) and forks again used to outlive the kill."""
    code = ("import os, time\n"
            "print(os.getcwd(), flush=True)\n"
            "if os.fork() == 0:\n"
            "    os.setsid()\n"
            "    if os.fork() == 0:\n"
            "        while True: time.sleep(0.05)\n"
            "    os._exit(0)\n"
            "os.wait()\n")
    r = run_program(code, timeout_s=10)
    assert r.status == "passed", r.output
    assert not wait_no_processes(r.output.split()[0]), "a setsid grandchild outlived its program"
    r = run_program(code + "while True: time.sleep(0.05)\n", timeout_s=3)  # and when killed at the time limit
    assert r.status == "timeout", r.output
    assert not wait_no_processes(r.output.split()[0]), "a setsid grandchild outlived the kill"


def test_the_users_files_are_invisible(kernel_sandbox):
    cache = Path.home() / ".cache"
    cache.mkdir(exist_ok=True)
    fd, secret = tempfile.mkstemp(prefix="phi3-sandbox-secret-", dir=cache)
    try:
        os.write(fd, b"s3cret")
        os.close(fd)
        os.chmod(secret, 0o644)  # readable by anyone who can reach it
        code = ("import errno, os\n"
                f"for path in [{secret!r}, {str(cache)!r}, {str(Path(sandbox.__file__))!r}, '/root/.cache', '/home',"
                " '/etc/shadow', '/etc/hostname']:\n"
                "    try:\n"
                "        print(path, open(path).read() if os.path.isfile(path) else os.listdir(path))\n"
                "    except OSError as e:\n"
                "        print(path, errno.errorcode[e.errno])\n")
        r = run_program(code)
        assert r.status == "passed", r.output
        assert "s3cret" not in r.output
        assert all(line.endswith(" ENOENT") for line in r.output.splitlines()), r.output
    finally:
        os.unlink(secret)


def test_the_program_is_not_root_and_has_no_capabilities(kernel_sandbox, id_mapping):
    code = ("import os\n"
            "print(os.getuid(), os.geteuid(), os.getgid(), os.getgroups(), os.getpid())\n"
            "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
            "keys = ('CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp')\n"
            "print(*(status[k].strip() for k in keys))\n"
            "print(os.stat('.').st_uid, sorted(os.listdir('/proc'))[:3])\n")
    r = run_program(code)
    assert r.status == "passed", r.output
    ids, caps, own = r.output.splitlines()
    assert ids == f"{SANDBOX_ID} {SANDBOX_ID} {SANDBOX_ID} [] 2"  # pid 2: the namespace's init is 1
    assert caps == "0000000000000000 " * 5 + "1 2"  # no capabilities, no_new_privs, a seccomp filter
    assert own == f"{SANDBOX_ID} ['1', '2', 'acpi']" or own.startswith(f"{SANDBOX_ID} ['1', '2',")
    expected = KERNEL_LAYERS | {"ipc-ns", "uts-ns", "proc", "no-new-privs", "rlimits", "audit-hook"}
    if os.getuid() != 0 or id_mapping == "host-id":
        expected.add("host-uid-nonroot")
    assert set(r.layers) == expected
    if id_mapping == "host-id":
        assert active_layers() == r.layers


def test_as_root_the_program_is_not_root_outside_either(outside, id_mapping):
    """Its files (and so its process) belong to HOST_ID on the machine, not to root."""
    if os.geteuid() != 0 or id_mapping != "host-id":
        pytest.skip("phi3 is not root here (or the test asks for phi3's own uid): the program runs as phi3's uid")
    marker = f"marker-{os.getpid()}-{time.monotonic_ns()}"
    code = ("import os, time\n"
            f"open({marker!r}, 'w').close()\n"
            f"while not os.path.exists({str(outside / 'go')!r}):\n"  # the test says when it has looked
            "    time.sleep(0.01)\n")
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(run_program, code, timeout_s=60)
        deadline = time.monotonic() + 30
        while not (found := list(Path(tempfile.gettempdir()).glob(f"phi3-sandbox-*/{marker}"))):
            assert time.monotonic() < deadline and not run.done(), "the program never wrote its marker"
            time.sleep(0.01)
        owner = found[0].stat()
        (outside / "go").touch()
        r = run.result()
    assert r.status == "passed", r.output
    assert (owner.st_uid, owner.st_gid) == (sandbox.HOST_ID, sandbox.HOST_ID)


def test_the_seccomp_filter(kernel_sandbox):
    code = ("import ctypes, errno, socket\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "def call(name, *args):\n"
            "    ret = getattr(libc, name)(*args)\n"
            "    print(name, ret, errno.errorcode.get(ctypes.get_errno(), 0) if ret == -1 else 'ok')\n"
            "call('unshare', 0x10000000)\n"  # CLONE_NEWUSER
            "call('mount', b'none', b'/tmp', b'tmpfs', 0, None)\n"
            "call('socket', socket.AF_INET, socket.SOCK_STREAM, 0)\n"
            "call('ptrace', 0, 0, None, None)\n"  # PTRACE_TRACEME
            "call('init_module', None, 0, b'')\n"
            "call('syscall', 435, None, 0)\n"  # clone3, the same number everywhere: ENOSYS, so the C library uses clone
            "fd = libc.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)\n"
            "print('unix', fd >= 0)\n")
    r = run_program(code)
    assert r.status == "passed", r.output
    assert r.output == ("unshare -1 EPERM\nmount -1 EPERM\nsocket -1 EPERM\nptrace -1 EPERM\ninit_module -1 EPERM\n"
                        "syscall -1 ENOSYS\nunix True\n")


def run_bpf(program: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """A classic BPF interpreter for the instructions the filter uses, over struct seccomp_data."""
    data = struct.pack("iIQ6Q", nr, arch, 0, *(list(args) + [0] * 6)[:6])
    code = [struct.unpack_from("HBBI", program, i) for i in range(0, len(program), 8)]
    pc = acc = 0
    while True:
        op, jt, jf, k = code[pc]
        pc += 1
        if op == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            acc = struct.unpack_from("I", data, k)[0]
        elif op in (0x15, 0x35, 0x45):  # BPF_JMP | JEQ / JGE / JSET | BPF_K
            taken = acc == k if op == 0x15 else acc >= k if op == 0x35 else bool(acc & k)
            pc += jt if taken else jf
        elif op == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected BPF instruction {op:#x}")


ALLOW, EPERM, ENOSYS, KILL = 0x7FFF0000, 0x50001, 0x50026, 0x80000000


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_seccomp_program_on_each_architecture(machine):
    """The filter's logic, checked without the kernel, for an architecture this machine may not be."""
    program = sandbox._seccomp_filter(machine)
    table, arch = sandbox._SYSCALLS[machine], sandbox._AUDIT_ARCH[machine]
    for name in sandbox._DENIED:
        if name in table:
            assert run_bpf(program, table[name], arch) == EPERM, name
    everyday = {"x86_64": {"read": 0, "write": 1, "openat": 257, "mmap": 9, "execve": 59, "setsid": 112,
                           "socketpair": 53, "prctl": 157},
                "aarch64": {"read": 63, "write": 64, "openat": 56, "mmap": 222, "execve": 221, "setsid": 157,
                            "socketpair": 199, "prctl": 167}}[machine]
    for name, nr in everyday.items():
        assert run_bpf(program, nr, arch) == ALLOW, name
    socket, clone = table["socket"], table["clone"]
    assert run_bpf(program, socket, arch, (1, 1)) == ALLOW  # AF_UNIX
    assert run_bpf(program, socket, arch, (2, 1)) == EPERM  # AF_INET
    assert run_bpf(program, socket, arch, (10, 1)) == EPERM  # AF_INET6
    assert run_bpf(program, socket, arch, (16, 3)) == EPERM  # AF_NETLINK
    assert run_bpf(program, socket, arch, (1 + 2**32, 1)) == ALLOW  # the kernel reads an int: the high half is noise
    assert run_bpf(program, clone, arch, (0x01200011,)) == ALLOW  # fork(): CLONE_CHILD_SETTID|CLEARTID|SIGCHLD
    assert run_bpf(program, clone, arch, (0x003D0F00,)) == ALLOW  # a pthread
    for flag in (0x20000, 0x2000000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000):
        assert run_bpf(program, clone, arch, (0x01200011 | flag,)) == EPERM, hex(flag)
    assert run_bpf(program, table["clone3"], arch) == ENOSYS
    other = sandbox._AUDIT_ARCH["aarch64" if machine == "x86_64" else "x86_64"]
    assert run_bpf(program, everyday["read"], other) == KILL  # another architecture's calls
    if machine == "x86_64":
        assert run_bpf(program, 0x40000000 | 1, arch) == EPERM  # x32's write
        assert run_bpf(program, 1, 0x40000003) == KILL  # i386
    assert sandbox._seccomp_filter(None) is None


@pytest.mark.parametrize("machine, headers", [
    ("x86_64", ["/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h"]),
    ("aarch64", ["/usr/include/asm-generic/unistd.h"])])
def test_the_system_call_numbers_match_the_kernel_headers(machine, headers):
    header = next((h for h in headers if os.path.exists(h)), None)
    if header is None:
        pytest.skip(f"no kernel headers here ({', '.join(headers)})")
    defined = {}
    for line in Path(header).read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "#define" and parts[2].isdigit():
            name = parts[1].removeprefix("__NR3264_").removeprefix("__NR_")
            defined.setdefault(name, int(parts[2]))
    table = sandbox._SYSCALLS[machine]
    checked = {name for name in table if name in defined}
    assert {name: table[name] for name in checked} == {name: defined[name] for name in checked}
    assert len(checked) >= 40  # the headers know most of them (older ones lack the newest calls)


def test_a_fork_bomb_stops_at_the_process_limit(kernel_sandbox):
    """RLIMIT_NPROC holds now that the program is not uid 0 (the kernel exempts root)."""
    code = ("import os, time\n"
            "n = 0\n"
            "try:\n"
            "    while True:\n"
            "        if os.fork() == 0:\n"
            "            time.sleep(60)\n"
            "            os._exit(0)\n"
            "        n += 1\n"
            "except OSError as e:\n"
            "    print(n, e.errno == __import__('errno').EAGAIN)\n")
    r = run_program(code, timeout_s=20)
    assert r.status == "passed", r.output
    n, eagain = r.output.split()
    assert 0 < int(n) < MAX_PROCESSES and eagain == "True"


def test_fallback_where_the_kernel_refuses_the_namespaces(monkeypatch, tmp_path):
    """What a container without user namespaces gets: the sandbox of before, and it says so."""
    full = active_layers()
    monkeypatch.setattr(sandbox, "_NAMESPACES", False)
    r = run_program("import os\nprint(os.getuid() == os.geteuid())\n")
    assert r.status == "passed" and r.output == "True\n", r.output
    assert "private-root" not in r.layers and "pid-ns" not in r.layers
    assert {"rlimits", "audit-hook"} <= set(r.layers)
    if "seccomp" in full:
        assert "seccomp" in r.layers  # it needs no namespace
    outside = tmp_path / "escape.txt"
    r = run_program(f"open({str(outside)!r}, 'w').write('x')\n")  # the hook still stops the ordinary calls
    assert r.status == "failed" and "outside the sandbox directory" in r.output
    assert not outside.exists()


def test_a_refused_private_root_is_reported_and_the_rest_holds(monkeypatch, kernel_sandbox, tmp_path):
    """Where the kernel takes the namespaces but refuses a step of the private root (here
    pivot_root, made to fail), the program still runs, in the other layers, and says which."""
    line = 'check(libc.syscall(ctypes.c_long(SYSCALLS["pivot_root"]), b".", b"."), "pivot_root")'
    assert line in sandbox._BOOTSTRAP
    monkeypatch.setattr(sandbox, "_BOOTSTRAP", sandbox._BOOTSTRAP.replace(line, 'raise OSError(1, "refused")'))
    r = run_program("import os\nprint(os.getuid(), os.listdir('.'))\n")
    assert r.status == "passed" and r.output == f"{SANDBOX_ID} ['program.py']\n", r.output
    assert "private-root" not in r.layers and "proc" not in r.layers
    assert {"pid-ns", "net-ns", "uid-nonroot", "no-caps", "seccomp", "audit-hook"} <= set(r.layers)


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
