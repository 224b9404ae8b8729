"""watch.Inotify: names renamed or written into a directory, waited for cooperatively."""

from __future__ import annotations

import os
from pathlib import Path

import gevent
import pytest

from greenmail.watch import Inotify


@pytest.fixture
def watched(tmp_path: Path):
    d = tmp_path / "outgoing"
    d.mkdir()
    notify = Inotify.open(d)
    if notify is None:
        pytest.skip("no inotify here")
    yield d, notify
    notify.close()


def test_a_rename_into_the_directory_is_reported(watched, tmp_path: Path) -> None:
    d, notify = watched
    (tmp_path / "x").write_bytes(b"data")
    os.rename(tmp_path / "x", d / "MSG1")
    assert notify.wait(2) == ["MSG1"]


def test_a_file_written_in_place_is_reported_when_closed(watched) -> None:
    d, notify = watched
    (d / "direct").write_bytes(b"data")
    assert notify.wait(2) == ["direct"]


def test_nothing_new_times_out_with_none(watched) -> None:
    _, notify = watched
    assert notify.wait(0.05) is None


def test_waiting_does_not_block_other_greenlets(watched, tmp_path: Path) -> None:
    d, notify = watched
    ran = []

    def writer() -> None:
        ran.append(True)
        (tmp_path / "y").write_bytes(b"data")
        os.rename(tmp_path / "y", d / "LATE")

    gevent.spawn_later(0.05, writer)
    assert notify.wait(2) == ["LATE"]
    assert ran == [True]


def test_a_missing_directory_gives_none(tmp_path: Path) -> None:
    assert Inotify.open(tmp_path / "absent") is None
