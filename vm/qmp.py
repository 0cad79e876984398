"""QMP through the ``qemu.qmp`` library (asyncio), wrapped synchronously with a private event loop."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from vm.errors import VmError


class QMP:
    """A synchronous QMP session: ``status()``, ``events()``, ``screendump()``, ``system_reset()``, ``quit()``."""

    def __init__(self, socket_path: Path, timeout: float = 10.0):
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient("stonelab")
        self._listener = EventListener()
        self._client.register_listener(self._listener)
        self._timeout = timeout
        try:
            self._run(self._client.connect(str(socket_path)))
        except Exception as err:
            self._loop.close()
            raise VmError(f"{socket_path}: cannot connect to QEMU's QMP socket: {err}") from None

    def _run(self, coro, timeout: float | None = None):
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout or self._timeout))

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return self._run(self._client.execute(command, arguments))

    def status(self) -> str:
        return self.execute("query-status")["status"]

    def events(self, timeout: float = 0.0) -> list[dict[str, Any]]:
        """Events received so far; waits up to ``timeout`` seconds for the first one when none is pending."""
        found = []
        if timeout > 0 and self._listener.empty():
            try:
                found.append(dict(self._run(self._listener.get(), timeout)))
            except asyncio.TimeoutError:
                return []
        return found + self._drain()

    def _drain(self) -> list[dict[str, Any]]:
        self._run(asyncio.sleep(0))
        found = []
        while not self._listener.empty():
            found.append(dict(self._run(self._listener.get())))
        return found

    def screendump(self, path: Path) -> Path:
        self.execute("screendump", {"filename": str(path)})
        return path

    def system_reset(self) -> None:
        self.execute("system_reset")

    def quit(self) -> None:
        try:
            self.execute("quit")
        except Exception:  # noqa: BLE001 - QEMU closes the socket while answering
            pass

    def close(self) -> None:
        try:
            self._run(self._client.disconnect())
        except Exception:  # noqa: BLE001
            pass
        self._loop.close()
