"""`stonelab` — one command, subcommands contributed by the modules listed below.

Each module in COMMAND_MODULES exposes ``register(subparsers)`` which adds its subcommands and sets
``func=callable(args) -> int`` on them.  User errors are :class:`StonelabError`: one line, exit 2.

Start-up cost matters (every guest command of the lab is a fresh interpreter, under TCG): ``main`` imports only
the module that provides the subcommand named on the command line (``COMMAND_INDEX``, checked against what the
modules register by tests/test_cli_dispatch.py); ``--version`` imports none; ``--help`` or an unknown word
imports them all.
"""
from __future__ import annotations

import errno
import importlib
import signal
import sys

from stonelab import __version__
from stonelab.errors import StonelabError

# argparse (and typing) are imported where needed: `stonelab --version` needs neither; the annotations that name
# argparse are strings (PEP 563), never evaluated

COMMAND_MODULES = [
    "reference_impl.stone.cli",
    "reference_impl.cli",
    "lab.cli",
    "lab.crash.cli",
    "lab.kernel.cli",
    "reference_impl.boot.cli",
    "vm.cli",
]
COMMAND_INDEX = {
    "inspect": "reference_impl.stone.cli", "stone": "reference_impl.stone.cli",
    "install": "reference_impl.cli", "remove": "reference_impl.cli", "sync": "reference_impl.cli",
    "state": "reference_impl.cli", "faults": "reference_impl.cli",
    "run": "lab.cli", "scenario": "lab.cli", "report": "lab.cli",
    "kernel": "lab.kernel.cli", "compat": "lab.kernel.cli", "crash": "lab.crash.cli",
    "boot": "reference_impl.boot.cli", "vm": "vm.cli",
}


def _command_word(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), or None."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(modules: list[str] | None = None) -> argparse.ArgumentParser:  # noqa: F821
    """The parser with the subcommands of ``modules`` (None: all of COMMAND_MODULES; []: none, enough for
    ``--version``)."""
    import argparse  # not at module level: `stonelab --version` needs none of it
    parser = argparse.ArgumentParser(
        prog="stonelab",
        description="Conformance lab for atomic, stateless operating systems (AerynOS model).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress (-v) and every QEMU argv and guest command (-vv)")
    parser.add_argument("--version", action="version", version=f"stonelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES if modules is None else modules:
        importlib.import_module(name).register(sub)
    return parser


def _modules_for(words: list[str]) -> list[str] | None:
    """The command modules ``words`` need: the named subcommand's, none for a bare ``--version``, else all."""
    if "-h" in words or "--help" in words:
        return None
    module = COMMAND_INDEX.get(_command_word(words) or "")
    if module:
        return [module]
    return [] if _command_word(words) is None and "--version" in words else None


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # a cancelled CI job (SIGTERM) cleans up exactly like Ctrl-C


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:  # noqa: F821
    """Run one command; ``parser``: a parser built earlier by build_parser (a process that runs many commands,
    such as the crash engine's guest worker, builds it once). Without one, only the module of the named
    subcommand is imported."""
    if argv is None:
        signal.signal(signal.SIGTERM, _interrupt)
    words = sys.argv[1:] if argv is None else argv
    if words == ["--version"]:  # before argparse, which alone costs a TCG guest's interpreter ~0.7 s
        print(f"stonelab {__version__}")
        return 0
    if parser is None:
        parser = build_parser(_modules_for(words))
    args = parser.parse_args(words)
    if args.verbose or getattr(args, "debug", False):
        from vm.log import configure  # logging costs a guest interpreter ~0.1 s of TCG time: only when asked
        configure(2 if getattr(args, "debug", False) else args.verbose)
    try:
        return int(args.func(args) or 0)
    except StonelabError as err:
        print(f"stonelab: error: {err}", file=sys.stderr)
        return err.exit_status
    except OSError as err:  # an I/O failure (real or injected): one line, not a traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"stonelab: error: {where}{err.strerror or err} ({errno.errorcode.get(err.errno, err.errno)})",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stonelab: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
