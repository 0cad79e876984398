"""The one error type the CLI turns into a one-line message and exit status 2."""


class StonelabError(Exception):
    """A user-facing error: bad input, missing tool, unusable disk. Never a bug.

    ``str(err)`` is the whole one-line message the CLI prints (it should name the file and the problem).
    """

    exit_status = 2
