"""hybridps.errors: the exit contract every command shares."""
from __future__ import annotations

import errno

import pytest

from hybridps.errors import describe_os_error, one_line, run_cli


class Bad(ValueError):
    pass


def _raise(e):
    def body():
        raise e
    return body


@pytest.mark.parametrize("exc, code, text", [
    (Bad("line one\n  line two"), 2, "tool x: error: line one line two\n"),
    (KeyError("unknown thing 'a'"), 1, "tool x: internal error: KeyError: unknown thing 'a' (set HYBRIDPS_DEBUG=1"),
    (OSError(errno.ENOSPC, "No space left on device", "/out/f"), 2, "tool x: error: disk full: no space left on device (/out/f)\n"),
    (KeyboardInterrupt(), 130, "tool x: interrupted; resume with --resume\n"),
    (RuntimeError("a bug"), 1, "tool x: internal error: RuntimeError: a bug (set HYBRIDPS_DEBUG=1 for the traceback)\n"),
])
def test_run_cli_maps_exceptions_to_the_contract(capsys, monkeypatch, exc, code, text):
    monkeypatch.delenv("HYBRIDPS_DEBUG", raising=False)
    assert run_cli("tool x", _raise(exc), (Bad,), "resume with --resume") == code
    err = capsys.readouterr().err
    assert err.startswith(text) and err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_internal_errors_but_not_user_errors(capsys, monkeypatch):
    monkeypatch.setenv("HYBRIDPS_DEBUG", "1")
    with pytest.raises(RuntimeError):
        run_cli("t", _raise(RuntimeError("x")), (Bad,))
    assert run_cli("t", _raise(Bad("y")), (Bad,)) == 2
    assert run_cli("t", lambda: None) == 0 and run_cli("t", lambda: 3) == 3


def test_messages():
    assert one_line(KeyError("no 'x' here")) == "no 'x' here"          # not the repr with quotes
    folded = "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n" \
             '  File "x.py", line 1\nValueError: shard 3 is broken\n'
    assert one_line(RuntimeError(folded)) == "shard 3 is broken"
    assert describe_os_error(OSError(errno.EACCES, "Permission denied", "/o")) == "permission denied (/o)"
    assert describe_os_error(OSError(errno.ENOTDIR, "Not a directory", "/o")) == "a file is in the way of a directory (/o)"
