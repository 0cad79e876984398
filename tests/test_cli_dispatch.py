"""`stonelab` imports only the module of the subcommand it runs (guest commands start a fresh interpreter each)."""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

from stonelab.cli import COMMAND_INDEX, COMMAND_MODULES

REPO = Path(__file__).resolve().parents[1]


def test_command_index_matches_what_the_modules_register():
    registered = {}
    for name in COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(name).register(sub)
        registered.update({command: name for command in sub.choices})
    assert registered == COMMAND_INDEX


def test_a_verb_imports_only_its_module():
    code = ("import sys; from stonelab.cli import main; main(['faults']); "
            "print(sorted(m for m in ('vm.machine', 'lab.report', 'rich', 'pexpect', 'reference_impl.client', "
            "'reference_impl.blit', 'reference_impl.stone', 'sqlite3') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


def test_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "stonelab.cli", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0
    for command in COMMAND_INDEX:
        if command != "report":
            assert command in proc.stdout


def test_version_imports_no_command_module():
    code = ("import sys; from stonelab.cli import COMMAND_MODULES, main; status = main(['--version']); "
            "print(status, sorted(m for m in (*COMMAND_MODULES, 'argparse', 'importlib.metadata') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    from stonelab import __version__
    assert proc.stdout.splitlines() == [f"stonelab {__version__}", "0 []"]
    # with other options it still works, through argparse and without any command module
    proc = subprocess.run([sys.executable, "-m", "stonelab.cli", "-v", "--version"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0 and proc.stdout == f"stonelab {__version__}\n"


def test_option_choices_are_the_enums_values():
    from reference_impl.blit import BlitStrategy
    from reference_impl.cli import BLIT_CHOICES, MODE_CHOICES, SWAP_CHOICES
    from reference_impl.swap import SwapStrategy
    from reference_impl.transaction import Mode

    assert MODE_CHOICES == tuple(m.value for m in Mode)
    assert SWAP_CHOICES == tuple(s.value for s in SwapStrategy)
    assert BLIT_CHOICES == tuple(b.value for b in BlitStrategy)
