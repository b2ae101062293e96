"""What ends a charlm command other than success: `charlm.__main__` turns each into one line and an exit code; and
what ends a playground request other than success (`HTTPError`, a status and one line)."""


class Stopped(BaseException):
    """A SIGINT or SIGTERM that ended the command: exit code 128 + the signal number. `detail` says what was kept
    ("after step 40; saved ..."); outside a training step the command stops at once (`stop_now`)."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum, detail)
        self.signum = signum
        self.detail = detail


def stop_now(signum: int, frame) -> None:
    raise Stopped(signum)


class FlagError(ValueError):
    """A flag or config value the command's parser refuses: exit code 2, as for any command-line tool."""


def first_line(error: BaseException, limit: int | None = 200) -> str:
    """An exception's message as one line of at most `limit` characters (its type's name when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class HTTPError(Exception):
    """A request the playground's API refuses: its status code and one line that names the value and the fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
