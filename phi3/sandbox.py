"""Runs model-written Python (HumanEval, MBPP) in a throwaway sandbox, for pass@1.

The code comes from a model, so it is treated as hostile: it may loop forever, eat memory, fork,
print without end, read or delete files, try the network, or attack the sandbox itself through
ctypes, `_posixsubprocess`, a multiprocessing 'spawn' child or the interpreter's own objects. The
boundary is therefore the kernel, not Python: an in-process audit hook cannot stop code running in
the same interpreter (each of those routes got around the hook this module used to rely on).

What a program gets, where the kernel allows user namespaces (checked on Linux 6.18 x86_64, with
phi3 as root in both uid mappings below and as an unprivileged user; aarch64 runs the same code
with its own system call numbers, not tried yet):

1. Namespaces: its own user, mount, PID, network, IPC and UTS namespaces. The network namespace
   has only a loopback device that is down, so every connection fails in the kernel. The PID
   namespace's init is a small process of ours: when the program ends, or the time limit kills
   the sandbox, the kernel kills every process in it, children that called setsid() or were
   double-forked included.
2. Filesystem: a fresh root, a read-only tmpfs holding only /usr (and the /bin, /lib* links or
   directories beside it), the interpreter's prefixes (sys.base_prefix and sys.prefix: a venv or
   pyenv outside /usr), /etc/ld.so.cache and /etc/localtime, all bound read-only, nosuid and nodev;
   a passwd and group naming the program's user; a minimal /dev (null, zero, full, random,
   urandom, and a /dev/shm for multiprocessing's semaphores); a private /tmp; a fresh /proc that
   shows only the sandbox's processes, with /proc/sys read-only. The program's temporary directory
   (its cwd, HOME and TMPDIR, at the same path as outside) is the only writable place on disk.
   Nothing else exists in there: not the user's home or ~/.cache, not /root beyond the
   interpreter, not the repository, not other sandboxes' directories, not /run or /var.
3. Identity: uid and gid SANDBOX_ID inside, no capabilities (effective, permitted, inheritable,
   bounding and ambient sets all empty) and no_new_privs. With phi3 as root the program is not root
   outside either: it is HOST_ID (nobody), which owns its temporary directory and nothing else.
   With phi3 as a normal user, a nested user namespace maps SANDBOX_ID to that user's uid, as
   much as an unprivileged process can do (set HOST_ID = None to get this mapping as root too;
   the program is then uid 0 outside, still without capabilities).
4. seccomp (a 64-bit interpreter on x86_64 or aarch64; skipped elsewhere): a BPF filter, built
   by the parent (`_seccomp_filter`), that answers EPERM to mount, umount, pivot_root, chroot,
   unshare, setns, clone with namespace flags, ptrace,
   process_vm_readv/writev, pidfd_getfd, keyctl, add_key, request_key, bpf, perf_event_open,
   userfaultfd, io_uring, kexec, module loading, mknod and mknodat (os.mkfifo too, even in the
   program's own directory), every xattr setter and remover, the new mount API, quotactl,
   swapon/swapoff, reboot, acct, syslog, open_by_handle_at, fanotify_init, iopl/ioperm, and to
   socket() for any family but AF_UNIX. clone3 gets ENOSYS (its flags lie in memory a filter cannot
   read; the C library then uses clone). A system call of another architecture (i386 on x86_64)
   kills the process; x32 calls get EPERM.
5. Resource limits, soft = hard so the program cannot raise them: RLIMIT_AS (memory_mb; a
   MemoryError becomes exit code MEMORY_EXIT and status "memory"), RLIMIT_FSIZE (no file over
   FILE_LIMIT_MB), RLIMIT_CORE 0 and RLIMIT_NPROC (MAX_PROCESSES processes and threads). The kernel
   exempts uid 0 from RLIMIT_NPROC; now that the program is not root, a fork bomb stops there.
6. The audit hook (`sys.addaudithook`), kept as a second layer because it turns ordinary mistakes
   into a readable PermissionError: no sockets but AF_UNIX, no connect, bind, sendto or name
   lookups; no subprocess, os.system, exec or spawn; no signals outside the program's process
   group; no writes, removals, renames, links, chmod/chown, truncate, utime or mkdir outside its
   directory. It is not a boundary; the layers above are.
7. In the parent: a wall-clock limit, after which the sandbox's process group is SIGKILLed (its
   init with it, and so everything in the PID namespace); output (stdout and stderr merged) is
   read as it comes, keeping the last OUTPUT_LIMIT bytes.

Each SandboxResult lists the layers that were in place (`layers`); `active_layers()` runs one
empty program and returns them, for eval records and the CLI.

Fallback. Where the kernel refuses the namespaces (a container without user namespaces, a
seccomp profile that forbids unshare, a normal user under kernel.unprivileged_userns_clone=0
or user.max_user_namespaces=0), the sandbox
does what it did before and `layers` says so: user and network namespaces with an identity uid
map, else a network namespace alone (root with CAP_SYS_ADMIN), else none; then the limits,
seccomp (it needs no namespace) and the audit hook. There the program runs as phi3's own uid and
sees the real filesystem: the routes around the hook (ctypes, `_posixsubprocess`, spawn
children, the hook's own state) can write wherever that uid can, and a setsid() child outlives
the kill. Where a single step fails (a kernel that refuses a fresh /proc or the private root; a
user namespace without capabilities, as under Ubuntu's AppArmor restriction) the other layers
still apply and `layers` lacks the missing ones. Without mount_setattr (Linux < 5.12) only the
top of each read-only bind is remounted read-only.

What it does not do: limit CPU time beyond the wall clock; limit disk use in the temporary
directory beyond FILE_LIMIT_MB per file; count the two FILE_LIMIT_MB tmpfs mounts (/tmp,
/dev/shm) against the memory limit; hide /usr, the interpreter's prefixes (site-packages
included) or what /proc tells about the machine (CPUs, memory, kernel version, uptime); stop
timing side channels or attacks on kernel bugs through the system calls it allows. Programs run
as "__main__" with stdin on /dev/null; the interpreter starts with -I -B -S (the bootstrap puts
site-packages on sys.path, without running their .pth files).

Cost: the layers add a few milliseconds of namespace and mount set-up per program (and three
forks); the bootstrap wins that back by being compiled once in the parent, skipping site's
startup (an editable install's .pth import finder alone took ~14 ms) and skipping the
interpreter's final teardown (5-30 ms). Measured on the 2-core development VM, alternating with
the audit-hook-only sandbox of before, under a load of 4-7 from other jobs: 50 trivial programs
with 2 workers ran at 21.4 / 10.4 / 14.1 programs/s (medians of three sessions) against 22.9 /
12.0 / 13.5 before; HumanEval's 164 canonical solutions took 6.4-8.2 s either way, all passing.
"""

