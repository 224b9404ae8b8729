"""The Python enqueue API: greenmail.enqueue and greenmail.enqueue_many."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

import greenmail
from greenmail.errors import AddressError, EnqueueError, GreenmailError
from greenmail.queuefile import read_envelope
from greenmail.spool import Spool


def files(spool: Path, sub: str) -> list[str]:
    return sorted(os.listdir(spool / sub))


def test_enqueue_many_writes_every_message_in_order(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    batch = [
        (f"s{i}@example.org", [f"r{i}@example.net"], f"Subject: {i}\n\nbody {i}\n".encode())
        for i in range(25)
    ]
    ids = greenmail.enqueue_many(batch, spool=spool)
    assert len(ids) == len(set(ids)) == 25
    assert sorted(ids) == files(spool, "outgoing")
    assert files(spool, "tmp") == []
    for i, qid in enumerate(ids):
        with open(spool / "outgoing" / qid, "rb") as f:
            env = read_envelope(f)
            f.seek(env.body_offset)
            body = f.read()
        assert (env.sender, env.recipients) == (f"s{i}@example.org", (f"r{i}@example.net",))
        assert body.endswith(f"Subject: {i}\n\nbody {i}\n".encode())
        assert b"Message-ID: <" + qid.encode() in body


def test_enqueue_many_takes_streams_too(tmp_path: Path) -> None:
    ids = greenmail.enqueue_many(
        [("a@x.y", ["b@x.y"], io.BytesIO(b"Subject: s\n\n" + b"x" * 200_000))], spool=tmp_path
    )
    data = (tmp_path / "outgoing" / ids[0]).read_bytes()
    assert data.endswith(b"x" * 200_000)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (("not an address", ["b@x.y"], b"Subject: s\n\nb\n"), AddressError),
        (("a@x.y", ["b@x.y"], b""), EnqueueError),
        (("a@x.y", [], b"Subject: s\n\nb\n"), EnqueueError),
    ],
    ids=["bad-address", "empty-message", "no-recipient"],
)
def test_enqueue_many_is_all_or_nothing(tmp_path: Path, bad: tuple, error: type[Exception]) -> None:
    good = ("a@x.y", ["b@x.y"], b"Subject: s\n\nb\n")
    with pytest.raises(error):
        greenmail.enqueue_many([good, good, bad, good], spool=tmp_path)
    assert files(tmp_path, "outgoing") == []
    assert files(tmp_path, "tmp") == []


def test_enqueue_many_unwritable_spool_leaves_nothing(tmp_path: Path) -> None:
    greenmail.enqueue_many([], spool=tmp_path)  # creates the directories
    (tmp_path / "outgoing").rmdir()
    (tmp_path / "outgoing").write_text("not a directory")
    with pytest.raises(GreenmailError, match="cannot"):
        greenmail.enqueue_many([("a@x.y", ["b@x.y"], b"Subject: s\n\nb\n")] * 3, spool=tmp_path)
    spool = Spool(tmp_path)  # without ensure(): the rename into outgoing/ fails
    with pytest.raises(EnqueueError, match="cannot write"):
        spool.enqueue_many([("a@x.y", ["b@x.y"], b"Subject: s\n\nb\n")] * 3)
    assert files(tmp_path, "tmp") == []


def test_enqueue_returns_the_id_of_a_durable_file(tmp_path: Path) -> None:
    qid = greenmail.enqueue("a@x.y", ["b@x.y"], b"Subject: s\n\nb\n", spool=tmp_path)
    assert files(tmp_path, "outgoing") == [qid]
