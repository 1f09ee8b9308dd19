"""A message record as JSON bytes, and back: encoding, update lines, checked decoding.

A spool file is a record (one JSON object) followed by zero or more update lines, each a
newline and ``{"set": {...}, "unset": [...], "splice": {...}}`` (what one settle changed;
``encode_update``). ``decode_record`` merges them and checks the result, so every reader
sees one record; anything else is a ``CorruptRecord`` naming why. orjson does the work;
what it would write or read differently from the json module (NaN, integers beyond 64
bits, lone surrogates...) goes through the json module.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

__all__ = (
    "ID_PATTERN",
    "UPDATE_MARK",
    "CorruptRecord",
    "decode_record",
    "encode_record",
    "encode_update",
    "plain_json",
)

# <nanoseconds>-<priority letter><random>: lexical order is creation order, and the
# priority is known from the name alone (no read needed to order a scan of the queue).
ID_PATTERN = re.compile(r"^\d{20}-[hnl][0-9a-f]{8}$")
# Each update line starts with this. A JSON text never holds a raw newline inside a
# string, and a pretty-printed record never starts a line with an object: never ambiguous.
UPDATE_MARK = b'\n{"set":'


class CorruptRecord(Exception):
    """A spool file that cannot be a message record; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


_BIG = float(2**63)
_SCALARS = frozenset({str, int, bool, type(None)})


def plain_json(value: object) -> bool:
    """True unless ``value`` holds a float that is not finite or is 2**63 or more in size
    (where orjson and the json module part ways: orjson writes NaN and infinities as
    null, and reads an integer beyond 64 bits as a float). Records and journal entries
    never do; those that would are encoded and decoded by the json module instead."""
    stack = [value]
    pop = stack.pop
    while stack:
        item = pop()
        kind = type(item)
        if kind in _SCALARS:
            continue
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float) and not -_BIG < item < _BIG:
            return False  # NaN compares false too
    return True