from __future__ import annotations

import base64
import json
import marshal
import os
import select
import shutil
import signal
import site
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache

from phi3.errors import Phi3Error

OUTPUT_LIMIT = 64 * 1024  # bytes of output kept (the tail: tracebacks and failed asserts come last)
FILE_LIMIT_MB = 64  # RLIMIT_FSIZE: largest file a program may write; also the size of its /tmp and /dev/shm
MAX_PROCESSES = 64  # RLIMIT_NPROC (processes and threads) of the program's uid in its user namespace
MEMORY_EXIT = 97  # the bootstrap's exit code after an uncaught MemoryError
SETUP_EXIT = 98  # the bootstrap's exit code when it could not apply the limits
SANDBOX_ID = 1000  # the program's uid and gid inside its user namespace
HOST_ID: int | None = 65534  # ...and outside it, when phi3 runs as root (nobody / nogroup); None: phi3's own uid
_MIN_MEMORY_MB = 64  # below this the interpreter itself cannot start its work
_AUDIT_HOOK = True  # tests turn it off to show that the kernel layers hold on their own
_NAMESPACES = True  # tests turn it off to see the fallback of a kernel that refuses them

# System call numbers for the seccomp filter, per architecture. Numbers from 424 up are the same
# everywhere; x86_64's are checked against <asm/unistd_64.h>, aarch64's against
# <asm-generic/unistd.h> (tests/test_sandbox.py does so where the headers are installed).
_NEW_SYSCALLS = {"pidfd_getfd": 438, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431,
                 "fsmount": 432, "fspick": 433, "mount_setattr": 442, "open_tree_attr": 467,
                 "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "quotactl_fd": 443,
                 "setxattrat": 463, "removexattrat": 466, "file_setattr": 469, "clone3": 435}
