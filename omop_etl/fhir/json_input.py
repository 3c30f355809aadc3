"""Read FHIR JSON the way a hospital's export really arrives: cut off, hand-edited, or written by tools
with bugs. Three things the plain `orjson.loads(file.read())` got wrong:

* **Memory.** A Bundle was parsed whole: every entry as Python objects at once (a 21 MB Bundle took over
  1 GB). `read_bundle` walks the top-level object and decodes one `entry` item at a time from a bounded
  text window, so a load holds the compact bytes of the entries, not their object trees. NDJSON lines are
  read with a bound (`read_lines`): a line longer than any FHIR resource we map is measured and dropped,
  not held.
* **Damage.** A file that ends early (a cut-off copy, a truncated gzip stream) or stops being JSON halfway
  raises `JsonDamage` *after* everything before the damage was handed out, so the caller keeps those
  records and reports the rest in one sentence naming the file.
* **Duplicate keys.** JSON parsers keep the last of two equal keys, so `"gender": "male", "gender":
  "nonsense"` loaded whichever came last without a word. RFC 8259 leaves such objects undefined; a
  record holding one is ambiguous and is quarantined naming the key. Bundles are decoded with an
  `object_pairs_hook` that sees every pair; NDJSON lines take a cheap count first (`duplicate_keys`) and
  pay for the exact check only when the count says a key went missing.
"""

from __future__ import annotations

