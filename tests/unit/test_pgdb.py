"""The psycopg version gate of the shared queue (greenmail/pgdb.py): 3.2 or later."""

from __future__ import annotations

import pytest

from greenmail.pgdb import new_enough


@pytest.mark.parametrize(
    ("version", "ok"),
    [("3.1.7", False), ("3.1.19", False), ("3.2.0", True), ("3.2rc1", True), ("3.2.0.dev1", True),
     ("3.3.9", True), ("3.10.1", True), ("4.0", True), ("3", False)],
)  # fmt: skip
def test_versions_from_3_2_on_are_new_enough(version: str, ok: bool) -> None:
    assert new_enough(version) is ok