_SYSCALLS = {
    "x86_64": {"mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
               "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "keyctl": 250, "add_key": 248,
               "request_key": 249, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "kexec_load": 246,
               "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
               "mknod": 133, "mknodat": 259, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
               "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "swapon": 167, "swapoff": 168,
               "reboot": 169, "acct": 163, "syslog": 103, "quotactl": 179, "name_to_handle_at": 303,
               "open_by_handle_at": 304, "fanotify_init": 300, "iopl": 172, "ioperm": 173, "uselib": 134,
               "vhangup": 153, "lookup_dcookie": 212, "socket": 41, "clone": 56, **_NEW_SYSCALLS},
    "aarch64": {"mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268,
                "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "keyctl": 219, "add_key": 217,
                "request_key": 218, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "kexec_load": 104,
                "kexec_file_load": 294, "init_module": 105, "finit_module": 273, "delete_module": 106,
                "mknodat": 33, "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14,
                "lremovexattr": 15, "fremovexattr": 16, "swapon": 224, "swapoff": 225, "reboot": 142, "acct": 89,
                "syslog": 116, "quotactl": 60, "name_to_handle_at": 264, "open_by_handle_at": 265,
                "fanotify_init": 262, "vhangup": 58, "lookup_dcookie": 18, "socket": 198, "clone": 220,
                **_NEW_SYSCALLS},
}
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
# Answered with EPERM: whatever changes mounts or namespaces, reaches into another process, loads
# code into the kernel, makes device nodes or fifos, sets extended attributes, or opens a door the
# rest of the filter cannot see (io_uring runs system calls of its own).
_DENIED = ("mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount", "fsopen",
           "fsconfig", "fsmount", "fspick", "mount_setattr", "open_tree_attr", "ptrace", "process_vm_readv",
           "process_vm_writev", "pidfd_getfd", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
           "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "kexec_load",
           "kexec_file_load", "init_module", "finit_module", "delete_module", "mknod", "mknodat", "setxattr",
           "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "setxattrat",
           "removexattrat", "file_setattr", "swapon", "swapoff", "reboot", "acct", "syslog", "quotactl",
           "quotactl_fd", "name_to_handle_at", "open_by_handle_at", "fanotify_init", "iopl", "ioperm", "uselib",
           "vhangup", "lookup_dcookie")
_NAMESPACE_FLAGS = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_AF_UNIX = 1
(_BPF_LD_ABS, _BPF_JEQ, _BPF_JGE, _BPF_JSET, _BPF_RET) = (0x20, 0x15, 0x35, 0x45, 0x06)  # with BPF_W / BPF_K
_RET_KILL_PROCESS, _RET_ALLOW, _RET_EPERM, _RET_ENOSYS = 0x80000000, 0x7FFF0000, 0x50000 | 1, 0x50000 | 38


def _machine() -> str | None:
    """The architecture whose system calls this interpreter makes, where the filter knows it: a
    32-bit interpreter on a 64-bit kernel makes the other architecture's calls."""
    machine = os.uname().machine if hasattr(os, "uname") else ""
    return machine if machine in _SYSCALLS and struct.calcsize("P") == 8 else None


