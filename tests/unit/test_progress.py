"""Progress of the long CLI commands: drawn on a terminal, absent (the output unchanged) when piped.

The commands run for real, in a subprocess, once under a pseudo-terminal and once with pipes. `prepare` builds real
adapters on the real base model; the model and the trained adapters are linked from the shared `.loraplex` (building
them takes minutes), so the weights stage is checked on `Bars` directly. Registration talks to a stand-in server
that answers as the router does (the same `AdapterRecord` card), slowly: these tests check what the CLI renders, not
the server.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from serve.cli.progress import Bars, Notes, local_size
from serve.demo.assets import DEFAULT_MODEL_NAME, prepare
from serve.demo.data import TRAINED_ADAPTERS
from serve.wire import AdapterRecord

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "serve.cli.main"]
SERVER_DELAY_S = 1.0
WARNING = "every lora_B weight is zero, so the adapter changes nothing"
ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
COLOUR = re.compile(r"\x1b\[[0-9;]*(3[0-7]|38;|9[0-7])[0-9;]*m")


def environment(**overrides: str) -> dict[str, str]:
    """This environment without the variables that force or forbid terminal output, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE",
                                                             "TTY_INTERACTIVE", "TQDM_DISABLE", "COLUMNS")}  # fmt: skip
    return {**env, "TERM": "xterm-256color", **overrides}


def in_terminal(args: list[str], columns: int = 200, **env: str) -> tuple[int, str]:
    """Runs `args` with stdin, stdout and stderr on a pseudo-terminal: (exit code, everything shown)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen(args, cwd=REPO, env=environment(**env), stdin=follower, stdout=follower,
                               stderr=follower, close_fds=True)  # fmt: skip
    os.close(follower)
    shown, deadline = bytearray(), time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    return process.wait(timeout=30), shown.decode(errors="replace").replace("\r\n", "\n")


def piped(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=120)


def visible(shown: str) -> str:
    """What a terminal shows, as text: escape sequences dropped."""
    return ESCAPE.sub("", shown)


# ---------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def model_dir() -> Path:
    model, _ = prepare(REPO / ".loraplex")  # the trained adapters too, which `linked_root` links
    return model


def linked_root(root: Path, model_dir: Path, adapters: Path | None = None) -> Path:
    """An assets root whose model and trained adapters are already built (linked), as are all its adapters if
    `adapters` holds them."""
    (root / "models").mkdir(parents=True)
    (root / "models" / DEFAULT_MODEL_NAME).symlink_to(model_dir, target_is_directory=True)
    if adapters is not None:
        (root / "adapters").symlink_to(adapters, target_is_directory=True)
        return root
    (root / "adapters").mkdir()
    for name in TRAINED_ADAPTERS:
        (root / "adapters" / name).symlink_to(REPO / ".loraplex" / "adapters" / name, target_is_directory=True)
    return root


def quiet_form(root: Path) -> str:
    """What `prepare` prints off a terminal once every adapter is trained: the model, then each adapter."""
    names = ("alpha", "beta", *TRAINED_ADAPTERS)
    return f"model {root / 'models' / DEFAULT_MODEL_NAME}\n" + "".join(
        f"adapter {name}={root / 'adapters' / name}\n" for name in names
    )


def test_prepare_shows_each_stage_with_the_bytes_it_writes_on_a_terminal(model_dir: Path, tmp_path: Path) -> None:
    root = linked_root(tmp_path, model_dir)
    code, shown = in_terminal([*CLI, "prepare", "--root", str(root)])
    text = visible(shown)
    assert code == 0, text
    for stage in ("loading the base model", "writing adapter alpha", "writing adapter beta",
                  "validating adapter alpha", "validating adapter beta"):  # fmt: skip
        assert stage in text, text
    # each adapter's row ends on what it wrote (beta, rank 16, ~19.6 MB), done, with its seconds
    assert re.search(r"✓ writing adapter beta .*19\.6/19\.6 MB +\d+\.\d s", text), text
    assert "Loading weights" not in text  # transformers' own tqdm bar would draw over ours
    assert text.endswith(quiet_form(root)), text  # the result still comes last, unchanged


def test_prepare_prints_only_its_result_when_piped(model_dir: Path, tmp_path: Path) -> None:
    """With everything built, only the validation stages run (the quick case: no adapter is written)."""
    root = linked_root(tmp_path, model_dir, REPO / ".loraplex" / "adapters")
    result = piped([*CLI, "prepare", "--root", str(root)])
    assert (result.returncode, result.stdout, result.stderr) == (0, quiet_form(root), "")
    _, shown = in_terminal([*CLI, "prepare", "--root", str(root)])
    assert "✓ validating adapter beta" in visible(shown)  # which a terminal would have shown


def test_a_stage_counts_the_bytes_written_under_the_folder_it_watches(tmp_path: Path) -> None:
    """The model weights stage in small: what `build_default_model` does with `save_pretrained`'s folder."""
    out = StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    with Bars.progress(console, auto_refresh=False) as progress:
        bars = Bars(progress)
        weights = tmp_path / "model.safetensors"
        with bars.stage("writing the model weights", total=3_000_000, watch=tmp_path), weights.open("wb") as file:
            for _ in range(3):
                file.write(b"\0" * 1_000_000)
                file.flush()
                time.sleep(0.5)  # the stage measures the folder every POLL_S
                progress.refresh()
        progress.refresh()
    text = visible(out.getvalue())
    assert "1.0/3.0 MB" in text and "2.0/3.0 MB" in text, text
    assert "3.0/3.0 MB" in text and "✓ writing the model weights" in text, text


