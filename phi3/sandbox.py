"""Runs model-written Python (HumanEval, MBPP) in a throwaway process, for pass@1.

The code comes from a model, so it is treated as careless rather than hostile: it may loop
forever, eat all memory, fork, print without end, delete files or try the network. Each program
gets its own fresh interpreter (`python -I -B`, so no user site, no PYTHON* variables and no .pyc
writes), a new temporary directory as cwd and HOME (removed afterwards) and an environment built
from scratch (no proxies, no tokens of ours). A small bootstrap (`_BOOTSTRAP`) runs in that
interpreter before the program and adds these layers:

1. Namespaces: `unshare(CLONE_NEWUSER | CLONE_NEWNET)` through libc (Python 3.11 has no
   os.unshare), then an identity uid/gid map so files keep their owner. The new network namespace
   has only a loopback device that is down, so every connection fails in the kernel, whatever the
   program calls (ctypes included). Done in the child rather than in a preexec_fn because
   run_programs starts processes from several threads, where preexec_fn can deadlock. Where the
   kernel refuses (some containers), the bootstrap falls back to a network namespace alone and
   then to nothing; the audit hook below still applies.
2. Resource limits, soft = hard so the program cannot raise them: RLIMIT_AS (memory_mb; a
   MemoryError becomes exit code MEMORY_EXIT and status "memory"), RLIMIT_FSIZE (no file over
   FILE_LIMIT_MB), RLIMIT_CORE 0, and RLIMIT_NPROC (MAX_PROCESSES, only inside a new user
   namespace, where the count starts at this process; outside one it counts every process of the
   user, so a small limit would fail for unrelated reasons). The kernel never enforces
   RLIMIT_NPROC for uid 0, so when this runs as root a fork bomb is only stopped by the time limit.
3. A `sys.addaudithook` hook, installed after the bootstrap's own imports and before the program
   runs, raising PermissionError on: non-AF_UNIX socket creation, connect, bind, sendto/sendmsg
   and name lookups (getaddrinfo, gethostbyname, gethostbyaddr, getnameinfo); subprocess.Popen,
   os.system, os.exec*, os.spawn*, os.posix_spawn*, pty.spawn; os.kill/killpg aimed outside the
   program's own process group; and file writes, removals, renames, links, chmod/chown, truncate,
   utime and mkdir outside the temporary directory (/dev/null, /dev/stdout and /dev/stderr
   excepted). AF_UNIX sockets stay allowed because asyncio's event loop and multiprocessing need
   socketpair(); os.fork stays allowed because multiprocessing needs it. Audit hooks are not a
   security boundary (ctypes or a C extension can go around them); they catch the ordinary calls a
   model writes, which is what matters when the namespaces are missing or the process is root,
   where file permissions protect nothing.
4. In the parent: a wall-clock limit after which the whole process group (start_new_session) is
   SIGKILLed; the group is killed after a normal exit too, so no forked child outlives its program.
   Output (stdout and stderr merged) is read as it comes, keeping the last OUTPUT_LIMIT bytes, so a
   full pipe never blocks the program and an endless print never fills our memory.

On the development machine (Linux 6.18 VM, running as root) all four layers are active:
unshare(CLONE_NEWUSER | CLONE_NEWNET) succeeds. RLIMIT_NPROC is set but inert there (root).
Known gaps: a child that calls os.setsid() leaves the process group and survives the kill (a PID
namespace would close this); programs run as "__main__", so `if __name__ == "__main__":` blocks
run (stdin is /dev/null, so an input() there fails instead of hanging).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from phi3.errors import Phi3Error

OUTPUT_LIMIT = 64 * 1024  # bytes of output kept (the tail: tracebacks and failed asserts come last)
FILE_LIMIT_MB = 64  # RLIMIT_FSIZE: largest file a program may write
MAX_PROCESSES = 64  # RLIMIT_NPROC (processes and threads) inside the user namespace
MEMORY_EXIT = 97  # the bootstrap's exit code after an uncaught MemoryError
SETUP_EXIT = 98  # the bootstrap's exit code when it could not apply the limits
_MIN_MEMORY_MB = 64  # below this the interpreter itself cannot start its work

# Runs in the child as `python -I -B -c _BOOTSTRAP MEMORY_BYTES FILE_BYTES NPROC`, cwd = the
# temporary directory holding program.py. Kept to the standard library and to what must happen
# before the program: namespaces first (unshare refuses threaded processes, and RLIMIT_NPROC must
# be set after it to count in the new namespace), then limits, then the audit hook last, because
# the bootstrap itself reads /proc and imports modules.
_BOOTSTRAP = r'''
import _socket, os, resource, sys, traceback
MEMORY_EXIT, SETUP_EXIT = @MEMORY_EXIT@, @SETUP_EXIT@


def unshare():
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000 | 0x40000000) == 0:  # CLONE_NEWUSER | CLONE_NEWNET
        try:  # an identity map: without one the uid shows as 65534 and new files may be refused
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
        except OSError:
            pass
        return True
    libc.unshare(0x40000000)  # user namespaces disabled but CAP_SYS_ADMIN held: network alone
    return False


def limit(kind, value):
    hard = resource.getrlimit(kind)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def setup():
    memory, fsize, nproc = (int(a) for a in sys.argv[1:4])
    in_userns = unshare()
    limit(resource.RLIMIT_AS, memory)
    limit(resource.RLIMIT_FSIZE, fsize)
    limit(resource.RLIMIT_CORE, 0)
    if in_userns:
        limit(resource.RLIMIT_NPROC, nproc)


def make_hook(root):
    blocked = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
               "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
               "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "pty.spawn"}
    # event -> (index of a path argument, index of its dir_fd argument or None)
    paths = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
             "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.truncate": ((0, None),),
             "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
             "shutil.rmtree": ((0, 1),)}
    devices = {"/dev/null", "/dev/stdout", "/dev/stderr"}
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    group, unix, prefix = os.getpgrp(), _socket.AF_UNIX, root + os.sep
    # bound here rather than looked up as globals, which are None during interpreter shutdown
    readlink, fsdecode, isabs, join, realpath, getpgid, finalizing = (
        os.readlink, os.fsdecode, os.path.isabs, os.path.join, os.path.realpath, os.getpgid, sys.is_finalizing)

    def inside(path, dir_fd=None):
        if isinstance(path, int):  # an open descriptor: judge the file it points at
            path = readlink(f"/proc/self/fd/{path}")
        path = fsdecode(path)
        if path in devices:
            return True
        if dir_fd is not None and dir_fd >= 0 and not isabs(path):
            path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = realpath(path)
        return real == root or real.startswith(prefix)

    def outside(event, args):
        """The first path argument of a writing event that lies outside the directory, or None."""
        try:
            if event == "open":
                # an int is a descriptor being wrapped, checked when it was opened
                return args[0] if len(args) > 2 and args[2] & writing and not isinstance(args[0], int) and not inside(args[0]) else None
            for p, d in paths[event]:
                if not inside(args[p], None if d is None else args[d]):
                    return args[p]
            return None
        except (TypeError, AttributeError):
            # At shutdown the stdlib helpers above are torn down (a tempfile's __del__ removing its
            # file lands here): let the operation be rather than print a spurious traceback.
            if finalizing():
                return None
            raise

    def deny(event, why):
        raise PermissionError(f"sandbox: {event} is not allowed ({why})")

    def hook(event, args):
        if event in blocked:
            deny(event, "no network or new programs in the sandbox")
        elif event == "socket.__new__" and args[1] != unix:
            deny(event, "no network in the sandbox")
        elif event == "open" or event in paths:
            path = outside(event, args)
            if path is not None:
                deny(event, f"{path!r} is outside the sandbox directory")
        elif event == "os.kill":
            pid = args[0]
            if not (pid == 0 or pid == -group or (pid > 0 and getpgid(pid) == group)):
                deny(event, f"process {pid} is not the program's")
        elif event == "os.killpg" and args[0] not in (0, group):
            deny(event, f"process group {args[0]} is not the program's")
    return hook


try:
    setup()
    with open("program.py", "rb") as f:
        source = f.read()
    hook = make_hook(os.path.realpath(os.getcwd()))
except BaseException:
    traceback.print_exc()
    print("sandbox: could not set up the limits", file=sys.stderr)
    os._exit(SETUP_EXIT)

sys.stdout.reconfigure(line_buffering=True)  # what was printed before a timeout kill still arrives
sys.argv = ["program.py"]
main = type(sys)("__main__")
main.__file__ = "program.py"
sys.modules["__main__"] = main  # so pickle (multiprocessing) finds the program's functions
try:
    code = compile(source, "program.py", "exec")  # here, so a SyntaxError is the program's failure
    del source
    sys.addaudithook(hook)
    exec(code, main.__dict__)
except MemoryError:
    try:
        traceback.print_exc()
        print("sandbox: memory limit reached", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(MEMORY_EXIT)
'''.replace("@MEMORY_EXIT@", str(MEMORY_EXIT)).replace("@SETUP_EXIT@", str(SETUP_EXIT))


@dataclass
class SandboxResult:
    """One program's outcome; `output` is kept so a failure can be read without rerunning it."""

    status: str  # "passed" | "failed" | "timeout" | "memory" | "error" (the sandbox could not start)
    returncode: int | None  # None when the process never started
    output: str  # the tail of stdout and stderr, interleaved as written
    seconds: float  # wall clock from start to exit (or kill)


