"""The guest agent's wire protocol: one JSON object per line, both directions.

Host → guest: ``{"id": N, "op": "run"|"read_file"|"write_file"|"hash_tree"|"rescan_disks"|"ping"|"shutdown", ...}``;
``run`` takes ``command`` as a list of words (executed exactly, no shell) or a string (a ``/bin/sh -c`` line),
optionally ``env`` (added to the agent's), ``cwd``, ``timeout`` and ``warm`` (a ``python -m``/``-c`` word list that
the agent's zygote, ``vm.zygote``, may fork from a warm interpreter instead of starting a fresh one).
Guest → host: ``{"id": N, "ok": true, "result": {...}}`` or ``{"id": N, "ok": false, "error": "..."}``, and once
at start ``{"event": "ready", ...}``.  File contents travel base64-encoded.

The guest agent imports this module at every boot, where each module costs a TCG guest tenths of a second
(``dataclasses`` alone ~1 s under load): it uses only ``base64``, ``json``, ``os``, ``select`` and ``time``. The
host's view of an answer (``RunResult``) lives in ``vm.transport``.
"""
from __future__ import annotations

import base64
import json
import os
import select
import time

OPS = ("ping", "run", "read_file", "write_file", "hash_tree", "rescan_disks", "shutdown")
MAX_LINE = 256 << 20


class ProtocolError(Exception):
    """A malformed line, or the peer closed the channel."""


class ChannelClosed(ProtocolError):
    """The peer closed the channel (end of stream)."""


def encode(message: dict[str, object]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, object]:
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolError(f"malformed agent line {line[:80]!r}: {err}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"agent line is not an object: {line[:80]!r}")
    return message


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class LineChannel:
    """Lines over a pair of file descriptors (a socket, a pipe pair or a virtio-serial port), with timeouts."""

    def __init__(self, read_fd: int, write_fd: int):
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._buffer = bytearray()

    def send(self, message: dict[str, object]) -> None:
        data = memoryview(encode(message))
        while data:
            written = os.write(self.write_fd, data)
            data = data[written:]

    def receive(self, timeout: float | None) -> dict[str, object] | None:
        """The next message, or None when ``timeout`` passed first. Raises ProtocolError at end of stream."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[:newline + 1]
                if line.strip():
                    return decode(line)
                continue
            if len(self._buffer) > MAX_LINE:
                raise ProtocolError("agent line longer than the limit")
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.read_fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise ChannelClosed("the agent channel was closed")
            self._buffer += chunk
