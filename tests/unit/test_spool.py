"""Unit tests of greenmail.spool: enqueue, scan, claim, settle, recovery, tmp cleaning."""

from __future__ import annotations

import collections
import io
import os
import random
import stat
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest

from greenmail import layout
from greenmail.errors import AddressError, CorruptQueueFile, EnqueueError
from greenmail.layout import ACTIVE, CORRUPT, DIRS, FAILED, MAILDROP, META, OUTGOING, OWNERS, TMP
from greenmail.queuefile import HOST, State, parse_name, read_envelope
from greenmail.spool import Spool
from greenmail.spool import SpoolClaim as Claim

MESSAGE = b"From: a@example.org\nSubject: hello\n\nbody line 1\nbody line 2\n"
FULL = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <fixed@example.org>\nSubject: s\n\nbody\n"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", owner="me")
    s.ensure()
    return s


def names(spool: Spool, d: str) -> list[str]:
    return sorted(os.listdir(spool.dir(d)))


def drop(spool: Spool, name: str, data: bytes) -> Path:
    """Put a file into outgoing/ the way another program would."""
    path = spool.dir(OUTGOING) / name
    path.write_bytes(data)
    return path


def claim_one(spool: Spool) -> Claim:
    entries = spool.scan()
    assert len(entries) == 1
    c = spool.claim(entries[0])
    assert c is not None
    return c


# -- ensure ---------------------------------------------------------------------


def test_ensure_creates_dirs_mode_0700(tmp_path: Path) -> None:
    s = Spool(tmp_path / "a" / "spool")
    s.ensure()
    assert stat.S_IMODE(os.stat(s.path).st_mode) == 0o711  # others pass through to maildrop/ only
    assert stat.S_IMODE(os.stat(s.dir(MAILDROP)).st_mode) == 0o3733
    for d in DIRS:
        st = os.stat(s.dir(d))
        assert stat.S_ISDIR(st.st_mode), d
        assert stat.S_IMODE(st.st_mode) == 0o700, d
    assert set(DIRS) >= {TMP, OUTGOING, ACTIVE, FAILED, CORRUPT}
    s.ensure()  # idempotent
    assert sorted(os.listdir(s.path)) == sorted([*DIRS, MAILDROP])


def test_ensure_mode_ignores_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        s = Spool(tmp_path / "spool")
        s.ensure()
    finally:
        os.umask(old)
    for d in DIRS:
        assert stat.S_IMODE(os.stat(s.dir(d)).st_mode) == 0o700, d


# -- enqueue ----------------------------------------------------------------------


def test_enqueue_writes_queue_file(spool: Spool) -> None:
    qid = spool.enqueue("a@example.org", ["b@example.net", "c@example.com"], MESSAGE)
    assert parse_name(qid) is not None and parse_name(qid).id == qid
    assert names(spool, OUTGOING) == [qid]
    assert names(spool, TMP) == []
    data = (spool.dir(OUTGOING) / qid).read_bytes()
    lines = data.split(b"\n")
    assert lines[0] == b"a@example.org"
    assert lines[1] == b"b@example.net,c@example.com"
    assert lines[2].startswith(b"Date: ")
    assert lines[3] == f"Message-ID: <{qid}@{HOST}>".encode()
    assert b"\n".join(lines[4:]) == MESSAGE
    st = os.stat(spool.dir(OUTGOING) / qid)
    assert stat.S_IMODE(st.st_mode) & 0o077 == 0


def test_enqueue_keeps_existing_headers(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ("c@d",), FULL)
    assert (spool.dir(OUTGOING) / qid).read_bytes() == b"a@b\nc@d\n" + FULL


def test_enqueue_crlf_message(spool: Spool) -> None:
    msg = b"Subject: s\r\nDate: d\r\n\r\nbody\r\n"
    qid = spool.enqueue("a@b", ["c@d"], msg)
    data = (spool.dir(OUTGOING) / qid).read_bytes()
    assert data == b"a@b\nc@d\n" + f"Message-ID: <{qid}@{HOST}>\r\n".encode() + msg


def test_enqueue_ids_unique(spool: Spool) -> None:
    ids = {spool.enqueue("a@b", ["c@d"], FULL) for _ in range(50)}
    assert len(ids) == 50
    assert sorted(ids) == names(spool, OUTGOING)


@pytest.mark.parametrize("null", ["<>", ""])
def test_enqueue_null_sender(spool: Spool, null: str) -> None:
    qid = spool.enqueue(null, ["c@d"], FULL)
    data = (spool.dir(OUTGOING) / qid).read_bytes()
    assert data == b"\nc@d\n" + FULL
    assert read_envelope(io.BytesIO(data)).sender == ""


