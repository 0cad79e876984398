"""Reading a user's YAML file (scenario, package metadata, trigger): safe loading, one-line errors."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from stonelab.errors import StonelabError


def read_yaml(path: str | os.PathLike[str], *, error: type[StonelabError] = StonelabError,
              kind: str = "YAML") -> object:
    """The parsed document; a missing/unreadable file or bad YAML raises ``error`` naming the file (and line)."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise error(f"{path}: {kind}{where}: {problem}") from None
