"""What on a (possibly shared) ESP belongs to this installation: its entry token and the files it wrote.

An ESP is shared by firmware updaters (fwupd keeps ``EFI/<os-id>/fwupdx64.efi`` and ``EFI/<os-id>/fw/``), other
operating systems and other installations of the same one.  Boot sync decides ownership so (docs/BOOT.md):

- **Entries** are this installation's when they carry ``moss.fstx=`` and exactly this installation's ``root=``
  words.  Every other entry is left alone, and the files it references are never removed.
- **Files** are this installation's when its ownership record lists them (written *before* a file is first
  copied, so a crash cannot leave an unrecorded file) or one of its own entries references them.  Nothing else
  is ever removed or overwritten; a kernel path already taken by a file it does not own gets another directory.
- **The entry token** names entries (``<token>-<kver>-<state>.conf``) and the kernel directory
  (``EFI/<token>/<kver>/``), as systemd's kernel-install does (kernel-install(8), ``--entry-token=auto``):
  ``/etc/kernel/entry-token``, else the machine ID (``/etc/machine-id``), else os-release's ``IMAGE_ID``, else
  ``ID``.  A token from os-release is shared by every installation of that OS (and a machine ID by every clone
  of an image): when the ESP already holds ``<token>-*`` entries of another ``root=``, this installation uses
  ``<token>-<installation id>`` instead.
- **The ownership record** is ``loader/stonelab/<installation id>.files``, one ESP path per line; the
  installation id is the first 16 hex digits of the sha256 of the ``root=`` words (sorted), so a record never
  mixes two installations.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from reference_impl.boot.entries import ENTRIES_DIR, cmdline_words, entry_fstx, parse_entry
from reference_impl.installation import Installation

RECORD_DIR = "loader/stonelab"
_MACHINE_ID = re.compile(r"[0-9a-f]{32}")
_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class EntryToken:
    value: str
    source: str        # "entry-token", "machine-id", "IMAGE_ID", "ID", or "ID (shared ESP)"


def installation_id(root_arg: str) -> str:
    """16 hex digits identifying an installation on an ESP: its ``root=`` words, order-insensitive."""
    return hashlib.sha256(" ".join(sorted(cmdline_words(root_arg))).encode()).hexdigest()[:16]


def record_path(root_arg: str) -> str:
    return f"{RECORD_DIR}/{installation_id(root_arg)}.files"


def _read_first_line(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip().splitlines()[0].strip() if path.is_file() else ""
    except (OSError, IndexError):
        return ""


def configured_token(root: Path, os_id: str, image_id: str | None = None) -> EntryToken:
    """The token systemd's ``--entry-token=auto`` would choose for ``root`` (not yet checked against the ESP)."""
    explicit = _read_first_line(root / "etc" / "kernel" / "entry-token")
    if _TOKEN.fullmatch(explicit):
        return EntryToken(explicit, "entry-token")
    machine_id = _read_first_line(root / "etc" / "machine-id")
    if _MACHINE_ID.fullmatch(machine_id):
        return EntryToken(machine_id, "machine-id")
    if image_id and _TOKEN.fullmatch(image_id):
        return EntryToken(image_id, "IMAGE_ID")
    return EntryToken(os_id, "ID")


def entry_root(text: str, keys: tuple[str, ...] = ("root", "rootflags", "rd.luks.uuid")) -> str:
    """The first ``key=value`` word of each of ``keys`` in an entry's options (the root it boots), in order."""
    first: dict[str, str] = {}
    for options in parse_entry(text).get("options", []):
        for word in cmdline_words(options):
            key = word.split("=", 1)[0].strip('"')
            if key in keys and "=" in word:
                first.setdefault(key, word)
    return " ".join(first[k] for k in keys if k in first)


def is_ours(text: str, root_arg: str) -> bool:
    """An entry this installation wrote: ``moss.fstx=``, and the first ``root=``/``rootflags=``/
    ``rd.luks.uuid=`` words are exactly this installation's (another installation sharing the ESP writes entries
    of the same shape for its own root; a later ``rootflags=`` from a cmdline snippet does not count)."""
    if entry_fstx(text) is None:
        return False
    words = cmdline_words(root_arg)
    keys = tuple(dict.fromkeys(w.split("=", 1)[0].strip('"') for w in words))
    return entry_root(text, keys) == " ".join(words)


def choose_token(token: EntryToken, root_arg: str, entries: dict[str, str], wanted_names: list[str]) -> EntryToken:
    """``token``, or ``<token>-<installation id>`` when ``token`` is taken on this ESP by another installation.

    Taken: a ``<token>-*.conf`` entry with ``moss.fstx=`` and another root (first come, first served: while
    this installation has entries under the plain token it keeps it), or, always, an entry file that is not this
    installation's at one of ``wanted_names`` (entry file names with the plain token).  ``entries`` maps the
    ESP's entry paths to their text.  Tokens from os-release collide by design; a machine ID or an
    ``/etc/kernel/entry-token`` collides when an image was cloned without giving each copy its own: the rule is
    the same for every source, so no entry of another installation is ever overwritten."""
    shared = EntryToken(f"{token.value}-{installation_id(root_arg)[:8]}", f"{token.source} (shared ESP)")
    prefix = f"{ENTRIES_DIR}/{token.value}-".casefold()
    shared_prefix = f"{ENTRIES_DIR}/{shared.value}-".casefold()
    wanted = {f"{ENTRIES_DIR}/{name}".casefold() for name in wanted_names}
    taken = holding = occupied = False
    for path, text in entries.items():
        folded = path.casefold()
        if is_ours(text, root_arg):
            holding |= folded.startswith(prefix) and not folded.startswith(shared_prefix)
        else:
            occupied |= folded in wanted
            taken |= folded.startswith(prefix) and entry_fstx(text) is not None
    return shared if occupied or (taken and not holding) else token


def remember_root(root: Path, root_arg: str) -> str | None:
    """Keep ``root_arg`` in ``<root>/.moss/boot-root`` (written to a temporary, renamed) so that ``boot status``
    knows this installation's entries without ``--root-device``; None, or why it could not be kept."""
    path = Installation(root).boot_root
    text = " ".join(cmdline_words(root_arg)) + "\n"
    try:
        if path.is_file() and path.read_text() == text:
            return None
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as err:
        return f"{path}: cannot record this installation's root= ({err.strerror or err})"
    return None


def remembered_root(root: Path) -> str | None:
    """The ``root=`` words of the last boot sync of ``root``, or None."""
    text = _read_first_line(Installation(root).boot_root)
    return text or None


def parse_record(data: bytes | None) -> set[str]:
    if not data:
        return set()
    return {line.strip() for line in data.decode(errors="replace").splitlines()
            if line.strip() and not line.startswith("#")}


def format_record(root_arg: str, paths: set[str]) -> bytes:
    header = f"# stonelab boot sync: files on this ESP written for the installation with {root_arg}\n"
    return (header + "".join(f"{p}\n" for p in sorted(paths))).encode()