BAD_ADDRESSES = [
    "",
    "nobody",
    "@example.org",
    "a@",
    "a b@c.org",
    "a@c.org ",
    "a\t@c.org",
    "a@c.org\n",
    "a@c.org\r",
    "a\x00@c.org",
    "a\x1b@c.org",
    "a\x7f@c.org",
    "<a@c.org>",
    "a<@c.org",
    "a@c.org>",
    "a,b@c.org",
    "a@b,c@d",
    "a" * 250 + "@c.org",
]


def assert_spool_empty(spool: Spool) -> None:
    for d in (TMP, OUTGOING, ACTIVE, FAILED, CORRUPT, META):
        if spool.dir(d).is_dir():
            assert names(spool, d) == [], d


@pytest.mark.parametrize("bad", BAD_ADDRESSES)
def test_enqueue_bad_recipient(spool: Spool, bad: str) -> None:
    with pytest.raises(AddressError):
        spool.enqueue("a@b", ["ok@example.org", bad], MESSAGE)
    assert_spool_empty(spool)


@pytest.mark.parametrize("bad", [b for b in BAD_ADDRESSES if b] + ["<x>", "< >"])
def test_enqueue_bad_sender(spool: Spool, bad: str) -> None:
    with pytest.raises(AddressError):
        spool.enqueue(bad, ["ok@example.org"], MESSAGE)
    assert_spool_empty(spool)


def test_enqueue_null_recipient_is_refused(spool: Spool) -> None:
    with pytest.raises(AddressError):
        spool.enqueue("a@b", ["<>"], MESSAGE)
    assert_spool_empty(spool)


def test_enqueue_no_recipients(spool: Spool) -> None:
    with pytest.raises(EnqueueError):
        spool.enqueue("a@b", [], MESSAGE)
    assert_spool_empty(spool)


@pytest.mark.parametrize("message", [b"", io.BytesIO(b""), bytearray()], ids=["bytes", "stream", "bytearray"])
def test_enqueue_empty_message(spool: Spool, message) -> None:
    with pytest.raises(EnqueueError):
        spool.enqueue("a@b", ["c@d"], message)
    assert_spool_empty(spool)


def strip_added(data: bytes) -> tuple[bytes, bytes]:
    """(envelope lines, message without the two generated header lines)."""
    env = read_envelope(io.BytesIO(data))
    body = data[env.body_offset :]
    first, second, rest = body.split(b"\n", 2)
    assert first.startswith(b"Date: ") and second.startswith(b"Message-ID: ")
    return data[: env.body_offset], rest


def test_enqueue_stream_equals_bytes(spool: Spool) -> None:
    a = spool.enqueue("a@b", ["c@d", "e@f"], MESSAGE)
    b = spool.enqueue("a@b", ["c@d", "e@f"], io.BytesIO(MESSAGE))
    da = (spool.dir(OUTGOING) / a).read_bytes()
    db = (spool.dir(OUTGOING) / b).read_bytes()
    assert strip_added(da) == strip_added(db) == (b"a@b\nc@d,e@f\n", MESSAGE)


def test_enqueue_stream_long_header_block(spool: Spool) -> None:
    # The header block is longer than one read chunk; Date:/Message-ID: come
    # after the first chunk and must still be seen.
    headers = b"".join(b"X-Filler-%05d: %s\n" % (i, b"x" * 60) for i in range(1500))
    msg = headers + b"Date: d\nMessage-ID: <m@x>\n\nbody\n"
    assert len(headers) > 64 * 1024
    for source in (msg, io.BytesIO(msg)):
        qid = spool.enqueue("a@b", ["c@d"], source)
        assert (spool.dir(OUTGOING) / qid).read_bytes() == b"a@b\nc@d\n" + msg


def test_enqueue_big_stream_intact(spool: Spool) -> None:
    body = bytes(random.Random(1).getrandbits(8) for _ in range(4096)) * 1280  # 5 MiB
    msg = FULL + body
    assert len(msg) > 5 * 1024 * 1024
    qid = spool.enqueue("a@b", ["c@d"], io.BytesIO(msg))
    data = (spool.dir(OUTGOING) / qid).read_bytes()
    assert len(data) == len(b"a@b\nc@d\n") + len(msg)
    assert data == b"a@b\nc@d\n" + msg
    assert names(spool, TMP) == []


