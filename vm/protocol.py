"""The guest agent's wire protocol: one JSON object per line, both directions.

Host → guest: ``{"id": N, "op": "run"|"read_file"|"write_file"|"hash_tree"|"rescan_disks"|"ping"|"shutdown", ...}``;
``run`` takes ``command`` as a list of words (executed exactly, no shell) or a string (a ``/bin/sh -c`` line).
Guest → host: ``{"id": N, "ok": true, "result": {...}}`` or ``{"id": N, "ok": false, "error": "..."}``, and once
at start ``{"event": "ready", ...}``.  File contents travel base64-encoded.
"""
from __future__ import annotations

import base64
import json
import os
import select
import time
from dataclasses import dataclass, field
from typing import Any

OPS = ("ping", "run", "read_file", "write_file", "hash_tree", "rescan_disks", "shutdown")
MAX_LINE = 256 << 20


class ProtocolError(Exception):
    """A malformed line, or the peer closed the channel."""


class ChannelClosed(ProtocolError):
    """The peer closed the channel (end of stream)."""


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
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


@dataclass
class RunResult:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    seconds: float = 0.0

    @classmethod
    def from_wire(cls, result: dict[str, Any]) -> RunResult:
        return cls(int(result["exit_code"]), result.get("stdout", ""), result.get("stderr", ""),
                   bool(result.get("timed_out", False)), float(result.get("seconds", 0.0)))


@dataclass
class LineChannel:
    """Lines over a pair of file descriptors (a socket, a pipe pair or a virtio-serial port), with timeouts."""

    read_fd: int
    write_fd: int
    _buffer: bytearray = field(default_factory=bytearray)

    def send(self, message: dict[str, Any]) -> None:
        data = memoryview(encode(message))
        while data:
            written = os.write(self.write_fd, data)
            data = data[written:]

    def receive(self, timeout: float | None) -> dict[str, Any] | None:
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
