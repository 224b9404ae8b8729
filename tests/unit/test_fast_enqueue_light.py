"""The light enqueue modules give what the pathlib/re versions they replaced gave.

dropoff.py (added headers, host name, spool directories) and purepath.py
(path strings) are written without re and pathlib so that ``greenmail
enqueue`` starts fast; each is checked here against the heavier expression of
the same rule, on generated inputs.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from greenmail import dropoff, purepath
from greenmail.errors import GreenmailError
from greenmail.spool import Spool

# -- added_headers: the regular expressions it was written with -----------------------------

_HEADER_LINE = re.compile(rb"[!-9;-~]+:")


def added_headers_by_regex(head: bytes, qid: str, date: bytes) -> bytes:
    """added_headers as it was written with re (before dropoff.py), the date given."""
    eol = b"\r\n" if head.split(b"\n", 1)[0].endswith(b"\r") else b"\n"
    if _HEADER_LINE.match(head):
        end = re.search(rb"\r?\n\r?\n", head)
        block = b"\n" + (head[: end.start()] if end else head)
    else:
        block = b""
    lines = []
    if not re.search(rb"\ndate:", block, re.IGNORECASE):
        lines.append(b"Date: " + date)
    if not re.search(rb"\nmessage-id:", block, re.IGNORECASE):
        lines.append(f"Message-ID: <{qid}@{dropoff.HOST}>".encode())
    if not lines:
        return b""
    out = eol.join(lines) + eol
    if not _HEADER_LINE.match(head) and not head.startswith((b"\n", b"\r\n")):
        out += eol
    return out


# Messages built from the pieces that matter: header-ish words, colons, CR, LF, spaces, case.
PIECES = st.sampled_from(
    [b"Date:", b"date:", b"DATE: x", b"Message-ID:", b"message-id: <a@b>", b"Message-Id:", b"Subject: s",
     b"X-Date: 1", b"From", b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\n\n", b"\r\n\r\n", b"\n\r\n",
     b"body text", b"a", b"\x00", b"\xff", b"\x7f", b"Dat", b"e:"]
)  # fmt: skip
HEADS = st.one_of(st.lists(PIECES, max_size=12).map(b"".join), st.binary(max_size=64))


@given(head=HEADS)
@example(head=b"")
@example(head=b"Subject: s\r\n\r\nDate: x\r\n")
@example(head=b"Subject: s\n\r\nDate: x\n")
@example(head=b"Subject: s\r\n\nDate: x\n")
@example(head=b"\r\n\r\nDate: x")
@example(head=b"X:\r\r\n\nDate:")
def test_added_headers_match_the_regex_version(head: bytes) -> None:
    date = "Mon, 01 Jan 2024 00:00:00 +0000"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dropoff, "rfc5322_date", lambda: date)
        assert dropoff.added_headers(head, "QID") == added_headers_by_regex(head, "QID", date.encode())


@given(name=st.text(max_size=20))
@example(name="")
@example(name="h\u00e9st.example")
@example(name="a_b c.d-e")
def test_host_name_matches_the_regex_version(name: str) -> None:
    by_regex = re.sub(r"[^A-Za-z0-9.-]", "-", name) or "localhost"
    light = "".join(c if c.isascii() and (c.isalnum() or c in ".-") else "-" for c in name) or "localhost"
    assert light == by_regex
    # and the module's own HOST is that rule applied to this machine's name
    assert (re.sub(r"[^A-Za-z0-9.-]", "-", os.uname().nodename) or "localhost") == dropoff.HOST


# -- purepath: pathlib's spelling ---------------------------------------------------------------

PATH_PIECES = ["", "/", "//", "///", ".", "..", "a", "b c", "\u00e9", "./", "a/", "x.y"]
PATHS = st.lists(st.sampled_from(PATH_PIECES), max_size=6).map("".join)


@given(p=PATHS)
def test_pure_and_parent_match_pathlib(p: str) -> None:
    assert purepath.pure(p) == str(PurePosixPath(p))
    assert purepath.parent(p) == str(PurePosixPath(p).parent)


@given(base=PATHS, p=PATHS)
def test_join_matches_pathlib(base: str, p: str) -> None:
    assert purepath.join(base, p) == str(PurePosixPath(base) / p)


# -- dropoff.ensure: Path.mkdir step for step ----------------------------------------------------


def test_ensure_creates_missing_parents_and_every_directory(tmp_path: Path) -> None:
    spool = tmp_path / "a" / "b" / "spool"
    dropoff.ensure(str(spool))
    assert sorted(p.name for p in spool.iterdir()) == sorted(dropoff.DIRS)
    for d in (spool, *(spool / n for n in dropoff.DIRS)):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    dropoff.ensure(str(spool))  # idempotent


@pytest.mark.parametrize("file_at", ["spool", "spool/..", "spool/../.."])
def test_ensure_error_is_the_one_pathlib_gave(tmp_path: Path, file_at: str) -> None:
    """A plain file where the spool or a parent should be: the words pathlib's mkdir gave."""
    target = tmp_path / "up" / "parent" / "spool"
    blocker = Path(os.path.normpath(target / ".." / file_at))
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file, not a directory")
    with pytest.raises(OSError) as by_pathlib:
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
    expected = f"spool {target}: cannot create: {by_pathlib.value.strerror}"
    with pytest.raises(GreenmailError) as light:
        dropoff.ensure(str(target))
    assert str(light.value) == expected
    with pytest.raises(GreenmailError) as spool:
        Spool(target).ensure()
    assert str(spool.value) == expected
