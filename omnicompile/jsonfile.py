"""The one way omnicompile reads JSON it did not just write: trajectory calibration files,
layered profile and schedule files, the CLI's ``--options @file`` / ``--spec-kwargs``, and
:meth:`omnicompile.report.Report.from_json`.

:func:`read_json` (a path) and :func:`parse_json` (text) check, before any schema:

* the path exists and is a **regular file** (a directory, FIFO or device is refused: reading
  a FIFO would block);
* it is at most ``max_bytes`` long (:data:`MAX_BYTES`; our files are kilobytes, a report of
  many generations a few megabytes) — the size is checked on ``stat`` and again on the bytes
  read, so a file that grows while it is read is still bounded;
* it is **UTF-8** (RFC 8259 JSON is; the message gives the offset of the first bad byte);
* it nests at most ``max_depth`` arrays/objects (:data:`MAX_DEPTH`; our deepest format, the
  report, nests 6): checked by a linear scan *before* ``json.loads``, whose recursive decoder
  would otherwise raise ``RecursionError`` on a deep file;
* it is strict JSON: no ``NaN``/``Infinity`` literals and no number that overflows a float
  (``1e999``) — every number a schema sees is finite.

Each failure raises ``error(message)`` — the caller's typed exception
(:class:`~omnicompile.errors.CalibrationError`, :class:`~omnicompile.errors.ScheduleError`,
:class:`~omnicompile.errors.ReportError`, the CLI's usage error) — with a message naming
the file (``what`` and the path) and the problem.  The per-format schema checks (types and
ranges of every field) are the caller's: they run on the value returned.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from typing import Any, Callable

__all__ = ["read_json", "parse_json", "MAX_BYTES", "MAX_DEPTH"]

#: largest file read (bytes)
MAX_BYTES = 64 * 2**20
#: deepest nesting of arrays and objects accepted
MAX_DEPTH = 64

#: a JSON string, or an unterminated one up to the end (so that every match attempt succeeds:
#: linear time); possessive, so nothing backtracks
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")


def read_json(path, what: str, error: Callable[[str], Exception], *, max_bytes: int = MAX_BYTES,
              max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of the file at ``path`` (see the module docstring for the checks);
    ``what`` names the file in messages ("trajectory calibration file")."""
    p = os.fspath(path)
    where = f"{what} {p!r}"
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error(f"{where} does not exist") from None
    except OSError as e:
        raise error(f"{where} cannot be read: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{where} is a directory, not a JSON file") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{where} is not a regular file (a FIFO, socket or device); give a JSON file") from None
    if st.st_size > max_bytes:
        raise error(f"{where} is {st.st_size} bytes; at most {max_bytes} are read (is it the right file?)")
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{where} cannot be read: {e.strerror or e}") from None
    return parse_json(data, where, error, max_bytes=max_bytes, max_depth=max_depth)


def parse_json(data, where: str, error: Callable[[str], Exception], *, max_bytes: int = MAX_BYTES,
               max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of ``data`` (``str`` or UTF-8 ``bytes``); ``where`` names its source in
    messages."""
    if isinstance(data, (bytes, bytearray)):
        if len(data) > max_bytes:
            raise error(f"{where} is over {max_bytes} bytes; at most {max_bytes} are read")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} "
                        f"({e.reason}); JSON files are UTF-8") from None
    elif isinstance(data, str):
        text = data
        if len(text) > max_bytes:
            raise error(f"{where} is over {max_bytes} characters; at most {max_bytes} are read")
    else:
        raise error(f"{where}: expected JSON text (str or bytes), got {type(data).__name__}")
    if _too_deep(text, max_depth):
        raise error(f"{where} nests arrays/objects deeper than {max_depth} levels; no omnicompile file "
                    "nests that deep")
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except _NonFinite as e:
        raise error(f"{where} is not valid JSON: {e} (numbers must be finite)") from None
    except (ValueError, RecursionError) as e:   # an int literal over Python's digit limit; a last guard
        raise error(f"{where} is not valid JSON: {e}") from None


class _NonFinite(ValueError):
    pass


def _no_constant(name: str):
    raise _NonFinite(f"the literal {name}")


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise _NonFinite(f"the number {s[:40]} overflows a float")
    return v


def _too_deep(text: str, limit: int) -> bool:
    """Whether ``text`` nests arrays/objects more than ``limit`` deep (brackets inside strings
    do not count).  In C-speed passes: strings removed, then only the brackets kept, then each
    pass of ``replace("[]", "")`` removes the innermost level of every nest — a nest still
    there after ``limit`` passes is deeper.  Malformed nesting is left to the parser."""
    if text.count("[") + text.count("{") <= limit:
        return False
    s = _STRING.sub("", text) if '"' in text else text
    s = _NOT_BRACKET.sub("", s).replace("{", "[").replace("}", "]")
    for _ in range(limit):
        t = s.replace("[]", "")
        if t == s:
            return False
        s = t
    return "[]" in s
