"""Transaction triggers inside real transactions (CLI, temporary roots): a trigger's output lands in the new state,
and a failing trigger fails the transaction before the swap, leaving the old /usr active."""
from __future__ import annotations

from pathlib import Path

from tests.pm import make_package, state_id, stonelab
from tests.test_triggers import BUSYBOX, needs_busybox, needs_sandbox

pytestmark = [needs_sandbox, needs_busybox]

TRIGGER = """\
name: {name}
description: test trigger shipped in a package
handlers:
    record:
        run: /usr/bin/busybox
        args: ["sh", "-c", "{script}"]
paths:
    "/usr/share/{name}/(item:*).conf":
        handlers: [record]
"""


def trigger_package(out: Path, name: str, script: str, version: str = "1.0") -> Path:
    files: dict[str, str | bytes] = {
        "bin/busybox": BUSYBOX.read_bytes(),
        f"share/moss/triggers/tx.d/{name}.yaml": TRIGGER.format(name=name, script=script),
        f"share/{name}/first.conf": "1",
        f"share/{name}/second.conf": "2",
    }
    return make_package(out, name, files, version=version, modes={"bin/busybox": 0o755})


def install(root: Path, *args: str, **kw):
    return stonelab("install", "-D", str(root), "--swap", "exchange", *args, **kw)


def test_trigger_output_is_part_of_the_new_state(root: Path, tmp_path: Path) -> None:
    pkg = trigger_package(tmp_path / "pkgs", "recorder", "echo $(item) >> /usr/share/recorder/seen")
    install(root, str(pkg), check=True)
    assert state_id(root) == 1
    assert (root / "usr/share/recorder/seen").read_text().split() == ["first", "second"]
    assert not (root / ".moss/root/isolation").exists()
    assert (root / "etc/hostname").read_text() == "lab\n"


def test_failing_trigger_fails_the_transaction_before_the_swap(root: Path, tmp_path: Path) -> None:
    good = trigger_package(tmp_path / "pkgs", "recorder", "echo $(item) >> /usr/share/recorder/seen")
    install(root, str(good), check=True)
    bad = trigger_package(tmp_path / "pkgs", "breaker", "echo broken-on-purpose >&2; exit 3")
    result = install(root, str(bad))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "trigger breaker (" in lines[0] and "exited 3: broken-on-purpose" in lines[0]
    assert state_id(root) == 1
    assert not (root / "usr/share/breaker").exists()
    assert not (root / ".moss/root/isolation").exists()


def test_no_triggers_option_skips_them(root: Path, tmp_path: Path) -> None:
    pkg = trigger_package(tmp_path / "pkgs", "recorder", "echo $(item) >> /usr/share/recorder/seen")
    install(root, "--no-triggers", str(pkg), check=True)
    assert (root / "usr/share/recorder/first.conf").exists()
    assert not (root / "usr/share/recorder/seen").exists()
