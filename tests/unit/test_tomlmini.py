"""tomlmini: exactly tomllib's answer inside its subset, and "not sure" (None) outside it.

Properties over generated documents: every document built from the subset's
grammar is accepted and read exactly as tomllib reads it (same keys in the same
order, same types: 1, 1.0 and true are told apart); for any other text (mutated
documents, TOML-ish noise) tomlmini either declines or agrees with tomllib, and
it declines every document tomllib rejects.
"""

from __future__ import annotations

import string
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from greenmail import tomlmini


def typed(value: Any) -> Any:
    """A form of a parsed document that equality compares strictly (order, types, -0.0)."""
    if isinstance(value, dict):
        return ("table", [(k, typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("array", [typed(v) for v in value])
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


def tomllib_or_none(text: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None


# -- documents inside the subset ------------------------------------------------------------------

PRINTABLE = [c for c in string.printable if c.isprintable()] + ["\t"]  # ASCII 0x20-0x7e and tab
KEYS = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=8)
WS = st.sampled_from(["", " ", "\t", "  ", " \t"])
COMMENT = st.one_of(st.just(""), st.text(alphabet=PRINTABLE, max_size=12).map(lambda t: "#" + t))


@st.composite
def numbers(draw: st.DrawFn) -> str:
    sign = draw(st.sampled_from(["", "", "+", "-"]))
    whole = str(draw(st.integers(0, 10**9)))
    if draw(st.booleans()):
        return sign + whole
    return f"{sign}{whole}.{draw(st.text(alphabet=string.digits, min_size=1, max_size=8))}"


SCALARS = st.one_of(
    numbers(),
    st.sampled_from(["true", "false"]),
    st.text(alphabet=[c for c in PRINTABLE if c not in '"\\'], max_size=12).map(lambda s: f'"{s}"'),
    st.text(alphabet=[c for c in PRINTABLE if c != "'"], max_size=12).map(lambda s: f"'{s}'"),
)


@st.composite
def arrays(draw: st.DrawFn) -> str:
    items = draw(st.lists(SCALARS, max_size=4))
    body = "".join(f"{draw(WS)}{item}{draw(WS)}," for item in items)
    if items and not draw(st.booleans()):
        body = body[:-1]  # no trailing comma
    return f"[{body}{draw(WS)}]"


VALUES = st.one_of(SCALARS, arrays())


@st.composite
def lines_of_table(draw: st.DrawFn) -> list[str]:
    keys = draw(st.lists(KEYS, unique=True, max_size=5))
    out = []
    for key in keys:
        out.extend(draw(st.lists(st.sampled_from(["", "# note", "  # indented note", " \t"]), max_size=1)))
        out.append(f"{draw(WS)}{key}{draw(WS)}={draw(WS)}{draw(VALUES)}{draw(WS)}{draw(COMMENT)}")
    return out


@st.composite
def documents(draw: st.DrawFn) -> str:
    lines = draw(lines_of_table())
    root_keys = {line.strip(" \t").split("=")[0].strip(" \t") for line in lines if "=" in line}
    names = draw(st.lists(KEYS.filter(lambda k: k not in root_keys), unique=True, max_size=4))
    for name in names:
        lines.append(f"{draw(WS)}[{draw(WS)}{name}{draw(WS)}]{draw(WS)}{draw(COMMENT)}")
        lines.extend(draw(lines_of_table()))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    return eol.join(lines) + (eol if draw(st.booleans()) else "")


@settings(max_examples=300)
@given(doc=documents())
@example(doc="")
@example(doc='[spool]\npath = "/tmp/x/spool"\n')
@example(doc="a = -0.0\nb = +0\nc = 0.5\nd = [ ]\ne = [1,]\n")
@example(doc="k = 1#c\n[ t ]#c\nx='a\"b\\\\c'\n")
def test_subset_documents_read_exactly_as_tomllib_reads_them(doc: str) -> None:
    mine = tomlmini.loads(doc.encode())
    assert mine is not None, "a document inside the subset was declined"
    assert typed(mine) == typed(tomllib.loads(doc))


# -- anything else ---------------------------------------------------------------------------------

NOISE = list("[]{}=#\"'.,+-_:\\ \t\r\n") + list("019aeflnirstux") + ["\x00", "\x7f", "\u00e9", "\x0c"]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    doc = draw(documents())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(doc)))
        cut = draw(st.integers(0, 2))
        doc = doc[:at] + "".join(draw(st.lists(st.sampled_from(NOISE), max_size=3))) + doc[at + cut :]
    return doc


@settings(max_examples=800)
@given(text=st.one_of(mutated(), st.text(alphabet=NOISE, max_size=40)))
@example(text="a = 01\n")
@example(text="a = 1.\n")
@example(text="a = .5\n")
@example(text="a = 1e5\n")
@example(text="a = 1_000\n")
@example(text="a = inf\n")
@example(text='a = """x"""\n')
@example(text="a.b = 1\n")
@example(text='"a" = 1\n')
@example(text="a = 1\na = 2\n")
@example(text="[t]\n[t]\n")
@example(text="t = 1\n[t]\n")
@example(text="[[t]]\n")
@example(text="a = {x = 1}\n")
@example(text="a = [1,\n2]\n")
@example(text="a = [[1]]\n")
@example(text="a = 1979-05-27\n")
@example(text='a = "\\n"\n')
@example(text="a = 1\rb = 2\n")
@example(text="a = true1\n")
@example(text="a = 1 2\n")
@example(text="a = [1 2]\n")
@example(text="a = [,]\n")
@example(text="a = 'x' y\n")
@example(text="[t] x\n")
@example(text="= 1\n")
@example(text="a =\n")
@example(text="a = 1234567890123456789\n")
def test_outside_the_subset_declines_and_never_answers_wrongly(text: str) -> None:
    mine = tomlmini.loads(text.encode())
    truth = tomllib_or_none(text)
    if truth is None:
        assert mine is None, "tomllib rejects this document but tomlmini read it"
    elif mine is not None:
        assert typed(mine) == typed(truth)


@pytest.mark.parametrize(
    "data",
    [b"\xff = 1\n", b'a = "\xc3\xa9"\n', "a = '\u00e9'\n".encode(), b"\xef\xbb\xbfa = 1\n"],
    ids=["not-utf8", "non-ascii-basic", "non-ascii-literal", "bom"],
)
def test_non_ascii_is_left_to_tomllib(data: bytes) -> None:
    assert tomlmini.loads(data) is None


def test_an_ordinary_configuration_is_inside_the_subset() -> None:
    doc = b"""# greenmail
[spool]
path = "var/spool"            # the spool directory

[relay]
host = "127.0.0.1"
port = 25
hosts = ["a.example:25", 'b.example:587']
auth_mechanisms = ["PLAIN", "LOGIN"]
tls_verify = true

[retry]
min_backoff = 300
max_lifetime = 432000.5

[metrics]
listen = ""
"""
    assert tomlmini.loads(doc) == tomllib.loads(doc.decode())


def test_the_shipped_configuration_is_inside_the_subset() -> None:
    """conf/greenmail.toml, which installations start from, takes the light path."""
    data = (Path(__file__).resolve().parents[2] / "conf" / "greenmail.toml").read_bytes()
    mine = tomlmini.loads(data)
    assert mine is not None
    assert typed(mine) == typed(tomllib.loads(data.decode()))
