"""The one exception for bad user input: its message names the file, the key or row, and the fix."""


class TunelabError(Exception):
    """A user error: the CLI prints its message on one line and exits 2, without a traceback."""
