"""Progress on stderr for the long commands (train, robustness, sweep): one plain line per finished step, which
logs, CI and pipes keep, and on a terminal a bar for the step under way. Nothing but forced lines when quiet."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """Lines and bars on stderr; `quiet` leaves out all but the lines written with `force`."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def line(self, text: str, force: bool = False) -> None:
        """One line, written above any bar on screen."""
        if force or not self.quiet:
            tqdm.write(text, file=sys.stderr)
            sys.stderr.flush()

    def bar(self, total: int, desc: str, initial: int = 0, unit: str = "it") -> tqdm:
        """A bar that disappears when closed; on a terminal only (elsewhere a bar that draws nothing)."""
        disable = self.quiet or not self.tty
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, disable=disable, file=sys.stderr)
