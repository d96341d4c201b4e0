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
"""

from __future__ import annotations

import os
import resource
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

SANDBOX_UID_BASE = 200_000  # slot k runs as uid/gid 200000 + k (no account needed: ids only)
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


def check_available(bwrap: str) -> None:
    """Start one empty sandbox; SandboxUnavailable says why it cannot (no user namespaces, say)."""
    out = run(bwrap, ["/usr/bin/true"], b"", {}, Limits(wall_s=30.0))
    if out.returncode != 0:
        lines = out.stderr.decode(errors="replace").strip().splitlines()
        reason = lines[-1] if lines else f"exit code {out.returncode}"
        raise SandboxUnavailable(f"bubblewrap cannot start a sandbox here ({reason}); "
                                 f"it needs unprivileged user namespaces (kernel.unprivileged_userns_clone, "
                                 f"user.max_user_namespaces) or root")


def command(bwrap: str, argv: Sequence[str], code_dir: str, build: Optional[Tuple[str, bool]] = None) -> List[str]:
    """The bwrap command line around argv (run inside, from the working directory); `build` = (a host
    folder, writable) appears as BUILD_DIR: a compiler's output, read-only to the program built there."""
    links = [part for name in ("bin", "lib", "lib64", "sbin") if os.path.islink(f"/{name}")
             for part in ("--symlink", os.readlink(f"/{name}"), f"/{name}")]
    extra = [] if build is None else ["--bind" if build[1] else "--ro-bind", build[0], BUILD_DIR]
    return [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv", "--cap-drop", "ALL",
            "--ro-bind", "/usr", "/usr", *links, "--proc", "/proc", "--dev", "/dev",
            "--tmpfs", WORK_DIR, "--ro-bind", code_dir, CODE_DIR, *extra, "--chdir", WORK_DIR,
            "--setenv", "HOME", WORK_DIR, "--setenv", "TMPDIR", WORK_DIR, "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "LANG", "C.UTF-8", "--", *argv]


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
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                count += os.stat(entry.path).st_uid == uid
            except OSError:
                pass
    return count


def run(bwrap: str, argv: Sequence[str], stdin: bytes, files: Dict[str, bytes], limits: Limits,
        slot: int = 0, build: Optional[Tuple[str, bool]] = None) -> Outcome:
    """Run argv in a fresh sandbox with `files` under /code, `stdin` fed to it (and `build`, see
    command); never raises for what the program does."""
    with tempfile.TemporaryDirectory(prefix="r1mega-code-") as code_dir:
        for name, data in files.items():
            target = Path(code_dir) / name
            if target.parent != Path(code_dir):
                raise ValueError(f"sandbox file {name!r}: a plain file name, please")
            target.write_bytes(data)
        os.chmod(code_dir, 0o755)  # readable by the slot's uid; the files are 0644
        return _supervise(command(bwrap, argv, code_dir, build), stdin, limits, slot)


def build_folder() -> tempfile.TemporaryDirectory:
    """A host folder for one program's build (BUILD_DIR), writable by any slot's uid."""
    folder = tempfile.TemporaryDirectory(prefix="r1mega-build-")
    os.chmod(folder.name, 0o777)
    return folder


def _supervise(cmd: List[str], stdin: bytes, limits: Limits, slot: int) -> Outcome:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={}, start_new_session=True, preexec_fn=_limit_child(limits, slot), close_fds=True)
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
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if not stream.closed:
            stream.close()
    killed = timed_out or exceeded
    return Outcome(None if killed else returncode, bytes(kept[out_fd]), bytes(kept[err_fd]), timed_out, exceeded,
                   time.monotonic() - start)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL bwrap's process group: its init child dies, and with it the PID namespace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
