"""Untrusted programs (model-written code) run inside a bubblewrap sandbox, with hard limits.

A program runs under `bwrap` with every namespace unshared: no network, no view of the host's
processes, its own user namespace with every capability dropped. It sees the system's /usr read-only
(with the /bin, /lib and /lib64 links of a merged-/usr system), a fresh /proc and /dev, its own
files read-only under /code, and a fresh tmpfs as home and working directory. It sees nothing else:
not the run folder, the checkpoints, the project, /root or /home, and no environment variables.
`--die-with-parent` ties it to the scoring process, `--new-session` keeps it off the terminal.

Limits, set before bwrap starts and inherited by everything inside: CPU seconds, address space,
processes, file size and open files. The parent adds a wall-clock deadline and an output cap; at
either it kills bwrap's process group, and with it the PID namespace, whose init's death takes every
process inside (a daemon that double-forked too).

Two details matter. bwrap itself starts from an empty environment: inside the PID namespace /proc/1
is bwrap's init, whose environ any program can read (bwrap's own --clearenv cleans the child's
only). The process limit counts a real uid's processes everywhere: as root the program gets an
unprivileged uid of its own per worker slot, so a fork bomb exhausts only that slot's allowance.
Run as another user, the limit is that user's: it is raised by the user's current count, so a fork
bomb still stops short of the trainer's processes' ceiling.

The limit counts zombies too. bwrap's init inside the namespace can outlive the outer bwrap for a
moment, so it is orphaned and left to the host's PID 1 to reap, which some inits do late or, where the
trainer itself is PID 1 in a container, never: a slot would run out of processes after a few hundred
programs. The process that runs sandboxes therefore makes itself a child subreaper and reaps those
orphaned bwrap processes itself after each run (only bwrap's: other children are their owners' to wait).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import resource
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

SANDBOX_UID_BASE = 200_000  # slot k runs as uid/gid 200000 + k (no account needed: ids only)
MAX_SLOT_GROUPS = 4096  # processes of one host that run sandboxes at once
SLOTS_PER_GROUP = 64  # the most sandboxes one process runs at once
CODE_DIR = "/code"  # the program's files, read-only
WORK_DIR = "/work"  # its home and working directory, a fresh tmpfs
BUILD_DIR = "/build"  # a compiled program: written by the compiler's sandbox, read by the program's


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing, or cannot create namespaces here."""


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0  # the parent kills everything at this deadline
    cpu_s: int = 10  # RLIMIT_CPU of every process
    memory_mb: int = 1024  # RLIMIT_AS of every process
    processes: int = 64  # RLIMIT_NPROC: processes and threads of the slot's uid
    file_size_mb: int = 16  # RLIMIT_FSIZE: the largest file it may write
    open_files: int = 64  # RLIMIT_NOFILE
    output_bytes: int = 1 << 20  # stdout and stderr kept each; more kills the program
    work_mb: int = 64  # the tmpfs home and working directory (it holds memory outside RLIMIT_AS)


@dataclass
class Outcome:
    returncode: Optional[int]  # None when killed by the parent (deadline or output cap)
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    output_exceeded: bool = False
    seconds: float = 0.0


def bwrap_path(configured: Optional[str] = None) -> str:
    """The bwrap executable: `configured`, else bwrap on PATH (Debian's bubblewrap package)."""
    path = configured or shutil.which("bwrap")
    if not path or not os.access(path, os.X_OK):
        raise SandboxUnavailable(f"bubblewrap is not installed ({configured or 'bwrap on PATH'}); install the "
                                 f"distribution's bubblewrap package")
    return path


def check_available(bwrap: str, argv: Sequence[str] = ("/usr/bin/true",), what: str = "") -> None:
    """Start one sandbox running argv; SandboxUnavailable says why it cannot (no user namespaces, a
    bubblewrap older than 0.7 without --size, `what` missing inside). Run in a process that is not made
    a subreaper by it: the scoring processes are."""
    out = run(bwrap, list(argv), b"", {}, Limits(wall_s=30.0), claim_slots(), reap=False)
    if out.returncode != 0:
        lines = out.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit code {out.returncode}"
        if what:
            raise SandboxUnavailable(f"the sandbox cannot run {what} ({reason})")
        raise SandboxUnavailable(f"bubblewrap cannot start a sandbox here ({reason}); it needs bubblewrap 0.7 or "
                                 f"newer and unprivileged user namespaces (kernel.unprivileged_userns_clone, "
                                 f"user.max_user_namespaces) or root")


_claimed: Dict[int, Tuple[int, int]] = {}  # pid -> (group, its lock file's descriptor)