def test_notes_stay_above_the_stages_on_a_terminal_and_plain_lines_off_one(capsys: pytest.CaptureFixture[str]) -> None:
    """What `prepare` says of an adapter it trained: its loss, and an answer before and after."""
    said = "trained json: loss 4.01 -> 0.06 in 40 steps (36 s)\n  base: [Paris]"  # brackets: no rich markup
    out = StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    with Bars.progress(console, auto_refresh=False) as progress:
        bars = Bars(progress)
        with bars.stage("training adapter json (40 steps)"):
            bars.note(said)
    assert said in visible(out.getvalue())
    Notes().note(said)
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", said + "\n")


# ---------------------------------------------------------------- registration


def record(version: int, warnings: tuple[str, ...] = ()) -> AdapterRecord:
    return AdapterRecord(name="alpha", source="/somewhere/alpha", version=version, content_hash="0" * 64, rank=8,
                         alpha=16.0, target_modules=("q_proj",), size_bytes=9_828_428, pinned=False, created=0,
                         warnings=warnings)  # fmt: skip


def card(item: AdapterRecord) -> dict[str, object]:
    """As `routing.endpoints.adapters.card` shows a record to an admin."""
    return {"id": f"{DEFAULT_MODEL_NAME}:{item.name}", "object": "adapter", **asdict(item)}


REFUSAL = "adapter rank 64 exceeds this server's max_lora_rank 16"
ANSWERS: dict[str, tuple[int, dict[str, object]]] = {
    "/v1/adapters": (201, card(record(2, (WARNING,)))),
    "/v1/adapters/alpha/rollout": (
        201,
        {**card(record(2)), "canary": asdict(record(3, (WARNING,))), "canary_percent": 10.0},
    ),
    "/v1/adapters/broken/rollout": (
        400,
        {"error": {"message": REFUSAL, "type": "invalid_request_error", "param": "source"}},
    ),
}