class ShortReads(io.RawIOBase):
    """A stream returning at most 1000 bytes per read, like a pipe."""

    def __init__(self, data: bytes) -> None:
        self._buf = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(min(n if n >= 0 else 1000, 1000))


def test_enqueue_short_reads(spool: Spool) -> None:
    msg = b"Subject: s\n" + b"X: y\n" * 400 + b"\n" + b"z" * 10000
    qid = spool.enqueue("a@b", ["c@d"], ShortReads(msg))
    data = (spool.dir(OUTGOING) / qid).read_bytes()
    assert strip_added(data) == (b"a@b\nc@d\n", msg)


def break_tmp_file(spool: Spool) -> None:
    spool.dir(TMP).rmdir()
    spool.dir(TMP).write_bytes(b"")


def break_tmp_missing(spool: Spool) -> None:
    spool.dir(TMP).rmdir()


def break_outgoing_missing(spool: Spool) -> None:
    spool.dir(OUTGOING).rmdir()


@pytest.mark.parametrize("breakage", [break_tmp_file, break_tmp_missing, break_outgoing_missing])
@pytest.mark.parametrize("stream", [False, True], ids=["bytes", "stream"])
def test_enqueue_unwritable_spool(spool: Spool, breakage, stream: bool) -> None:
    breakage(spool)
    with pytest.raises(EnqueueError) as exc:
        spool.enqueue("a@b", ["c@d"], io.BytesIO(MESSAGE) if stream else MESSAGE)
    assert "\n" not in str(exc.value)
    for d in (TMP, OUTGOING):
        if spool.dir(d).is_dir():
            assert names(spool, d) == [], d
    if spool.dir(TMP).is_file():
        assert spool.dir(TMP).read_bytes() == b""


def test_enqueue_stream_error_leaves_nothing(spool: Spool) -> None:
    class Failing(io.RawIOBase):
        calls = 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            self.calls += 1
            if self.calls == 1:
                return b"Subject: s\n\nstart of body\n"
            raise RuntimeError("reader died")

    with pytest.raises(RuntimeError):
        spool.enqueue("a@b", ["c@d"], Failing())
    assert_spool_empty(spool)


def test_enqueue_stream_oserror_is_enqueue_error(spool: Spool) -> None:
    class Failing(io.RawIOBase):
        calls = 0

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            self.calls += 1
            if self.calls == 1:
                return b"Subject: s\n\nstart of body\n"
            raise OSError(5, "Input/output error")

    with pytest.raises(EnqueueError):
        spool.enqueue("a@b", ["c@d"], Failing())
    assert_spool_empty(spool)


