"""Where everything lives in a target root, in upstream moss's on-disk layout (plus the reference's intent record)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATE_ID_FILE = ".stateID"
ROOT_LINKS = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib", "lib32": "usr/lib32"}


@dataclass(frozen=True)
class Installation:
    root: Path

    @property
    def moss(self) -> Path:
        return self.root / ".moss"

    @property
    def assets(self) -> Path:
        return self.moss / "assets" / "v2"

    @property
    def db_dir(self) -> Path:
        return self.moss / "db"

    @property
    def trees(self) -> Path:
        return self.moss / "root"

    @property
    def staging(self) -> Path:
        return self.trees / "staging"

    @property
    def staging_usr(self) -> Path:
        return self.staging / "usr"

    @property
    def isolation(self) -> Path:
        return self.trees / "isolation"

    @property
    def usr(self) -> Path:
        return self.root / "usr"

    @property
    def lockfile(self) -> Path:
        return self.moss / ".moss-lockfile"

    @property
    def intent(self) -> Path:
        """The reference's intent record (upstream keeps none)."""
        return self.moss / "intent.json"

    @property
    def boot_root(self) -> Path:
        """The ``root=`` words the last boot sync wrote into this installation's entries (reference only)."""
        return self.moss / "boot-root"

    def archived(self, state_id: int) -> Path:
        """The archived tree of a state (for the symlink strategy also the live one)."""
        return self.trees / str(state_id) / "usr"

    def ensure_dirs(self) -> None:
        for path in (self.assets, self.db_dir, self.trees):
            path.mkdir(parents=True, exist_ok=True)

    def active_state(self) -> int | None:
        """The id in ``/usr/.stateID`` (following a symlinked /usr), or None."""
        return read_state_id(self.usr)

    def archived_ids(self) -> list[int]:
        if not self.trees.is_dir():
            return []
        return sorted(int(p.name) for p in self.trees.iterdir() if p.name.isdigit() and (p / "usr").is_dir())


def read_state_id(usr: Path) -> int | None:
    try:
        text = (usr / STATE_ID_FILE).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
