"""The listener's users file: scrypt lines, checks, and the errors naming the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from greenmail import users
from greenmail.errors import ConfigError


def test_a_line_checks_its_password_and_no_other(tmp_path: Path) -> None:
    line = users.hash_line("app", "s3cret", n=2**10)
    assert line.startswith("app:scrypt$1024$8$1$") and "s3cret" not in line
    path = tmp_path / "users"
    path.write_text(f"# the listener's users\n\n{line}\n")
    loaded = users.load(path)
    assert users.check(loaded, "app", "s3cret")
    assert not users.check(loaded, "app", "s3cret ")
    assert not users.check(loaded, "nobody", "s3cret")


@pytest.mark.parametrize(
    "bad",
    [
        "app",
        "app:md5$x",
        "app:scrypt$1000$8$1$AAAA$AAAA",
        "app:scrypt$1024$8$1$!!$AAAA",
        ":scrypt$1024$8$1$AAAA$AAAA",
    ],
)
def test_a_bad_line_is_a_config_error_naming_it(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "users"
    path.write_text(f"{users.hash_line('ok', 'x', n=2**10)}\n{bad}\n")
    with pytest.raises(ConfigError, match=r"users:2: expected"):
        users.load(path)


@pytest.mark.parametrize("name", ["", "a:b", " a", "a\nb"])
def test_names_that_cannot_be_written(name: str) -> None:
    with pytest.raises(ConfigError):
        users.hash_line(name, "x", n=2**10)
