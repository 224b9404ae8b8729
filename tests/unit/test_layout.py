"""The spool's layout (layout.py) and the writer's added headers (dropoff.py).

The added headers and the host name are written without re (the submission
path is light); each is checked here against the regular expression of the
same rule, on generated inputs. Directory creation gives pathlib's words.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from greenmail import dropoff, layout
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
        lines.append(f"Message-ID: <{qid}@{layout.HOST}>".encode())
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
    assert (re.sub(r"[^A-Za-z0-9.-]", "-", os.uname().nodename) or "localhost") == layout.HOST


# -- layout.ensure and Spool.ensure ------------------------------------------------------------


def test_ensure_creates_missing_parents_and_every_directory(tmp_path: Path) -> None:
    spool = tmp_path / "a" / "b" / "spool"
    Spool(spool).ensure()
    assert sorted(p.name for p in spool.iterdir()) == sorted([*layout.DIRS, layout.MAILDROP])
    for d in (spool / n for n in layout.DIRS):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(spool.stat().st_mode) == 0o711
    assert stat.S_IMODE((spool / layout.MAILDROP).stat().st_mode) == 0o3733
    Spool(spool).ensure()  # idempotent


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
    with pytest.raises(GreenmailError) as spool:
        Spool(target).ensure()
    assert str(spool.value) == expected


# -- layout.rename_new: never replaces ------------------------------------------------------------


def test_rename_new_moves_a_file(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    layout.rename_new(tmp_path / "a", tmp_path / "b")
    assert sorted(os.listdir(tmp_path)) == ["b"] and (tmp_path / "b").read_text() == "a"


def test_rename_new_refuses_to_replace(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("old")
    with pytest.raises(FileExistsError):
        layout.rename_new(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").read_text() == "new" and (tmp_path / "b").read_text() == "old"


def test_rename_new_without_renameat2_links_and_unlinks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layout._noreplace(), "_fn", None)  # a C library without renameat2
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("old")
    with pytest.raises(FileExistsError):
        layout.rename_new(tmp_path / "a", tmp_path / "b")
    layout.rename_new(tmp_path / "a", tmp_path / "c")
    assert sorted(os.listdir(tmp_path)) == ["b", "c"] and (tmp_path / "c").read_text() == "new"


def test_rename_new_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        layout.rename_new(tmp_path / "gone", tmp_path / "b")


def test_own_ids_and_their_time() -> None:
    qid = layout.new_id()
    assert layout.is_own_id(qid) and len(qid) == 24
    t = layout.id_time(qid)
    assert t is not None and abs(t - __import__("time").time()) < 5
    for other in ("msg.4242", "abc", qid.lower(), qid + "0", ""):
        assert not layout.is_own_id(other) and layout.id_time(other) is None
