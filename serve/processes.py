"""The processes `loraplex serve` started, found and ended whatever happened to the ones in between.

A local server is a tree: the CLI starts Ray's node processes (GCS, raylet, ...), the raylet starts the
Serve actors' workers, an engine replica starts vLLM's engine core, which starts its worker. A signal to the
CLI's whole process group (systemd's default stop, a supervisor's) kills the GCS and raylet at once; the
workers and engines below them then lose the parents that would have cleaned them up and live on with
parent 1, holding gigabytes. So the CLI makes itself a *child subreaper* (Linux `prctl`): orphans among its
descendants are re-parented to it, not to init, and `sweep` ends every descendant that is still there when
the CLI stops. Processes whose own parent died while the CLI was killed outright (SIGKILL of the group)
end through `die_with_parent`, which the replicas and the engine processes call on themselves.

A signal to the CLI's whole process group (systemd's `KillMode=control-group`, `kill -- -PGID`) must drain like a
signal to the CLI alone, yet a SIGKILL to that group must still end everything. Process groups alone cannot do
both, so a local `loraplex serve` runs as two processes (`supervise`): a small supervisor stays in the caller's
group and forwards SIGINT, SIGTERM and SIGHUP to the server, which runs in a group of its own with Ray's daemons.
A group SIGTERM then reaches the supervisor alone and the server drains; a group SIGKILL kills the supervisor, and
the server, which follows it through a pipe (`follow_supervisor`), kills its own group at once: the same processes
die as when everything was in one group, and what is below them dies with its parent as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger("loraplex")
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
KILL_ROUNDS_S = 10.0
DIE_WITH_PARENT_ENV = "LORAPLEX_DIE_WITH_PARENT"
"""Set (to 1) in the deployments' environment, which their vLLM processes inherit: each asks to die with its
parent (`die_with_parent_if_asked`). Not a default of the functions, so tests and libraries are not affected."""
SUPERVISOR_FD_ENV = "LORAPLEX_SUPERVISOR_FD"
"""Set by `supervise` in the server's environment: the descriptor of the pipe whose other end the supervisor holds."""
FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM, signal.SIGHUP: signal.SIGTERM}
"""The signals the supervisor passes on, and as what (a closed terminal stops the server like SIGTERM)."""


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(option, value, 0, 0, 0)) == 0


def become_subreaper() -> bool:
    """Orphaned descendants of this process are re-parented to it (so `sweep` finds them); False if unsupported."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(signum: int = signal.SIGKILL) -> bool:
    """Asks the kernel to send `signum` to this process when its parent dies; False if unsupported.

    If the parent already died (this process was re-parented before the call), the signal is sent at once.
    """
    parent = os.getppid()
    if not _prctl(PR_SET_PDEATHSIG, signum):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signum)
    return True


def die_with_parent_if_asked() -> bool:
    """`die_with_parent` when `DIE_WITH_PARENT_ENV` is set: a Ray worker with its raylet, an engine process with
    the replica that spawned it, its worker with the engine core."""
    return os.environ.get(DIE_WITH_PARENT_ENV) == "1" and die_with_parent()


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first, then parent), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie is already dead: only its exit status is left to collect)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def program(pid: int) -> str:
    """The program `pid` runs (its argv[0]), or "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    """Every live process's parent, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(entry.name)) is not None and fields[0] not in ("Z", "X"):
            parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int | None = None) -> list[int]:
    """The live processes below `pid` (this process by default), parents before children."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    frontier = [root]
    while frontier:
        below = [child for parent in frontier for child in children.get(parent, [])]
        found += below
        frontier = below
    return found


def reap() -> None:
    """Collects the exit status of children that ended (orphans re-parented here become our children)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def sweep(grace_s: float = 5.0) -> list[int]:
    """Ends every process still below this one: SIGTERM, then SIGKILL after `grace_s`. Returns those it found."""
    found = descendants()
    if not found:
        return []
    logger.warning("stopping %d processes left behind: %s", len(found), found)
    for pid in found:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        reap()
        if not set(found) & set(descendants()):
            return found
        time.sleep(0.1)
    # SIGKILL until none is left: a dying parent (a raylet) may still have started a child (an agent) meanwhile.
    deadline = time.monotonic() + KILL_ROUNDS_S
    while (left := descendants()) and time.monotonic() < deadline:
        for pid in left:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.2)
        reap()
    if left:
        logger.error("processes still running after the sweep: %s", left)
    return found


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def node_processes_alive(children: list[int]) -> Callable[[], bool]:
    """Whether the local Ray cluster's GCS and raylet (among `children`, started by this process) still run."""
    watched = [pid for pid in children if program(pid).endswith(("gcs_server", "raylet"))]
    return lambda: all(alive(pid) for pid in watched)


def supervised() -> bool:
    """Whether this process is a server that `supervise` started."""
    return SUPERVISOR_FD_ENV in os.environ


def supervise(command: list[str]) -> int:
    """Runs `command` (this CLI again) in a process group of its own and waits for it, passing on the stop signals
    this process gets (`FORWARDED`); returns its exit status (128 + N if signal N ended it, as a shell says).

    The server keeps this process's session. It holds the read end of a pipe whose write end only this process
    has: when this process dies, however, the server's `follow_supervisor` sees the pipe close.
    """
    read_end, write_end = os.pipe()
    env = dict(os.environ, **{SUPERVISOR_FD_ENV: str(read_end)})
    server = subprocess.Popen(command, env=env, pass_fds=(read_end,), process_group=0)
    os.close(read_end)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            server.send_signal(FORWARDED[signal.Signals(signum)])

    for signum in FORWARDED:
        signal.signal(signum, forward)
    try:
        code = server.wait()  # retried after each signal handler (PEP 475)
    finally:
        os.close(write_end)
    return code if code >= 0 else 128 - code


def follow_supervisor() -> bool:
    """In a server that `supervise` started: when the supervisor dies (a SIGKILL of the caller's group, which the
    supervisor is in and the server is not), kill this process's group at once (this process, Ray's daemons), as
    that SIGKILL would have without the supervisor. False when not supervised."""
    descriptor = os.environ.pop(SUPERVISOR_FD_ENV, None)  # Ray's processes need not see it
    if descriptor is None:
        return False
    fd = int(descriptor)
    os.set_inheritable(fd, False)

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 64):  # nothing is ever written: b"" is the pipe closing
                pass
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="loraplex-supervisor", daemon=True).start()
    return True
