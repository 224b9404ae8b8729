"""failed/ and corrupt/ are pruned after spool.prune_after: by the time a file went there."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from greenmail.layout import CORRUPT, FAILED, META, new_id
from greenmail.spool import Spool


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool", owner="me")
    s.ensure()
    return s


def fill(spool: Spool) -> tuple[str, str]:
    qid = new_id()
    (spool.dir(FAILED) / f"{qid},3,0").write_bytes(b"a@b.example\nc@d.example\n\nx\n")
    (spool.dir(META) / f"{qid}.json").write_text("{}")
    (spool.dir(CORRUPT) / "dropped-junk").write_bytes(b"junk")
    (spool.dir(CORRUPT) / "maildrop-somedir").mkdir()  # a directory a user made in maildrop/
    return qid, f"{qid},3,0"


def test_nothing_younger_than_the_age_is_removed(spool: Spool) -> None:
    qid, name = fill(spool)
    assert spool.prune(3600, now=time.time() + 3000) == {FAILED: 0, CORRUPT: 0}
    assert os.listdir(spool.dir(FAILED)) == [name]
    assert (spool.dir(META) / f"{qid}.json").exists()
    assert len(os.listdir(spool.dir(CORRUPT))) == 2


def test_older_files_go_with_their_state_and_one_log_line(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    qid, _ = fill(spool)
    keep = spool.dir(FAILED) / ".operator-note"  # dot names are left alone
    keep.write_text("x")
    with caplog.at_level(logging.INFO, logger="greenmail.spool"):
        assert spool.prune(3600, now=time.time() + 3601) == {FAILED: 1, CORRUPT: 2}
    assert os.listdir(spool.dir(FAILED)) == [".operator-note"]
    assert os.listdir(spool.dir(CORRUPT)) == []
    assert not (spool.dir(META) / f"{qid}.json").exists()
    [line] = [r.getMessage() for r in caplog.records if "pruned" in r.getMessage()]
    assert (
        line == "pruned 1 message(s) from failed/ and 2 file(s) from corrupt/ there for over 0.0416667 days"
    )