def _seccomp_filter(machine: str | None) -> bytes | None:
    """The seccomp program of the module docstring, as the kernel's struct sock_filter array
    (classic BPF over struct seccomp_data: nr at offset 0, arch at 4, args[i] at 16 + 8i, of which
    the low 32 bits are read, enough for a socket family and clone's namespace flags); None for an
    architecture without a table."""
    if machine is None:
        return None
    nr = _SYSCALLS[machine]
    prog = [(_BPF_LD_ABS, 0, 0, 4), (_BPF_JEQ, 1, 0, _AUDIT_ARCH[machine]), (_BPF_RET, 0, 0, _RET_KILL_PROCESS),
            (_BPF_LD_ABS, 0, 0, 0)]
    if machine == "x86_64":
        prog += [(_BPF_JGE, 0, 1, 0x40000000), (_BPF_RET, 0, 0, _RET_EPERM)]  # the x32 ABI's calls
    for number in sorted({nr[name] for name in _DENIED if name in nr}):
        prog += [(_BPF_JEQ, 0, 1, number), (_BPF_RET, 0, 0, _RET_EPERM)]
    prog += [(_BPF_JEQ, 0, 1, nr["clone3"]), (_BPF_RET, 0, 0, _RET_ENOSYS),
             (_BPF_JEQ, 0, 4, nr["socket"]), (_BPF_LD_ABS, 0, 0, 16), (_BPF_JEQ, 0, 1, _AF_UNIX),
             (_BPF_RET, 0, 0, _RET_ALLOW), (_BPF_RET, 0, 0, _RET_EPERM),
             (_BPF_JEQ, 0, 4, nr["clone"]), (_BPF_LD_ABS, 0, 0, 16), (_BPF_JSET, 0, 1, _NAMESPACE_FLAGS),
             (_BPF_RET, 0, 0, _RET_EPERM), (_BPF_RET, 0, 0, _RET_ALLOW),
             (_BPF_RET, 0, 0, _RET_ALLOW)]
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


# `python -I -B -S -c _LOADER CONFIG_JSON CODE` runs the bootstrap below, compiled by the parent.
# -S: site's startup (the .pth files: an editable install's import finder alone took ~14 ms per
# program) is skipped; the bootstrap adds site-packages to sys.path and site's exit()/quit() itself.
_LOADER = "import binascii, marshal, sys, zlib; exec(marshal.loads(zlib.decompress(binascii.a2b_base64(sys.argv[2]))))"

