"""``greenmail enqueue``'s light configuration path agrees with config.load.

entry.spool_dir reads the file with tomlmini and checks it with confcheck
(config.load's own rules) and turns to config.load's parser when tomlmini is
not sure. For generated files — valid and invalid values, unknown keys and
sections, keys that must go together, TOML outside tomlmini's subset — it must
accept exactly what config.load accepts, giving the same spool directory, and
reject the rest with config.load's words.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from greenmail import confcheck, config, entry
from greenmail.errors import ConfigError


def by_config_load(path: str) -> tuple[str, str]:
    try:
        return "ok", str(config.load(path).spool.path)
    except ConfigError as e:
        return "error", f"greenmail: configuration error: {e}\n"


def by_enqueue_path(path: str) -> tuple[str, str]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return "ok", entry.spool_dir(path)
    except SystemExit as e:
        assert e.code == entry.EX_CONFIG
        return "error", err.getvalue()


def agree(path: str) -> tuple[str, str]:
    full = by_config_load(path)
    assert by_enqueue_path(path) == full
    return full


# -- generated files -------------------------------------------------------------------------------

VALUES = [
    "1", "0", "-1", "25", "2525", "70000", "1.5", "-0.5", "0.0", "true", "false", '"x"', '""', '"a b"',
    '"h:25"', '"h:0"', '"[::1]:9100"', '"PLAIN"', '["PLAIN", "LOGIN"]', '["MD5"]', '["a:25", "b:26"]',
    "[]", "[1]", '"starttls"', '"none"', '"/abs/spool"', '"rel/spool"', "'lit/spool'", '"./s/"',
    # outside tomlmini's subset: tomllib decides
    "nan", "inf", "1e3", "1_000", '"esc\\u0061ped"', "{}", "1979-05-27",
]  # fmt: skip
SECTIONS = [*confcheck.SCHEMA, "nosuch"]


@st.composite
def files(draw: st.DrawFn) -> str:
    lines = []
    if draw(st.booleans()):
        lines.append(f"{draw(st.sampled_from(SECTIONS))} = {draw(st.sampled_from(VALUES))}")
    for section in draw(st.lists(st.sampled_from(SECTIONS), unique=True, max_size=4)):
        lines.append(f"[{section}]")
        keys = [*confcheck.SCHEMA.get(section, {}), "unknown_key"]
        for key in draw(st.lists(st.sampled_from(keys), unique=True, max_size=4)):
            lines.append(f"{key} = {draw(st.sampled_from(VALUES))}")
    if draw(st.integers(0, 9)) == 0:
        lines.append(draw(st.sampled_from(["[relay", "x =", "= 1", "a.b = 1", "\x00", "[spool]"])))
    return "\n".join(lines) + "\n"


@settings(max_examples=300, deadline=None)
@given(text=files())
@example(text="")
@example(text='[spool]\npath = "q"\n')
@example(text="[relay]\nport = 1.5\n")
@example(text="[relay]\nport = 0.0\n")
@example(text="[delivery]\nconnect_tries = true\n")
@example(text='[spool]\npath = "1"\n')
@example(text='[relay]\nhosts = ["a:25"]\nport = 25\n')
@example(text='[relay]\nusername = "u"\n')
@example(text='[relay]\npassword_file = "f"\npassword_env = "E"\n')
@example(text='[relay]\ntls_key_file = "k"\n')
@example(text="[retry]\nmin_backoff = 5000\n")
@example(text="[retry]\nmin_backoff = 10\nmax_backoff = 5\n")
@example(text='["x\\ny"]\nk = 1\n')
@example(text='[relay]\n"a\\nb" = 1\n')
def test_the_enqueue_path_accepts_and_rejects_what_config_load_does(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "greenmail.toml"
        path.write_text(text)
        agree(str(path))


@pytest.mark.parametrize(
    "data",
    [b'[relay]\nhost = "\xff"\n', b"\xef\xbb\xbf[spool]\n", b"[spool]\npath = 'x'\r\n", b"a = 1\rb = 2\n"],
    ids=["not-utf8", "bom", "crlf", "lone-cr"],
)
def test_bytes_outside_ascii_and_odd_line_ends(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "greenmail.toml"
    path.write_bytes(data)
    agree(str(path))


# -- the file itself ------------------------------------------------------------------------------


def test_missing_file_directory_and_unreadable_file(tmp_path: Path) -> None:
    assert agree(str(tmp_path / "nope.toml"))[0] == "error"
    assert agree(str(tmp_path))[0] == "error"
    unreadable = tmp_path / "secret.toml"
    unreadable.write_text("")
    unreadable.chmod(0)
    agree(str(unreadable))  # root reads it anyway; either way both paths agree


@pytest.mark.parametrize(
    "spelling",
    ["conf/greenmail.toml", "./conf/greenmail.toml", "conf//greenmail.toml", "link/greenmail.toml", "{abs}"],
)
@pytest.mark.parametrize("spool", ["spool", "./a/../b/", "/abs/spool", "."])
def test_spool_directory_is_spelled_as_config_load_spells_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str, spool: str
) -> None:
    conf = tmp_path / "real" / "conf"
    conf.mkdir(parents=True)
    (conf / "greenmail.toml").write_text(f'[spool]\npath = "{spool}"\n')
    (tmp_path / "real" / "link").symlink_to(conf)
    monkeypatch.chdir(tmp_path / "real")
    path = spelling.format(abs=conf / "greenmail.toml")
    status, spool_dir = agree(path)
    assert status == "ok"
    assert Path(spool_dir) == (Path(spool) if spool.startswith("/") else conf.resolve() / spool)


def test_no_config_path_uses_config_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATHS", ())
    err = io.StringIO()
    with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(err):
        entry.spool_dir(None)
    assert exc.value.code == entry.EX_CONFIG
    no_config = f"no configuration: pass --config PATH or set ${config.ENV_VAR}"
    assert err.getvalue() == f"greenmail: configuration error: {no_config}\n"


# -- one source of truth -----------------------------------------------------------------------------


def test_schema_names_exactly_the_config_fields() -> None:
    sections = {
        "spool": config.SpoolConfig,
        "relay": config.RelayConfig,
        "delivery": config.DeliveryConfig,
        "retry": config.RetryConfig,
        "timeouts": config.Timeouts,
        "metrics": config.MetricsConfig,
    }
    assert set(confcheck.SCHEMA) == set(sections)
    for name, cls in sections.items():
        assert set(confcheck.SCHEMA[name]) == {f.name for f in fields(cls)}, name
    assert (config.RetryConfig.min_backoff, config.RetryConfig.max_backoff) == (
        confcheck.MIN_BACKOFF,
        confcheck.MAX_BACKOFF,
    )


def test_working_directory_does_not_matter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "greenmail.toml"
    path.write_text('[spool]\npath = "q"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert agree(str(path)) == ("ok", str(tmp_path.resolve() / "q"))
    assert os.getcwd() == str(elsewhere)
