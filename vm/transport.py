"""One interface — ``Transport`` — over the three ways into a guest; ``Machine`` only ever talks to a Transport.

* ``AgentTransport``: the lab's guest agent over virtio-serial (default; files and tree hashes too);
* ``SSHTransport``: paramiko, for guest images with their own sshd (e.g. a real AerynOS install); files by SFTP;
* ``ConsoleTransport``: a shell on the serial console, for kernels that cannot run Python (foreign kernels);
  files as base64 through the shell.

A command is either a list of words — run exactly as given, the guest sees the same argv (through a shell only
where the way in has no other means, and then quoted with ``shlex.join``) — or a string, a shell command line.
"""
from __future__ import annotations

import logging
import re
import secrets
import shlex
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vm.errors import GuestTimeout, VmError
from vm.log import get_logger
from vm.protocol import LineChannel, ProtocolError, b64, unb64

Command = str | Sequence[str]

@dataclass
class RunResult:
    """One command's outcome: ``exit_code`` (negative: killed by that signal), its output, whether it was killed
    for exceeding its timeout, its duration in seconds as the guest measured it, and whether the guest forked it
    from its warm interpreter (``vm.zygote``) rather than starting a fresh process."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    seconds: float = 0.0
    forked: bool = False

    @classmethod
    def from_wire(cls, result: dict[str, Any]) -> RunResult:
        return cls(int(result["exit_code"]), result.get("stdout", ""), result.get("stderr", ""),
                   bool(result.get("timed_out", False)), float(result.get("seconds", 0.0)),
                   bool(result.get("forked", False)))


log = get_logger("vm.transport")


def shell_line(command: Command, env: dict[str, str] | None = None, cwd: str | None = None) -> str:
    """``command`` as one shell command line: a string unchanged, a word list quoted word by word; with ``env``
    (exported) or ``cwd``, in a subshell that sets them first."""
    line = command if isinstance(command, str) else shlex.join(command)
    if not env and not cwd:
        return line
    setup = ([f"cd {shlex.quote(cwd)}"] if cwd else []) + [f"export {k}={shlex.quote(v)}" for k, v in (env or {}).items()]
    return f"( {' && '.join(setup)} && {line} )"


@dataclass
class GuestLink:
    """What a transport may use of one boot: QEMU's unix sockets, its console, whether it still runs, and
    whether this boot is a restored saved state (no ``ready`` event will come: the agent already sent it)."""

    connect: Callable[[str], socket.socket]
    console: Any                     # vm.console.Console
    alive: Callable[[], bool]
    restored: bool = False


class Transport(Protocol):
    """A way into a running guest.

    ``attach`` is called once per boot after QEMU started and returns once commands can run (raises VmError /
    GuestTimeout with the console tail otherwise); ``run`` returns a RunResult (exit code; negative: killed by
    that signal), with ``env`` added to the guest's environment, in ``cwd``, and ``warm``: a ``python -m``/``-c``
    word list that may be forked from a warm interpreter (the agent's zygote; other transports start it fresh); ``read_file``/``write_file`` move bytes; ``request_poweroff`` asks the guest to sync and power
    off (QEMU then exits); ``detach`` drops the connection (called when the boot ends, also after a power cut).
    """

    def attach(self, link: GuestLink, timeout: float) -> dict[str, Any]: ...
    def run(self, command: Command, timeout: float | None = None, *, env: dict[str, str] | None = None,
            cwd: str | None = None, warm: bool = False) -> RunResult: ...
    def read_file(self, path: str) -> bytes: ...
    def write_file(self, path: str, data: bytes, mode: int | None = None, fsync: bool = False) -> None: ...
    def request_poweroff(self) -> None: ...
    def detach(self) -> None: ...


@dataclass
class AgentTransport:
    """The guest agent (``vm.agent``) over the virtio-serial port ``org.stonelab.agent`` (QEMU socket
    ``agent.sock``), or over any ``LineChannel`` given directly (tests run the agent over pipes)."""

    channel: LineChannel | None = None
    console_tail: Callable[[], list[str]] = lambda: []
    request_margin: float = 30.0
    _next_id: int = 1
    _sock: socket.socket | None = field(default=None, repr=False)

    def attach(self, link: GuestLink, timeout: float) -> dict[str, Any]:
        self._sock = link.connect("agent.sock")
        self.channel = LineChannel(self._sock.fileno(), self._sock.fileno())
        self.console_tail = link.console.tail
        if link.restored:  # the agent is already serving: any answer proves it
            return self.request("ping", timeout)
        return self.wait_ready(timeout, link.alive)

    def wait_ready(self, timeout: float, alive: Callable[[], bool]) -> dict[str, Any]:
        """The agent's ``ready`` event (``{"event": "ready", "pid", "uptime"}``) within ``timeout`` seconds."""
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
        """Send one request and return its ``result``; VmError when the agent reports a failure or the channel
        breaks, GuestTimeout after ``wait_s`` + ``request_margin`` seconds without an answer."""
        if self.channel is None:
            raise VmError(f"guest agent {op}: not attached to a running guest")
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
                if message is not None and message.get("id") == ident:
                    break
        except (ProtocolError, OSError) as err:
            raise VmError(f"guest agent connection lost during {op}: {err}; console: "
                          + " | ".join(self.console_tail()[-5:])) from None
        if not message.get("ok"):
            raise VmError(f"guest agent {op} failed: {message.get('error')}")
        return message["result"]

    def run(self, command: Command, timeout: float | None = None, *, env: dict[str, str] | None = None,
            cwd: str | None = None, warm: bool = False) -> RunResult:
        wire = command if isinstance(command, str) else list(command)  # a list runs without a shell
        fields = {k: v for k, v in (("env", env), ("cwd", cwd), ("warm", warm)) if v}
        return RunResult.from_wire(self.request("run", timeout, command=wire, timeout=timeout, **fields))

    def read_file(self, path: str, timeout: float | None = 120) -> bytes:
        return unb64(self.request("read_file", timeout, path=path)["data"])

    def write_file(self, path: str, data: bytes, mode: int | None = None, fsync: bool = False,
                   timeout: float | None = 120) -> None:
        extra = {} if mode is None else {"mode": mode}
        self.request("write_file", timeout, path=path, data=b64(data), fsync=fsync, **extra)

    def hash_tree(self, path: str, timeout: float | None = 300) -> dict[str, str]:
        return self.request("hash_tree", timeout, path=path)["entries"]

    def rescan_disks(self, timeout: float | None = 60) -> list[str]:
        """Drop the guest's cached blocks and partition tables of its virtio disks and read them again (after a
        restore the disks are new files); returns the disks rescanned."""
        return self.request("rescan_disks", timeout)["disks"]

    def request_poweroff(self) -> None:
        self.request("shutdown", 30)

    def detach(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.channel = None


@dataclass
class ConsoleTransport:
    """A shell on the console. stdout and stderr arrive merged (as ``stdout``); the exit code via a marker.
    Built with ``send``/``wait_for`` of a Console (tests), or attached to a Machine's console."""

    send: Callable[[str], None] | None = None
    wait_for: Callable[[str, float], re.Match] | None = None

    def attach(self, link: GuestLink, timeout: float) -> dict[str, Any]:
        self.send, self.wait_for = link.console.send, link.console.wait_for
        return {}

    def run(self, command: Command, timeout: float | None = None, *, env: dict[str, str] | None = None,
            cwd: str | None = None, warm: bool = False) -> RunResult:
        tag = secrets.token_hex(4)
        started = time.monotonic()
        # The markers are built by the shell (quotes split them), so the echoed command line never matches.
        self.send(f"echo ST''ART-{tag}; {shell_line(command, env, cwd)}; echo EX''IT-{tag}=$?\n")
        self.wait_for(rf"START-{tag}\r*\n", timeout or 600)
        match = self.wait_for(rf"(?s)(.*?)EXIT-{tag}=(\d+)", timeout or 600)
        output = match.group(1).replace("\r", "")
        return RunResult(int(match.group(2)), output, "", seconds=time.monotonic() - started)

    def _checked(self, command: str, timeout: float) -> str:
        result = self.run(command, timeout)
        if result.exit_code != 0:
            raise VmError(f"console command {command[:60]!r} exited {result.exit_code}: {result.stdout[-200:]}")
        return result.stdout

    def read_file(self, path: str, timeout: float = 120) -> bytes:
        text = self._checked(f"base64 {shlex.quote(path)}", timeout)
        return unb64("".join(text.split()))

    def write_file(self, path: str, data: bytes, mode: int | None = None, fsync: bool = False,
                   timeout: float = 120) -> None:
        target = shlex.quote(path)
        self._checked(f": > {target}", timeout)
        encoded = b64(data)
        for start in range(0, len(encoded), 768):  # short lines: a tty line discipline buffers 4 KiB at most
            self._checked(f"echo {encoded[start:start + 768]} | base64 -d >> {target}", timeout)
        if mode is not None:
            self._checked(f"chmod {mode:o} {target}", timeout)
        if fsync:
            self._checked("sync", timeout)

    def request_poweroff(self) -> None:
        self.send("exit\n")  # the guest init powers off when the console shell ends

    def detach(self) -> None:
        pass


@dataclass
class SSHTransport:
    """Commands over SSH (paramiko) to a guest with its own sshd, e.g. through hostfwd=tcp:127.0.0.1:PORT-:22.
    SSH always runs a command through the remote user's shell, so word lists are quoted with ``shlex.join``."""

    host: str
    port: int
    username: str = "root"
    password: str | None = None
    key_filename: str | None = None
    connect_timeout: float = 10.0
    _client: Any = field(default=None, repr=False)

    def attach(self, link: GuestLink, timeout: float) -> dict[str, Any]:
        self.detach()
        self.connect(timeout)
        return {}

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

    def run(self, command: Command, timeout: float | None = None, *, env: dict[str, str] | None = None,
            cwd: str | None = None, warm: bool = False) -> RunResult:
        if self._client is None:
            self.connect()
        started = time.monotonic()
        _, stdout, stderr = self._client.exec_command(shell_line(command, env, cwd), timeout=timeout)
        out = stdout.read().decode("utf-8", "replace")
        err = stderr.read().decode("utf-8", "replace")
        return RunResult(stdout.channel.recv_exit_status(), out, err, seconds=time.monotonic() - started)

    def read_file(self, path: str) -> bytes:
        with self._sftp() as sftp, sftp.open(path, "rb") as handle:
            return handle.read()

    def write_file(self, path: str, data: bytes, mode: int | None = None, fsync: bool = False) -> None:
        with self._sftp() as sftp:
            with sftp.open(path, "wb") as handle:
                handle.write(data)
            if mode is not None:
                sftp.chmod(path, mode)
        if fsync:
            self.run(["sync", path])

    def _sftp(self):
        if self._client is None:
            self.connect()
        return self._client.open_sftp()

    def request_poweroff(self) -> None:
        try:
            self.run("sync; poweroff", 30)
        except Exception as err:  # noqa: BLE001 - the connection drops while the guest powers off
            log.debug("ssh poweroff: %s", err)

    def close(self) -> None:
        self.detach()

    def detach(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
