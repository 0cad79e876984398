"""`stonelab inspect` and `stonelab stone build|index|extract`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reference_impl.stone.extract import extract_assets
from reference_impl.stone.inspect import inspect_dict, inspect_text
from reference_impl.stone.reader import read_stone
from reference_impl.stone.repository import write_repository_index
from reference_impl.stone.writer import DEFAULT_LEVEL, build_package, load_spec
from stonelab.errors import StonelabError


def register(sub: argparse._SubParsersAction) -> None:
    inspect = sub.add_parser("inspect", help="show the header, payloads, metadata and layout of .stone files")
    inspect.add_argument("files", nargs="+", metavar="FILE")
    inspect.add_argument("--json", action="store_true", help="one JSON object per file per line")
    inspect.set_defaults(func=cmd_inspect)

    stone = sub.add_parser("stone", help="build and index .stone packages")
    verbs = stone.add_subparsers(dest="stone_command", metavar="VERB")
    verbs.required = True
    build = verbs.add_parser("build", help="build a package from a /usr tree and a metadata file")
    build.add_argument("tree", metavar="DIR", help="the package's /usr content (paths relative to /usr)")
    build.add_argument("-o", "--output", required=True, metavar="OUT.stone")
    build.add_argument("-m", "--meta", metavar="META.yaml",
                       help="package metadata (name, version, release, summary, license, depends, provides, "
                            "conflicts); default: DIR.yaml beside DIR")
    build.add_argument("--level", type=int, default=DEFAULT_LEVEL, help="zstd level (default %(default)s)")
    build.set_defaults(func=cmd_build)

    index = verbs.add_parser("index", help="write DIR/stone.index for the packages in DIR")
    index.add_argument("directory", metavar="DIR")
    index.set_defaults(func=cmd_index)

    extract = verbs.add_parser("extract", help="verify a package and write its unique files to DIR/<digest>")
    extract.add_argument("file", metavar="FILE")
    extract.add_argument("directory", metavar="DIR")
    extract.set_defaults(func=cmd_extract)


def cmd_inspect(args: argparse.Namespace) -> int:
    for number, name in enumerate(args.files):
        stone = read_stone(name)
        stone.verify_content()  # every file's digest and the Content checksum too
        if args.json:
            print(json.dumps(inspect_dict(stone), sort_keys=False))
        else:
            if number:
                print()
            print(inspect_text(stone))
        sys.stdout.flush()
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    tree = Path(args.tree)
    meta_path = Path(args.meta) if args.meta else tree.with_name(tree.name + ".yaml")
    if not meta_path.exists():
        raise StonelabError(f"{meta_path}: metadata file not found (give one with --meta)")
    out = build_package(tree, load_spec(meta_path), Path(args.output), level=args.level)
    print(out)
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    print(write_repository_index(args.directory))
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    written = extract_assets(read_stone(args.file), Path(args.directory))
    print(f"{written} bytes extracted to {args.directory}")
    return 0