def test_enqueue_is_durable_in_order(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, layout.link_new

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst) -> None:
        events.append(("rename", str(src)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(layout, "link_new", rename)
    qid = spool.enqueue("a@b", ["c@d"], MESSAGE)
    tmp = str(spool.dir(TMP) / qid)
    assert events == [
        ("fsync", tmp),
        ("rename", tmp),
        ("fsync", str(spool.dir(OUTGOING))),
    ]


# -- scan -----------------------------------------------------------------------------


def test_scan_lists_entries(spool: Spool) -> None:
    assert spool.scan() == []
    ids = {spool.enqueue("a@b", ["c@d"], FULL) for _ in range(3)}
    drop(spool, "00000000000000000000AAAA,2,1700000000", b"a@b\nc@d\n" + FULL)
    entries = spool.scan()
    assert {e.name for e in entries} == ids | {"00000000000000000000AAAA,2,1700000000"}
    by_id = {e.id: e for e in entries}
    assert (by_id["00000000000000000000AAAA"].attempts, by_id["00000000000000000000AAAA"].next_at) == (
        2,
        1700000000,
    )
    assert all(by_id[i].attempts == 0 and by_id[i].next_at == 0 for i in ids)


def test_scan_ignores_dot_files(spool: Spool) -> None:
    drop(spool, ".partial", b"a@b\nc@d\n")
    drop(spool, ".x,1,2", b"a@b\nc@d\n")
    assert spool.scan() == []
    assert names(spool, OUTGOING) == [".partial", ".x,1,2"]


def test_scan_adopts_foreign_file(spool: Spool) -> None:
    data = b"a@b\nc@d\n" + FULL
    drop(spool, "my message.eml", data)
    entries = spool.scan()
    assert len(entries) == 1
    e = entries[0]
    assert e.name != "my message.eml"
    assert parse_name(e.name) == e and (e.attempts, e.next_at) == (0, 0)
    assert names(spool, OUTGOING) == [e.name]
    assert (spool.dir(OUTGOING) / e.name).read_bytes() == data
    assert spool.scan() == [e]  # stable afterwards
    c = spool.claim(e)
    assert c is not None and c.recipients == ("c@d",)


@pytest.mark.parametrize("name", ["a@b", "x,1", "ümlaut", "a,1,2,3"])
def test_scan_adopts_other_foreign_names(spool: Spool, name: str) -> None:
    drop(spool, name, b"a@b\nc@d\n" + FULL)
    (e,) = spool.scan()
    assert e.name != name and parse_name(e.name) == e
    assert names(spool, OUTGOING) == [e.name]


# -- claim -------------------------------------------------------------------------------


def test_claim(spool: Spool) -> None:
    before = time.time()
    qid = spool.enqueue("a@b", ["c@d", "e@f"], MESSAGE)
    (entry,) = spool.scan()
    c = spool.claim(entry)
    assert c is not None
    assert c.id == qid and c.entry == entry
    assert c.path == str(spool.dir(ACTIVE) / f"{qid}@me")
    assert names(spool, OUTGOING) == []
    assert names(spool, ACTIVE) == [f"{qid}@me"]
    assert c.sender == "a@b"
    assert c.recipients == ("c@d", "e@f")
    assert c.body_offset == len(b"a@b\nc@d,e@f\n")
    assert c.state == State()
    file_size = os.path.getsize(c.path)
    assert c.size == file_size - c.body_offset
    assert before - 2 <= c.queued_at <= time.time() + 2
    with c.open_body() as f:
        body = f.read()
    assert len(body) == c.size
    assert body.endswith(MESSAGE)
    assert body.startswith(b"Date: ")


def test_claim_open_body_exact(spool: Spool) -> None:
    spool.enqueue("", ["c@d"], FULL)
    c = claim_one(spool)
    with c.open_body() as f:
        assert f.read() == FULL
    assert c.size == len(FULL)


def test_claim_twice_returns_none(spool: Spool) -> None:
    spool.enqueue("a@b", ["c@d"], FULL)
    (entry,) = spool.scan()
    other = Spool(spool.path, owner="other")
    assert spool.claim(entry) is not None
    assert spool.claim(entry) is None
    assert other.claim(entry) is None
    assert len(names(spool, ACTIVE)) == 1


def test_claim_reads_state(spool: Spool) -> None:
    spool.enqueue("a@b", ["c@d", "e@f"], FULL)
    c = claim_one(spool)
    c.state.recipients["c@d"] = "delivered"
    c.state.last_error = "451 later"
    spool.requeue(c, 0)
    c2 = claim_one(spool)
    assert c2.state == State({"c@d": "delivered"}, "451 later")
    assert c2.pending() == ("e@f",)


CORRUPT_FILES = [
    pytest.param(b"a@b\n", id="one-line"),
    pytest.param(b"", id="empty-file"),
    pytest.param(b"a@b\nc@d\n", id="empty-message"),
    pytest.param(b"nobody\nc@d\nSubject: x\n\nb\n", id="bad-sender"),
    pytest.param(b"a@b\nc d\nSubject: x\n\nb\n", id="bad-recipient"),
    pytest.param(b"a@b\n\nSubject: x\n\nb\n", id="no-recipients"),
    pytest.param(b"a@b\n\xff@d\nSubject: x\n\nb\n", id="not-utf8"),
]


@pytest.mark.parametrize("data", CORRUPT_FILES)
def test_claim_corrupt_file(spool: Spool, data: bytes) -> None:
    drop(spool, "00000000000000000000BAD1", data)
    (entry,) = spool.scan()
    with pytest.raises(CorruptQueueFile):
        spool.claim(entry)
    assert names(spool, OUTGOING) == []
    assert names(spool, ACTIVE) == []
    assert names(spool, CORRUPT) == ["00000000000000000000BAD1"]
    assert (spool.dir(CORRUPT) / "00000000000000000000BAD1").read_bytes() == data
    assert spool.read_state("00000000000000000000BAD1").last_error
    assert spool.scan() == []


def test_claim_corrupt_keeps_deferred_name(spool: Spool) -> None:
    drop(spool, "00000000000000000000BAD2,3,1700000000", b"only one line")
    (entry,) = spool.scan()
    with pytest.raises(CorruptQueueFile):
        spool.claim(entry)
    assert names(spool, CORRUPT) == ["00000000000000000000BAD2,3,1700000000"]
    assert names(spool, OUTGOING) == names(spool, ACTIVE) == []


def test_claim_symlink_is_corrupt(spool: Spool, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"a@b\nc@d\n" + FULL)
    os.symlink(target, spool.dir(OUTGOING) / "000000000000000000001111")
    (entry,) = spool.scan()
    with pytest.raises(CorruptQueueFile):
        spool.claim(entry)
    assert names(spool, CORRUPT) == ["000000000000000000001111"]
    assert names(spool, OUTGOING) == names(spool, ACTIVE) == []
    assert target.read_bytes() == b"a@b\nc@d\n" + FULL


def test_claim_directory_is_corrupt(spool: Spool) -> None:
    (spool.dir(OUTGOING) / "000000000000000000002222").mkdir()
    (entry,) = spool.scan()
    with pytest.raises(CorruptQueueFile):
        spool.claim(entry)
    assert names(spool, CORRUPT) == ["000000000000000000002222"]
    assert names(spool, OUTGOING) == names(spool, ACTIVE) == []


FIFO_CLAIM = r"""
import sys
from greenmail.errors import CorruptQueueFile
from greenmail.spool import Spool
s = Spool(sys.argv[1], owner="fifo")
(entry,) = s.scan()
try:
    s.claim(entry)
except CorruptQueueFile:
    print("corrupt", flush=True)
"""


def test_claim_fifo_is_corrupt_and_does_not_hang(spool: Spool) -> None:
    # A named pipe dropped into outgoing/ is not a regular file: the claim
    # must move it to corrupt/, not block forever in open() waiting for a writer.
    os.mkfifo(spool.dir(OUTGOING) / "000000000000000000003333")
    proc = subprocess.Popen([sys.executable, "-c", FIFO_CLAIM, str(spool.path)], stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("claim() of a FIFO blocked in open()")
    assert out == b"corrupt\n"
    assert names(spool, CORRUPT) == ["000000000000000000003333"]
    assert names(spool, OUTGOING) == names(spool, ACTIVE) == []


# -- races ---------------------------------------------------------------------------------


def fill(spool: Spool, n: int) -> set[str]:
    return {spool.enqueue("a@b", ["c@d"], FULL) for _ in range(n)}


def test_greenlet_race_claims_each_file_once(spool: Spool) -> None:
    ids = fill(spool, 200)
    claimed: list[tuple[str, str]] = []
    misses = collections.Counter()

    def worker(i: int) -> None:
        s = Spool(spool.path, owner=f"g{i}")
        rng = random.Random(i)
        while True:
            entries = s.scan()
            if not entries:
                return
            if i % 2:
                rng.shuffle(entries)
            for e in entries:
                c = s.claim(e)
                if c is None:
                    misses[i] += 1
                else:
                    claimed.append((c.id, s.owner))
                gevent.sleep(0)

    greenlets = [gevent.spawn(worker, i) for i in range(20)]
    gevent.joinall(greenlets, timeout=30, raise_error=True)
    assert all(g.dead for g in greenlets)
    counts = collections.Counter(qid for qid, _ in claimed)
    assert set(counts) == ids
    assert max(counts.values()) == 1
    assert sum(misses.values()) > 0  # the greenlets really did compete
    assert len({owner for _, owner in claimed}) > 1
    active = names(spool, ACTIVE)
    assert len(active) == 200
    assert {n.rpartition("@")[0] for n in active} == ids
    assert names(spool, OUTGOING) == []


WORKER = r"""
import sys
from greenmail.spool import Spool
s = Spool(sys.argv[1], owner=sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
got = []
while True:
    entries = s.scan()
    if not entries:
        break
    for e in entries:
        c = s.claim(e)
        if c is not None:
            got.append(c.id)
print("\n".join(got), flush=True)
"""


def test_process_race_claims_each_file_once(spool: Spool) -> None:
    ids = fill(spool, 200)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(spool.path), f"proc{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        for i in range(2)
    ]
    try:
        for p in procs:
            assert p.stdout.readline() == b"ready\n"
        for p in procs:  # start both at once
            p.stdin.write(b"go\n")
            p.stdin.flush()
        outputs = [p.communicate(timeout=20)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0]
    claimed = [line for out in outputs for line in out.decode().split()]
    counts = collections.Counter(claimed)
    assert set(counts) == ids
    assert max(counts.values()) == 1
    active = names(spool, ACTIVE)
    assert len(active) == 200
    assert {n.rpartition("@")[0] for n in active} == ids


# -- settling --------------------------------------------------------------------------------


def test_done_removes_file_and_meta(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ["c@d"], FULL)
    c = claim_one(spool)
    c.state.last_error = "x"
    spool.requeue(c, 0)
    assert (spool.dir(META) / f"{qid}.json").exists()
    c = claim_one(spool)
    spool.done(c)
    assert_spool_empty(spool)
    assert spool.read_state(qid) == State()


def test_done_without_meta(spool: Spool) -> None:
    spool.enqueue("a@b", ["c@d"], FULL)
    spool.done(claim_one(spool))
    assert_spool_empty(spool)


def test_retire_takes_the_message_and_its_state_out_of_the_queue_at_once(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ["c@d"], FULL)
    c = claim_one(spool)
    c.state.last_error = "x"
    spool.requeue(c, 0)
    c = claim_one(spool)
    assert c.has_meta
    gone = spool.retire(c)
    # nothing is left where a scan, a claim, a recovery or the state lookup would find it
    assert names(spool, ACTIVE) == names(spool, OUTGOING) == names(spool, META) == []
    assert spool.read_state(qid) == State()
    assert spool.recover() == 0
    assert sorted(os.path.basename(p) for p in gone) == names(spool, TMP)
    assert all(n.startswith(".done.") for n in names(spool, TMP))
    spool.purge(gone)
    assert_spool_empty(spool)
    spool.purge(gone)  # already gone: not an error


@pytest.mark.parametrize("rm", ["rm", "failing rm", "no rm"])
def test_purge_removes_a_batch_whatever_rm_does(
    spool: Spool, rm: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import greenmail.spool as spool_module

    if rm == "failing rm":
        monkeypatch.setattr(spool_module, "RM", "/bin/false")  # exits 1: the loop finishes the job
    elif rm == "no rm":
        monkeypatch.setattr(spool_module, "RM", None)
    else:
        assert spool_module.RM is not None
    spool.enqueue_many([("a@b", ["c@d"], FULL)] * (spool_module.RM_BATCH + 4))
    gone = [p for e in spool.scan() if (c := spool.claim(e)) for p in spool.retire(c)]
    gone.append(str(spool.dir(TMP) / ".done.already-gone"))  # not an error
    spool.purge(gone)
    assert_spool_empty(spool)
    assert ("rm of delivered messages" in caplog.text) == (rm == "failing rm")


def test_retired_files_left_by_a_crash_are_cleaned_whatever_their_age(spool: Spool) -> None:
    spool.enqueue("a@b", ["c@d"], FULL)
    spool.retire(claim_one(spool))  # and the daemon dies before the purge
    fresh = spool.dir(TMP) / "FRESH"  # a writer at work: left alone
    fresh.write_bytes(b"x")
    assert spool.clean_tmp() == 1
    assert names(spool, TMP) == ["FRESH"]


def test_requeue(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ["c@d", "e@f"], FULL)
    c = claim_one(spool)
    c.state.recipients["c@d"] = "delivered"
    c.state.last_error = "451 4.3.0 try later"
    c.state.errors["e@f"] = "451 4.3.0 try later"
    new = spool.requeue(c, 1700000123)
    assert new.name == f"{qid},1,1700000123"
    assert (new.id, new.attempts, new.next_at) == (qid, 1, 1700000123)
    assert names(spool, OUTGOING) == [new.name]
    assert names(spool, ACTIVE) == []
    assert names(spool, TMP) == []
    assert spool.read_state(qid) == c.state
    assert spool.scan() == [new]
    assert not new.due(1700000122) and new.due(1700000123)
    # a second temporary failure counts again
    c2 = spool.claim(new)
    assert c2 is not None and c2.state == c.state
    again = spool.requeue(c2, 1700000999)
    assert again.name == f"{qid},2,1700000999"


def test_requeue_without_attempt_keeps_count(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ["c@d"], FULL)
    first = spool.requeue(claim_one(spool), 1000)
    assert first.attempts == 1
    c = spool.claim(first)
    assert c is not None
    kept = spool.requeue(c, 0, attempt=False)
    assert (kept.attempts, kept.next_at) == (1, 0)
    assert kept.name == f"{qid},1,0"
    assert names(spool, OUTGOING) == [kept.name]


def test_requeue_fresh_without_attempt_keeps_plain_name(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ["c@d"], FULL)
    new = spool.requeue(claim_one(spool), 0, attempt=False)
    assert new.name == qid and new.attempts == 0
    assert names(spool, OUTGOING) == [qid]


def test_requeue_without_state_writes_no_meta(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ["c@d"], FULL)
    c = claim_one(spool)
    c.state.last_error = "not saved"
    spool.requeue(c, 5, state=False)
    assert names(spool, META) == []
    assert spool.read_state(qid) == State()


def test_fail(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ["c@d", "e@f"], FULL)
    c = claim_one(spool)
    c.state.recipients.update({"c@d": "delivered", "e@f": "failed"})
    c.state.errors["e@f"] = "550 5.1.1 no such user"
    c.state.last_error = "550 5.1.1 no such user"
    spool.fail(c)
    assert names(spool, OUTGOING) == names(spool, ACTIVE) == []
    (failed,) = names(spool, FAILED)
    entry = parse_name(failed)
    assert entry is not None and entry.id == qid and entry.attempts == 1
    assert spool.read_state(qid) == c.state
    assert (spool.dir(FAILED) / failed).read_bytes().endswith(FULL)


def test_fail_after_retries_counts_attempts(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ["c@d"], FULL)
    e = spool.requeue(claim_one(spool), 0)
    e = spool.requeue(spool.claim(e), 0)
    spool.fail(spool.claim(e))
    (failed,) = names(spool, FAILED)
    assert parse_name(failed).id == qid
    assert parse_name(failed).attempts == 3


# -- recovery ----------------------------------------------------------------------------------


def test_recover_dead_owner_without_lock(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ["c@d"], FULL)
    dead = Spool(spool.path, owner="dead.1.aa")
    (entry,) = dead.scan()
    assert dead.claim(entry) is not None
    assert names(spool, ACTIVE) == [f"{qid}@dead.1.aa"]
    assert spool.recover() == 1
    assert names(spool, ACTIVE) == []
    assert names(spool, OUTGOING) == [qid]
    assert spool.recover() == 0


def test_recover_keeps_deferred_name(spool: Spool) -> None:
    spool.enqueue("a@b", ["c@d"], FULL)
    e = spool.requeue(claim_one(spool), 1700000000)
    dead = Spool(spool.path, owner="dead")
    assert dead.claim(e) is not None
    assert spool.recover() == 1
    assert names(spool, OUTGOING) == [e.name]
    assert spool.scan() == [e]


def test_recover_dead_owner_with_stale_lock_file(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ["c@d"], FULL)
    dead = Spool(spool.path, owner="crashed")
    dead.claim(dead.scan()[0])
    (spool.dir(OWNERS) / "crashed.lock").write_text("12345\n")  # nobody holds the flock
    assert spool.recover() == 1
    assert names(spool, OUTGOING) == [qid]
    assert names(spool, OWNERS) == []


def test_recover_leaves_live_owner_alone(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ["c@d"], FULL)
    live = Spool(spool.path, owner="live.2.bb")
    live.lock_owner()
    try:
        assert names(spool, OWNERS) == ["live.2.bb.lock"]
        c = live.claim(live.scan()[0])
        assert c is not None
        assert spool.recover() == 0
        assert names(spool, ACTIVE) == [f"{qid}@live.2.bb"]
        assert names(spool, OUTGOING) == []
        assert names(spool, OWNERS) == ["live.2.bb.lock"]
        # asking again does not disturb the live owner's lock
        assert spool.recover() == 0
        assert names(spool, ACTIVE) == [f"{qid}@live.2.bb"]
    finally:
        live.unlock_owner()
    assert names(spool, OWNERS) == []
    assert spool.recover() == 1
    assert names(spool, OUTGOING) == [qid]
    assert names(spool, ACTIVE) == []


def test_recover_mixed_owners(spool: Spool) -> None:
    fill(spool, 3)
    live = Spool(spool.path, owner="live")
    dead = Spool(spool.path, owner="dead")
    live.lock_owner()
    try:
        e1, e2, e3 = spool.scan()
        assert live.claim(e1) and dead.claim(e2) and spool.claim(e3)
        assert spool.recover() == 1
        assert names(spool, OUTGOING) == [e2.name]
        assert sorted(names(spool, ACTIVE)) == sorted([f"{e1.name}@live", f"{e3.name}@me"])
    finally:
        live.unlock_owner()


def test_recover_ignores_own_claims(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ["c@d"], FULL)
    claim_one(spool)  # spool has not called lock_owner(): still its own
    assert spool.recover() == 0
    assert names(spool, ACTIVE) == [f"{qid}@me"]
    spool.lock_owner()
    try:
        assert spool.recover() == 0
        assert names(spool, ACTIVE) == [f"{qid}@me"]
    finally:
        spool.unlock_owner()


def test_lock_owner_leaves_no_temporary(spool: Spool) -> None:
    spool.lock_owner()
    try:
        assert names(spool, OWNERS) == ["me.lock"]
        assert (spool.dir(OWNERS) / "me.lock").read_text() == f"{os.getpid()}\n"
    finally:
        spool.unlock_owner()
    spool.unlock_owner()  # a second unlock is harmless
    assert names(spool, OWNERS) == []


# -- clean_tmp ------------------------------------------------------------------------------------


def test_clean_tmp(spool: Spool) -> None:
    now = time.time()
    old = spool.dir(TMP) / "OLD"
    old_dot = spool.dir(TMP) / ".meta.X.1234"
    fresh = spool.dir(TMP) / "FRESH"
    young = spool.dir(TMP) / "YOUNG"
    for p in (old, old_dot, fresh, young):
        p.write_bytes(b"x")
    os.utime(old, (now - 7200, now - 7200))
    os.utime(old_dot, (now - 4000, now - 4000))
    os.utime(young, (now - 1000, now - 1000))
    assert spool.clean_tmp(max_age=3600) == 2
    assert names(spool, TMP) == ["FRESH", "YOUNG"]
    assert spool.clean_tmp(max_age=3600) == 0
    assert spool.clean_tmp(max_age=500) == 1
    assert names(spool, TMP) == ["FRESH"]


def test_clean_tmp_default_age(spool: Spool) -> None:
    now = time.time()
    day_old = spool.dir(TMP) / "DAY"
    hour_old = spool.dir(TMP) / "HOUR"
    for p, age in ((day_old, 86400 + 60), (hour_old, 3600)):
        p.write_bytes(b"x")
        os.utime(p, (now - age, now - age))
    assert spool.clean_tmp() == 1
    assert names(spool, TMP) == ["HOUR"]


def test_clean_tmp_leaves_other_dirs(spool: Spool) -> None:
    qid = spool.enqueue("a@b", ["c@d"], FULL)
    old = time.time() - 10 * 86400
    os.utime(spool.dir(OUTGOING) / qid, (old, old))
    assert spool.clean_tmp(max_age=0) == 0
    assert names(spool, OUTGOING) == [qid]


def test_clean_tmp_survives_a_directory(spool: Spool) -> None:
    # Something other than a file in tmp/ must not make the cleaning fail.
    old = time.time() - 10 * 86400
    stray = spool.dir(TMP) / "STRAYDIR"
    stray.mkdir()
    os.utime(stray, (old, old))
    stale = spool.dir(TMP) / "STALE"
    stale.write_bytes(b"x")
    os.utime(stale, (old, old))
    spool.clean_tmp(max_age=3600)
    assert not stale.exists()


@pytest.mark.parametrize(
    ("sender", "body", "expected"),
    [
        ("a@b", b"plain ascii\r\n", False),
        ("a@b", b"caf\xc3\xa9\r\n", True),
        ("a@b", b"\x80", True),
        ("a@b", b"\x7f\x00\t\r\n", False),  # DEL and NUL are 7-bit
        ("caf\u00e9@example.org", b"ascii only\r\n", False),  # the envelope is not the message
        ("a@b", b"x" * (64 * 1024 - 1) + b"\xff", True),  # the last byte of the first chunk
        ("a@b", b"x" * (64 * 1024) + b"\xff", True),  # the first byte of the second
        ("a@b", b"x" * (3 * 64 * 1024 + 17) + b"\xe9yz", True),
        ("a@b", b"x" * (3 * 64 * 1024 + 17), False),
    ],
    ids=lambda v: None if isinstance(v, bool) else repr(v[:24]),
)
@pytest.mark.parametrize("stream", [False, True], ids=["bytes", "stream"])
def test_enqueue_records_an_8bit_message_in_the_file_mode(
    spool: Spool, sender: str, body: bytes, expected: bool, stream: bool
) -> None:
    message = b"Subject: s\r\n\r\n" + body
    qid = spool.enqueue(sender, ["c@d"], io.BytesIO(message) if stream else message)
    assert layout.is_8bit(os.stat(spool.dir(OUTGOING) / qid).st_mode) is expected
    assert stat.S_IMODE(os.stat(spool.dir(OUTGOING) / qid).st_mode) & 0o077 == 0
    c = claim_one(spool)
    assert c.eight_bit is expected


def test_an_adopted_file_gets_its_8bit_mode(spool: Spool) -> None:
    drop(spool, "from-elsewhere", b"a@b\nc@d\nSubject: s\n\n" + b"x" * 70000 + b"\xe9\n")
    (e,) = spool.scan()
    assert layout.is_8bit(os.stat(spool.dir(OUTGOING) / e.name).st_mode)
    assert claim_one(spool).eight_bit