def claim_slots() -> int:
    """The first of SLOTS_PER_GROUP sandbox slots no other process of this host uses while this one lives.

    Slots are claimed in groups by an exclusive lock on a file per group, which the kernel drops when
    the process exits however it exits: two reward workers, two ranks or two jobs on one host never
    share a uid, so one's fork bomb cannot use up another's process allowance. One group per process."""
    pid = os.getpid()
    if pid not in _claimed:
        folder = Path(tempfile.gettempdir()) / "r1mega-sandbox-slots"
        try:
            folder.mkdir()
            os.chmod(folder, 0o1777)  # every user's processes claim slots here (mkdir's mode obeys the umask)
        except FileExistsError:
            pass
        for group in range(MAX_SLOT_GROUPS):
            try:
                fd = os.open(folder / f"{group}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except PermissionError:  # another user's lock file, unreadable here: a group it uses
                continue
            try:
                os.fchmod(fd, 0o666)
            except PermissionError:
                pass
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _claimed[pid] = (group, fd)
            break
        else:
            raise SandboxUnavailable(f"all {MAX_SLOT_GROUPS} sandbox slot groups of this host are in use "
                                     f"({folder})")
    return _claimed[pid][0] * SLOTS_PER_GROUP


def command(bwrap: str, argv: Sequence[str], code_dir: str, build: Optional[Tuple[str, bool]] = None,
            work_mb: int = 64) -> List[str]:
    """The bwrap command line around argv (run inside, from the working directory); `build` = (a host
    folder, writable) appears as BUILD_DIR: a compiler's output, read-only to the program built there."""
    links = [part for name in ("bin", "lib", "lib64", "sbin") if os.path.islink(f"/{name}")
             for part in ("--symlink", os.readlink(f"/{name}"), f"/{name}")]
    extra = [] if build is None else ["--bind" if build[1] else "--ro-bind", build[0], BUILD_DIR]
    return [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL",
            "--ro-bind", "/usr", "/usr", *links, "--proc", "/proc", "--dev", "/dev",
            "--size", str(work_mb << 20), "--tmpfs", WORK_DIR, "--ro-bind", code_dir, CODE_DIR, *extra,
            "--chdir", WORK_DIR,
            "--setenv", "HOME", WORK_DIR, "--setenv", "TMPDIR", WORK_DIR, "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "LANG", "C.UTF-8",
            # bwrap's own root and /dev are tmpfs mounts of half the host's memory, writable by the program:
            # read-only once everything is mounted (device nodes stay writable; /work is the one place to write)
            "--remount-ro", "/dev", "--remount-ro", "/", "--", *argv]


def _limit_child(limits: Limits, slot: int):
    """preexec_fn: the rlimits, then (as root) the slot's unprivileged ids."""
    root = os.getuid() == 0
    extra = 0 if root else _processes_of(os.getuid())  # a shared uid: the allowance on top of its count

    def apply() -> None:
        for which, value in ((resource.RLIMIT_CPU, limits.cpu_s),
                             (resource.RLIMIT_AS, limits.memory_mb << 20),
                             (resource.RLIMIT_NPROC, limits.processes + extra),
                             (resource.RLIMIT_FSIZE, limits.file_size_mb << 20),
                             (resource.RLIMIT_NOFILE, limits.open_files),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(which, (value, value))
        if root:
            uid = SANDBOX_UID_BASE + slot
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return apply


def _processes_of(uid: int) -> int:
    """Tasks of the uid (threads count: RLIMIT_NPROC counts them, and a trainer has hundreds)."""
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.stat(entry.path).st_uid == uid:
                    count += len(os.listdir(f"{entry.path}/task"))
            except OSError:
                pass
    return count


def run(bwrap: Optional[str], argv: Sequence[str], stdin: bytes, files: Dict[str, bytes], limits: Limits,
        slot: int = 0, build: Optional[Tuple[str, bool]] = None, reap: bool = True) -> Outcome:
    """Run argv in a fresh sandbox with `files` under /code, `stdin` fed to it (and `build`, see
    command); never raises for what the program does. bwrap=None runs it without a sandbox
    (reward.code.sandbox=none): the same limits and folders, and nothing else kept from it.
    reap=False for a one-off run in a process that should not become a subreaper (the trainer)."""
    with tempfile.TemporaryDirectory(prefix="r1mega-code-") as code_dir:
        for name, data in files.items():
            target = Path(code_dir) / name
            if target.parent != Path(code_dir):
                raise ValueError(f"sandbox file {name!r}: a plain file name, please")
            target.write_bytes(data)
            os.chmod(target, 0o644)  # readable by the slot's uid whatever the umask
        os.chmod(code_dir, 0o755)
        if bwrap is not None:
            return _supervise(command(bwrap, argv, code_dir, build, limits.work_mb), stdin, limits, slot,
                              reap=reap, name=os.path.basename(bwrap))
        with tempfile.TemporaryDirectory(prefix="r1mega-work-") as work:
            os.chmod(work, 0o777)
            places = {CODE_DIR: code_dir, WORK_DIR: work, **({BUILD_DIR: build[0]} if build else {})}
            cmd = [_relocate(arg, places) for arg in argv]
            env = {"HOME": work, "TMPDIR": work, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
            return _supervise(cmd, stdin, limits, slot, cwd=work, env=env, reap=reap)


def _relocate(arg: str, places: Dict[str, str]) -> str:
    for inside, outside in places.items():
        if arg == inside or arg.startswith(inside + "/"):
            return outside + arg[len(inside):]
    return arg


def build_folder() -> tempfile.TemporaryDirectory:
    """A host folder for one program's build (BUILD_DIR), writable by any slot's uid."""
    folder = tempfile.TemporaryDirectory(prefix="r1mega-build-")
    os.chmod(folder.name, 0o777)
    return folder


_PR_SET_CHILD_SUBREAPER = 36
_subreaper_of: Optional[int] = None  # the pid that made itself a subreaper (the flag is not inherited)
_spawning = threading.Lock()  # held while a sandbox starts and while orphans are reaped
_live: set = set()  # pids of outer bwraps that a run still waits for


def _become_subreaper() -> None:
    global _subreaper_of
    if _subreaper_of != os.getpid():
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        _subreaper_of = os.getpid()


def _reap_orphans(name: str) -> None:
    """Reap zombie bwrap processes (`name`: the executable's) that became this process's children (see
    the module doc); other children are their owners' to wait for."""
    me = str(os.getpid())
    with _spawning:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) in _live:
                continue
            try:
                with open(f"{entry.path}/stat") as f:
                    comm, rest = f.read().split(" (", 1)[1].rsplit(") ", 1)
                state, ppid = rest.split()[:2]
                if ppid == me and state == "Z" and comm == name[:15]:
                    os.waitpid(int(entry.name), os.WNOHANG)
            except (OSError, IndexError, ValueError):
                pass


def _supervise(cmd: List[str], stdin: bytes, limits: Limits, slot: int, cwd: Optional[str] = None,
               env: Optional[Dict[str, str]] = None, reap: bool = True, name: str = "") -> Outcome:
    if reap:
        _become_subreaper()
    main = threading.current_thread() is threading.main_thread()
    if main:  # a reward time-out (SIGALRM) between the start and the try below would leave it unwatched
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        with _spawning:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=cwd, env=env or {}, start_new_session=True,
                                    preexec_fn=_limit_child(limits, slot), close_fds=True)
            _live.add(proc.pid)
    finally:
        if main:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    outcome = None
    try:
        outcome = _watch(proc, stdin, limits)
        return outcome
    finally:  # also when interrupted (a reward time-out): nothing of the sandbox may outlive the call
        if proc.returncode is None:
            _kill(proc)
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if not stream.closed:
                stream.close()
        with _spawning:
            _live.discard(proc.pid)
        if reap and name:
            _reap_orphans(name)
        if outcome is None or outcome.returncode is None:  # killed: let its processes die before the slot is reused
            _wait_for_slot(slot)


def _wait_for_slot(slot: int, seconds: float = 2.0) -> None:
    """After a kill, until no process of the slot's uid is left alive (as root; its own uid otherwise)."""
    if os.getuid() != 0:
        return
    uid, deadline = SANDBOX_UID_BASE + slot, time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = False
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if os.stat(entry.path).st_uid == uid:
                        with open(f"{entry.path}/stat") as f:
                            alive = f.read().rsplit(")", 1)[1].split()[0] != "Z"
                except OSError:
                    continue
                if alive:
                    break
        if not alive:
            return
        time.sleep(0.02)


def _watch(proc: subprocess.Popen, stdin: bytes, limits: Limits) -> Outcome:
    start = time.monotonic()
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    kept = {out_fd: bytearray(), err_fd: bytearray()}
    timed_out = exceeded = False
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        sel.register(proc.stderr, selectors.EVENT_READ)
        if stdin:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        pending = memoryview(stdin)
        while sel.get_map():
            left = start + limits.wall_s - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=left):
                if key.fileobj is proc.stdin:
                    try:
                        pending = pending[os.write(proc.stdin.fileno(), pending[:65536]):]
                    except (BrokenPipeError, OSError):
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buffer = kept[key.fd]
                room = limits.output_bytes - len(buffer)
                buffer += chunk[:room]
                exceeded = exceeded or len(chunk) > room
            if exceeded:
                break
    if timed_out or exceeded:
        _kill(proc)
    try:
        returncode = proc.wait(timeout=max(1.0, start + limits.wall_s - time.monotonic()))
    except subprocess.TimeoutExpired:  # the pipes closed but the program lives on (it closed them)
        timed_out = True
        _kill(proc)
        returncode = proc.wait()
    killed = timed_out or exceeded
    return Outcome(None if killed else returncode, bytes(kept[out_fd]), bytes(kept[err_fd]), timed_out, exceeded,
                   time.monotonic() - start)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL bwrap's process group: its init child dies, and with it the PID namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
