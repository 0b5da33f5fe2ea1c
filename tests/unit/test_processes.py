"""serve.processes: what `loraplex serve` uses to leave no process behind, tried on real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")


def run_python(code: str, timeout: float = 30) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, cwd=os.getcwd()
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_subreaper_finds_the_orphans_of_its_children_and_sweeps_them() -> None:
    out = run_python(
        """
        import subprocess, time
        from serve import processes
        assert processes.become_subreaper()
        # The child starts a grandchild in a new session and exits: the grandchild is an orphan.
        subprocess.run(["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 & echo $!"], check=True,
                       stdout=open("/tmp/loraplex-orphan.pid", "w"))
        orphan = int(open("/tmp/loraplex-orphan.pid").read())
        time.sleep(0.3)
        assert orphan in processes.descendants(), "re-parented to the subreaper"
        assert processes.sweep(grace_s=2) == [orphan]
        assert processes.descendants() == []
        print(orphan)
        """
    )
    assert not alive(int(out.split()[-1]))


def test_without_a_subreaper_the_orphan_escapes_which_is_why_the_cli_is_one() -> None:
    out = run_python(
        """
        import subprocess
        from serve import processes
        subprocess.run(["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 & echo $!"], check=True,
                       stdout=open("/tmp/loraplex-escaped.pid", "w"))
        orphan = int(open("/tmp/loraplex-escaped.pid").read())
        assert orphan not in processes.descendants()
        print(orphan)
        """
    )
    pid = int(out.split()[-1])
    try:
        assert alive(pid)
    finally:
        os.kill(pid, 9)


CHILD = """
import time
from pathlib import Path
from serve import processes
assert processes.die_with_parent()
Path(__file__).with_suffix(".asked").touch()
time.sleep(600)
"""
MIDDLE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, sys.argv[1]])
print(child.pid, flush=True)
time.sleep(600)
"""


def test_a_process_that_asked_dies_with_its_parent(tmp_path: Path) -> None:
    """What a replica and an engine process do, so the CLI killed outright does not leave them running."""
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "middle.py").write_text(MIDDLE)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    middle = subprocess.Popen(
        [sys.executable, str(tmp_path / "middle.py"), str(tmp_path / "child.py")], stdout=subprocess.PIPE, env=env
    )
    assert middle.stdout is not None
    child = int(middle.stdout.readline())
    deadline = time.monotonic() + 20
    while not (tmp_path / "child.asked").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(child)
    middle.kill()
    middle.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child)


SERVER = """
import os, signal, subprocess, sys, time
from serve import processes
assert processes.follow_supervisor(), "started by supervise"
daemon = subprocess.Popen(["sleep", "600"])  # like Ray's GCS: in the server's group
open(sys.argv[1], "w").write(f"{os.getpid()} {daemon.pid}\\n")
terms = []

def on_term(signum, _frame):
    terms.append(signum)
    time.sleep(0.5)  # a group signal would have reached the daemon by now
    with open(sys.argv[1], "a") as out:
        out.write(f"terms={len(terms)} daemon_alive={daemon.poll() is None}\\n")
    daemon.kill()
    daemon.wait()
    sys.exit(3)

signal.signal(signal.SIGTERM, on_term)
while True:
    time.sleep(0.1)
"""


def supervised_server(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, int, int]:
    """A supervisor (as `loraplex serve` runs itself) in a session and group of its own, its server, and the
    server's daemon child: (supervisor, the server's report file, server pid, daemon pid)."""
    server, report = tmp_path / "server.py", tmp_path / "report"
    server.write_text(SERVER)
    command = [sys.executable, str(server), str(report)]
    code = f"import sys; from serve import processes; sys.exit(processes.supervise({command!r}))"
    supervisor = subprocess.Popen([sys.executable, "-c", code], cwd=os.getcwd(), start_new_session=True)
    deadline = time.monotonic() + 20
    while not (report.exists() and report.read_text().endswith("\n")):
        assert time.monotonic() < deadline and supervisor.poll() is None, "the server did not start"
        time.sleep(0.05)
    server_pid, daemon_pid = map(int, report.read_text().split())
    return supervisor, report, server_pid, daemon_pid


def test_a_signal_to_the_callers_whole_group_reaches_the_server_once_through_its_supervisor(tmp_path: Path) -> None:
    supervisor, report, server, daemon = supervised_server(tmp_path)
    assert os.getpgid(server) == server != supervisor.pid, "the server leads a group of its own"
    assert os.getpgid(daemon) == server and os.getsid(server) == supervisor.pid, "the daemon in it, one session"
    os.killpg(supervisor.pid, signal.SIGTERM)
    assert supervisor.wait(timeout=20) == 3, "the supervisor ends with the server's status"
    assert report.read_text().split("\n")[1] == "terms=1 daemon_alive=True", "one SIGTERM, to the server alone"
    assert not alive(server) and not alive(daemon)


def test_a_sigkill_of_the_callers_group_still_ends_the_server_and_its_group(tmp_path: Path) -> None:
    supervisor, report, server, daemon = supervised_server(tmp_path)
    os.killpg(supervisor.pid, signal.SIGKILL)
    supervisor.wait(timeout=10)
    deadline = time.monotonic() + 10
    while (alive(server) or alive(daemon)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(server) and not alive(daemon), "the server killed its group when its supervisor died"
    assert "terms" not in report.read_text(), "killed, not drained"
