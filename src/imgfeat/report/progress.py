"""Progress a person can read: a live bar on a terminal, a plain line every few seconds in a
log, nothing with --quiet; and a summary at the end in every case but quiet."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

LINE_INTERVAL_S = 10.0


class _Rate(ProgressColumn):
    def __init__(self, per_second: str):
        super().__init__()
        self.per_second = per_second

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.per_second}" if speed else f"-- {self.per_second}",
                    style="cyan")


class Reporter:
    """Counts images (rows and errors) and shows them as `mode` says: bar, lines or none."""

    def __init__(self, mode: str = "auto", stream=None, interval: float = LINE_INTERVAL_S,
                 label: str = "extract", unit: str = "images", log: Path | None = None):
        self.stream = stream or sys.stderr
        self.log = log  # warnings and the summary are appended there, whatever the mode
        self.label, self.unit = label, unit
        self.per_second = "img/s" if unit == "images" else f"{unit}/s"
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self.interval = interval
        self.total: int | None = None
        self.done = self.rows = self.errors = 0
        self.already_done = 0
        self._started = time.monotonic()
        self._last_line = self._started
        self._bar: Progress | None = None
        self._workers: dict[str, int] = {}
        self._note = ""

    def start(self, total: int | None, already_done: int = 0) -> None:
        self.total, self.already_done = total, already_done
        if self.mode == "bar":
            self._bar = Progress(
                TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                _Rate(self.per_second),
                TextColumn("[red]{task.fields[errors]} errors"), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[devices]}"),
                console=Console(file=self.stream), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=total, completed=already_done,
                                            errors=0, devices="")

    def note(self, text: str) -> None:
        """A short status shown beside the counts (e.g. workers alive)."""
        self._note = text
        if self._bar is not None:
            self._bar.update(self._task, devices=self._extra())

    def _extra(self) -> str:
        return ", ".join(part for part in (self.device_rates(), self._note) if part)

    def skip(self, count: int) -> None:
        """Images done by an earlier run (committed shards): counted, not timed."""
        self.already_done += count
        if self._bar is not None:
            self._bar.update(self._task, advance=count)

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def advance(self, rows: int, errors: int, worker: str | None = None) -> None:
        """Count images just done (negative when a failed shard's work is taken back)."""
        self.rows += rows
        self.errors += errors
        self.done += rows + errors
        if worker is not None:
            self._workers[worker] = self._workers.get(worker, 0) + rows + errors
        if self._bar is not None:
            self._bar.update(self._task, advance=rows + errors, errors=self.errors,
                             devices=self._extra())
        elif self.mode == "lines" and time.monotonic() - self._last_line >= self.interval:
            self._last_line = time.monotonic()
            self._print(self._line())

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def rate(self) -> float:
        elapsed = self.elapsed()
        return self.done / elapsed if elapsed > 0 else 0.0

    def device_rates(self) -> str:
        """'cpu#0 10.2/s, cpu#1 9.8/s': shown when more than one worker runs."""
        if len(self._workers) < 2:
            return ""
        elapsed = max(self.elapsed(), 1e-9)
        return ", ".join(f"{name} {count / elapsed:,.1f}/s"
                         for name, count in sorted(self._workers.items()))

    def _line(self) -> str:
        rate = self.rate()
        done = self.done + self.already_done
        devices = f" ({extra})" if (extra := self._extra()) else ""
        if self.total is None:
            return (f"{self.label}: {done:,} {self.unit}, {rate:,.1f} {self.per_second}{devices}, "
                    f"{self.errors:,} errors")
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        percent = 100 * done / max(1, self.total)
        return (f"{self.label}: {done:,}/{self.total:,} {self.unit} ({percent:.1f}%), "
                f"{rate:,.1f} {self.per_second}{devices}, {self.errors:,} errors, "
                f"eta {_clock(eta)}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def summary(self, message: str) -> None:
        self.stop()
        self.append_log(message)
        if self.mode != "none":
            self._print(message)

    def warn(self, message: str) -> None:
        """A warning (a worker's, say): above the bar, never through it, and in the log."""
        self.append_log(f"warning: {message}")
        if self._bar is not None:
            self._bar.console.print(f"imgfeat: warning: {message}", markup=False,
                                    highlight=False)
        elif self.mode != "none":
            self._print(f"imgfeat: warning: {message}")

    def append_log(self, message: str) -> None:
        """One timestamped entry in the run's log file (if its folder exists)."""
        if self.log is None or not self.log.parent.is_dir():
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        try:
            with open(self.log, "a", encoding="utf-8") as handle:
                handle.write("".join(f"{stamp} {line}\n" for line in message.splitlines()))
        except OSError:
            pass  # a log that cannot be written must not stop the run

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
