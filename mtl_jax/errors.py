"""The one exception type that reaches users as a clean message instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: a file, a line, a config key or a flag.

    The CLI prints ``error: <message>`` on one line and exits with status 2. The message
    names what is at fault (file and line, config key, flag) and what would fix it.
    """


def where(path, line: int | None = None, column: str | None = None) -> str:
    """``file``, ``file:line`` or ``file:line (column 'x')`` for error messages."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if column is not None:
        loc += f" (column '{column}')"
    return loc
