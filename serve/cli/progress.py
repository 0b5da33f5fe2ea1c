"""Progress for the CLI's long commands (`prepare`, adapter registration), drawn with rich on stderr.

Drawn only when stderr is an interactive terminal: a TTY, not `TERM=dumb` nor `TTY_INTERACTIVE=0` (rich's own
test); `NO_COLOR` drops the colours, as everywhere in rich. Piped, in CI or under tests nothing is drawn, and the
commands print exactly what they print without it, but for the notes a stage leaves (what a demo adapter learnt),
as plain lines. Progress goes to stderr, as git's does, so a terminal still shows it while stdout is piped, and what
a script reads from stdout never changes.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.filesize import decimal
from rich.progress import BarColumn, DownloadColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.table import Column
from rich.text import Text

POLL_S = 0.2
"""How often a stage that writes a folder measures what is on disk."""


def terminal() -> Console | None:
    """A console on stderr if progress is to be drawn there (an interactive terminal), else None."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return None
    console = Console(stderr=True)
    return console if tty and console.is_interactive else None


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` now (0 if it is gone); files may appear and vanish while it counts."""
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:
            continue
    return total


def local_size(source: str) -> int | None:
    """Bytes the server will fetch from a local source, as this machine sees them (what `LocalSource` copies:
    the folder's visible files), or None when they cannot be known here: s3:// and hf:// sources, and relative
    paths, which the server resolves against its own working directory."""
    if "://" in source and not source.startswith("file://"):
        return None
    path = Path(source.removeprefix("file://"))
    if not path.is_absolute() or not path.is_dir():
        return None
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and not p.name.startswith("."))


class Stages(Protocol):
    """Where a long job reports its stages; `QUIET` shows nothing."""

    def stage(self, label: str, *, total: int | None = None, watch: Path | None = None) -> AbstractContextManager[None]:
        """A stage, open while the `with` body runs; the bytes under folder `watch` count as its progress toward
        `total` (unknown if None); without `watch`, it shows only that it is running, and for how long."""
        ...

    def note(self, text: str) -> None:
        """What a stage found that is worth keeping once it is over (a training loss, an example); one or more
        lines, shown above the stages still running."""
        ...


class Quiet:
    """Stages that show nothing: for callers that report no progress."""

    def stage(self, label: str, *, total: int | None = None, watch: Path | None = None) -> AbstractContextManager[None]:
        return nullcontext()

    def note(self, text: str) -> None:
        return None


QUIET = Quiet()


class Notes(Quiet):
    """Stages that show only their notes, as plain lines on stderr: a command's progress off a terminal."""

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


class _Bytes(ProgressColumn):
    """Bytes written so far (of the total, when known), for stages that write a folder; blank for the others."""

    def render(self, task: Task) -> Text:
        return DownloadColumn().render(task) if task.fields.get("counts_bytes") else Text("")


class _Seconds(ProgressColumn):
    """Seconds since the task started, to a tenth."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.elapsed or 0:.1f} s", style="progress.elapsed")  # frozen once the task is stopped


class Bars:
    """Stages as rich progress rows: a spinner (a tick once done), the label, a bar, bytes written, seconds."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    @staticmethod
    def progress(console: Console, **options: Any) -> Progress:
        """The rich display that shows them, on `console`."""
        columns = (
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=24),
            _Bytes(table_column=Column(no_wrap=True)),
            _Seconds(),
        )
        return Progress(*columns, console=console, redirect_stdout=False, **options)

    @contextmanager
    def stage(self, label: str, *, total: int | None = None, watch: Path | None = None) -> Iterator[None]:
        task = self._progress.add_task(label, total=total, counts_bytes=watch is not None)
        stop = threading.Event()
        poller = None
        if watch is not None:
            poller = threading.Thread(target=self._poll, args=(task, watch, stop), name="progress-poll", daemon=True)
            poller.start()
        try:
            yield
        finally:
            stop.set()
            if poller is not None:
                poller.join()
            self._progress.stop_task(task)
        done = folder_bytes(watch) if watch is not None else 1
        self._progress.update(task, total=done, completed=done)  # what was written: the estimate is forgotten

    def note(self, text: str) -> None:
        self._progress.console.print(text, markup=False, highlight=False)

    def _poll(self, task: Any, watch: Path, stop: threading.Event) -> None:
        while not stop.wait(POLL_S):
            self._progress.update(task, completed=folder_bytes(watch))


@contextmanager
def stages() -> Iterator[Stages]:
    """Progress rows on stderr while the body runs if it is an interactive terminal, else only the notes."""
    console = terminal()
    if console is None:
        yield Notes()
        return
    with _other_bars_off(), Bars.progress(console) as progress:
        yield Bars(progress)


@contextmanager
def _other_bars_off() -> Iterator[None]:
    """Turns tqdm's bars off (transformers draws them while it converts and loads weights): they would draw over
    ours. tqdm reads TQDM_DISABLE when it is imported, which the commands that show stages do only after this."""
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = before


@dataclass
class ServerWork:
    """One request doing long work on the server (fetch, validation, composition); reports what it made."""

    console: Console | None
    started: float

    def made(self, record: Mapping[str, Any]) -> None:
        """What the server registered: version, rank, size, warnings, and how long it took (terminal only)."""
        if self.console is None:
            return
        seconds = time.monotonic() - self.started
        self.console.print(
            Text.assemble(
                ("✓ ", "green"),
                f"v{record['version']}: rank {record['rank']}, {decimal(record['size_bytes'])}, "
                f"ready in {seconds:.1f} s",
            )
        )
        for warning in record.get("warnings") or ():
            self.console.print(Text.assemble(("  warning: ", "yellow"), str(warning)))


@contextmanager
def on_server(doing: str) -> Iterator[ServerWork]:
    """While the body runs (a request), a spinner with what the server is `doing` and the seconds elapsed, on an
    interactive terminal; the line is gone once it returns."""
    work = ServerWork(terminal(), time.monotonic())
    if work.console is None:
        yield work
        return
    # the seconds before what is done: a long source is cut short at the terminal's edge, they are not
    columns = (
        SpinnerColumn(table_column=Column(min_width=1)),
        _Seconds(table_column=Column(min_width=len("999.9 s"), justify="right")),
        TextColumn("{task.description}", markup=False, table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
    )
    with Progress(*columns, console=work.console, transient=True, redirect_stdout=False, expand=True) as progress:
        progress.add_task(doing, total=None)
        yield work


def sized(source: str) -> str:
    """`source`, with the bytes it holds when this machine can tell (see `local_size`)."""
    size = local_size(source)
    return source if size is None else f"{source} ({decimal(size)})"
