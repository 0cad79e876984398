"""One small interface — run a command, get a RunResult — over three ways into a guest.

* ``AgentTransport``: the lab's guest agent over virtio-serial (default; also files and tree hashes);
* ``SSHTransport``: paramiko, for guest images with their own sshd (e.g. a real AerynOS install);
* ``ConsoleTransport``: a shell on the serial console, for kernels that cannot run Python (foreign kernels).
"""
from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vm.errors import GuestTimeout, VmError
from vm.protocol import LineChannel, ProtocolError, RunResult, b64, unb64


class Transport(Protocol):
    def run(self, command: str, timeout: float | None = None) -> RunResult: ...


@dataclass
class AgentTransport:
    channel: LineChannel
    console_tail: Callable[[], list[str]]
    request_margin: float = 30.0
    _next_id: int = 1

    def wait_ready(self, timeout: float, alive: Callable[[], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                message = self.channel.receive(min(remaining, 0.5))
            except (ProtocolError, OSError) as err:
                time.sleep(0.2)  # let the console thread collect QEMU's last words
                raise VmError(f"guest agent channel failed before the agent was ready ({err}); console: "
                              + " | ".join(self.console_tail())) from None
            if message is not None and message.get("event") == "ready":
                return message
            if message is None and not alive():
                raise VmError("QEMU exited before the guest agent was ready; console: "
                              + " | ".join(self.console_tail()))
        raise GuestTimeout("the guest agent to start", timeout, self.console_tail())

    def request(self, op: str, wait_s: float | None = None, **fields: Any) -> dict[str, Any]:
        ident = self._next_id
        self._next_id += 1
        try:
            self.channel.send({"id": ident, "op": op, **fields})
            wait = None if wait_s is None else wait_s + self.request_margin
            deadline = None if wait is None else time.monotonic() + wait
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise GuestTimeout(f"the agent's answer to {op}", wait, self.console_tail())
                message = self.channel.receive(remaining)
                if message is None:
                    continue
                if message.get("id") == ident:
                    break
        except (ProtocolError, OSError) as err:
            raise VmError(f"guest agent connection lost during {op}: {err}; console: "
                          + " | ".join(self.console_tail()[-5:])) from None
        if not message.get("ok"):
            raise VmError(f"guest agent {op} failed: {message.get('error')}")
        return message["result"]

    def run(self, command: str | list[str], timeout: float | None = None, **fields: Any) -> RunResult:
        return RunResult.from_wire(self.request("run", timeout, command=command, timeout=timeout, **fields))

    def read_file(self, path: str, timeout: float | None = 120) -> bytes:
        return unb64(self.request("read_file", timeout, path=path)["data"])

    def write_file(self, path: str, data: bytes, mode: int | None = None, fsync: bool = False,
                   timeout: float | None = 120) -> None:
        extra = {} if mode is None else {"mode": mode}
        self.request("write_file", timeout, path=path, data=b64(data), fsync=fsync, **extra)

    def hash_tree(self, path: str, timeout: float | None = 300) -> dict[str, str]:
        return self.request("hash_tree", timeout, path=path)["entries"]


@dataclass
class ConsoleTransport:
    """A shell on the console. stdout and stderr arrive merged (as ``stdout``); the exit code via a marker."""

    send: Callable[[str], None]
    wait_for: Callable[[str, float], re.Match]

    def run(self, command: str, timeout: float | None = None) -> RunResult:
        tag = secrets.token_hex(4)
        started = time.monotonic()
        # The markers are built by the shell (quotes split them), so the echoed command line never matches.
        self.send(f"echo ST''ART-{tag}; {command}; echo EX''IT-{tag}=$?\n")
        self.wait_for(rf"START-{tag}\r*\n", timeout or 600)
        match = self.wait_for(rf"(?s)(.*?)EXIT-{tag}=(\d+)", timeout or 600)
        output = match.group(1).replace("\r", "")
        return RunResult(int(match.group(2)), output, "", seconds=time.monotonic() - started)


@dataclass
class SSHTransport:
    """Commands over SSH (paramiko) to a guest with its own sshd, e.g. through hostfwd=tcp:127.0.0.1:PORT-:22."""

    host: str
    port: int
    username: str = "root"
    password: str | None = None
    key_filename: str | None = None
    connect_timeout: float = 10.0
    _client: Any = field(default=None, repr=False)

    def connect(self, timeout: float = 120.0) -> None:
        import paramiko

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # throw-away lab guests
            try:
                client.connect(self.host, self.port, self.username, self.password, key_filename=self.key_filename,
                               timeout=self.connect_timeout, banner_timeout=self.connect_timeout,
                               allow_agent=False, look_for_keys=self.key_filename is None and self.password is None)
                self._client = client
                return
            except Exception as err:  # noqa: BLE001 - sshd not up yet: retry until the deadline
                last = err
                client.close()
                time.sleep(1.0)
        raise VmError(f"ssh {self.username}@{self.host}:{self.port}: no connection within {timeout:g}s ({last})")

    def run(self, command: str, timeout: float | None = None) -> RunResult:
        if self._client is None:
            self.connect()
        started = time.monotonic()
        _, stdout, stderr = self._client.exec_command(command, timeout=timeout)
        out = stdout.read().decode("utf-8", "replace")
        err = stderr.read().decode("utf-8", "replace")
        return RunResult(stdout.channel.recv_exit_status(), out, err, seconds=time.monotonic() - started)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