def _check(timeout_s: float, memory_mb: int) -> None:
    # `not x > 0` also rejects NaN
    if not timeout_s > 0:
        raise Phi3Error(f"sandbox timeout_s must be a positive number of seconds, got {timeout_s!r}: "
                        f"pass e.g. 10")
    if not memory_mb >= _MIN_MEMORY_MB:
        raise Phi3Error(f"sandbox memory_mb must be at least {_MIN_MEMORY_MB} (the interpreter needs that much "
                        f"address space), got {memory_mb!r}: pass e.g. 1024")


def _child_env(tmp: str) -> dict[str, str]:
    """Built from nothing so that no proxy, credential or PYTHON* setting of ours reaches the program."""
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": tmp,  # libraries that cache under ~ write into the throwaway directory
        "TMPDIR": tmp,  # tempfile too
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        # -I already makes the child ignore PYTHON* variables (-B is what stops .pyc writes); set for
        # any other tool that reads it
        "PYTHONDONTWRITEBYTECODE": "1",
        # RLIMIT_AS counts address space: glibc's per-thread 64 MB malloc arenas and BLAS thread
        # pools would use it up without using memory, and parallel programs would fight for 2 cores
        "MALLOC_ARENA_MAX": "2",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the process has exited, without reaping it: while it is an unreaped zombie its pid,
    and so its process group id, cannot be reused, which makes the killpg after it safe."""
    if not hasattr(os, "waitid"):  # macOS
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped (SIGCHLD ignored by the embedding program)
        return True


def _read(fd: int, tail: bytearray) -> bool:
    """Appends what there is to read to `tail`; False at end of file."""
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return True
    tail.extend(chunk)
    return bool(chunk)


def _collect(proc: subprocess.Popen, deadline: float) -> tuple[bytes, int, bool]:
    """Reads output until the process exits or the deadline passes, then kills its group.
    Returns (the last OUTPUT_LIMIT bytes, bytes dropped before them, timed out)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    tail, dropped, eof, timed_out = bytearray(), 0, False, False

    def trim() -> None:
        nonlocal dropped
        if len(tail) > OUTPUT_LIMIT:
            dropped += len(tail) - OUTPUT_LIMIT
            del tail[:-OUTPUT_LIMIT]

    # The loop ends on the process's exit, not on end of file: a forked child may hold the pipe open.
    while not _exited(proc):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        if eof:
            time.sleep(min(remaining, 0.005))
        elif select.select([fd], [], [], min(remaining, 0.05))[0]:
            eof = not _read(fd, tail)
            if len(tail) > 2 * OUTPUT_LIMIT:
                trim()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # after a normal exit too: forked children die with it
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    # What the group wrote before dying is still in the pipe; the wait is bounded in case a child
    # escaped the group (setsid) and keeps it open.
    drain_until = time.monotonic() + 1.0
    while not eof and (left := drain_until - time.monotonic()) > 0 and select.select([fd], [], [], left)[0]:
        eof = not _read(fd, tail)
        trim()
    trim()
    return bytes(tail), dropped, timed_out


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        # the program made something unwritable; all of it is ours, so give access back and retry
        for parent, dirs, _ in os.walk(path):
            for d in dirs:
                full = os.path.join(parent, d)
                if not os.path.islink(full):  # chmod follows links: never touch what one points at
                    try:
                        os.chmod(full, 0o700)
                    except OSError:
                        pass
        shutil.rmtree(path, ignore_errors=True)


