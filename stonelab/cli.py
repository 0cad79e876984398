"""`stonelab` — one command, subcommands contributed by the modules listed below.

Each module in COMMAND_MODULES exposes ``register(subparsers)`` which adds its subcommands and sets
``func=callable(args) -> int`` on them.  User errors are :class:`StonelabError`: one line, exit 2.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import signal
import sys

from stonelab.errors import StonelabError
from vm.log import configure as configure_logging

COMMAND_MODULES = [
    "reference_impl.stone.cli",
    "reference_impl.cli",
    "lab.cli",
    "lab.kernel.cli",
    "reference_impl.boot.cli",
    "vm.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stonelab",
        description="Conformance lab for atomic, stateless operating systems (AerynOS model).",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress (-v) and every QEMU argv and guest command (-vv)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
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