class SlowRouter(BaseHTTPRequestHandler):
    """Answers the adapter writes after SERVER_DELAY_S, as the router does once the registry fetched and validated."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(SERVER_DELAY_S)
        status, body = ANSWERS[self.path]
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SlowRouter)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "alpha"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 1_234_567)
    return folder


def commands(source: Path) -> list[tuple[list[str], str, str, str]]:
    """(arguments, what the spinner says, the result line on stdout, the summary on a terminal), per command."""
    id_ = f"{DEFAULT_MODEL_NAME}:alpha"
    return [
        (["add", "alpha", str(source)], f"fetching and validating {source} (1.2 MB) on the server",
         f"{id_} v2\n", "✓ v2: rank 8, 9.8 MB, ready in"),
        (["compose", "alpha", "sql=0.7", "chat=0.3"], "composing alpha from sql=0.7, chat=0.3 on the server",
         f"{id_} v2 r=8\n", "✓ v2: rank 8, 9.8 MB, ready in"),
        (["rollout", "alpha", f"file://{source}", "--percent", "10"],
         f"fetching and validating file://{source} (1.2 MB) on the server",
         f"{id_}\tv2 90% / v3 10%\n", "✓ v3: rank 8, 9.8 MB, ready in"),
    ]  # fmt: skip


@pytest.mark.parametrize("which", ["add", "compose", "rollout"])
def test_registration_shows_a_live_status_then_what_was_made_on_a_terminal(
    server: str, source: Path, which: str
) -> None:
    args, status, result, summary = next(c for c in commands(source) if c[0][0] == which)
    code, shown = in_terminal([*CLI, "adapters", *args, "--url", server])
    text = visible(shown)
    assert code == 0, text
    assert status in text, text  # whole on a terminal wide enough (below: cut short on a narrow one)
    # the seconds tick while the server works: at least a second goes by, shown as it passes
    ticks = {float(s) for s in re.findall(rf"(\d+\.\d) s {re.escape(status[:40])}", text)}
    assert len(ticks) >= 3 and max(ticks) >= 0.8, ticks
    assert result in text and summary in text, text
    assert f"warning: {WARNING}" in text, text


def test_on_a_narrow_terminal_a_long_source_is_cut_short_and_the_seconds_still_tick(server: str, source: Path) -> None:
    code, shown = in_terminal([*CLI, "adapters", "add", "alpha", str(source), "--url", server], columns=60)
    lines = visible(shown).replace("\r", "\n").splitlines()
    status = [line for line in lines if "fetching and validating" in line]
    assert code == 0 and status and all(len(line) <= 60 and line.endswith("…") for line in status), lines
    assert len(set(re.findall(r"(\d+\.\d) s fetching", "\n".join(status)))) >= 3, status  # the seconds tick


@pytest.mark.parametrize("which", ["add", "compose", "rollout"])
def test_registration_prints_only_its_result_when_piped(server: str, source: Path, which: str) -> None:
    args, _, result, _ = next(c for c in commands(source) if c[0][0] == which)
    done = piped([*CLI, "adapters", *args, "--url", server])
    assert (done.returncode, done.stdout, done.stderr) == (0, result, "")


def test_a_refusal_replaces_the_status_line_and_reads_as_before(server: str, source: Path) -> None:
    args = [*CLI, "adapters", "rollout", "broken", str(source), "--url", server]
    message = f"error 400: {REFUSAL}\n"
    code, shown = in_terminal(args)
    assert code == 1 and message in visible(shown) and "✓" not in shown
    done = piped(args)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", message)


def test_a_dumb_terminal_gets_the_piped_output(server: str, source: Path) -> None:
    code, shown = in_terminal([*CLI, "adapters", "add", "alpha", str(source), "--url", server], TERM="dumb")
    assert (code, shown) == (0, f"{DEFAULT_MODEL_NAME}:alpha v2\n")


def test_no_color_keeps_the_progress_and_drops_the_colours(server: str, source: Path) -> None:
    code, shown = in_terminal([*CLI, "adapters", "add", "alpha", str(source), "--url", server], NO_COLOR="1")
    assert code == 0 and "fetching and validating" in shown and "✓ v2" in visible(shown)
    assert not COLOUR.search(shown), repr(shown)
    _, coloured = in_terminal([*CLI, "adapters", "add", "alpha", str(source), "--url", server])
    assert COLOUR.search(coloured)  # the check above would notice colours


@pytest.mark.parametrize(
    ("given", "size"),
    [
        ("{folder}", 1_234_567 + 2),
        ("file://{folder}", 1_234_567 + 2),
        ("relative/alpha", None),  # the server resolves it against its own working directory
        ("{folder}/missing", None),
        ("s3://bucket/alpha", None),
        ("hf://org/alpha", None),
    ],
)
def test_only_local_absolute_sources_are_sized_up_front(source: Path, given: str, size: int | None) -> None:
    (source / ".hidden").write_bytes(b"not copied by LocalSource")
    assert local_size(given.format(folder=source)) == size
