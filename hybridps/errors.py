"""The exit contract shared by every command of the project.

    0    success
    2    bad input, arguments or environment: one line on stderr, never a traceback
    1    internal error: one line, the traceback with HYBRIDPS_DEBUG=1
    130  interrupted (Ctrl-C)

:func:`run_cli` applies it around a command's body; the parts pass the exception types that
mean "bad input" for them.  Standard library only, so every part may use it.
"""
from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

DEBUG_ENV = "HYBRIDPS_DEBUG"
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def debug() -> bool:
    return bool(os.environ.get(DEBUG_ENV))


def one_line(e: BaseException | str) -> str:
    """The message of ``e`` on one line.  A KeyError's message is its argument (not its repr);
    an error raised in a DataLoader worker arrives with the worker's traceback folded into the
    message: its last line is the original error."""
    if isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    else:
        text = str(e).strip()
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return " ".join(text.split()) or (type(e).__name__ if isinstance(e, BaseException) else "")


def describe_os_error(e: OSError) -> str:
    """What the environment refused, in words a user can act on."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"disk full: no space left on device{where}"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded{where}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}"
    if e.errno == errno.EROFS:
        return f"read-only file system{where}"
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"a file is in the way of a directory{where}"
    return f"{e.strerror or e}{where}"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_cli(prog: str, body: Callable[[], int | None], user_errors: tuple[type[BaseException], ...] = (),
            interrupted_hint: str = "", report: Callable[[str], None] = _stderr) -> int:
    """Run ``body`` under the exit contract; ``prog`` starts every message ("hybridps data build").
    ``report`` writes the one final line (default stderr; the CLIs also copy it to their log.txt)."""
    try:
        rc = body()
        return EXIT_OK if rc is None else int(rc)
    except KeyboardInterrupt:
        report(f"{prog}: interrupted" + (f"; {interrupted_hint}" if interrupted_hint else ""))
        return EXIT_INTERRUPTED
    except user_errors as e:
        report(f"{prog}: error: {one_line(e)}")
        return EXIT_USAGE
    except OSError as e:
        # the environment (full disk, permissions, a file where OUT should be), not a bug
        if debug():
            raise
        report(f"{prog}: error: {describe_os_error(e)}")
        return EXIT_USAGE
    except Exception as e:
        if debug():
            raise
        report(f"{prog}: internal error: {type(e).__name__}: {one_line(e)} (set {DEBUG_ENV}=1 for the traceback)")
        return EXIT_INTERNAL
