"""One rule for what every CLI shows and keeps: progress, ``log.txt``, strict JSON.

* **Progress**: a tqdm bar when stderr is a terminal; otherwise a plain line
  every ``HYBRIDPS_LOG_INTERVAL`` seconds (default 30; 0 = every update) with
  the count, rate, ETA and whatever the caller adds (loss, lr, memory).  The
  plain lines also go to ``log.txt`` when a bar is drawn, so the file holds
  the same record either way.
* **Logging**: stdlib :mod:`logging`.  :func:`cli_logging` puts one handler on
  stderr for the length of a command (``prog: message``; warnings say so) and
  :meth:`RunLog.to_folder` adds ``<folder>/log.txt`` (appended: a resumed run
  keeps one file).  Under ``accelerate launch`` only rank 0 writes INFO lines
  and the file; other ranks still show warnings and errors.  Records of other
  libraries pass only from WARNING up, so the file is ours, not accelerate's.
* **JSON**: :func:`dumps` writes ``null`` for NaN/inf (``allow_nan=False``:
  bare ``NaN`` is not JSON and strict parsers refuse it) and plain strings for
  enums.

Why in ``hybridps`` (next to errors.py and bounded.py): all four parts use it, and a
module of the shared core imports no part, so data_prep and checkpoints (which import
neither of the others) use the same rule as pretrain and finetune.
"""
from __future__ import annotations

import contextlib
import datetime
import enum
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

INTERVAL_ENV = "HYBRIDPS_LOG_INTERVAL"
DEFAULT_INTERVAL = 30.0
LOG_NAME = "log.txt"
# loggers whose INFO lines are ours (the packages, and their future namespace)
OUR_LOGGERS = ("data_prep", "pretrain", "finetune", "checkpoints", "hybridps", "benchmarks", "__main__")
_PROGRESS = "hybridps_progress"     # LogRecord attribute: a periodic progress line
_FILE_ONLY = "hybridps_file_only"   # LogRecord attribute: already shown on stderr by other means
_bars_drawn = 0                     # live tqdm bars: progress lines stay off stderr meanwhile
_active: list["RunLog"] = []        # the commands running (innermost last)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- small facts
def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):     # replaced or closed stream
        return False