import codecs
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest NDJSON line read: far above any resource we map (Synthea's largest is ~60 KB); what is longer is
an embedded document or a file without line breaks, and holding it would let one line take the memory."""
PREFIX_BYTES = 4096
"""What of an over-long line is kept: enough to see its resourceType and id, and to show it in the quarantine."""
CHUNK_BYTES = 1 << 20
IO_ERRORS = (OSError, EOFError, zlib.error)
"""What reading a damaged file raises: OSError (gzip.BadGzipFile is one), EOFError (a gzip stream cut off),
zlib.error (corrupt compressed data)."""


class JsonDamage(Exception):
    """The file cannot be read past this point; `rule` is malformed_json (not JSON from here) or damaged_file
    (the bytes themselves cannot be read: cut-off compression, not UTF-8, an I/O error)."""

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.rule, self.reason = rule, reason


def describe_io_error(error: BaseException) -> str:
    """A sentence fragment for an I/O error while reading a file, in the words a hospital IT person uses."""
    if isinstance(error, EOFError):
        return "the compressed data end before the end-of-stream marker (the file was cut off, e.g. while copying)"
    if isinstance(error, zlib.error) or "gzip" in type(error).__name__.lower() or "gzip" in str(error).lower():
        return f"it is not a readable gzip file ({error})"
    if isinstance(error, UnicodeDecodeError):
        return f"it is not UTF-8 text (byte {error.start} of the part being read: {error.reason})"
    return f"it cannot be read ({error.strerror or error})" if isinstance(error, OSError) else str(error)


def read_lines(handle: IO[bytes], limit: int = MAX_LINE_BYTES) -> Iterator[tuple[bytes, int | None]]:
    """(line, None) for every line of a binary file, and (first PREFIX_BYTES, full length) for a line longer
    than `limit`, which is read past in pieces and never held whole. Read errors propagate to the caller,
    which knows the line number."""
    while True:
        line = handle.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n"):
            yield line, None
            continue
        length, prefix = len(line), line[:PREFIX_BYTES]
        del line
        while piece := handle.readline(CHUNK_BYTES):
            length += len(piece)
            if piece.endswith(b"\n"):
                break
        yield prefix, length


_TYPE_IN_PREFIX = re.compile(rb'"resourceType"\s*:\s*"([A-Za-z]{1,64})"')
_ID_IN_PREFIX = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9\-.]{1,64})"')


def sniff_prefix(prefix: bytes) -> tuple[str | None, str | None]:
    """(resourceType, id) as far as the first bytes of a record show them, for a record too long to parse."""
    kind, ident = _TYPE_IN_PREFIX.search(prefix), _ID_IN_PREFIX.search(prefix)
    return (kind.group(1).decode() if kind else None), (ident.group(1).decode() if ident else None)


class _NotJson:
    """What NaN, Infinity and -Infinity decode to: not JSON (RFC 8259), and orjson refuses to write them back."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


class _PairsHook:
    """An object_pairs_hook that builds dicts and notes every key that occurs twice in one object."""

    def __init__(self) -> None:
        self.duplicates: list[str] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict:
        value = dict(pairs)
        if len(value) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen and key not in self.duplicates:
                    self.duplicates.append(key)
                seen.add(key)
        return value


def _precise_duplicates(raw: bytes) -> list[str]:
    hook = _PairsHook()
    try:
        json.loads(raw, object_pairs_hook=hook, parse_constant=_NotJson)
    except (ValueError, RecursionError):  # not JSON: the validator says so in its own words
        return []
    return hook.duplicates


_KEY_END = re.compile(rb'"[ \t\n\r]*:')


def duplicate_keys(raw: bytes, parsed: Any = None) -> list[str]:
    """Keys that occur twice in one JSON object of `raw` (an NDJSON line), in order of first repeat.

    Cheapest: a line that is byte for byte what orjson writes for its parsed value lost nothing. Else a
    count: every key ends in `"` then `:`; inside a string a `"` is written `\\"`, and the same
    string content gives the same matches when orjson writes the parsed value back, except that values
    lost to a repeated key are missing there. So the raw text has more matches than the round trip exactly
    when a key was repeated (`\\u0022` or `\\u003a` escapes would break that; such lines take the exact
    check). Only then is the line parsed again with an object_pairs_hook, which names the key.
    """
    if parsed is None:
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _precise_duplicates(raw)  # e.g. an integer beyond 64 bits, which stdlib json reads
    try:
        again = orjson.dumps(parsed)
    except TypeError:
        return _precise_duplicates(raw)
    size = len(again)  # the common case: the export wrote what orjson writes, so nothing was lost (no copies made)
    if not raw[size:].strip(b"\r\n") and memoryview(raw)[:size] == again:
        return []
    if b"\\u00" in raw and re.search(rb"\\u00(22|3[aA])", raw):
        return _precise_duplicates(raw)
    if len(_KEY_END.findall(raw)) <= again.count(b'":'):
        return []
    return _precise_duplicates(raw)


def compact(value: Any) -> bytes:
    """orjson's compact JSON of `value`, copied to a bytes object of its own size: orjson 3.13 returns buffers
    of at least 4 KiB (64 KiB for a 5 KB resource), and a Bundle keeps one per entry until it is written."""
    return bytes(memoryview(orjson.dumps(value)))


def kind_of(value: Any) -> str:
    """The JSON kind of a decoded value, for sentences ("a string", "a number")."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else "not JSON"


def show(value: Any, limit: int = 40) -> str:
    """A short rendering of a decoded value for a sentence (never the whole of a large value)."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class BundleItem:
    """One event of `read_bundle`: a top-level member (`key`, `value`) or one item of the `entry` array."""

    kind: str  # "member" | "entries" (the entry array starts) | "entry" | "entry_not_array"
    value: Any
    key: str | None = None
    duplicates: list[str] = field(default_factory=list)


_WS = re.compile(r"[ \t\n\r]*")


class _Window:
    """A bounded window of decoded text over a binary stream, for json's raw_decode to work on."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.text, self.at, self.eof = "", 0, False
        self.pending: JsonDamage | None = None  # a read error met after some text: raised once that text is used
        self.hook = _PairsHook()
        self.json = json.JSONDecoder(object_pairs_hook=self.hook, parse_constant=_NotJson)

    def more(self, at_least: int = CHUNK_BYTES) -> None:
        """Read on: drop what was consumed, add at least `at_least` bytes' worth of text (or reach the end).

        Reads with read1 (one underlying read at a time): a cut-off gzip stream raises on the read that finds
        the end missing, and what came before must still be handed out, so that error waits for the next call.
        """
        if self.pending is not None:
            raise self.pending
        pieces: list[bytes] = []
        wanted = max(at_least, CHUNK_BYTES)
        try:
            while wanted > 0:
                piece = self.handle.read1(wanted)
                if not piece:
                    break
                pieces.append(piece)
                wanted -= len(piece)
            chunk = b"".join(pieces)
            text = self.decoder.decode(chunk, final=not pieces)
        except (*IO_ERRORS, UnicodeDecodeError) as error:
            damage = JsonDamage("damaged_file", describe_io_error(error))
            if not pieces or isinstance(error, UnicodeDecodeError):
                raise damage from None
            self.pending, chunk = damage, b"".join(pieces)
            try:
                text = self.decoder.decode(chunk)
            except UnicodeDecodeError as bad:
                raise JsonDamage("damaged_file", describe_io_error(bad)) from None
        self.text, self.at = self.text[self.at :] + text, 0
        self.eof = not pieces

    def peek(self) -> str:
        """The next non-space character ('' at the end of the file)."""
        while True:
            self.at = _WS.match(self.text, self.at).end()
            if self.at < len(self.text) or self.eof:
                return self.text[self.at : self.at + 1]
            self.more()

    def expect(self, char: str, where: str) -> None:
        found = self.peek()
        if found != char:
            shown = f"'{found}'" if found else "the end of the file"
            raise JsonDamage("malformed_json", f"not valid JSON: expected '{char}' {where}, found {shown}")
        self.at += 1

    def value(self, where: str) -> tuple[Any, list[str]]:
        """Decode the JSON value that starts here; (value, keys repeated inside it)."""
        self.peek()
        while True:
            self.hook.duplicates = []
            try:
                value, end = self.json.raw_decode(self.text, self.at)
            except json.JSONDecodeError as error:
                incomplete = error.pos >= len(self.text) - 64 or error.msg.startswith("Unterminated string")
                if incomplete and not self.eof:
                    self.more(len(self.text))  # double the window: a large value costs linear time, not quadratic
                    continue
                if self.eof and incomplete:
                    raise JsonDamage("malformed_json", f"the file ends in the middle of {where}") from None
                raise JsonDamage("malformed_json", f"not valid JSON in {where} ({error.msg})") from None
            except RecursionError:
                raise JsonDamage("malformed_json", f"{where} is nested too deeply to be a FHIR resource") from None
            if end >= len(self.text) and not self.eof:  # a number may go on in the next chunk
                self.more(len(self.text))
                continue
            self.at = end
            return value, list(self.hook.duplicates)


def read_bundle(handle: IO[bytes]) -> Iterator[BundleItem]:
    """The top-level members of the JSON object in `handle`, and each item of its `entry` array on its own.

    Items come in file order; a problem with the file itself raises JsonDamage after everything before it.
    Only a top-level `entry` that is an array is split into items (a non-array `entry` comes as one
    "entry_not_array" item), so whatever else the file holds is still seen whole.
    """
    window = _Window(handle)
    if window.peek() == "":
        raise JsonDamage("malformed_json", "the file is empty")
    window.expect("{", "at the start of the file (a FHIR JSON file holds one object)")
    if window.peek() == "}":
        window.at += 1
    else:
        while True:
            if window.peek() != '"':
                window.expect('"', "at the start of a key of the top-level object")
            key, _ = window.value("a key of the top-level object")
            window.expect(":", f"after the key '{key}'")
            if key == "entry" and window.peek() == "[":
                window.at += 1
                yield BundleItem("entries", None, key)
                number = 0
                if window.peek() == "]":
                    window.at += 1
                else:
                    while True:
                        number += 1
                        value, duplicates = window.value(f"entry {number}")
                        yield BundleItem("entry", value, key, duplicates)
                        if window.peek() == "]":
                            window.at += 1
                            break
                        window.expect(",", f"after entry {number}")
            else:
                value, duplicates = window.value(f"the element '{key}'")
                yield BundleItem("entry_not_array" if key == "entry" else "member", value, key, duplicates)
            if window.peek() == "}":
                window.at += 1
                break
            window.expect(",", f"after the element '{key}'")
    if window.peek() != "":
        raise JsonDamage("malformed_json", "not valid JSON: there is more text after the end of the top-level object")
