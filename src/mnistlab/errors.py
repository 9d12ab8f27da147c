"""User-facing messages: the one exception type for mistakes a user can make (bad file, bad name, bad option),
warnings, and counts in words.

The CLI turns a MnistlabError into one line on stderr and exit code 2. Anything else is a bug and keeps its traceback.
"""

import sys


class MnistlabError(Exception):
    """A user-facing error: the message names the thing that is wrong and, where possible, the fix."""


def warn(message: str) -> None:
    """One line on stderr for something the user should know but that does not stop the command."""
    print(f"mnistlab: warning: {message}", file=sys.stderr)


def plural(count: int, noun: str) -> str:
    """`count` and `noun`, its plural when count is not 1: "1 epoch", "2 epochs", "0 threads"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