def encode_record(record: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (``json.dumps(ensure_ascii=False)``'s data, via orjson)."""
    if plain_json(record):
        try:
            return orjson.dumps(record)
        except orjson.JSONEncodeError:
            pass  # an int beyond 64 bits, a str subclass, a lone surrogate...: json decides
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def encode_update(base: dict[str, Any], record: dict[str, Any]) -> bytes:
    """The update line (newline first) that turns ``base`` into ``record``: the keys
    whose values changed or are new (``set``), those removed (``unset``), and for a long
    text changed in one place (the message whose Date the first attempt stamps) the
    change alone (``splice``: start, characters removed, text inserted), so that a file
    grows by its changes, never by a second copy of its message."""
    changed: dict[str, Any] = {}
    spliced: dict[str, list[Any]] = {}
    for key, value in record.items():
        old = base.get(key, _MISSING)
        if _same(old, value):
            continue
        if type(value) is str and type(old) is str and len(value) >= _SPLICE_MIN:
            start = _common_prefix(old, value)
            end = _common_prefix(old[start:][::-1], value[start:][::-1])
            spliced[key] = [start, len(old) - start - end, value[start:len(value) - end]]
        else:
            changed[key] = value
    update: dict[str, Any] = {"set": changed}
    removed = [key for key in base if key not in record]
    if removed:
        update["unset"] = removed
    if spliced:
        update["splice"] = spliced
    return b"\n" + encode_record(update)


_MISSING = object()
_SPLICE_MIN = 1024


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON: ``==`` takes 1 for True and 0.0 for -0.0, in lists too."""
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is str or kind is int or kind is bool or a is None:
        return bool(a == b)
    if kind is float:
        return bool(a == b and repr(a) == repr(b))
    try:
        return orjson.dumps(a) == orjson.dumps(b)
    except orjson.JSONEncodeError:
        return False


def _common_prefix(a: str, b: str) -> int:
    """The length of the longest common prefix (compared in C, block by block)."""
    size = min(len(a), len(b))
    start = 0
    while start < size:
        stop = min(start + 4096, size)
        if a[start:stop] != b[start:stop]:
            low, high = start, stop  # a[:low] == b[:low]; a[:high] != b[:high]
            while high - low > 1:
                mid = (low + high) // 2
                if a[low:mid] == b[low:mid]:
                    low = mid
                else:
                    high = mid
            return low
        start = stop
    return size


_SAFE_ADDRESS = re.compile(r"^[^\s<>\x00-\x1f\x7f]+@[^\s<>\x00-\x1f\x7f@]+$")
_REQUIRED = {"id": str, "mail_from": str, "recipients": list, "raw": str, "attempts": int,
             "created_at": (int, float)}


# Times (POSIX seconds): a finite number, or null where optional. A NaN or an infinity
# would never compare due in a timer heap; an int too big for a float cannot be a time.
_TIMES = ("created_at", "next_attempt_at", "send_at", "last_attempt_at", "finished_at",
          "held_at")


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> float:
    raise _NonFinite(name)  # NaN, Infinity, -Infinity: not JSON, and never a record's


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)  # e.g. 1e400, which float() makes inf
    return value


def _is_time(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond any float: 10**400
        return False


def decode_record(data: bytes, *, check: bool = True) -> dict[str, Any]:
    """Parse and check a spool file: its record with its update lines applied in order.
    Raise CorruptRecord (naming the key, or the update line) for anything else.
    ``check=False`` skips the record's checks (for bytes already read and checked)."""
    if not data:
        raise CorruptRecord("empty file")
    mark = data.find(UPDATE_MARK)
    if mark < 0:
        record = _load(data)
        return _check_record(record) if check or not isinstance(record, dict) else record
    record = _load(data[:mark])
    if not isinstance(record, dict):
        raise CorruptRecord("not a JSON object")
    for number, line in enumerate(data[mark + 1:].split(b"\n"), 1):
        try:
            update = _load(line)
        except CorruptRecord as exc:  # a torn line is a sender's crash before its sync
            raise CorruptRecord(f"update line {number}: {exc.reason}") from None
        if not isinstance(update, dict) or not _apply(record, update):
            raise CorruptRecord(f"update line {number}: malformed")
    return _check_record(record) if check else record


def _apply(record: dict[str, Any], update: dict[str, Any]) -> bool:
    """Apply one update line to ``record``; False if it is not one."""
    changed, removed, spliced = (update.get("set"), update.get("unset", []),
                                 update.get("splice", {}))
    if not (isinstance(changed, dict) and isinstance(removed, list) and isinstance(
            spliced, dict) and all(isinstance(key, str) for key in removed)):
        return False
    record.update(changed)
    for key in removed:
        record.pop(key, None)
    for key, change in spliced.items():
        text = record.get(key)
        if not (isinstance(text, str) and isinstance(change, list) and len(change) == 3):
            return False
        start, count, inserted = change
        if not (type(start) is int and type(count) is int and isinstance(inserted, str)
                and start >= 0 and count >= 0 and start + count <= len(text)):
            return False
        record[key] = text[:start] + inserted + text[start + count:]
    return True


def _load(data: bytes) -> Any:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        value = None
    if value is None or not plain_json(value):
        # Whatever orjson refuses or might read otherwise (invalid or non-UTF-8 JSON, a
        # BOM, a lone surrogate, NaN, 1e400, an integer beyond 64 bits): the json module
        # decides, as it always did, and names the reason.
        value = _decode_json(data)
    return value


def _decode_json(data: bytes) -> Any:
    try:
        return json.loads(data, parse_constant=_reject_constant, parse_float=_finite_float)
    except _NonFinite as exc:
        raise CorruptRecord(f"non-finite number {str(exc)[:40]!r}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptRecord(f"not JSON: {exc}") from None


def _check_record(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise CorruptRecord("not a JSON object")
    for key, kind in _REQUIRED.items():
        if not isinstance(record.get(key), kind):  # type: ignore[arg-type]
            raise CorruptRecord(f"missing or malformed key {key!r}")
    for key in _TIMES:
        value = record.get(key)
        if (value is not None or key == "created_at") and not _is_time(value):
            raise CorruptRecord(f"malformed key {key!r}: not a finite time")
    # Addresses go into SMTP commands as they are: nothing that could end or add a command,
    # and nothing but ASCII unless the record says the message needs SMTPUTF8.
    ascii_only = record.get("smtputf8") is not True
    for key, addresses in (("recipients", record["recipients"]),
                           ("mail_from", [record["mail_from"]])):
        if not addresses:
            raise CorruptRecord(f"malformed key {key!r}: no address")
        for address in addresses:
            if not (isinstance(address, str) and _SAFE_ADDRESS.match(address)):
                raise CorruptRecord(f"malformed key {key!r}")
            if ascii_only and not address.isascii():
                raise CorruptRecord(f"malformed key {key!r}: non-ASCII address "
                                    f"{address[:80]!r} in a record without smtputf8")
    if not ID_PATTERN.match(record["id"]):
        raise CorruptRecord("malformed key 'id'")
    return record
