"""Reading the YAML files people write (study, site policy, site file) without trusting their shape.

A study travels from a consortium to every hospital, and a site file or policy may be edited by hand or
by a script gone wrong, so the command that reads one must answer in seconds with a sentence, whatever
the file holds. PyYAML alone does not: its composer recurses once per nesting level (a few thousand
brackets raise RecursionError), it reads a file of any size (a 10 MB study took a minute and 1.5 GB),
its aliases let a 1 KB file stand for a billion values ("billion laughs": whoever walks or prints the
result never finishes), and a key written twice silently keeps the last value, which for a policy
setting means a ceiling the steward did not choose.

`read_yaml_file` bounds all four before anything is built. The size is checked before the file is
parsed; nesting depth and the number of values (aliases expanded) are counted on PyYAML's event stream,
which is iterative, so the recursive composer only ever sees a document already known to be shallow
and small. Each caller names its limits (`YamlLimits`) and its own error type, so a study error stays
a `StudyError` and a policy error a `PolicyError`.

This module sits in `federation.common`, the lowest layer the study (federation) and the site files
(site_node) share; it imports nothing of the project.
"""

from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml
from yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    CollectionStartEvent,
    NodeEvent,
)

# libyaml's parser when PyYAML was built with it (a study of 1 MiB reads in under a second instead of
# several); the pure-Python one otherwise. Both give the same events and the same documents.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class YamlFileError(ValueError):
    """A YAML file cannot be read or breaks a limit; the message names the file and the limit."""


@dataclass(frozen=True)
class YamlLimits:
    """How large one kind of file may be. `what` names the kind in messages ("a study file").

    `hint` follows the size and value-count refusals: what to do instead (a study names concepts and
    settings, not data).
    """

    what: str
    max_bytes: int
    max_depth: int = 20
    max_values: int = 10_000
    hint: str = ""


def read_yaml_file(
    path: Path, limits: YamlLimits, error: type[ValueError] = YamlFileError, missing_hint: str = ""
) -> object:
    """The document in `path` (None for an empty file), or `error` with a sentence naming the file.

    Refuses a file larger than `limits.max_bytes` before parsing it, one nested deeper than
    `limits.max_depth`, one whose aliases expand to more than `limits.max_values` values, and a mapping
    that repeats a key.
    """
    path = Path(path)
    text = _read_text(path, limits, error, missing_hint)
    return parse_yaml_text(text, str(path), limits, error)


def parse_yaml_text(text: str, source: str, limits: YamlLimits, error: type[ValueError] = YamlFileError) -> object:
    """`read_yaml_file` for text already in memory (`source` names it in messages); the size is checked too."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise error(_too_large(source, size, limits))
    try:
        _check_shape(text, source, limits, error)
        return yaml.load(_Named(text, source), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except _RepeatedKey as exc:
        raise error(f"{source}: {exc.sentence}") from None
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own bound (1,000 levels) met before ours
            raise error(_too_deep(source, limits)) from None
        raise error(f"{source}: {_yaml_problem(exc)}") from None


def _read_text(path: Path, limits: YamlLimits, error: type[ValueError], missing_hint: str) -> str:
    """The file's text, reading at most one byte past the limit (a FIFO or /dev/zero cannot hang it)."""
    try:
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            regular = stat.S_ISREG(info.st_mode)
            data = b"" if regular and info.st_size > limits.max_bytes else handle.read(limits.max_bytes + 1)
    except FileNotFoundError:
        hint = f"; {missing_hint}" if missing_hint else ""
        raise error(f"{path}: no such {limits.what.removeprefix('a ')}{hint}") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder, not {limits.what}") from None
    except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
        raise error(f"{path}: cannot read {limits.what}: {exc}") from None
    if regular and info.st_size > limits.max_bytes:
        raise error(_too_large(str(path), info.st_size, limits))
    if len(data) > limits.max_bytes:  # not a regular file (a pipe, a device): its size is what it gave
        raise error(_too_large(str(path), None, limits))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(
            f"{path}: {limits.what} is UTF-8 text, and byte {exc.start} is not UTF-8 (was it saved in another "
            "encoding, or is it not a YAML file?)"
        ) from None


