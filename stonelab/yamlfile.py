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


Path_ = tuple[object, ...]  # a field path: mapping keys and list indices, as pydantic's ``loc``


class MarkedYaml:
    """A YAML document with the line and column of every value and every mapping key (1-based).

    ``where(loc)`` gives the position of the deepest node on ``loc`` that exists in the document, so an error
    about a missing field points at the mapping that lacks it and an unknown key points at that key.
    """

    def __init__(self, path: Path, data: object, values: dict[Path_, tuple[int, int]],
                 keys: dict[Path_, tuple[int, int]]):
        self.path, self.data, self._values, self._keys = path, data, values, keys

    def where(self, loc: Path_, *, key: bool = False) -> tuple[int, int]:
        loc = tuple(loc)
        if key and loc in self._keys:
            return self._keys[loc]
        while loc and loc not in self._values:
            loc = loc[:-1]
        return self._values.get(loc, (1, 1))

    def located(self, loc: Path_, message: str, *, key: bool = False) -> str:
        """``FILE:LINE:COL: message`` for the node at ``loc``."""
        line, col = self.where(loc, key=key)
        return f"{self.path}:{line}:{col}: {message}"


def read_yaml_marked(path: str | os.PathLike[str], *, error: type[StonelabError] = StonelabError,
                     kind: str = "YAML") -> MarkedYaml:
    """Like :func:`read_yaml`, keeping where each value and key stands; a duplicate key is an error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise error(f"{path}: cannot read: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text ({err.reason})") from None
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
        values: dict[Path_, tuple[int, int]] = {}
        keys: dict[Path_, tuple[int, int]] = {}
        if node is not None:
            _walk(loader, node, (), values, keys, path, error, set())
    except RecursionError:
        raise error(f"{path}: {kind}: nested too deeply (or a YAML alias refers to itself)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{mark.line + 1}:{mark.column + 1}:" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise error(f"{path}:{where} {kind}: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return MarkedYaml(path, data, values, keys)


def _walk(loader: yaml.SafeLoader, node: yaml.Node, loc: Path_, values: dict, keys: dict, path: Path,
          error: type[StonelabError], walked: set[int]) -> None:
    values[loc] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if id(node) in walked:  # an alias: its marks are those of the anchored node, already recorded
        return
    walked.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            if key is None or isinstance(key, (list, dict)):
                continue
            if key in seen:
                mark = key_node.start_mark
                raise error(f"{path}:{mark.line + 1}:{mark.column + 1}: duplicate key {key!r}")
            seen.add(key)
            keys[(*loc, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _walk(loader, value_node, (*loc, key), values, keys, path, error, walked)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(loader, item, (*loc, index), values, keys, path, error, walked)
