"""Faults the lab injects into a system root (beyond the package manager's own fault points): run in the lab
process for the host target, or in the guest as ``python -m lab.faults ACTION ROOT`` for the VM target."""
from __future__ import annotations

import sys
from pathlib import Path


def corrupt_largest_asset(root: Path) -> str:
    """Flip the first byte of the largest asset in the store; returns its path relative to the root."""
    return corrupt_largest_file(root / ".moss" / "assets", root)


def corrupt_largest_file(base: Path, root: Path, pattern: str = "*") -> str:
    """Flip the first byte of the largest regular file below ``base`` whose name matches ``pattern`` (symlinks
    not followed); returns its path relative to ``root``. Raises RuntimeError when there is none."""
    assets = sorted(p for p in base.rglob(pattern) if p.is_file() and not p.is_symlink())
    if not assets:
        raise RuntimeError(f"{base}: no file to corrupt")
    victim = max(assets, key=lambda p: (p.stat().st_size, str(p)))
    victim.chmod(0o644)
    with open(victim, "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 0xFF]) if first else b"!")
    return str(victim.relative_to(root))


ACTIONS = {"corrupt-asset": corrupt_largest_asset}


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2 or args[0] not in ACTIONS:
        print(f"usage: python -m lab.faults {{{'|'.join(ACTIONS)}}} ROOT", file=sys.stderr)
        return 2
    print(ACTIONS[args[0]](Path(args[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
