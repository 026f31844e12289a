"""Safe S-expression reader for swimmy's legacy ``BACKTEST_RESULT`` messages.

What this module owns
---------------------
* :func:`parse` -- a generic, size-, depth- and count-capped reader that turns
  UTF-8 S-expression text into plain Python values (lists, :class:`Dotted`
  improper lists, :class:`Symbol`, str, int, float, bool, None).
* :func:`parse_backtest_result` -- the interpretation of PROTOCOL section 2
  ("Legacy ingest"): both spellings (dotted pairs as swimmy's backtest service
  writes them, and Guardian's serde_lexpr form where an optional value is a
  one-element list), the ``max_drawdown`` alias, the ``error`` field, and the
  trade list turned into columns named exactly like a section-1 ``chunk``.

What it never does
------------------
* Never evaluates anything: no ``eval``/``exec``/``pickle``, no reader macros,
  no code paths that depend on the content other than the grammar below.
* Never recurses on input structure (an explicit stack is used; nesting is
  capped by ``max_depth``), never touches global state (safe from any thread;
  the compiled patterns are immutable module constants), never does I/O,
  logging, metrics, validation of request ids, or storage -- the caller owns
  those.  Every failure is a :class:`SexprError` (a ``ValueError``) whose
  message says what went wrong and, where it is known, the byte offset.

Grammar accepted (liberal, as in PROTOCOL section 2)
----------------------------------------------------
``(`` ... ``)`` lists (``#(`` ... ``)`` vectors read as lists), ``(a b . c)``
dotted tails, ``;`` line comments, strings in double quotes with backslash
escapes (``\\"`` ``\\\\`` ``\\n`` ``\\t`` ``\\r`` ``\\0`` ``\\xHH;``; any other
escaped character stands for itself), integers, floats (sign, ``1.``, ``.5``,
exponents ``e``/``E`` and Common Lisp's ``d``/``f``/``s``/``l`` markers,
``+nan.0``/``+inf.0``/``-inf.0``), booleans ``#t`` ``#f`` ``#true``
``#false`` ``t`` ``true`` ``false``, and ``nil``/``#nil`` (None).  The
boolean and nil symbols are case-insensitive (Common Lisp prints ``T`` and
``NIL``).  ``()`` reads as ``[]``; both ``nil`` and ``()`` mean "empty/none"
to :func:`parse_backtest_result`.

Interpretation choices (see :func:`parse_backtest_result`)
----------------------------------------------------------
* An alist entry is ``(key . value)``, or ``(key value)`` (serde_lexpr
  ``Some``), or ``(key)`` (serde_lexpr ``None``), or ``(key v1 v2 ...)``
  (a Lisp printer's rendering of ``(key . (v1 v2 ...))``: value is the list).
  Keys are symbols or strings, lower-cased, ``-`` read as ``_``, a leading
  ``:`` dropped.  The first occurrence of a key wins (Lisp ``assoc``).
* The top level may be ``((type . "BACKTEST_RESULT") (result . ALIST))``, the
  same with ``(result ALIST)``, or the result alist itself (with or without a
  ``type`` entry).  Entries outside ``result`` are merged under it (``result``
  wins).  When a ``type`` is present anywhere it must be ``BACKTEST_RESULT``
  (string or symbol, case-insensitive).
* Metrics that are NaN or infinite are left out of ``metrics`` (stored as
  NULL), whether read as numbers (``+nan.0``, ``1e999``) or spelled as
  Guardian's strings/symbols (``"NaN"``, ``"inf"``, ``"-inf"``); a metric of
  any other wrong type is an error.  Trade values: ``timestamp`` and ``pnl``
  are required; a non-finite ``pnl`` (number or such a string) does not make
  the message unreadable but the result ``failed``: ``error`` names the trade
  index and no columns are returned.  Optional numeric columns reject NaN and
  infinities.  Ints are accepted as floats, integral floats as ints,
  booleans are never numbers.  Unknown keys are ignored.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from . import codec

__all__ = [
    "SexprError",
    "Symbol",
    "Dotted",
    "LegacyResult",
    "parse",
    "parse_backtest_result",
]


class SexprError(ValueError):
    """The input is not an acceptable S-expression / BACKTEST_RESULT.

    ``offset`` is the byte offset the message refers to, or None.
    """

    def __init__(self, message: str, offset: int | None = None):
        if offset is not None:
            message = f"{message} (at byte {offset})"
        super().__init__(message)
        self.offset = offset


class NonFinitePnl(SexprError):
    """A trade's pnl is NaN or infinite: the result is readable, but ``failed`` (internal)."""


