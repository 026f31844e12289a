"""Unit tests for pairlane.sexpr (PROTOCOL section 2, legacy ingest)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pairlane import sexpr
from pairlane.sexpr import (
    Dotted,
    LegacyResult,
    SexprError,
    Symbol,
    parse,
    parse_backtest_result,
)
from pairlane.synthetic import legacy_columns as synthetic_columns
from pairlane.synthetic import legacy_message as synthetic

DOTTED = (
    b'((type . "BACKTEST_RESULT") (result . ((strategy_name . "S") (request_id . "R") '
    b'(sharpe . 0.1) (trades . 2) (profit_factor . 1.2) (win_rate . 0.5) (max_dd . 0.1) '
    b'(symbol . "USDJPY") (timeframe . 60) (rank . "A") (oos_kind . "x") '
    b"(trade_list . (((timestamp . 1709234567) (pnl . 0.75)) "
    b"((timestamp . 1709234568) (pnl . -0.25)))))))"
)
LEXPR = (
    b'((type . "BACKTEST_RESULT") (result ((strategy_name . "S") (request_id . "R") '
    b'(sharpe 0.1) (trades . 2) (profit_factor 1.2) (win_rate 0.5) (max_dd 0.1) '
    b'(symbol "USDJPY") (timeframe 60) (rank "A") (oos_kind "x") '
    b"(trade_list (((timestamp . 1709234567) (pnl . 0.75)) "
    b"((timestamp . 1709234568) (pnl . -0.25)))))))"
)
EXPECTED = LegacyResult(
    request_id="R",
    strategy_name="S",
    metrics={"sharpe": 0.1, "profit_factor": 1.2, "win_rate": 0.5, "max_dd": 0.1, "trades": 2},
    symbol="USDJPY",
    timeframe=60,
    rank="A",
    oos_kind="x",
    error=None,
    has_trade_list=True,
    columns={"timestamp": [1709234567, 1709234568], "pnl": [0.75, -0.25]},
    total_trades=2,
    truncated=False,
)


def both(data, **kw):
    """Parse with and without the trade fast paths; they must agree."""
    fast = parse_backtest_result(data, **kw)
    slow = parse_backtest_result(data, _fast=False, **kw)
    assert fast == slow
    return fast


def contains_block(data: bytes) -> bool:
    tree = sexpr._read(sexpr._prepare(data, 1 << 30), 64, None, True, {})
    todo = [tree]
    while todo:
        x = todo.pop()
        if isinstance(x, sexpr._TradeBlock):
            return True
        if isinstance(x, list):
            todo.extend(x)
        elif isinstance(x, Dotted):
            todo.extend(x.items)
            todo.append(x.tail)
    return False


# --------------------------------------------------------------------------
# Both spellings and the shapes around them
# --------------------------------------------------------------------------

@pytest.mark.parametrize("data", [DOTTED, LEXPR, DOTTED.decode(), LEXPR.decode()])
def test_both_spellings(data):
    assert both(data) == EXPECTED


def test_lisp_printer_spelling():
    # What a Lisp printer makes of the dotted form: (k . (a b)) prints (k a b).
    data = (
        b'((TYPE . "BACKTEST_RESULT") (RESULT (STRATEGY-NAME . "S") (REQUEST-ID . "R") '
        b"(SHARPE . 0.1d0) (TRADES . 2) (PROFIT-FACTOR . 1.2d0) (WIN-RATE . 0.5d0) "
        b'(MAX-DD . 0.1d0) (SYMBOL . "USDJPY") (TIMEFRAME . 60) (RANK . "A") (OOS-KIND . "x") '
        b"(TRADE-LIST ((TIMESTAMP . 1709234567) (PNL . 0.75)) "
        b"((TIMESTAMP . 1709234568) (PNL . -0.25)))))"
    )
    assert both(data) == EXPECTED
    single = b'((result (request_id . "R") (trade_list ((timestamp . 5) (pnl . 1)))))'
    r = both(single)
    assert r.request_id == "R" and r.columns == {"timestamp": [5], "pnl": [1.0]}


def test_single_trade_lexpr_and_dotted():
    for data in (
        b'((result ((request_id . "R") (trade_list (((timestamp . 5) (pnl . 1)))))))',
        b'((result . ((request_id . "R") (trade_list . (((timestamp . 5) (pnl . 1)))))))',
    ):
        r = both(data)
        assert r.total_trades == 1 and r.columns == {"timestamp": [5], "pnl": [1.0]}


@pytest.mark.parametrize(
    "data",
    [
        # the result alist alone, type inside
        b'((type . "BACKTEST_RESULT") (request_id . "R") (strategy_name . "S"))',
        # no type at all
        b'((request_id . "R") (strategy_name . "S"))',
        # type as a symbol, request_id outside result
        b'((type . backtest-result) (request_id . "R") (result . ((strategy_name . "S"))))',
        # tagged form
        b'(BACKTEST_RESULT (request_id . "R") (strategy_name . "S"))',
        # (result ALIST) alone, serde_lexpr style
        b'(result ((request_id . "R") (strategy_name . "S")))',
        # an extra wrapping list
        b'(((type . "BACKTEST_RESULT") (result . ((request_id . "R") (strategy_name . "S")))))',
        # vectors read as lists
        b'#((type . "BACKTEST_RESULT") (result . #((request_id . "R") (strategy_name . "S"))))',
    ],
)
def test_top_level_wrappings(data):
    r = both(data)
    assert (r.request_id, r.strategy_name) == ("R", "S")
    assert not r.has_trade_list and r.total_trades == 0


@pytest.mark.parametrize(
    "data",
    [
        b'((type . "LIVE_TRADE") (result . ((request_id . "R"))))',
        b'((type . 7) (request_id . "R"))',
        b'((result . ((type . "OTHER") (request_id . "R"))))',
        b'(SOMETHING_ELSE (request_id . "R"))',
        b"42",
        b'"just a string"',
        b"(1 2 3)",
    ],
)
def test_wrong_type_or_shape_rejected(data):
    with pytest.raises(SexprError):
        parse_backtest_result(data)


def test_missing_request_id_is_not_a_parse_error():
    r = both(b'((type . "BACKTEST_RESULT") (result . ((strategy_name . "S"))))')
    assert r.request_id is None and r.strategy_name == "S"


def test_first_key_wins_and_result_wins_over_outer():
    r = both(b'((request_id . "OUT") (result . ((request_id . "IN") (request_id . "IN2"))))')
    assert r.request_id == "IN"


def test_without_trade_list():
    r = both(b'((type . "BACKTEST_RESULT") (result . ((request_id . "R") (trades . 0))))')
    assert not r.has_trade_list
    assert r.total_trades == 0 and not r.truncated
    assert r.columns == {"timestamp": [], "pnl": []}
    for tl in (b"(trade_list . nil)", b"(trade_list)", b"(trade_list . ())", b"(trade_list nil)"):
        r = both(b'((request_id . "R") ' + tl + b")")
        assert not r.has_trade_list and r.total_trades == 0


def test_error_field():
    r = both(b'((type . "BACKTEST_RESULT") (result . ((request_id . "R") (strategy_name . "S") '
             b'(error . "data file \\"x.csv\\" missing"))))')
    assert r.error == 'data file "x.csv" missing'
    assert not r.has_trade_list and r.total_trades == 0
    assert both(b'((request_id . "R") (error "boom"))').error == "boom"
    assert both(b'((request_id . "R") (error))').error is None
    assert both(b'((request_id . "R") (error . nil))').error is None


def test_max_drawdown_alias():
    r = both(b'((request_id . "R") (max_drawdown . 0.25))')
    assert r.metrics == {"max_dd": 0.25}
    r = both(b'((request_id . "R") (max-drawdown 0.25) (max_dd . 0.5))')
    assert r.metrics == {"max_dd": 0.5}


def test_metrics_types():
    r = both(b'((request_id . "R") (sharpe . 1) (profit_factor . +inf.0) (win_rate . +nan.0) '
             b"(trades . 3.0) (max_dd))")
    assert r.metrics == {"sharpe": 1.0, "trades": 3}
    assert type(r.metrics["sharpe"]) is float and type(r.metrics["trades"]) is int
    for bad in (b"(sharpe . \"x\")", b"(sharpe . #t)", b"(trades . 2.5)", b"(trades . \"2\")",
                b"(timeframe . \"H1\")", b"(strategy_name . (1 2))"):
        with pytest.raises(SexprError):
            parse_backtest_result(b'((request_id . "R") ' + bad + b")")


def test_request_id_and_names_as_symbols_or_numbers():
    r = both(b"((request_id . R-1) (strategy_name . 42) (rank . S) (symbol . nil))")
    assert (r.request_id, r.strategy_name, r.rank, r.symbol) == ("R-1", "42", "S", None)
    assert type(r.request_id) is str


# --------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["dotted", "lexpr"])
@pytest.mark.parametrize("reported,actual", [(500, 800), (800, 500), (500, 500)])
def test_truncated_flag(style, reported, actual):
    r = both(synthetic(actual, style=style, reported_trades=reported))
    assert r.total_trades == actual
    assert len(r.columns["timestamp"]) == len(r.columns["pnl"]) == actual
    assert r.metrics["trades"] == reported
    # issue 12: truncated means a list shorter than the reported count (Guardian kept the last 500)
    assert r.truncated == (actual < reported)


def test_not_truncated_without_reported_count():
    r = both(b'((request_id . "R") (trade_list . (((timestamp . 1) (pnl . 2)))))')
    assert "trades" not in r.metrics and not r.truncated


# --------------------------------------------------------------------------
# Trades and columns
# --------------------------------------------------------------------------

def test_optional_columns_none_filled():
    data = (
        b'((request_id . "R") (trade_list . ('
        b"((timestamp . 1) (pnl . 1))"
        b'((timestamp . 2) (pnl . 2) (symbol . "EURUSD") (sl . 1) (hold_time . 30.0) (foo . 9))'
        b"((timestamp . 3) (pnl . 3))"
        b"((timestamp . 4) (pnl . 4) (direction . BUY) (tp nil) (volume) (timeframe 15))"
        b"((timestamp . 5) (pnl . 5)))))"
    )
    r = both(data)
    assert r.columns == {
        "timestamp": [1, 2, 3, 4, 5],
        "pnl": [1.0, 2.0, 3.0, 4.0, 5.0],
        "symbol": [None, "EURUSD", None, None, None],
        "direction": [None, None, None, "BUY", None],
        "sl": [None, 1.0, None, None, None],
        "tp": [None, None, None, None, None],
        "volume": [None, None, None, None, None],
        "hold_time": [None, 30, None, None, None],
        "timeframe": [None, None, None, 15, None],
    }
    assert type(r.columns["sl"][1]) is float and type(r.columns["hold_time"][1]) is int
    assert all(type(x) is str for x in r.columns["direction"] if x is not None)


@pytest.mark.parametrize("style", ["dotted", "lexpr"])
def test_extra_columns_match_generator(style):
    r = both(synthetic(300, style=style, extra_columns=True, seed=3))
    assert r.columns == synthetic_columns(300, extra_columns=True, seed=3)


@pytest.mark.parametrize(
    "trade,what",
    [
        (b"((pnl . 1))", "timestamp"),
        (b"((timestamp . 1))", "pnl"),
        (b"((timestamp . 1) (pnl . nil))", "pnl"),
        (b"((timestamp . 1) (pnl))", "pnl"),
        (b'((timestamp . 1) (pnl . "0.5"))', "pnl"),
        (b"((timestamp . 1) (pnl . abc))", "pnl"),
        (b"((timestamp . 1) (pnl . #t))", "pnl"),
        (b"((timestamp . 1) (pnl . (1)))", "pnl"),
        (b"((timestamp . 1.5) (pnl . 1))", "timestamp"),
        (b"((timestamp . 99999999999999999999) (pnl . 1))", "timestamp"),
        (b'((timestamp . "1") (pnl . 1))', "timestamp"),
        (b"((timestamp . 1) (pnl . 1) (sl . +inf.0))", "sl"),
        (b'((timestamp . 1) (pnl . 1) (hold_time . "x"))', "hold_time"),
        (b"((timestamp . 1) (pnl . 1) (symbol . #f))", "symbol"),
        (b"((timestamp . 1) (pnl . 1) (symbol . (a)))", "symbol"),
        (b"nil", "timestamp"),
        (b"42", "association list"),
    ],
)
@pytest.mark.parametrize("fast", [True, False])
def test_bad_trades(trade, what, fast):
    good = b"((timestamp . 1) (pnl . 2)) " * 50
    data = b'((request_id . "R") (trade_list . (' + good + trade + b" " + good + b")))"
    with pytest.raises(SexprError) as ei:
        parse_backtest_result(data, _fast=fast)
    msg = str(ei.value)
    assert "trade 50" in msg and what in msg
    if trade.startswith(b"("):  # atoms carry no offset, lists do
        assert ei.value.offset == data.index(trade)


def test_numbers():
    got = parse(b"(1 -2 +3 1. .5 -.5 1.5e3 2E-2 1d0 -1.5D+2 +nan.0 +inf.0 -inf.0 007)")
    assert got[:10] == [1, -2, 3, 1.0, 0.5, -0.5, 1500.0, 0.02, 1.0, -150.0]
    assert math.isnan(got[10]) and got[11] == math.inf and got[12] == -math.inf
    assert got[13] == 7
    assert [type(x) for x in got[:4]] == [int, int, int, float]
    # not numbers: symbols
    assert parse(b"(1a - + ... 1.2.3)") == [Symbol(x) for x in ("1a", "-", "+", "...", "1.2.3")]
    assert all(type(x) is Symbol for x in parse(b"(1a - + ... 1.2.3)"))


def test_int_and_float_columns_coercion():
    r = both(b'((request_id . "R") (trade_list . (((timestamp . 10.0) (pnl . 3)))))')
    assert r.columns == {"timestamp": [10], "pnl": [3.0]}
    assert type(r.columns["timestamp"][0]) is int and type(r.columns["pnl"][0]) is float


# --------------------------------------------------------------------------
# Generic reader
# --------------------------------------------------------------------------

def test_parse_structure():
    got = parse(b'((a . 1) (b 2) (c) (d e . f) () #(1 2) "s" sym)')
    assert got == [
        Dotted([Symbol("a")], 1),
        [Symbol("b"), 2],
        [Symbol("c")],
        Dotted([Symbol("d"), Symbol("e")], Symbol("f")),
        [],
        [1, 2],
        "s",
        Symbol("sym"),
    ]
    assert type(got[6]) is str and type(got[7]) is Symbol
    assert repr(Symbol("x")) == "Symbol('x')"


def test_booleans_and_nil():
    got = parse(b"(#t #f #true #false #nil t T true TRUE false False nil NIL ())")
    assert got == [True, False, True, False, None, True, True, True, True, False, False,
                   None, None, []]
    assert got[0] is True and got[1] is False
    assert parse(b"nil") is None and parse(b"t") is True
    r = both(b'((request_id . "R") (symbol . NIL) (rank nil) (trade_list . NIL))')
    assert r.symbol is None and r.rank is None and not r.has_trade_list


def test_escapes():
    got = parse(rb'("a\"b" "back\\slash" "nl\n" "tab\t" "cr\r" "q\x41;" "other\q" "" "caf' + b'\xc3\xa9")')
    assert got == ['a"b', "back\\slash", "nl\n", "tab\t", "cr\r", "qA", "otherq", "", "café"]
    assert parse('"日本"'.encode()) == "日本"
    assert parse('("multi\nline")') == ["multi\nline"]


def test_comments_and_whitespace():
    assert parse(b"; header\n(a ; inline\n . \t\r\n 1) ; tail") == Dotted([Symbol("a")], 1)
    assert parse(b"\xef\xbb\xbf(a)") == [Symbol("a")]


def test_max_atoms():
    assert parse(b"(1 2 3)", max_atoms=4) == [1, 2, 3]
    with pytest.raises(SexprError, match="max_atoms"):
        parse(b"(1 2 3 4)", max_atoms=4)


def test_depth_cap():
    ok = b"(" * 64 + b")" * 64
    assert parse(ok) is not None
    deep = b"(" * 65 + b")" * 65
    with pytest.raises(SexprError, match="max_depth") as ei:
        parse(deep)
    assert ei.value.offset == 64
    with pytest.raises(SexprError, match="max_depth"):
        parse(b"(" * 1_000_000)  # no recursion, no RecursionError
    with pytest.raises(SexprError, match="max_depth"):
        parse_backtest_result(DOTTED, max_depth=5)
    assert both(DOTTED, max_depth=7) == EXPECTED  # trades' entries are at depth 7
    with pytest.raises(SexprError, match="max_depth"):
        parse_backtest_result(DOTTED, max_depth=6)
    assert parse(b"(((a)))", max_depth=3) == [[[Symbol("a")]]]


def test_size_cap():
    with pytest.raises(SexprError, match="limit"):
        parse(b"(" + b"a " * 100 + b")", max_bytes=100)
    with pytest.raises(SexprError, match="limit"):
        parse_backtest_result(DOTTED, max_bytes=len(DOTTED) - 1)
    assert parse_backtest_result(DOTTED, max_bytes=len(DOTTED)) == EXPECTED
    with pytest.raises(SexprError, match="limit"):
        parse("(" + "é" * 60 + ")", max_bytes=100)  # 122 bytes, 62 chars


@pytest.mark.parametrize(
    "data,what,offset",
    [
        (b"", "empty", 0),
        (b"   ; only a comment", "empty", 19),
        (b"((a . 1)", "never closed", 0),
        (b"(a))", "unexpected ')'", 3),
        (b")", "unexpected ')'", 0),
        (b"(a) (b)", "after the top-level", 4),
        (b'(a "unterminated)', "unterminated string", 3),
        (b"(. a)", "start of a list", 1),
        (b"(a . )", "missing value", 5),
        (b"(a . b c)", "more than one value", 7),
        (b"(a . b . c)", "second '.'", 7),
        (b". a", "outside a list", 0),
        (b"(a #x)", "unexpected character", 3),
        (b"(a 'b)", "unexpected character", 3),
        (b'(a . "\xff")', "UTF-8", 6),
        (b"(\x00\xfe\xff)", "UTF-8", 2),
        (b'("\\x110000;")', "escape", 1),
    ],
)
def test_malformed(data, what, offset):
    with pytest.raises(SexprError) as ei:
        parse(data)
    assert what in str(ei.value)
    assert ei.value.offset == offset
    assert f"byte {offset}" in str(ei.value)
    with pytest.raises(SexprError):
        parse_backtest_result(data)


def test_offsets_are_bytes_for_str_input():
    with pytest.raises(SexprError) as ei:
        parse('("日本" . )')
    assert ei.value.offset == len('("日本" . '.encode())
    with pytest.raises(SexprError, match="UTF-8"):
        parse("(a \udc80)")


def test_not_bytes_or_str():
    with pytest.raises(SexprError):
        parse(12)  # type: ignore[arg-type]
    assert parse(bytearray(b"(a)")) == [Symbol("a")]
    assert parse(memoryview(b"(a)")) == [Symbol("a")]


def test_sexpr_error_is_value_error():
    assert issubclass(SexprError, ValueError)


# --------------------------------------------------------------------------
# Fast paths: used, and equivalent to the generic reader
# --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "data",
    [
        DOTTED,
        LEXPR,
        synthetic(5, extra_columns=True),
        synthetic(5, style="lexpr", extra_columns=True),
        b'((result (request_id . "R") (trade_list ((timestamp . 5) (pnl . 1)))))',
    ],
)
def test_fast_path_is_used(data):
    assert contains_block(data)


def test_fast_path_not_used_outside_trade_list():
    # a flat, trade-shaped alist anywhere else stays a generic tree
    data = b'((request_id . "R") (other . (((timestamp . 1) (pnl . 2)))))'
    assert not contains_block(data)
    r = both(b'((result . ((timestamp . 1) (pnl . 2) (request_id . "R"))))')
    assert r.request_id == "R" and not r.has_trade_list


def test_mixed_fast_and_generic_trades():
    data = (
        b'((request_id . "R") (trade_list . ('
        b"((timestamp . 1) (pnl . 1)) ((timestamp . 2) (pnl . 2))"
        b" ( (timestamp . 3) ; a comment defeats the fast paths\n (pnl . 3))"
        b" ((timestamp . 4) (pnl . 4) (regime . (nested)))"
        b' ((timestamp . 5) (pnl . 5) (symbol "X")) ((TIMESTAMP . 6) (PNL . 6e0))'
        b" ((pnl . 7) (timestamp . 7) (pnl . 99)))))"
    )
    with pytest.raises(SexprError, match="regime"):
        parse_backtest_result(data)
    data = data.replace(b"(regime . (nested))", b"(regime . nested)")
    r = both(data)
    assert r.columns["timestamp"] == [1, 2, 3, 4, 5, 6, 7]
    assert r.columns["pnl"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert r.columns["regime"] == [None, None, None, "nested", None, None, None]
    assert r.columns["symbol"] == [None, None, None, None, "X", None, None]


_ws = st.sampled_from([" ", "  ", "\n", "\t", " \r\n "])
_num = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=64).map(repr),
    st.sampled_from(["1.", ".5", "-.25", "+3", "1e5", "2.5E-3", "1d0", "+nan.0", "-inf.0", "1e999",
                     "99999999999999999999"]),
)
_atom = st.one_of(
    _num,
    st.sampled_from(['"USDJPY"', '"a\\"b"', '""', "BUY", "nil", "#t", "#f", "t", "#nil", "x.y",
                     "(1)", "()", '"\\x41;"']),
)
_key = st.sampled_from(["timestamp", "pnl", "TIMESTAMP", "Pnl", "symbol", "direction", "sl",
                        "hold-time", "timeframe", "rank", "foo", "t", "nil", "volume", "regime"])


@st.composite
def _entry_text(draw):
    k = draw(_key)
    form = draw(st.integers(0, 3))
    w = draw(_ws)
    if form == 0:
        return f"({k}{w}.{w}{draw(_atom)})"
    if form == 1:
        return f"({k}{w}{draw(_atom)})"
    if form == 2:
        return f"({k})"
    return f"({w}{k} . {draw(_atom)}{w})"


@st.composite
def _trade_text(draw):
    if draw(st.booleans()):
        ts = draw(st.integers(0, 2**40))
        pnl = draw(_num)
        w = draw(_ws)
        return f"((timestamp . {ts}){w}(pnl . {pnl}))"
    entries = draw(st.lists(_entry_text(), min_size=0, max_size=6))
    return "(" + draw(_ws).join(entries) + ")"


@st.composite
def _message_text(draw):
    trades = draw(st.lists(_trade_text(), min_size=0, max_size=8))
    body = draw(_ws).join(trades)
    form = draw(st.integers(0, 2))
    if form == 0:
        tl = f"(trade_list . ({body}))"
    elif form == 1:
        tl = f"(trade_list ({body}))"
    else:
        tl = f"(trade_list {body})"
    return f'((type . "BACKTEST_RESULT") (result . ((request_id . "R") (trades . 3) {tl})))'


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_message_text())
def test_fast_path_equivalent_to_generic(text):
    try:
        slow = parse_backtest_result(text, _fast=False)
    except SexprError:
        with pytest.raises(SexprError):
            parse_backtest_result(text)
        return
    fast = parse_backtest_result(text)
    assert fast == slow
    assert len(fast.columns["timestamp"]) == fast.total_trades
    for col in fast.columns.values():
        assert len(col) == fast.total_trades


# --------------------------------------------------------------------------
# Fuzz: nothing but SexprError ever escapes
# --------------------------------------------------------------------------

def _only_sexpr_errors(data):
    for fn in (parse, parse_backtest_result):
        try:
            fn(data)
        except SexprError:
            pass
    try:
        parse(data, max_depth=3, max_atoms=5, max_bytes=64)
    except SexprError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    _only_sexpr_errors(data)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet='()  .."\\#tfnil;\n0123456789e+-abxyz_:é', max_size=120))
def test_fuzz_sexpr_like_text(text):
    _only_sexpr_errors(text)
    _only_sexpr_errors(text.encode("utf-8"))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_mutated_messages(data):
    base = bytearray(data.draw(st.sampled_from([DOTTED, LEXPR, synthetic(3, extra_columns=True)])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(base) - 1))
        op = data.draw(st.integers(0, 2))
        if op == 0:
            del base[i]
        elif op == 1:
            base.insert(i, data.draw(st.sampled_from(b'()." \\#;x1e-')))
        else:
            base[i] = data.draw(st.integers(0, 255))
    _only_sexpr_errors(bytes(base))


# --------------------------------------------------------------------------
# Large messages, threads
# --------------------------------------------------------------------------

def test_100k_trades_exact():
    n = 100_000
    data = synthetic(n, seed=7, request_id="big-1", strategy_name="Strat")
    assert 3_000_000 < len(data) < 8_000_000
    r = parse_backtest_result(data)
    want = synthetic_columns(n, seed=7)
    assert r.request_id == "big-1" and r.strategy_name == "Strat"
    assert r.total_trades == n and not r.truncated and r.metrics["trades"] == n
    assert r.columns == want
    assert math.fsum(r.columns["pnl"]) == math.fsum(want["pnl"])
    assert sum(r.columns["timestamp"]) == sum(want["timestamp"])
    assert all(type(x) is float for x in r.columns["pnl"])
    assert all(type(x) is int for x in r.columns["timestamp"])


def test_lexpr_large_exact():
    r = parse_backtest_result(synthetic(20_000, style="lexpr", seed=11, reported_trades=500))
    assert r.columns == synthetic_columns(20_000, seed=11)
    # issue 12: a list longer than the reported count is not a truncation
    assert not r.truncated and r.total_trades == 20_000


def test_synthetic_options():
    assert b"request_id" not in synthetic(1, request_id=None)
    r = both(synthetic(4, with_trade_list=False, reported_trades=4))
    assert not r.has_trade_list and not r.truncated  # reported 4, no list: absent, not truncated (issue 12)
    with pytest.raises(ValueError):
        synthetic(1, style="json")
    assert synthetic(10, seed=1) == synthetic(10, seed=1) != synthetic(10, seed=2)


def test_thread_safe():
    msgs = [synthetic(1000, seed=i, style=("dotted", "lexpr")[i % 2], extra_columns=i % 3 == 0)
            for i in range(6)]
    expected = [parse_backtest_result(m) for m in msgs]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(parse_backtest_result, msgs * 3))
    assert got == expected * 3


# --------------------------------------------------------------------------
# Issue 12: what swimmy really sends (non-finite numbers, absent lists)
# --------------------------------------------------------------------------

@pytest.mark.parametrize(
    "pnl",
    [b"+nan.0", b"-inf.0", b"1e999", b'"NaN"', b'"inf"', b'"-inf"', b"NaN", b'"nan"'],
)
@pytest.mark.parametrize("fast", [True, False])
def test_non_finite_pnl_makes_result_failed_naming_the_trade(pnl, fast):
    # formerly a SexprError (the whole message rejected); now the result is readable and failed
    good = b"((timestamp . 1) (pnl . 2)) " * 50
    data = (b'((request_id . "R") (strategy_name . "S") (trades . 101) (trade_list . ('
            + good + b"((timestamp . 1) (pnl . " + pnl + b")) " + good + b")))")
    r = parse_backtest_result(data, _fast=fast)
    assert r.request_id == "R" and r.strategy_name == "S"
    assert r.error is not None and "trade 50" in r.error and "pnl is not finite" in r.error, r.error
    assert r.total_trades == 0 and r.columns == {"timestamp": [], "pnl": []}
    assert not r.truncated


def test_message_error_wins_over_non_finite_pnl():
    r = both(b'((request_id . "R") (error . "guardian died") (trade_list . (((timestamp . 1) (pnl . "NaN")))))')
    assert r.error == "guardian died" and r.total_trades == 0


def test_non_finite_metric_strings_are_left_out():
    r = both(b'((request_id . "R") (sharpe . "NaN") (profit_factor . "inf") (win_rate . "-inf") '
             b'(max_dd . 0.25) (sharpe_ci_lower . "-inf") (sortino . "inf") (trades . 0))')
    assert r.metrics == {"max_dd": 0.25, "trades": 0}
    r = both(b'((request_id . "R") (sharpe . NaN) (profit_factor . -Infinity) (win_rate . 1e999))')
    assert r.metrics == {}
    with pytest.raises(SexprError):  # other strings are still not numbers
        parse_backtest_result(b'((request_id . "R") (sharpe . "0.5"))')


@pytest.mark.parametrize(
    "tail,truncated",
    [
        (b"(trades . 7)", False),                                                  # no list at all
        (b"(trades . 7) (trade_list . nil)", False),                               # nil list
        (b"(trades . 7) (trade_list)", False),                                     # lexpr None
        (b"(trades . 2) (trade_list . (((timestamp . 1) (pnl . 1)) ((timestamp . 2) (pnl . 2))))", False),
        (b"(trades . 1) (trade_list . (((timestamp . 1) (pnl . 1)) ((timestamp . 2) (pnl . 2))))", False),
        (b"(trades . 3) (trade_list . (((timestamp . 1) (pnl . 1)) ((timestamp . 2) (pnl . 2))))", True),
        (b"(trade_list . (((timestamp . 1) (pnl . 1))))", False),                  # no count reported
    ],
)
def test_truncated_only_for_a_present_shorter_list(tail, truncated):
    r = both(b'((request_id . "R") ' + tail + b")")
    assert r.truncated is truncated


TIER1_PNL = [b"1.", b".5", b"-.5", b"+2", b"1.e5", b"1.5E-7", b"0", b"-0.0", b"12.", b"3e0", b"-7", b"+.25e+2"]


def test_tier1_reads_every_pnl_spelling_like_the_generic_reader():
    # odd spacing, upper-case keys, a pnl's own '.' next to the dot token: the tier-1 value scan
    # must pick exactly ts, pnl, ts, pnl, ... out of the run
    trades = b" ".join(b"(\n( TIMESTAMP  .\t%d )( pnl . %s\n) )" % (i, p) for i, p in enumerate(TIER1_PNL))
    data = b'((request_id . "R") (trade_list . (' + trades + b" ((timestamp . 99) (pnl . 1.)))))"
    tok = data.index(b"(trade_list . (") + len(b"(trade_list . (")
    block, end = sexpr._tier1(data, tok)
    assert block.n == len(TIER1_PNL) + 1 and data[end:end + 1] == b")"
    assert block.cols["pnl"] == [float(p) for p in TIER1_PNL] + [1.0]
    r = both(data)
    assert r.columns["pnl"] == [float(p) for p in TIER1_PNL] + [1.0]
    assert r.columns["timestamp"] == list(range(len(TIER1_PNL))) + [99]