def log_interval() -> float:
    """Seconds between plain progress lines (``HYBRIDPS_LOG_INTERVAL``)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        log.warning("%s=%r is not a number of seconds >= 0; using %g", INTERVAL_ENV, raw, DEFAULT_INTERVAL)
        return DEFAULT_INTERVAL
    return value


def is_main_process() -> bool:
    """Rank 0 (or not launched): ``accelerate launch`` / torchrun set ``RANK``."""
    return os.environ.get("RANK", "0").strip() in ("0", "")


def memory_mib() -> float:
    """Peak memory so far in MiB: the CUDA allocator's peak when torch uses a
    GPU in this process, else the process's peak resident set size."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated() / 2 ** 20
    except (AttributeError, RuntimeError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1024 if sys.platform != "darwin" else peak / 2 ** 20    # KiB on Linux, bytes on macOS
    except (ImportError, OSError):
        return float("nan")


def hms(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_value(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


# --------------------------------------------------------------------------- strict JSON
def jsonable(obj: Any) -> Any:
    """Plain JSON values: NaN/inf -> None, enums -> their value, numpy scalars
    and arrays -> Python numbers/lists, paths -> strings, tuples -> lists."""
    if isinstance(obj, enum.Enum):
        return jsonable(obj.value)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(jsonable(k)) if not isinstance(k, str) else k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and type(obj).__module__ in ("numpy", "torch"):
        return jsonable(obj.tolist())
    raise TypeError(f"{type(obj).__name__} value is not JSON data")


def dumps(obj: Any, **kw) -> str:
    """``json.dumps`` that never writes NaN/Infinity (see :func:`jsonable`)."""
    return json.dumps(jsonable(obj), allow_nan=False, **kw)


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """Atomic (tmp + rename) strict JSON file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(dumps(obj, indent=indent) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json_object(path: str | Path, error: type[Exception] = ValueError) -> dict:
    """A JSON file that must hold an object (a run's meta.json...); anything else raises
    ``error`` with one line naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise error(f"{path}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: must be a JSON object, got a {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- handlers
class _Filter(logging.Filter):
    def __init__(self, to_stderr: bool, main: bool) -> None:
        super().__init__()
        self.to_stderr, self.main = to_stderr, main

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name.split(".")[0] in OUR_LOGGERS
        if record.levelno < logging.WARNING and not (ours and self.main):
            return False
        if self.to_stderr and getattr(record, _FILE_ONLY, False):
            return False
        if self.to_stderr and getattr(record, _PROGRESS, False) and _bars_drawn:
            return False       # the bar shows it
        return True


class _StderrHandler(logging.Handler):
    """Writes to the *current* ``sys.stderr`` (tests swap it), through
    ``tqdm.write`` while a bar is drawn so the bar is not torn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if _bars_drawn:
                from tqdm import tqdm

                tqdm.write(msg, file=sys.stderr)
            else:
                sys.stderr.write(msg + "\n")
                sys.stderr.flush()
        except Exception:       # logging must never take the run down
            self.handleError(record)


class _PrefixFormatter(logging.Formatter):
    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        return f"{self.prog}: {msg}"


class RunLog:
    """The handlers of one command; :meth:`to_folder` adds ``log.txt``."""

    def __init__(self, prog: str, main: bool, argv: list[str] | None = None) -> None:
        self.prog, self.main = prog, main
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.folder: Path | None = None
        self.stderr = _StderrHandler(logging.INFO)
        self.stderr.setFormatter(_PrefixFormatter(prog))
        self.stderr.addFilter(_Filter(to_stderr=True, main=main))
        self.file: logging.Handler | None = None

    def to_folder(self, folder: str | Path) -> Path | None:
        """Append this command's records to ``<folder>/log.txt`` (rank 0 only)."""
        if not self.main or self.file is not None:
            return None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(folder / LOG_NAME, mode="a", encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               datefmt="%Y-%m-%d %H:%M:%S"))
        handler.addFilter(_Filter(to_stderr=False, main=True))
        logging.getLogger().addHandler(handler)
        self.file, self.folder = handler, folder
        logging.getLogger("hybridps").info("%s %s", self.prog, " ".join(self.argv), extra={_FILE_ONLY: True})
        return folder / LOG_NAME


@contextlib.contextmanager
def cli_logging(prog: str, argv: list[str] | None = None) -> Iterator[RunLog]:
    """Route our log records to stderr (and later ``log.txt``) while a command runs;
    ``argv`` (default ``sys.argv[1:]``) heads the command's part of ``log.txt``."""
    root = logging.getLogger()
    run = RunLog(prog, is_main_process(), argv)
    level = root.level
    root.addHandler(run.stderr)
    root.setLevel(logging.INFO)
    _active.append(run)
    try:
        yield run
    finally:
        _active.remove(run)
        root.removeHandler(run.stderr)
        if run.file is not None:
            root.removeHandler(run.file)
            run.file.close()
        root.setLevel(level)


def log_to_folder(folder: str | Path) -> Path | None:
    """``<folder>/log.txt`` for the running command (no-op outside :func:`cli_logging`,
    on other ranks, or when the command already writes one)."""
    return _active[-1].to_folder(folder) if _active else None


def final_error(line: str) -> None:
    """A command's one-line error: stderr, and ``log.txt`` when the command writes one."""
    print(line, file=sys.stderr, flush=True)
    logging.getLogger("hybridps").error("%s", line, extra={_FILE_ONLY: True})


def result(text: str) -> None:
    """A command's result (a table, the run directory): stdout, and ``log.txt``."""
    print(text, flush=True)
    logging.getLogger("hybridps").info("%s", text, extra={_FILE_ONLY: True})


# --------------------------------------------------------------------------- progress
class Progress:
    """Count towards ``total``: a tqdm bar on a terminal, plain log lines otherwise.

    ``update(n, **fields)`` adds ``n`` and shows ``fields`` (loss, lr...) with
    the count.  A plain line goes out on the first update, then every
    :func:`log_interval` seconds, and at :meth:`close` if the count moved
    since.  ``bar=False`` never draws a bar (and logs the lines to stderr);
    ``show=False`` (a ``--quiet``) keeps bar and lines off stderr, the lines
    still go to ``log.txt``; ``memory=True`` adds the peak memory;
    ``bytes_=True`` formats counts as sizes.
    """

    def __init__(self, total: int | None, what: str, *, unit: str = "it", initial: int = 0,
                 logger: logging.Logger | None = None, bar: bool | None = None, memory: bool = False,
                 bytes_: bool = False, interval: float | None = None, show: bool = True) -> None:
        global _bars_drawn
        self.total, self.what, self.unit = total, what, unit
        self.count = self.start = initial
        self.logger = logger or log
        self.memory, self.bytes_ = memory, bytes_
        self.interval = log_interval() if interval is None else interval
        self.fields: dict[str, Any] = {}
        self.t0 = time.monotonic()
        self.last_line: float | None = None
        self.last_count = initial
        self.bar = None
        self.extra = {_PROGRESS: True, _FILE_ONLY: not show}
        if show and (stderr_is_terminal() if bar is None else bar) and stderr_is_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=what, unit=unit if not bytes_ else "B",
                            unit_scale=bytes_, unit_divisor=1024 if bytes_ else 1000, file=sys.stderr,
                            dynamic_ncols=True, leave=False, mininterval=0.5)
            _bars_drawn += 1

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **fields: Any) -> None:
        self.count += n
        if fields:
            self.fields = fields
        if self.bar is not None:
            if fields:
                self.bar.set_postfix({k: format_value(v) for k, v in fields.items()}, refresh=False)
            self.bar.update(n)
        now = time.monotonic()
        if self.last_line is None or now - self.last_line >= self.interval:
            self._line(now)

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self.t0
        done = self.count - self.start
        rate = done / elapsed if elapsed > 0 else float("nan")
        size = human_bytes if self.bytes_ else str
        parts = [f"{self.what} {size(self.count)}" + (f"/{size(self.total)}" if self.total else "")
                 + (f" ({100 * self.count / self.total:.0f}%)" if self.total else "")]
        if self.fields:
            parts.append(" ".join(f"{k} {format_value(v)}" for k, v in self.fields.items()))
        if math.isfinite(rate):
            parts.append(f"{human_bytes(rate)}/s" if self.bytes_ else
                         (f"{rate:.2f} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.2f} s/{self.unit}"))
        parts.append(f"elapsed {hms(elapsed)}")
        if self.total and done > 0 and self.count < self.total:
            parts.append(f"ETA {hms((self.total - self.count) / rate)}")
        if self.memory:
            parts.append(f"mem {memory_mib():.0f} MiB")
        return " | ".join(parts)

    def _line(self, now: float) -> None:
        self.last_line, self.last_count = now, self.count
        self.logger.info("%s", self.line(now), extra=self.extra)

    def close(self) -> None:
        global _bars_drawn
        if self.count != self.last_count:
            self._line(time.monotonic())
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            _bars_drawn -= 1