def run_program(code: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Runs `code` as a program in the sandbox (see the module docstring for the layers).
    "passed" means exit code 0, which is how HumanEval and MBPP tests report success; any
    uncaught exception, failed assert or nonzero exit is "failed"."""
    _check(timeout_s, memory_mb)
    tmp = tempfile.mkdtemp(prefix="phi3-sandbox-")
    start = time.monotonic()
    try:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        args = [sys.executable, "-I", "-B", "-c", _BOOTSTRAP,
                str(memory_mb * 2**20), str(FILE_LIMIT_MB * 2**20), str(MAX_PROCESSES)]
        try:
            proc = subprocess.Popen(args, cwd=tmp, env=_child_env(tmp), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            return SandboxResult("error", None, f"sandbox: could not start {sys.executable}: {e}",
                                 time.monotonic() - start)
        with proc:
            tail, dropped, timed_out = _collect(proc, start + timeout_s)
        seconds = time.monotonic() - start
    finally:
        _remove_tree(tmp)
    output = tail.decode("utf-8", errors="replace")
    if dropped:
        output = f"[sandbox: {dropped} earlier bytes of output dropped]\n" + output
    rc = proc.returncode
    if timed_out:
        status = "timeout"
    elif rc == MEMORY_EXIT or rc == -signal.SIGKILL:  # a SIGKILL we did not send: the kernel's OOM killer
        status = "memory"
    elif rc == SETUP_EXIT:
        status = "error"
    else:
        status = "passed" if rc == 0 else "failed"
    return SandboxResult(status, rc, output, seconds)


def run_programs(programs: list[str], timeout_s: float = 10.0, memory_mb: int = 1024, workers: int = 2,
                 progress: bool = False) -> list[SandboxResult]:
    """Runs many programs, `workers` at a time; results in the order of `programs`. Threads are
    enough: each one only waits on its own child process."""
    _check(timeout_s, memory_mb)
    if not workers >= 1:
        raise Phi3Error(f"sandbox workers must be at least 1, got {workers!r}: pass e.g. 2")
    from tqdm import tqdm
    results: list[SandboxResult | None] = [None] * len(programs)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with tqdm(total=len(programs), desc="sandbox", unit="program", file=sys.stderr,
                  disable=not progress) as bar:
            futures = {pool.submit(run_program, p, timeout_s, memory_mb): i for i, p in enumerate(programs)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update(1)
    finally:
        # on Ctrl-C, drop the queued programs instead of running them all before returning
        pool.shutdown(wait=True, cancel_futures=True)
    return results  # type: ignore[return-value]  # every slot is filled once all futures are done


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program openai/human-eval runs: the prompt (signature and docstring) with the
    completion as its body, then the test's `check` called on the entry point."""
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})\n"


def mbpp_program(code: str, test_list: list[str], test_setup_code: str = "") -> str:
    """The solution, then the task's setup (imports or data the asserts use), then its asserts:
    the program passes when no assert fails."""
    parts = [code, test_setup_code, *test_list]
    return "\n".join(p for p in parts if p) + "\n"
