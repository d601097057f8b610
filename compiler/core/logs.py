"""Where output goes during a build: the console shows one line per stage, qcompile's warnings and errors
(recipes/hydra/job_logging/qcompile.yaml wires the handlers); everything else -- qcompile's INFO records,
the libraries' logs, warnings and raw prints (torch.onnx, onnx_ir, onnxscript, modelopt) -- goes to the
run's log file (cli.log) only."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

# the loggers whose records the console shows: qcompile's stages and its own modules
CONSOLE_LOGGERS = ("qcompile", "compiler", "targets", "__main__")
# where captured library output is logged: the run's log file, never the console
LIBRARY_LOGGER = "library"

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    """text without terminal colour / cursor codes (torch.export and rich colour their error text)."""
    return _ANSI.sub("", text)


# a stage's closing record (compiler.pipeline.stage) carries these attributes: the console draws it as one line
STAGE_KEYS = ("stage", "seconds")


def stage_extra(name: str, seconds: float) -> dict:
    """The `extra` of a stage's closing log record."""
    return dict(zip(STAGE_KEYS, (name, seconds)))


def _ours(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in CONSOLE_LOGGERS)


class ConsoleFilter(logging.Filter):
    """What one console handler shows of qcompile's records (a library's records only reach the file handlers).
    shows="stages": the line each stage ends with (not in a sweep: one line per job there), and with
    verbose=true qcompile's INFO records too; "warnings": qcompile's warnings and errors (guard rails, data
    clamped, an engine not built); "all": both (a console handler that is not qcompile's, e.g. with
    hydra/job_logging=default). configure_console sets stages and verbose per build."""

    def __init__(self, shows: str = "all"):
        super().__init__()
        self.shows = shows
        self.stages = True
        self.verbose = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not _ours(record.name):
            return False
        warning = record.levelno >= logging.WARNING
        if warning:
            return self.shows != "stages"
        if self.shows == "warnings":
            return False
        return self.stages if hasattr(record, STAGE_KEYS[0]) else self.verbose


class ConsoleHandler(logging.StreamHandler):
    """The console end of qcompile's logging, drawn with rich: a stage as "name  seconds", a warning or error as
    one line led by its level word (coloured on a terminal, plain in a pipe or file), never wrapped; no
    timestamps (cli.log has them). A StreamHandler, so console_for_qcompile_only can point it elsewhere."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from rich.console import Console
            from rich.text import Text

            if hasattr(record, STAGE_KEYS[0]):
                text = Text.assemble("  ", (f"{record.stage:<15}", "bold"), f"{record.seconds:>7.1f} s")
            else:
                msg = strip_ansi(self.format(record))
                if record.levelno >= logging.WARNING:
                    word = record.levelname.lower()
                    text = Text(f"{word}: {msg}", style="yellow" if word == "warning" else "bold red")
                else:
                    text = Text(msg, style="dim")
            Console(file=self.stream, soft_wrap=True, highlight=False).print(text)
        except Exception:  # noqa: BLE001 -- logging must not break the build it describes
            self.handleError(record)


def configure_console(verbose: bool = False, stages: bool = True) -> None:
    """Per build: whether the console shows the stage lines (a sweep shows one line per job instead) and,
    with verbose=true, qcompile's INFO records (cache hits, fallbacks taken) as well."""
    for handler in logging.getLogger().handlers:
        for f in handler.filters:
            if isinstance(f, ConsoleFilter):
                f.verbose, f.stages = bool(verbose), bool(stages)


def _is_console(handler: logging.Handler) -> bool:
    return (isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and getattr(handler, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__))


def route_library_logs() -> None:
    """After Hydra configured logging (console + <run dir>/<job>.log on the root logger): the console
    handlers show qcompile's loggers only (a ConsoleFilter on each), library loggers with handlers of their
    own (modelopt's) hand their records to the root's handlers instead, and Python warnings become log
    records (py.warnings), so they land in the log file. Idempotent."""
    root = logging.getLogger()
    for handler in root.handlers:
        if _is_console(handler) and not any(isinstance(f, ConsoleFilter) for f in handler.filters):
            handler.addFilter(ConsoleFilter())
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger) or any(name == p or name.startswith(p + ".") for p in CONSOLE_LOGGERS):
            continue
        for handler in list(lg.handlers):
            if _is_console(handler):
                lg.removeHandler(handler)
                lg.propagate = True
    logging.captureWarnings(True)


def _restore_fds(saved: dict[int, int]) -> None:
    """Point stdout / stderr (fds 1, 2) back at the copies taken before a redirect, flushing Python's buffers
    first so nothing printed during the redirect lands on the terminal afterwards."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in saved.items():
        os.dup2(copy, fd)
        os.close(copy)


@contextlib.contextmanager
def library_output(what: str) -> Iterator[None]:
    """Capture everything libraries print while the block runs (Python prints, C++ writes to the stdout /
    stderr file descriptors such as torch's TorchScript shape-inference warnings, Python warnings) and log
    it to the LIBRARY_LOGGER at INFO, line by line, when the block ends (also when it raises)."""
    log = logging.getLogger(f"{LIBRARY_LOGGER}.{what}")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as sink, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            _restore_fds(saved)
            sink.seek(0)
            text = strip_ansi(sink.read().decode("utf-8", "replace"))
            for line in text.splitlines():
                if line.strip():
                    log.info("%s", line.rstrip())
            for w in caught:
                log.info("%s: %s", w.category.__name__, strip_ansi(str(w.message)))


def log_file() -> str | None:
    """The file the root logger writes to (Hydra's job log, <run dir>/<job name>.log), if any."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


@contextlib.contextmanager
def console_for_qcompile_only(path: str | None) -> Iterator[None]:
    """While a build runs, the console shows qcompile's log records only: the root logger's console
    handlers keep writing to the terminal (through copies of its file descriptors), while whatever else
    reaches stdout / stderr (library prints such as modelopt's "Inserted 58 quantizers", library loggers
    with handlers of their own, C++ warnings) is appended to ``path``, the run's log file. Without a
    path, nothing is redirected."""
    if not path:
        yield
        return
    root = logging.getLogger()
    consoles = [h for h in root.handlers if _is_console(h)]
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = {fd: os.fdopen(os.dup(saved[fd]), "w", buffering=1, encoding="utf-8", errors="replace")
                for fd in (1, 2)}
    swapped = []
    for h in consoles:
        fd = 1 if h.stream in (sys.stdout, sys.__stdout__) else 2
        swapped.append((h, h.setStream(terminal[fd])))
    sink = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for fd in (1, 2):
            os.dup2(sink, fd)
        yield
    finally:
        _restore_fds(saved)
        os.close(sink)
        for h, old in swapped:
            h.setStream(old)
        for stream in terminal.values():
            stream.close()
