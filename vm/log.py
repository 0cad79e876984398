"""Logging for the VM layer and the lab: the standard ``logging`` module, plus ``nested``, a timed block whose
messages are indented by depth — in the manner of the NixOS test driver's ``machine.nested(...)``
(nixos/lib/test-driver/test_driver/logger.py).

    with nested(log, "booting guest"):      # "booting guest"
        ...                                  #   "  …messages inside, indented"
                                             # "booting guest (4.21 s)"  (or "… failed after 4.21 s: error")
"""
from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("stonelab_log_depth", default=0)


class IndentFilter(logging.Filter):
    """Prefixes each record's message with two spaces per enclosing ``nested`` block of the emitting context."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.indent = "  " * _DEPTH.get()
        return True


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with the indentation filter attached once."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, IndentFilter) for f in logger.filters):
        logger.addFilter(IndentFilter())
    return logger


@contextmanager
def nested(logger: logging.Logger, message: str, level: int = logging.INFO) -> Iterator[None]:
    """Log ``message``, run the block one level deeper, then log its duration in seconds (or its failure, with
    the exception's one-line text, re-raised unchanged)."""
    logger.log(level, message)
    token = _DEPTH.set(_DEPTH.get() + 1)
    started = time.monotonic()
    try:
        yield
    except BaseException as err:
        _DEPTH.reset(token)
        logger.log(level, "%s failed after %.2f s: %s", message, time.monotonic() - started,
                   str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise
    _DEPTH.reset(token)
    logger.log(level, "%s (%.2f s)", message, time.monotonic() - started)


def configure(verbosity: int) -> None:
    """Send stonelab's log records to stderr: 0 → warnings, 1 → progress (INFO), 2+ → QEMU argv and every guest
    command (DEBUG). Called once by the CLI; libraries only log."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(indent)s%(message)s", "%H:%M:%S"))
    handler.addFilter(IndentFilter())
    for name in ("vm", "lab", "stonelab"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers = [handler]
        logger.propagate = False