# The bootstrap runs with cwd = the temporary directory holding program.py, as a single-threaded
# process ("S") that phi3 starts without preexec_fn (phi3 starts sandboxes from several threads,
# where preexec_fn can deadlock). S enters the namespaces (as root, a forked helper that stays
# outside writes its uid map) and forks B, the PID namespace's init, which builds the private root
# and forks C, which drops its privileges, sets the limits and the seccomp filter and runs the
# program in this same interpreter (a second interpreter start would cost ~20 ms per program).
# S and B end the way C did. The standard library only.
_BOOTSTRAP = r'''
import _socket, json, os, resource, signal, stat, struct, sys, traceback
MEMORY_EXIT, SETUP_EXIT, ID = @MEMORY_EXIT@, @SETUP_EXIT@, @SANDBOX_ID@
cfg = json.loads(sys.argv[1])
HOST_ID = cfg["host_id"]
layers = []
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    libc.unshare.argtypes = [ctypes.c_int]
except (ImportError, OSError, AttributeError):
    libc = None

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 4, 24, 38, 22
SYSCALLS = cfg["syscalls"]  # {"pivot_root": nr, "mount_setattr": nr} on a known architecture, else None


def check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def b(s):
    return None if s is None else os.fsencode(s)


def mount(src, dst, fstype=None, flags=0, data=None):
    check(libc.mount(b(src), b(dst), b(fstype), flags, b(data)), f"mount {dst}")


def restrict(path, readonly=True, recursive=True):
    """nosuid, nodev and (by default) read-only for the mount at path and, with mount_setattr
    (Linux 5.12+), every mount under it; else a remount of its top keeping the flags the kernel
    locks in a user namespace (noexec; atime is kept by the kernel)."""
    attr = (1 if readonly else 0) | 2 | 4  # MOUNT_ATTR_RDONLY, NOSUID, NODEV
    if SYSCALLS is not None:
        buf = ctypes.create_string_buffer(struct.pack("QQQQ", attr, 0, 0, 0))
        if libc.syscall(ctypes.c_long(SYSCALLS["mount_setattr"]), ctypes.c_int(-100), b(path), ctypes.c_uint(0x8000 if recursive else 0),
                        buf, ctypes.c_size_t(32)) == 0:
            return
    flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV | (MS_RDONLY if readonly else 0)
    mount(None, path, None, flags | (os.statvfs(path).f_flag & MS_NOEXEC))


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces():
    """Unshares everything; returns how ids are mapped ("range": uid ID is HOST_ID outside,
    written by a helper that is still root outside; "self": our own uid is root inside;
    "unmapped") or None when the kernel refused."""
    if libc is None or not cfg["namespaces"]:
        return None
    uid, gid = os.getuid(), os.getgid()
    helper = None
    if os.geteuid() == 0 and HOST_ID is not None:
        # Only a process with CAP_SETUID outside may map more than its own uid, and we lose
        # that by unsharing: a child that stays outside writes our maps.
        r, w = os.pipe()
        helper = os.fork()
        if helper == 0:
            os.close(w)
            code = 2
            try:
                if os.read(r, 1) == b"1":
                    code = 1
                    for name in ("uid_map", "gid_map"):
                        write(f"/proc/{os.getppid()}/{name}", f"0 0 1\n{ID} {HOST_ID} 1\n")
                    code = 0
            except OSError:
                pass
            os._exit(code)
        os.close(r)
    ok = libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS) == 0
    if helper is not None:
        os.write(w, b"1" if ok else b"0")
        os.close(w)
        ranged = os.waitpid(helper, 0)[1] == 0
    if not ok:
        return None
    if helper is not None and ranged:
        return "range"
    try:
        for name, outer in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/self/{name}") as f:
                if f.read():
                    continue  # the helper got this one written
            if name == "gid_map":
                write("/proc/self/setgroups", "deny")  # required before an unprivileged gid_map
            write(f"/proc/self/{name}", f"0 {outer} 1")
        return "self"
    except OSError:
        return "unmapped"  # e.g. a user namespace without capabilities (AppArmor); the steps below fail softly


def build_root(directory):
    """The private root (see the module docstring), built on a tmpfs over the program's own
    directory (a place that surely exists and is ours), then pivoted into."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount may propagate outside
    held = []

    def hold(path):  # sources are opened before the staging tmpfs covers anything
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        held.append(fd)
        return f"/proc/self/fd/{fd}"

    plan = []
    for path in ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", *cfg["ro"],
                 "/etc/ld.so.cache", "/etc/localtime"]:
        if path == "/" or directory == path or directory.startswith(path.rstrip("/") + "/"):
            continue  # never the folder holding our directory: other sandboxes' directories are there
        if os.path.islink(path):
            plan.append((path, None, os.readlink(path)))
        elif os.path.exists(path):
            plan.append((path, hold(path), None))
    devices = [(name, hold("/dev/" + name)) for name in ("null", "zero", "full", "random", "urandom")
               if os.path.exists("/dev/" + name)]
    own = hold(directory)
    root = directory
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")

    def place(path, is_dir):
        target = root + path
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if is_dir:
            os.makedirs(target, mode=0o755, exist_ok=True)
        elif not os.path.lexists(target):
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
        return target

    # /tmp first: read-only paths may lie under it (a venv in /tmp)
    size = f"size={cfg['fsize'] // 2**20}m,mode=1777"
    mount("tmpfs", place("/tmp", True), "tmpfs", MS_NOSUID | MS_NODEV, size)
    target = place(directory, True)
    mount(own, target, None, MS_BIND)
    restrict(target, readonly=False, recursive=False)
    for path, source, link in plan:
        if link is not None:
            os.makedirs(os.path.dirname(root + path), mode=0o755, exist_ok=True)
            os.symlink(link, root + path)
            continue
        target = place(path, stat.S_ISDIR(os.stat(source).st_mode))
        mount(source, target, None, MS_BIND | MS_REC)
        restrict(target)
    write(place("/etc/passwd", False), f"root:x:0:0:root:/:/bin/sh\nsandbox:x:{ID}:{ID}:sandbox:{directory}:/bin/sh\n")
    write(place("/etc/group", False), f"root:x:0:\nsandbox:x:{ID}:\n")
    mount("tmpfs", place("/dev", True), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64k,mode=755")
    for name, source in devices:
        mount(source, place("/dev/" + name, False), None, MS_BIND)
    for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                       ("stderr", "/proc/self/fd/2")):
        os.symlink(link, root + "/dev/" + name)
    mount("tmpfs", place("/dev/shm", True), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, size)
    restrict(root + "/dev", recursive=False)
    try:
        mount("proc", place("/proc", True), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        for name in ("sys", "sysrq-trigger", "irq", "bus", "fs"):
            path = root + "/proc/" + name
            if os.path.exists(path):
                mount(path, path, None, MS_BIND | MS_REC)
                restrict(path)
        fresh_proc = True
    except OSError:
        fresh_proc = False  # a kernel that refuses a fresh procfs (host /proc partly covered): /proc stays empty
    restrict(root, recursive=False)
    os.chdir(root)
    if SYSCALLS is not None:
        check(libc.syscall(ctypes.c_long(SYSCALLS["pivot_root"]), b".", b"."), "pivot_root")
        check(libc.umount2(b".", 2), "umount the old root")  # MNT_DETACH
    else:
        os.chroot(".")
    for fd in held:
        os.close(fd)
    os.chdir(directory)
    layers.extend(["private-root", "proc"] if fresh_proc else ["private-root"])


def drop_privileges(mapping):
    """uid ID without capabilities: setresuid where the namespace maps ID, else a nested user
    namespace mapping ID to our uid (then capset clears what that namespace gave us)."""
    if mapping == "range":
        for cap in range(64):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                break
        os.setgroups([])
        os.setresgid(ID, ID, ID)
        os.setresuid(ID, ID, ID)  # from 0 to non-zero: the kernel clears the capabilities
    else:
        # the maps are written through /proc, absent where the kernel refused a fresh one
        if mapping == "self" and os.path.exists("/proc/self/uid_map") and libc.unshare(CLONE_NEWUSER) == 0:
            write("/proc/self/setgroups", "deny")
            write("/proc/self/uid_map", f"{ID} 0 1")
            write("/proc/self/gid_map", f"{ID} 0 1")
        for cap in range(64):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                break
        data = (ctypes.c_uint32 * 6)()
        check(libc.capset(struct.pack("Ii", 0x20080522, 0), data), "capset")  # _LINUX_CAPABILITY_VERSION_3


def seccomp():
    """Installs the filter the parent built (see _seccomp_filter); returns whether the kernel took it."""
    if libc is None or cfg["seccomp"] is None:
        return False
    code = ctypes.create_string_buffer(bytes.fromhex(cfg["seccomp"]))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", len(code.raw) // 8, ctypes.addressof(code)))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    layers.append("no-new-privs")
    return libc.prctl(PR_SET_SECCOMP, 2, ctypes.addressof(fprog), 0, 0) == 0  # SECCOMP_MODE_FILTER


def limit(kind, value):
    hard = resource.getrlimit(kind)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def fallback():
    """The sandbox of before, where the kernel refused the namespaces; returns whether we are
    in a new user namespace."""
    if libc is None:
        return False
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
        layers.extend(["user-ns", "net-ns"])
        try:  # an identity map: without one the uid shows as 65534 and new files may be refused
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                write(f"/proc/self/{name}", text)
        except OSError:
            pass
        return True
    if libc.unshare(CLONE_NEWNET) == 0:  # user namespaces disabled but CAP_SYS_ADMIN held: network alone
        layers.append("net-ns")
    return False


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


def setup_program(in_userns):
    """Limits, seccomp and the report of the layers, in the process that runs the program."""
    limit(resource.RLIMIT_AS, cfg["memory"])
    limit(resource.RLIMIT_FSIZE, cfg["fsize"])
    limit(resource.RLIMIT_CORE, 0)
    if in_userns:  # outside one it counts every process of the user, so a small limit would fail for unrelated reasons
        limit(resource.RLIMIT_NPROC, cfg["nproc"])
    layers.append("rlimits")
    if os.getuid() != 0 and os.geteuid() != 0:
        layers.append("uid-nonroot")
    if mapping == "range" or OUTER_UID != 0:
        layers.append("host-uid-nonroot")
    try:
        with open("/proc/self/status") as f:
            caps = {k: int(v, 16) for k, v in (line.split(":", 1) for line in f) if k in ("CapPrm", "CapEff", "CapBnd")}
        if len(caps) == 3 and not any(caps.values()):
            layers.append("no-caps")
    except (OSError, ValueError):
        pass
    if seccomp():
        layers.append("seccomp")
    if cfg["audit"]:
        layers.append("audit-hook")
    os.write(cfg["report"], json.dumps(layers).encode())
    os.close(cfg["report"])


def forward(status):
    """Ends this process the way the program ended (the exit code, or the signal that killed it)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else SETUP_EXIT)


def init(mapping, status_fd):
    """B: PID 1 of the sandbox. Builds the root, forks the program, reaps orphans until the
    program ends, then exits, and the kernel kills whatever is left in the namespace."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # if S is killed, so is the sandbox
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # the program cannot open our /proc/1 files
    directory = cfg["dir"]
    try:
        _socket.sethostname("sandbox")  # the machine's name is none of the program's business
    except OSError:
        pass
    try:
        build_root(directory)
    except OSError:
        libc.umount2(b(directory), 2)  # whatever was staged over the directory goes; the rest still applies
        os.chdir(directory)
    program = os.fork()
    if program == 0:
        os.close(status_fd)
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # B's setting is inherited; it would make /proc/self ours, not the program's
        os.setpgid(0, 0)  # our own process group, so the audit hook's signal rule has a group to name
        drop_privileges(mapping)
        setup_program(True)
        return
    os.close(cfg["report"])
    status = None
    while True:
        try:
            pid, st = os.wait()
        except ChildProcessError:
            break
        if pid == program:
            status = st
            break
    os.write(status_fd, str(status).encode() if status is not None else b"")
    os._exit(0)


OUTER_UID = os.getuid()
try:
    limit(resource.RLIMIT_CORE, 0)
    mapping = enter_namespaces()
    if mapping is None:
        setup_program(fallback())
    else:
        layers.extend(["user-ns", "mount-ns", "pid-ns", "net-ns", "ipc-ns", "uts-ns"])
        if mapping == "range":
            os.chown(".", ID, ID)  # the program's uid owns its directory (HOST_ID outside)
        r, w = os.pipe()
        if os.fork():  # S: wait for the sandbox and end as its program did
            os.close(w)
            os.close(cfg["report"])
            status = os.wait()[1]
            data = os.read(r, 32)
            forward(int(data) if data else status)
        os.close(r)
        init(mapping, w)
    with open("program.py", "rb") as f:
        source = f.read()
    hook = make_hook(os.path.realpath(os.getcwd()))
except BaseException:
    traceback.print_exc()
    print("sandbox: could not set up the limits", file=sys.stderr)
    os._exit(SETUP_EXIT)

import site  # -S skipped its startup: the site-packages directories and exit()/quit() are still expected
site.setquit()
site.setcopyright()
site.sethelper()
sys.path.extend(p for p in cfg["site"] if p not in sys.path)
sys.stdout.reconfigure(line_buffering=True)  # what was printed before a timeout kill still arrives
sys.argv = ["program.py"]
main = type(sys)("__main__")
main.__file__ = "program.py"
sys.modules["__main__"] = main  # so pickle (multiprocessing) finds the program's functions
status = 0
try:
    code = compile(source, "program.py", "exec")  # here, so a SyntaxError is the program's failure
    del source
    if cfg["audit"]:
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
except SystemExit as e:  # what the interpreter does with it
    if e.code is None:
        status = 0
    elif isinstance(e.code, int):
        status = e.code & 0xFF
    else:
        print(e.code, file=sys.stderr)
        status = 1
except BaseException as e:
    e.__traceback__ = e.__traceback__.tb_next  # without this bootstrap's own frame
    sys.excepthook(type(e), e, e.__traceback__)
    status = 1
# The interpreter's shutdown, less what only frees memory (module teardown and the last garbage
# collection took 5-30 ms per program): non-daemon threads are joined, atexit functions run
# (multiprocessing's among them), the standard streams are flushed.
try:
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    import atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    traceback.print_exc()
    status = status or 1
os._exit(status)
'''.replace("@MEMORY_EXIT@", str(MEMORY_EXIT)).replace("@SETUP_EXIT@", str(SETUP_EXIT)).replace(
    "@SANDBOX_ID@", str(SANDBOX_ID))