class Symbol(str):
    """A bare symbol, spelled as in the input (a ``str`` subclass)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Symbol({str.__repr__(self)})"


class Dotted:
    """An improper list ``(i1 i2 ... . tail)``: ``items`` is ``[i1, i2, ...]``."""

    __slots__ = ("items", "tail")

    def __init__(self, items: list, tail: object):
        self.items = items
        self.tail = tail

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Dotted):
            return NotImplemented
        return self.items == other.items and self.tail == other.tail

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Dotted({self.items!r}, {self.tail!r})"


# The optional trade columns (PROTOCOL section 1 "chunk", defined in pairlane.codec) and their
# kinds, strings first; timestamp and pnl are read on their own.
_COLUMN_KIND = {c: codec.COLUMN_KINDS[c] for c in (*codec.STR_COLS, *codec.FLOAT_COLS, *codec.INT_COLS)
                if c not in codec.REQUIRED}

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


@dataclass
class LegacyResult:
    """One interpreted BACKTEST_RESULT (see PROTOCOL section 2)."""

    request_id: str | None = None
    strategy_name: str | None = None
    metrics: dict = field(default_factory=dict)
    symbol: str | None = None
    timeframe: int | None = None
    rank: str | None = None
    oos_kind: str | None = None
    error: str | None = None
    has_trade_list: bool = False
    columns: dict[str, list] = field(default_factory=dict)
    total_trades: int = 0
    truncated: bool = False


# ---------------------------------------------------------------------------
# Tokenizer.  One master pattern over bytes (offsets are byte offsets); each
# match swallows the whitespace/comments in front of one token.
# ---------------------------------------------------------------------------

_DELIM = rb'(?=[\s()";]|\Z)'
_TOKEN = re.compile(
    rb"""(?:\s++|;[^\n]*+)*+
    (?:
        (?P<open>\(|\#\()
      | (?P<close>\))
      | (?P<str>"(?:[^"\\]++|\\.)*+")
      | (?P<int>[-+]?\d+)""" + _DELIM + rb"""
      | (?P<float>(?:[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eEdDfFsSlL][-+]?\d+)?
                   |[-+](?:nan|inf)\.0))""" + _DELIM + rb"""
      | (?P<dot>\.)""" + _DELIM + rb"""
      | (?P<hash>\#(?:[tT](?:[rR][uU][eE])?|[fF](?:[aA][lL][sS][eE])?|[nN][iI][lL]))""" + _DELIM + rb"""
      | (?P<sym>[^\s()";\#'`,][^\s()";]*+)
      | (?P<eof>\Z)
      | (?P<bad>.)
    )""",
    re.X | re.S,
)

_SYMBOL_ATOMS = {"t": True, "true": True, "false": False, "nil": None}
_HASH_ATOMS = {b"#t": True, b"#true": True, b"#f": False, b"#false": False, b"#nil": None}
_EXP_MARKERS = bytes.maketrans(b"dDfFsSlL", b"eeeeeeee")
_ESCAPE = re.compile(rb"\\(?:[xX]([0-9a-fA-F]{1,6});|(.))", re.S)
_ESCAPES = {b"n": "\n", b"t": "\t", b"r": "\r", b"0": "\0", b"a": "\a", b"b": "\b", b"f": "\f", b"v": "\v"}

# Fast paths for the trade list.  They are only optimisations: they run where
# the reader is directly inside a trade list (the value of a ``trade_list``
# entry, or right after the ``trade_list`` symbol), and turn a run of
# consecutive *flat* trades into one _TradeBlock holding exactly the columns
# the generic reader + interpreter would have produced.  Anything they do not
# recognise, or any value that would be an error, is left to the generic
# reader, which then reports it with its byte offset.
#
# Tier 1: swimmy's real shape ``((timestamp . T) (pnl . P))``.
# Possessive throughout (what follows each quantified part can never be what it consumed, so
# nothing is given up by not backtracking): about 10% faster than plain quantifiers.
_T1_RUN = re.compile(
    rb"(?:\(\s*+\(\s*+(?i:timestamp)\s++\.\s++[-+]?+\d++\s*+\)"
    rb"\s*+\(\s*+(?i:pnl)\s++\.\s++[-+]?+(?:\d++(?:\.\d*+)?+|\.\d++)(?:[eE][-+]?+\d++)?+\s*+\)\s*+\)\s*+)++"
)
# Inside a tier-1 run, the values are exactly what follows a '.' and whitespace (a pnl's own '.'
# is followed by a digit, or by whitespace and ')'): ts, pnl, ts, pnl, ...  Starting on a literal
# lets the engine skip to each '.': a third faster than scanning for whitespace first.
_T1_NUM = re.compile(rb"\.\s++([^\s)]++)")
# Tier 2: any flat trade ``((key . atom) (key atom) (key) ...)`` whose atoms are
# numbers, strings, symbols or #t/#f/#nil.
_T2_KEY = rb"[A-Za-z_:][^\s()\";]*+"
_T2_ATOM = (
    rb"{G}[-+]?\d+)(?=\s*\))|{G}[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eEdDfFsSlL][-+]?\d+)?)(?=\s*\))"
    rb"|{G}\"(?:[^\"\\]++|\\.)*+\")|{G}[A-Za-z_:][^\s()\";]*+)|{G}\#(?i:true|false|nil|t|f))(?=\s*\))"
)
_T2_ENTRY = rb"\(\s*{G}" + _T2_KEY + rb")(?:\s+(?:\.\s+)?(?:" + _T2_ATOM + rb"))?\s*\)"
_T2_RUN = re.compile(
    rb"(?:\(\s*(?:" + _T2_ENTRY.replace(b"{G}", b"(?:") + rb"\s*)++\)\s*)++", re.S
)
_T2_ITEM = re.compile(_T2_ENTRY.replace(b"{G}", b"(") + rb"|(\))", re.S)
_isfinite = math.isfinite
_MISSING = object()
_NONFINITE_TEXT = frozenset({"nan", "inf", "infinity", "+nan", "-nan", "+inf", "-inf", "+infinity", "-infinity",
                             "+nan.0", "-nan.0", "+inf.0", "-inf.0"})


def _nonfinite_text(v) -> bool:
    """True for a string or symbol spelling NaN or an infinity (Guardian writes them as strings)."""
    return isinstance(v, str) and v.strip().lower() in _NONFINITE_TEXT


class _TradeBlock:
    """A run of consecutive flat trades read by a fast path (internal).

    ``cols`` maps column name -> list of ``n`` converted values; timestamp and
    pnl are always there, optional columns only if some trade has them.
    """

    __slots__ = ("n", "cols", "offset")

    def __init__(self, n: int, cols: dict, offset: int):
        self.n = n
        self.cols = cols
        self.offset = offset

    def __len__(self) -> int:
        return self.n


def _tier1(buf: bytes, tok: int):
    """(block, end); (None, end) when the run holds a value that is an error
    (the generic reader must then read up to ``end``); None when no run."""
    run = _T1_RUN.match(buf, tok)
    if run is None:
        return None
    end = run.end()
    nums = _T1_NUM.findall(buf, tok, end)
    try:
        ts = list(map(int, nums[0::2]))
        pnl = list(map(float, nums[1::2]))
    except ValueError:  # absurdly long literal
        return None, end
    if (len(ts) != len(pnl) or not all(map(_isfinite, pnl))
            or min(ts) < _INT64_MIN or max(ts) > _INT64_MAX):
        return None, end
    return _TradeBlock(len(ts), {"timestamp": ts, "pnl": pnl}, tok), end


def _tier2(buf: bytes, tok: int):
    run = _T2_RUN.match(buf, tok)
    if run is None:
        return None
    end = run.end()
    ts: list = []
    pnl: list = []
    opt: dict = {}
    keys: dict = {}
    syms: dict = {}
    d: dict = {}
    j = 0
    try:
        for key, i_, f_, s_, y_, h_, close in _T2_ITEM.findall(buf, tok, end):
            if close:
                _add_trade(d, j, ts, pnl, opt)
                j += 1
                d = {}
                continue
            k = keys.get(key)
            if k is None:
                name = key.decode("utf-8")
                k = keys[key] = "" if name.lower() in _SYMBOL_ATOMS else _norm_key(name)
            if not k or k in d:  # (t . x) is no entry; first key wins
                continue
            if i_:
                v = int(i_)
            elif f_:
                v = float(f_.translate(_EXP_MARKERS))
            elif s_:
                v = s_[1:-1]
                v = _unescape(v) if b"\\" in v else v.decode("utf-8")
            elif y_:
                v = syms.get(y_, _MISSING)
                if v is _MISSING:
                    name = y_.decode("utf-8")
                    low = name.lower()
                    v = syms[y_] = _SYMBOL_ATOMS[low] if low in _SYMBOL_ATOMS else Symbol(name)
            elif h_:
                v = _HASH_ATOMS[h_.lower()]
            else:
                v = None
            d[k] = v
    except (SexprError, ValueError):  # let the generic reader report it
        return None, end
    for lst in opt.values():
        if len(lst) < j:
            lst.extend([None] * (j - len(lst)))
    cols = {"timestamp": ts, "pnl": pnl}
    cols.update(opt)
    return _TradeBlock(j, cols, tok), end


def _prepare(data: bytes | str, max_bytes: int) -> bytes:
    if isinstance(data, str):
        if len(data) > max_bytes:
            raise SexprError(f"message is over the limit of {max_bytes} bytes")
        try:
            buf = data.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SexprError(f"text is not encodable as UTF-8 ({e.reason})", None) from None
    elif isinstance(data, (bytes, bytearray, memoryview)):
        buf = bytes(data)
    else:
        raise SexprError(f"expected bytes or str, got {type(data).__name__}")
    if len(buf) > max_bytes:
        raise SexprError(f"message is {len(buf)} bytes, over the limit of {max_bytes}")
    try:
        buf.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SexprError(f"invalid UTF-8 ({e.reason})", e.start) from None
    if buf.startswith(b"\xef\xbb\xbf"):
        buf = b"   " + buf[3:]  # keep offsets
    return buf


def _unescape(raw: bytes) -> str:
    def repl(m: re.Match) -> bytes:
        if m.group(1) is not None:
            cp = int(m.group(1), 16)
            if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                raise ValueError(f"\\x{m.group(1).decode()}; is not a Unicode scalar value")
            return chr(cp).encode("utf-8")
        c = m.group(2)
        e = _ESCAPES.get(c)
        return e.encode() if e is not None else c

    return _ESCAPE.sub(repl, raw).decode("utf-8")


def _read(buf: bytes, max_depth: int, max_atoms: int | None, fast: bool, positions: dict | None):
    """Build the value tree with an explicit stack."""
    if max_depth < 1:
        raise SexprError("max_depth must be >= 1")
    limit = max_atoms if max_atoms is not None else -1
    count = 0
    if max_atoms is not None:
        fast = False  # keep the value count exact
    stack: list = []  # saved (list, state, tail, start, trades_here) of enclosing lists
    trades_here = False  # cur is a trade list (fast paths allowed inside)
    no_fast_before = 0
    cur = None  # list being filled, None at top level
    state = 0  # 0: items, 1: after '.', 2: tail read
    tail = None
    start = 0
    depth = 0
    root = _NOTHING = object()
    sym_cache: dict = {}
    pos = 0
    while True:
        restart = -1
        for m in _TOKEN.finditer(buf, pos):
            kind = m.lastgroup
            if kind == "open":
                tok = m.start("open")
                if cur is None and root is not _NOTHING:
                    raise SexprError("data after the top-level expression", tok)
                if fast and cur is not None and tok >= no_fast_before:
                    at_list = (type(cur[0]) is Symbol and _norm_key(cur[0]) == "trade_list"
                               if cur else False)
                    if (trades_here or at_list) and state == 0 and depth + 2 <= max_depth:
                        got = _tier1(buf, tok) or _tier2(buf, tok)
                        if got is not None:
                            if got[0] is None:
                                no_fast_before = got[1]  # an error inside: generic reports it
                            else:
                                cur.append(got[0])
                                restart = got[1]
                                break
                else:
                    at_list = False
                depth += 1
                if depth > max_depth:
                    raise SexprError(f"nesting deeper than max_depth={max_depth}", tok)
                count += 1
                if count == limit + 1 and limit >= 0:
                    raise SexprError(f"more than max_atoms={limit} values", tok)
                if cur is not None:
                    stack.append((cur, state, tail, start, trades_here))
                cur = []
                state = 0
                tail = None
                start = tok
                trades_here = at_list
                continue
            if kind == "close":
                if cur is None:
                    raise SexprError("unexpected ')'", m.start("close"))
                if state == 0:
                    val = cur
                elif state == 2:
                    val = Dotted(cur, tail)
                else:
                    raise SexprError("missing value after '.'", m.start("close"))
                if positions is not None:
                    positions[id(val)] = start
                depth -= 1
                if stack:
                    cur, state, tail, start, trades_here = stack.pop()
                else:
                    cur = None
                    state = 0
                    trades_here = False
            elif kind == "sym":
                raw = m.group("sym")
                val = sym_cache.get(raw, _NOTHING)
                if val is _NOTHING:
                    name = raw.decode("utf-8")
                    low = name.lower()
                    val = _SYMBOL_ATOMS[low] if low in _SYMBOL_ATOMS else Symbol(name)
                    sym_cache[raw] = val
            elif kind == "dot":
                tok = m.start("dot")
                if cur is None:
                    raise SexprError("'.' outside a list", tok)
                if state != 0:
                    raise SexprError("second '.' in a list", tok)
                if not cur:
                    raise SexprError("'.' at the start of a list", tok)
                state = 1
                continue
            elif kind == "int":
                try:
                    val = int(m.group("int"))
                except ValueError:  # beyond Python's int-string digit limit
                    raise SexprError("integer literal too long", m.start("int")) from None
            elif kind == "str":
                raw = m.group("str")[1:-1]
                if b"\\" in raw:
                    try:
                        val = _unescape(raw)
                    except ValueError as e:
                        raise SexprError(f"bad string escape: {e}", m.start("str")) from None
                else:
                    val = raw.decode("utf-8")
            elif kind == "float":
                raw = m.group("float")
                if raw[1:2] in (b"n", b"i"):
                    val = float(raw[:-2])  # Scheme's +nan.0 / +inf.0 / -inf.0
                else:
                    val = float(raw.translate(_EXP_MARKERS))
            elif kind == "hash":
                val = _HASH_ATOMS[m.group("hash").lower()]
            elif kind == "eof":
                break
            else:  # bad
                tok = m.start("bad")
                ch = buf[tok:tok + 1]
                if ch == b'"':
                    raise SexprError("unterminated string", tok)
                raise SexprError(f"unexpected character {ch.decode('latin-1')!r}", tok)
            if kind != "close":
                count += 1
                if count == limit + 1 and limit >= 0:
                    raise SexprError(f"more than max_atoms={limit} values", m.start(kind))
            # place the value
            if cur is None:
                if root is not _NOTHING:
                    raise SexprError("data after the top-level expression", m.start(kind))
                root = val
            elif state == 0:
                cur.append(val)
            elif state == 1:
                tail = val
                state = 2
            else:
                raise SexprError("more than one value after '.'", m.start(kind))
        if restart < 0:
            break
        pos = restart
    if cur is not None:
        raise SexprError("unbalanced parentheses: '(' never closed", start)
    if root is _NOTHING:
        raise SexprError("empty input", len(buf))
    return root


def parse(data: bytes | str, *, max_bytes: int = 64 << 20, max_depth: int = 64,
          max_atoms: int | None = None) -> object:
    """Read exactly one S-expression from UTF-8 ``data`` without evaluating it.

    Lists become Python lists, ``(a b . c)`` becomes ``Dotted([a, b], c)``,
    symbols :class:`Symbol`; ``t``/``true``/``#t`` -> True, ``false``/``#f``
    -> False, ``nil``/``#nil`` -> None, ``()`` -> ``[]``.  ``max_atoms`` caps
    the number of values (atoms and lists both count).
    """
    buf = _prepare(data, max_bytes)
    return _read(buf, max_depth, max_atoms, False, None)


# ---------------------------------------------------------------------------
# Interpretation of BACKTEST_RESULT
# ---------------------------------------------------------------------------

def _norm_key(k: str) -> str:
    n = k.lower().replace("-", "_")
    return n[1:] if n.startswith(":") else n


def _entry(node):
    """(normalised key, value) if node is an alist entry, else None."""
    if type(node) is list:
        if not node:
            return None
        k = node[0]
        if not isinstance(k, str):
            return None
        n = len(node)
        if n == 1:
            return _norm_key(k), None
        if n == 2 and type(node[1]) is not _TradeBlock:
            return _norm_key(k), node[1]
        return _norm_key(k), node[1:]
    if type(node) is Dotted:
        if len(node.items) == 1 and isinstance(node.items[0], str):
            return _norm_key(node.items[0]), node.tail
    return None


def _is_entry(node) -> bool:
    return _entry(node) is not None


def _alist(node) -> dict:
    """First-wins dict of the entries of an alist (non-entries are skipped)."""
    out: dict = {}
    if type(node) is not list:
        return out
    for el in node:
        e = _entry(el)
        if e is not None and e[0] not in out:
            out[e[0]] = e[1]
    return out


def _as_alist_node(v):
    """A value meant to be an alist; a lone entry is wrapped (Lisp printer)."""
    if type(v) is Dotted or (type(v) is list and v and isinstance(v[0], str)):
        return [v]
    return v


def _describe(v) -> str:
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "a boolean"
    if type(v) is Symbol:
        return f"symbol {str(v)!r}"
    if isinstance(v, str):
        return f"string {v!r}"[:80]
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, Dotted, _TradeBlock)):
        return "a list"
    return type(v).__name__


def _type_ok(v) -> bool:
    if isinstance(v, str):
        return v.upper().replace("-", "_") == "BACKTEST_RESULT"
    return False


def _text(v, what: str) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return str(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise SexprError(f"{what} must be a string, got {_describe(v)}")


def _to_int(v, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SexprError(f"{what} must be an integer, got {_describe(v)}")
    if isinstance(v, float):
        if not v.is_integer():
            raise SexprError(f"{what} must be an integer, got {v!r}")
        v = int(v)
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise SexprError(f"{what} is out of the 64-bit range: {v}")
    return v


def _to_float(v, what: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SexprError(f"{what} must be a number, got {_describe(v)}")
    try:
        f = float(v)
    except OverflowError:
        raise SexprError(f"{what} is out of the float range") from None
    return f


def _trades_of(v) -> list:
    """The trade_list value as a list of trade nodes and _TradeBlocks."""
    if v is None:
        return []
    if type(v) is _TradeBlock:
        return [v]
    if type(v) is list:
        if v and _is_entry(v[0]):
            return [v]  # a single trade printed as (trade_list (k . v) ...)
        return v
    if type(v) is Dotted:
        if _is_entry(v):
            return [[v]]
        raise SexprError("trade_list is an improper list")
    raise SexprError(f"trade_list must be a list, got {_describe(v)}")


def _add_trade(d: dict, i: int, ts_col: list, pnl_col: list, opt: dict) -> None:
    """Append trade number ``i`` (a dict of normalised key -> raw value)."""
    tsv = d.get("timestamp")
    if tsv is None:
        raise SexprError("missing timestamp")
    pv = d.get("pnl")
    if pv is None:
        raise SexprError("missing pnl")
    tsv = tsv if type(tsv) is int and _INT64_MIN <= tsv <= _INT64_MAX else _to_int(tsv, "timestamp")
    if _nonfinite_text(pv):
        raise NonFinitePnl(f"pnl is not finite ({str(pv)!r})")
    pv = pv if type(pv) is float else _to_float(pv, "pnl")
    if not _isfinite(pv):
        raise NonFinitePnl(f"pnl is not finite ({pv!r})")
    if len(d) > 2:
        conv_all = []
        for key, val in d.items():
            kind = _COLUMN_KIND.get(key)
            if kind is None:
                continue
            tv = type(val)
            if val is None:
                conv = None
            elif kind == "str":
                if tv is str:
                    conv = val
                elif tv is Symbol or tv is int or tv is float:
                    conv = str(val)
                else:
                    raise SexprError(f"{key} must be a string, got {_describe(val)}")
            elif kind == "float":
                conv = val if tv is float else _to_float(val, key)
                if not _isfinite(conv):
                    raise SexprError(f"{key} is not finite ({conv!r})")
            elif tv is int and _INT64_MIN <= val <= _INT64_MAX:
                conv = val
            else:
                conv = _to_int(val, key)
            conv_all.append((key, conv))
        for key, conv in conv_all:
            lst = opt.get(key)
            if lst is None:
                lst = opt[key] = [None] * i
            elif len(lst) < i:
                lst.extend([None] * (i - len(lst)))
            lst.append(conv)
    ts_col.append(tsv)
    pnl_col.append(pv)


def _columns(trades: list, positions: dict) -> tuple[dict, int]:
    ts_col: list = []
    pnl_col: list = []
    opt: dict[str, list] = {}
    i = 0
    for t in trades:
        if type(t) is _TradeBlock:
            for name, vals in t.cols.items():
                if name == "timestamp":
                    ts_col.extend(vals)
                elif name == "pnl":
                    pnl_col.extend(vals)
                else:
                    lst = opt.get(name)
                    if lst is None:
                        lst = opt[name] = [None] * i
                    elif len(lst) < i:
                        lst.extend([None] * (i - len(lst)))
                    lst.extend(vals)
            i += t.n
            continue
        where = positions.get(id(t))
        if type(t) is Dotted and _is_entry(t):
            t = [t]
        elif t is None:
            t = []
        try:
            if type(t) is not list:
                raise SexprError(f"not an association list but {_describe(t)}")
            _add_trade(_alist(t), i, ts_col, pnl_col, opt)
        except SexprError as e:  # NonFinitePnl keeps its type: the result is failed, not unreadable
            raise type(e)(f"trade {i}: {e}", where) from None
        i += 1
    cols: dict = {"timestamp": ts_col, "pnl": pnl_col}
    for name in _COLUMN_KIND:
        lst = opt.get(name)
        if lst is not None:
            if len(lst) < i:
                lst.extend([None] * (i - len(lst)))
            cols[name] = lst
    return cols, i


_METRICS = ("sharpe", "profit_factor", "win_rate", "max_dd")


def _interpret(tree, positions: dict) -> LegacyResult:
    top = tree
    # Unwrap one-element wrappers such as (((type . ...) ...)).
    while type(top) is list and len(top) == 1 and type(top[0]) is list and not _is_entry(top[0]):
        top = top[0]
    if type(top) is Dotted and _is_entry(top):
        top = [top]
    elif type(top) is list and top and isinstance(top[0], str):
        # (result ALIST) alone, or a tagged form (BACKTEST_RESULT (k . v) ...)
        if _norm_key(top[0]) == "result":
            top = [top]
        elif _type_ok(top[0]):
            top = top[1:]
        else:
            raise SexprError(f"message head is {_describe(top[0])}, expected BACKTEST_RESULT")
    if type(top) is not list:
        raise SexprError(f"expected an association list at the top level, got {_describe(top)}")
    outer = _alist(top)
    if not outer:
        raise SexprError("top level is not an association list", positions.get(id(top)))
    if "type" in outer and not _type_ok(outer["type"]):
        raise SexprError(f"type is {_describe(outer['type'])}, expected BACKTEST_RESULT")
    if "result" in outer and outer["result"] is not None:
        rnode = _as_alist_node(outer["result"])
        if type(rnode) is not list:
            raise SexprError(f"result must be an association list, got {_describe(rnode)}")
        inner = _alist(rnode)
        if "type" in inner and not _type_ok(inner["type"]):
            raise SexprError(f"result type is {_describe(inner['type'])}, expected BACKTEST_RESULT")
        d = {k: v for k, v in outer.items() if k not in ("type", "result")}
        d.update(inner)
    else:
        d = outer

    res = LegacyResult()
    res.request_id = _text(d.get("request_id"), "request_id")
    res.strategy_name = _text(d.get("strategy_name"), "strategy_name")
    res.symbol = _text(d.get("symbol"), "symbol")
    res.rank = _text(d.get("rank"), "rank")
    res.oos_kind = _text(d.get("oos_kind"), "oos_kind")
    res.timeframe = _to_int(d.get("timeframe"), "timeframe")
    err = d.get("error")
    if err is None or err is False or err == []:
        res.error = None
    elif isinstance(err, list) and all(isinstance(x, str) for x in err):
        res.error = " ".join(err)
    elif isinstance(err, (str, int, float)):
        res.error = str(err)
    else:
        res.error = _describe(err)
    metrics: dict = {}
    if "max_dd" not in d and "max_drawdown" in d:
        d["max_dd"] = d["max_drawdown"]
    for name in _METRICS:
        v = d.get(name)
        if v is None or v == []:
            continue
        if _nonfinite_text(v):
            continue  # Guardian's "NaN" / "inf" / "-inf": stored as NULL
        f = _to_float(v, name)
        if _isfinite(f):
            metrics[name] = f
    reported = d.get("trades")
    if reported is not None and reported != []:
        metrics["trades"] = _to_int(reported, "trades")
    res.metrics = metrics

    trades = _trades_of(d.get("trade_list"))
    res.has_trade_list = bool(trades)
    try:
        res.columns, res.total_trades = _columns(trades, positions)
    except NonFinitePnl as e:
        # the result is read, but cannot be stored as trades: failed, with the trade index
        if res.error is None:
            res.error = str(e)
        res.columns, res.total_trades = {"timestamp": [], "pnl": []}, 0
        return res
    # Guardian keeps only the last 500 trades: a list shorter than the reported count. An absent
    # list (Brain asked for none) or a longer one is not a truncation.
    res.truncated = res.has_trade_list and "trades" in metrics and res.total_trades < metrics["trades"]
    return res


def parse_backtest_result(data: bytes | str, *, max_bytes: int = 64 << 20,
                          max_depth: int = 64, _fast: bool = True) -> LegacyResult:
    """Parse and interpret one swimmy ``BACKTEST_RESULT`` message.

    A missing request_id is not an error (``request_id`` is None: the caller
    rejects it).  ``has_trade_list`` is False when there is no ``trade_list``
    or it is ``nil``/empty.  ``truncated`` is True only when a trade_list is
    present and shorter than a reported ``trades`` count.  A trade whose
    ``pnl`` is NaN or infinite sets ``error`` ("trade N: pnl is not finite
    ...", unless the message has an error of its own) and leaves no columns.
    ``_fast=False`` disables the trade fast path (for tests only).
    """
    buf = _prepare(data, max_bytes)
    positions: dict = {}
    tree = _read(buf, max_depth, None, _fast, positions)
    return _interpret(tree, positions)
