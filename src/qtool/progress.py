"""Progress reporting chosen at the edge: a rich progress bar in a terminal, plain lines
otherwise, nothing with ``--quiet`` or ``--json``. The library only calls the callback."""

from __future__ import annotations

import sys
import time
from typing import Any


class PlainReporter:
    """One line per stage/block on stderr (CI logs, pipes)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def __call__(self, event: str, **info: Any) -> None:
        elapsed = f"[{time.perf_counter() - self.t0:7.1f}s]"
        if event == "stage":
            print(f"{elapsed} {info['name']}: {info.get('detail', '')}", file=self.stream, flush=True)
        elif event == "block":
            errs = [v for s in info.get("layers", {}).values() for k, v in s.items() if k in ("loss", "weight_rel_err", "out_rel_err")]
            worst = f", worst layer error {max(errs):.3g}" if errs else ""
            print(f"{elapsed} block {info['index'] + 1}/{info['total']} done in {info['seconds']:.1f}s{worst}",
                  file=self.stream, flush=True)
        elif event == "window" and (info["index"] + 1) % 10 == 0:
            print(f"{elapsed} window {info['index'] + 1}/{info['total']}", file=self.stream, flush=True)

    def close(self) -> None:
        pass


class RichReporter:
    """A rich progress bar with ETA per stage (blocks, windows)."""

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
        elif event == "blocks":
            self._task("blocks", "quantizing blocks", info["total"], info.get("start", 0))
        elif event == "block":
            task = self._task("blocks", "quantizing blocks", info["total"])
            self.progress.update(task, completed=info["index"] + 1,
                                 description=f"block {info['index'] + 1}/{info['total']} ({info['seconds']:.1f}s)")
        elif event == "eval":
            self.tasks.pop("windows", None)
            self._task("windows", f"eval {info['name']}", info["total"])
        elif event == "window":
            task = self._task("windows", "evaluating", info["total"])
            self.progress.update(task, completed=info["index"] + 1)

    def close(self) -> None:
        self.progress.stop()


def make_reporter(json_mode: bool, quiet: bool):
    if json_mode or quiet:
        return None
    if sys.stderr.isatty():
        return RichReporter()
    return PlainReporter()
