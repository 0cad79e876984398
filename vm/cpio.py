"""A minimal writer of "newc" cpio archives (the format the Linux kernel unpacks as an initramfs)."""
from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import BinaryIO


@dataclass
class CpioWriter:
    out: BinaryIO
    _ino: int = field(default=1)

    def _header(self, name: str, mode: int, size: int, rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        self.out.write(b"070701" + b"".join(b"%08X" % value for value in fields) + encoded)
        self._pad()

    def _pad(self) -> None:
        position = self.out.tell()
        self.out.write(b"\0" * (-position % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._header(name, stat.S_IFDIR | mode, 0)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._header(name, stat.S_IFREG | mode, len(data))
        self.out.write(data)
        self._pad()

    def symlink(self, name: str, target: str) -> None:
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data))
        self.out.write(data)
        self._pad()

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._header(name, stat.S_IFCHR | mode, 0, (major, minor))

    def close(self) -> None:
        self._header("TRAILER!!!", 0, 0)
