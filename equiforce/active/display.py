"""Progress of a learning run: a rich bar of oracle calls with the current phase, or plain lines.

One live display for the whole run (rich allows one at a time), so the trainer and MD run without their
own bars and report into this one.
"""

from __future__ import annotations

import sys
from typing import Any


class Display:
    """``bar`` on a terminal, ``lines`` (one line per event) otherwise, or ``off``."""

    def __init__(self, progress: bool | None, max_calls: int) -> None:
        if progress is None:
            self.mode = "bar" if sys.stderr.isatty() else "lines"
        else:
            self.mode = "bar" if progress else "off"
        self.max_calls = max_calls
        self._progress = None
        self._last_phase = ""

    def __enter__(self) -> Display:
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("oracle calls"), MofNCompleteColumn(), BarColumn(bar_width=24),
                                      TimeElapsedColumn(), TextColumn("{task.description}"),
                                      console=Console(stderr=True, highlight=False))
            self._progress.start()
            self._task = self._progress.add_task("", total=self.max_calls)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def info(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message)
        elif self.mode != "off":
            print(message, file=sys.stderr, flush=True)

    def phase(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)
        elif self.mode == "lines" and not text.split(",")[0] == self._last_phase.split(",")[0]:
            print(f"[learn] {text}", file=sys.stderr, flush=True)  # one line per phase, not per epoch
        self._last_phase = text

    def calls(self, n: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=n)

    def round_done(self, round_: int, evaluated: dict[str, Any], calls: int) -> None:
        valid = evaluated.get("valid") or {}
        parts = [f"round {round_}: {calls} oracle calls, {evaluated.get('n_train', 0)} train structures"]
        if valid.get("forces_mae") is not None:
            parts.append(f"valid F MAE {valid['forces_mae']:.1f} meV/Å, mean σ {valid['mean_force_sigma']:.3g} eV/Å")
        test = evaluated.get("test") or {}
        if test.get("forces_mae") is not None:
            parts.append(f"test F MAE {test['forces_mae']:.1f} meV/Å")
        self.info("; ".join(parts))
