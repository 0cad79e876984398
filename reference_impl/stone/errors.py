from __future__ import annotations

from stonelab.errors import StonelabError


class StoneError(StonelabError):
    """A `.stone` file that cannot be trusted: names the file, the payload and the byte offset."""

    def __init__(self, file: str, problem: str, *, payload: str | None = None, offset: int | None = None):
        self.file = file
        self.problem = problem
        self.payload = payload
        self.offset = offset
        where = [str(file)]
        if payload:
            where.append(f"payload {payload}")
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{': '.join([', '.join(where), problem])}")
