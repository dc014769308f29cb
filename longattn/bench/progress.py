"""A tiny progress bar on stderr (no tqdm dependency).

On a terminal it redraws one line in place: cases done, the fraction of the
current case, and what is running (a compile can take tens of seconds, so
the user should see that it is compiling and not hung). When stderr is not
a terminal (CI logs, pipes) or ``quiet`` is set, only one line per finished
case is printed: redrawn lines would turn a log into noise.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

BAR_WIDTH = 24


class Progress:
    """Progress over ``total_cases`` cases, each made of some number of steps."""

    def __init__(self, total_cases: int, *, quiet: bool = False, stream: TextIO | None = None):
        self.stream = sys.stderr if stream is None else stream
        self.live = not quiet and _is_tty(self.stream)
        self.total_cases = max(1, total_cases)
        self.cases_done = 0
        self.steps = 1
        self.steps_done = 0
        self.label = ""
        self.case_start = time.perf_counter()
        self._width = 0

    def start_case(self, label: str, steps: int) -> None:
        self.label, self.steps, self.steps_done = label, max(1, steps), 0
        self.case_start = time.perf_counter()
        self._draw("")

    def status(self, detail: str) -> None:
        """Show what is running now, without advancing."""
        self._draw(detail)

    def step(self, detail: str = "", count: int = 1) -> None:
        self.steps_done = min(self.steps, self.steps_done + count)
        self._draw(detail)

    def finish_case(self, summary: str) -> None:
        """Print the case's one-line summary (always, even when quiet)."""
        self.cases_done += 1
        elapsed = time.perf_counter() - self.case_start
        self._clear()
        print(f"[{self.cases_done}/{self.total_cases}] {summary} ({elapsed:.1f} s)", file=self.stream, flush=True)

    def _draw(self, detail: str) -> None:
        if not self.live:
            return
        fraction = (self.cases_done + self.steps_done / self.steps) / self.total_cases
        filled = int(round(fraction * BAR_WIDTH))
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        line = f"[{bar}] {self.cases_done}/{self.total_cases} {self.label}"
        if detail:
            line += f": {detail}"
        # A line wider than the terminal wraps, and "\r" would then only
        # return to the start of its last piece.
        line = line[: max(20, shutil.get_terminal_size().columns - 1)]
        self._clear()
        self.stream.write(line)
        self.stream.flush()
        self._width = len(line)

    def _clear(self) -> None:
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or wrapped streams
        return False
