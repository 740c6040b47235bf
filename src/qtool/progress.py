"""Progress reporting chosen at the edge: a rich progress bar in a terminal, plain lines
otherwise, nothing with ``--quiet`` or ``--json``. The library only calls the callback.

Events (keyword arguments):

- ``stage``: ``name``, ``detail`` (a step that starts: loading, calibration data, saving);
- ``capture``: ``total`` (calibration samples run through the model up to block 0);
- ``blocks``: ``total``, ``start`` (the block loop starts; ``start`` > 0 when resumed);
- ``block``: ``index``, ``total``, ``seconds``, ``layers`` (linear name -> its stats);
- ``eval``: ``name``, ``total``, optional ``unit`` (a counted loop starts: eval windows,
  checked layers);
- ``window``: ``index``, ``total`` (one unit of that loop is done).

Plain lines carry the elapsed time, the rate and the ETA, so a log shows how far a run is
and when it will end; loops with many fast steps print at most one line per
``min_interval`` seconds (always the first and the last step).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from qtool.layer_error import worst_layer_error


def format_duration(seconds: float) -> str:
    """``45s``, ``2m18s``, ``1h02m``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_rate(done: int, elapsed: float, unit: str) -> str:
    """``2.5 windows/s`` or, for slow steps, ``12.3 s/window``."""
    if done <= 0 or elapsed <= 0:
        return ""
    per_s = done / elapsed
    return f"{per_s:.1f} {unit}s/s" if per_s >= 1 else f"{elapsed / done:.1f} s/{unit}"


def block_error_text(layers: dict[str, dict]) -> str:
    """``worst relative output error 4.21% (model.layers.2.mlp.down_proj)`` or ''."""
    found = worst_layer_error(layers)
    if found is None:
        return ""
    label, value, name = found
    return f"worst {label} {value:.2f}% ({name})"


class _Loop:
    """Start time and first index of a counted loop, for rate and ETA."""

    def __init__(self, total: int, start: int = 0, unit: str = "window"):
        self.t0, self.total, self.start, self.unit = time.perf_counter(), total, start, unit

    def rate_eta(self, done_index: int) -> tuple[str, str]:
        """Rate and ETA after item ``done_index`` (0-based) is finished."""
        done = done_index + 1 - self.start
        elapsed = time.perf_counter() - self.t0
        if done <= 0:
            return "", ""
        eta = elapsed / done * (self.total - done_index - 1)
        return format_rate(done, elapsed, self.unit), format_duration(eta)


class PlainReporter:
    """Plain lines on stderr (CI logs, pipes): every stage, every block, and the steps of
    counted loops at most every ``min_interval`` seconds."""

    def __init__(self, stream=None, min_interval: float = 5.0):
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.min_interval = min_interval
        self.loops: dict[str, _Loop] = {}
        self.last_line = float("-inf")

    def _print(self, text: str) -> None:
        now = time.perf_counter()
        self.last_line = now
        print(f"[{now - self.t0:7.1f}s] {text}", file=self.stream, flush=True)

    def __call__(self, event: str, **info: Any) -> None:
        if event == "stage":
            self._print(f"{info['name']}: {info.get('detail', '')}")
        elif event == "capture":
            self._print(f"capturing the inputs of block 1 for {info['total']} calibration samples")
        elif event == "blocks":
            self.loops["blocks"] = _Loop(info["total"], info.get("start", 0), "block")
        elif event == "block":
            loop = self.loops.setdefault("blocks", _Loop(info["total"], info["index"], "block"))
            _, eta = loop.rate_eta(info["index"])
            err = block_error_text(info.get("layers", {}))
            self._print(f"block {info['index'] + 1}/{info['total']} done in {info['seconds']:.1f}s, eta {eta}"
                        + (f"; {err}" if err else ""))
        elif event == "eval":
            unit = info.get("unit", "window")
            self.loops["steps"] = _Loop(info["total"], 0, unit)
            self._print(f"{info['name']}: {info['total']} {unit}s")
        elif event == "window":
            loop = self.loops.setdefault("steps", _Loop(info["total"], info["index"]))
            i, total = info["index"], info["total"]
            due = time.perf_counter() - self.last_line >= self.min_interval
            if i == 0 or i + 1 == total or due:
                rate, eta = loop.rate_eta(i)
                self._print(f"{loop.unit} {i + 1}/{total} ({100 * (i + 1) / total:.0f}%), {rate}, eta {eta}")

    def close(self) -> None:
        pass


class RichReporter:
    """A rich progress bar with rate and ETA per loop (blocks, windows, layers)."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
                                 transient=False)
        self.progress.start()
        self.tasks: dict[str, int] = {}

    def _task(self, key: str, description: str, total: int, completed: int = 0) -> int:
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total, completed=completed)
        return self.tasks[key]

    def __call__(self, event: str, **info: Any) -> None:
        if event == "stage":
            self.console.log(f"{info['name']}: {info.get('detail', '')}")
        elif event == "capture":
            self.console.log(f"capturing the inputs of block 1 for {info['total']} calibration samples")
        elif event == "blocks":
            self._task("blocks", "quantizing blocks", info["total"], info.get("start", 0))
        elif event == "block":
            task = self._task("blocks", "quantizing blocks", info["total"])
            err = block_error_text(info.get("layers", {}))
            if err:
                self.console.log(f"block {info['index'] + 1}/{info['total']}: {err}")
            self.progress.update(task, completed=info["index"] + 1,
                                 description=f"block {info['index'] + 1}/{info['total']} ({info['seconds']:.1f}s)")
        elif event == "eval":
            self.tasks.pop("windows", None)
            self._task("windows", f"{info['name']} ({info.get('unit', 'window')}s)", info["total"])
        elif event == "window":
            task = self._task("windows", "evaluating", info["total"])
            self.progress.update(task, completed=info["index"] + 1)

    def close(self) -> None:
        self.progress.stop()


def make_reporter(json_mode: bool, quiet: bool, stream=None):
    """The reporter for this run: None with ``--json`` or ``--quiet``, a rich bar when
    ``stream`` (default stderr) is a terminal, plain lines otherwise."""
    if json_mode or quiet:
        return None
    stream = stream or sys.stderr
    if stream.isatty():
        return RichReporter()
    return PlainReporter(stream)