@dataclass
class SandboxResult:
    """One program's outcome; `output` is kept so a failure can be read without rerunning it."""

    status: str  # "passed" | "failed" | "timeout" | "memory" | "error" (the sandbox could not start)
    returncode: int | None  # None when the process never started
    output: str  # the tail of stdout and stderr, interleaved as written
    seconds: float  # wall clock from start to exit (or kill)
    # The isolation that was in place (see the module docstring): "user-ns", "mount-ns", "pid-ns",
    # "net-ns", "ipc-ns", "uts-ns", "private-root", "proc", "uid-nonroot" (not uid 0 inside),
    # "host-uid-nonroot" (nor outside), "no-caps", "no-new-privs", "seccomp", "rlimits",
    # "audit-hook"; empty when the sandbox did not get as far as running the program.
    layers: tuple[str, ...] = ()


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


@lru_cache(maxsize=4)
def _compiled(source: str) -> str:
    """The bootstrap compiled once per phi3 process (compiling it in each child cost ~10 ms),
    marshalled for the same interpreter, compressed (72 KB of marshal data become ~20 KB; one
    argument may hold at most 128 KB) and in base64 for the command line."""
    return base64.b64encode(zlib.compress(marshal.dumps(compile(source, "<sandbox>", "exec")), 9)).decode()


