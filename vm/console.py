"""The guest's serial console: QEMU runs under pexpect (a pty); a thread drains it into a log and a buffer so
QEMU never blocks on a full pty, and ``wait_for`` matches regular expressions against what arrived."""
from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pexpect

from vm.errors import GuestTimeout, VmError

TAIL_LINES = 40


class Console:
    def __init__(self, child: pexpect.spawn, log_path: Path | None):
        self._child = child
        self._text = ""
        self._cursor = 0
        self._closed = False
        self._cond = threading.Condition()
        self._log = open(log_path, "ab") if log_path else None
        self._thread = threading.Thread(target=self._drain, name="stonelab-console", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            try:
                data = self._child.read_nonblocking(65536, timeout=0.5)
            except pexpect.TIMEOUT:
                continue
            except (pexpect.EOF, OSError, ValueError):
                break
            if self._log:
                self._log.write(data)
                self._log.flush()
            with self._cond:
                self._text += data.decode("utf-8", "replace")
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return self._text

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        return [line.rstrip("\r") for line in self.text.splitlines()[-lines:]]

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first match of ``pattern`` after the previous match; GuestTimeout with the console tail when none
        arrives within ``timeout`` seconds, VmError when QEMU exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = regex.search(self._text, self._cursor)
                if match:
                    self._cursor = match.end()
                    return match
                if self._closed:
                    raise VmError(f"QEMU exited before the console showed /{pattern}/; last console lines: "
                                  + " | ".join(self._text.splitlines()[-TAIL_LINES:]))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestTimeout(f"/{pattern}/ on the console", timeout, self.tail_unlocked())
                self._cond.wait(remaining)

    def tail_unlocked(self) -> list[str]:
        return [line.rstrip("\r") for line in self._text.splitlines()[-TAIL_LINES:]]

    def send(self, text: str) -> None:
        self._child.send(text.encode())

    def close(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)
        if self._log:
            self._log.close()
            self._log = None