def short_repr(value: object, limit: int = 60) -> str:
    """`repr` cut to `limit` characters: an error names a wrong value, it does not reprint a huge one."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _too_large(source: str, size: int | None, limits: YamlLimits) -> str:
    stated = f"is {size:,} bytes" if size is not None else f"is more than {limits.max_bytes:,} bytes"
    return (
        f"{source} {stated}; {limits.what} may be at most {limits.max_bytes:,} bytes ({_human(limits.max_bytes)})"
        + (f": {limits.hint}" if limits.hint else "")
    )


def _human(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 2**10:g} KiB"


def _check_shape(text: str, source: str, limits: YamlLimits, error: type[ValueError]) -> None:
    """Count nesting and values on the event stream (no recursion), aliases expanded by what they name.

    An alias stands for its anchor's whole node: its values count again and its depth adds to where
    it appears, exactly as in the document a program would walk.
    """
    values = 0
    open_nodes: list[list] = []  # per open collection: [values before it, anchor, height of deepest child]
    anchored: dict[str, tuple[int, int]] = {}  # anchor -> (values, height) of the node it names

    def placed(count: int, height: int) -> None:
        nonlocal values
        values += count
        if values > limits.max_values:
            raise error(
                f"{source} holds more than {limits.max_values:,} values (aliases such as *name counted as the "
                f"values they repeat); {limits.what} needs far fewer" + (f": {limits.hint}" if limits.hint else "")
            )
        if len(open_nodes) + height > limits.max_depth:
            raise error(_too_deep(source, limits))
        if open_nodes:
            open_nodes[-1][2] = max(open_nodes[-1][2], height)

    for event in yaml.parse(_Named(text, source), Loader=_BaseLoader):
        if isinstance(event, CollectionStartEvent):
            if len(open_nodes) + 1 > limits.max_depth:
                raise error(_too_deep(source, limits))
            open_nodes.append([values, event.anchor, 0])
        elif isinstance(event, CollectionEndEvent):
            before, anchor, child_height = open_nodes.pop()
            count, height = values - before + 1, child_height + 1
            values = before
            placed(count, height)
            if anchor is not None:
                anchored[anchor] = (count, height)
        elif isinstance(event, AliasEvent):
            if any(node[1] == event.anchor for node in open_nodes):
                raise error(
                    f"{source}: the alias *{event.anchor} is inside the node &{event.anchor} it repeats, which would "
                    "make that node infinite; write the values out"
                )
            placed(*anchored.get(event.anchor, (1, 0)))  # an undefined alias is reported by the loader
        elif isinstance(event, NodeEvent):  # a scalar
            placed(1, 0)
            if event.anchor is not None:
                anchored[event.anchor] = (1, 0)


def _too_deep(source: str, limits: YamlLimits) -> str:
    return (
        f"{source} is nested deeper than {limits.max_depth} levels (lists and mappings inside one another); "
        f"{limits.what} needs a handful: is it the right file?"
    )


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error as one line: where, then what (its own text spans several lines and a caret)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        context = f" ({exc.context})" if exc.context else ""
        return f"{where}not valid YAML: {exc.problem}{context}"
    return "not valid YAML: " + " ".join(str(exc).split())


class _Named(io.StringIO):
    """Text that PyYAML's marks name by the file it came from, not '<unicode string>'."""

    def __init__(self, text: str, name: str) -> None:
        super().__init__(text)
        self.name = name


class _RepeatedKey(yaml.YAMLError):
    def __init__(self, sentence: str) -> None:
        super().__init__(sentence)
        self.sentence = sentence


class _UniqueKeyLoader(_BaseLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping.

    Plain YAML keeps the last value silently; a policy with `study_epsilon_ceiling` twice would then mean
    whichever line came last. Keys brought in by a merge (`<<: *defaults`) may be overridden, as YAML means.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error names it
                break
            seen[key] = line
            if first is not None:
                raise _RepeatedKey(
                    f"line {line}: the key {short_repr(key)} appears twice in one mapping (first on line {first}); "
                    "YAML would silently keep the last value, so write each key once"
                )
        return super().construct_mapping(node, deep=deep)