@lru_cache(maxsize=1)
def _seccomp_arg() -> str | None:
    program = _seccomp_filter(_machine())
    return None if program is None else program.hex()


def _mount_syscalls() -> dict[str, int] | None:
    """The system calls the C library has no wrapper for, by number, for the bootstrap."""
    machine = _machine()
    return None if machine is None else {k: _SYSCALLS[machine][k] for k in ("pivot_root", "mount_setattr")}


def _site_packages() -> list[str]:
    """Where installed packages are (the venv's site-packages): the child runs with -S."""
    getsitepackages = getattr(site, "getsitepackages", None)  # missing in some old virtualenvs
    return list(getsitepackages()) if getsitepackages else [p for p in sys.path if p.endswith("-packages")]


def _readonly_paths() -> list[str]:
    """The interpreter's own directories, bound read-only into the sandbox beside /usr: the
    program imports the standard library and site-packages from there, and a multiprocessing
    'spawn' child starts sys.executable. Outermost first; those under /usr are there anyway."""
    candidates = []
    for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix,
              os.path.dirname(os.path.dirname(sys.executable))):
        if p:
            candidates += [os.path.abspath(p), os.path.realpath(p)]  # both: the interpreter may use either
    paths: list[str] = []
    for p in sorted(set(candidates), key=len):
        if p == "/" or p == "/usr" or p.startswith("/usr/"):
            continue
        if not any(p == q or p.startswith(q + "/") for q in paths):
            paths.append(p)
    return paths


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
        # the program reports its layers on a pipe of their own, before it runs anything of its own
        report_r, report_w = os.pipe()
        config = {"memory": memory_mb * 2**20, "fsize": FILE_LIMIT_MB * 2**20, "nproc": MAX_PROCESSES,
                  "dir": os.path.realpath(tmp), "ro": _readonly_paths(), "site": _site_packages(),
                  "host_id": HOST_ID, "report": report_w, "audit": _AUDIT_HOOK, "namespaces": _NAMESPACES,
                  "seccomp": _seccomp_arg(), "syscalls": _mount_syscalls()}
        args = [sys.executable, "-I", "-B", "-S", "-c", _LOADER, json.dumps(config), _compiled(_BOOTSTRAP)]
        try:
            try:
                proc = subprocess.Popen(args, cwd=tmp, env=_child_env(tmp), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                        pass_fds=(report_w,))
            except OSError as e:
                return SandboxResult("error", None, f"sandbox: could not start {sys.executable}: {e}",
                                     time.monotonic() - start)
            finally:
                os.close(report_w)
            with proc:
                tail, dropped, timed_out = _collect(proc, start + timeout_s)
            seconds = time.monotonic() - start
            layers = _read_layers(report_r)
        finally:
            os.close(report_r)
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
    return SandboxResult(status, rc, output, seconds, layers)


def _read_layers(fd: int) -> tuple[str, ...]:
    os.set_blocking(fd, False)  # every writer has exited or closed it by now; never wait on it anyway
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return ()
    try:
        return tuple(str(x) for x in json.loads(data)) if data else ()
    except ValueError:
        return ()


def active_layers() -> tuple[str, ...]:
    """The layers this machine gives a program (runs an empty one, once per process and
    setting), for eval records and the CLI: see SandboxResult.layers."""
    return _probe(HOST_ID, _AUDIT_HOOK, _NAMESPACES)


@lru_cache(maxsize=8)
def _probe(*settings: object) -> tuple[str, ...]:
    return run_program("pass", timeout_s=30).layers


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
