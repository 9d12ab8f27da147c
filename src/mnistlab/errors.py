"""The one exception type for mistakes a user can make (bad file, bad name, bad option).

The CLI turns it into one line on stderr and exit code 2. Anything else is a bug and keeps its traceback.
"""


class MnistlabError(Exception):
    """A user-facing error: the message names the thing that is wrong and, where possible, the fix."""
