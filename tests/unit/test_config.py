"""Unit tests of greenmail.config: loading, defaults, validation and find()."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from greenmail import confcheck, config
from greenmail.config import Config, ConfigError, load

FULL = """
[spool]
path = "var/spool"

[relay]
host = "relay.example.net"
port = 2525
helo = "mail.example.org"

[delivery]
max_connections = 7
check_interval = 45.5
connect_tries = 4

[retry]
min_backoff = 120
max_backoff = 3600
max_lifetime = 86400
bounce = false

[timeouts]
connect = 11
banner = 12
command = 13.5
data_init = 14
data_block = 15
data_end = 16

[metrics]
listen = "0.0.0.0:9100"
"""


def write(tmp_path: Path, text: str, name: str = "greenmail.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    return load(write(tmp_path, text))


# -- valid files --------------------------------------------------------------


def test_full_file_gives_every_value(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    cfg = load(path)
    assert cfg.source == path
    assert cfg.spool.path == tmp_path.resolve() / "var" / "spool"
    assert (cfg.relay.host, cfg.relay.port, cfg.relay.helo) == ("relay.example.net", 2525, "mail.example.org")
    assert cfg.delivery.max_connections == 7
    assert cfg.delivery.check_interval == 45.5
    assert cfg.delivery.connect_tries == 4
    assert cfg.retry.min_backoff == 120
    assert cfg.retry.max_backoff == 3600
    assert cfg.retry.max_lifetime == 86400
    assert cfg.retry.bounce is False
    t = cfg.timeouts
    assert (t.connect, t.banner, t.command, t.data_init, t.data_block, t.data_end) == (
        11,
        12,
        13.5,
        14,
        15,
        16,
    )
    assert cfg.metrics.listen == "0.0.0.0:9100"
    assert cfg.metrics.address == ("0.0.0.0", 9100)


def test_defaults_when_sections_absent(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[spool]\npath = "/srv/spool"\n')
    assert cfg.spool.path == Path("/srv/spool")
    assert (cfg.relay.host, cfg.relay.port, cfg.relay.helo) == ("127.0.0.1", 25, None)
    assert (cfg.delivery.max_connections, cfg.delivery.check_interval, cfg.delivery.connect_tries) == (
        10,
        60,
        3,
    )
    assert (cfg.retry.min_backoff, cfg.retry.max_backoff, cfg.retry.max_lifetime, cfg.retry.bounce) == (
        300,
        4000,
        432000,
        True,
    )
    t = cfg.timeouts
    assert (t.connect, t.banner, t.command, t.data_init, t.data_block, t.data_end) == (
        30,
        300,
        300,
        120,
        180,
        600,
    )
    assert cfg.metrics.listen == "127.0.0.1:9465"
    assert cfg.metrics.address == ("127.0.0.1", 9465)


def test_defaults_partial_section(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, '[spool]\npath = "s"\n[relay]\nport = 587\n')
    assert cfg.relay.port == 587
    assert cfg.relay.host == "127.0.0.1"


def test_empty_file_defaults_spool_path_relative_to_file(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "")
    assert cfg.spool.path == tmp_path.resolve() / "var" / "spool"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("spool", lambda d: d / "spool"),
        ("./a/b", lambda d: d / "a" / "b"),
        ("../up", lambda d: d.parent / "up"),  # ".." steps resolved, for readable paths
        ("/abs/spool", lambda d: Path("/abs/spool")),
    ],
)
def test_spool_path_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value, expected) -> None:
    confdir = tmp_path / "etc" / "gm"
    confdir.mkdir(parents=True)
    path = write(confdir, f'[spool]\npath = "{value}"\n')
    # The working directory must not matter.
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load(path)
    assert cfg.spool.path == expected(confdir.resolve())
    assert cfg.spool.path.is_absolute()


def test_relative_config_path_resolves_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    write(tmp_path / "conf", '[spool]\npath = "q"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load("conf/greenmail.toml")
    assert cfg.spool.path == tmp_path.resolve() / "conf" / "q"


@pytest.mark.parametrize(
    ("listen", "address"),
    [
        ("127.0.0.1:9465", ("127.0.0.1", 9465)),
        ("localhost:1", ("localhost", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("[::1]:9100", ("::1", 9100)),
        ("", None),
    ],
)
def test_metrics_address(tmp_path: Path, listen: str, address) -> None:
    cfg = load_text(tmp_path, f'[spool]\npath = "s"\n[metrics]\nlisten = "{listen}"\n')
    assert cfg.metrics.listen == listen
    assert cfg.metrics.address == address


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "")
    with pytest.raises(AttributeError):
        cfg.relay.port = 26  # type: ignore[misc]


# -- errors -------------------------------------------------------------------

BAD = [
    # (toml, substring the message must contain)
    pytest.param("[relay]\nfoo = 1\n", "relay.foo", id="unknown-key"),
    pytest.param('[spool]\npath = "s"\nextra = true\n', "spool.extra", id="unknown-spool-key"),
    pytest.param("[nosuch]\nx = 1\n", "nosuch", id="unknown-section"),
    pytest.param("relay = 5\n", "relay", id="section-not-table"),
    pytest.param('[relay]\nport = "25"\n', "relay.port", id="port-string"),
    pytest.param("[relay]\nport = 25.0\n", "relay.port", id="port-float"),
    pytest.param("[relay]\nport = true\n", "relay.port", id="port-bool"),
    pytest.param("[relay]\nport = 0\n", "relay.port", id="port-0"),
    pytest.param("[relay]\nport = 70000\n", "relay.port", id="port-70000"),
    pytest.param("[relay]\nport = -1\n", "relay.port", id="port-negative"),
    pytest.param('[relay]\nhost = ""\n', "relay.host", id="host-empty"),
    pytest.param('[relay]\nhost = "a b"\n', "relay.host", id="host-space"),
    pytest.param("[relay]\nhelo = 1\n", "relay.helo", id="helo-int"),
    pytest.param("[delivery]\nmax_connections = true\n", "delivery.max_connections", id="maxconn-bool"),
    pytest.param("[delivery]\nmax_connections = 0\n", "delivery.max_connections", id="maxconn-0"),
    pytest.param('[delivery]\nmax_connections = "10"\n', "delivery.max_connections", id="maxconn-str"),
    pytest.param("[delivery]\ncheck_interval = 0\n", "delivery.check_interval", id="check-0"),
    pytest.param("[delivery]\ncheck_interval = -5\n", "delivery.check_interval", id="check-negative"),
    pytest.param("[delivery]\ncheck_interval = true\n", "delivery.check_interval", id="check-bool"),
    pytest.param("[delivery]\nconnect_tries = 0\n", "delivery.connect_tries", id="tries-0"),
    pytest.param("[retry]\nmin_backoff = true\n", "retry.min_backoff", id="duration-bool"),
    pytest.param('[retry]\nmin_backoff = "300"\n', "retry.min_backoff", id="duration-string"),
    pytest.param("[retry]\nmax_lifetime = -1\n", "retry.max_lifetime", id="duration-negative"),
    pytest.param("[retry]\nmax_lifetime = -0.5\n", "retry.max_lifetime", id="duration-negative-float"),
    pytest.param("[retry]\nmax_lifetime = nan\n", "retry.max_lifetime", id="duration-nan"),
    pytest.param("[retry]\nmax_lifetime = inf\n", "retry.max_lifetime", id="duration-inf"),
    pytest.param("[retry]\nbounce = 1\n", "retry.bounce", id="bounce-int"),
    pytest.param('[retry]\nbounce = "yes"\n', "retry.bounce", id="bounce-str"),
    pytest.param("[retry]\nmin_backoff = 500\nmax_backoff = 100\n", "retry.max_backoff", id="max<min"),
    pytest.param("[retry]\nmin_backoff = 5000\n", "retry.max_backoff", id="min>default-max"),
    pytest.param("[timeouts]\nconnect = 0\n", "timeouts.connect", id="timeout-0"),
    pytest.param("[timeouts]\ndata_end = -3\n", "timeouts.data_end", id="timeout-negative"),
    pytest.param("[timeouts]\nbanner = false\n", "timeouts.banner", id="timeout-bool"),
    pytest.param("[timeouts]\nidle = 5\n", "timeouts.idle", id="timeout-unknown"),
    pytest.param('[metrics]\nlisten = "nohost"\n', "metrics.listen", id="listen-noport"),
    pytest.param('[metrics]\nlisten = "h:0"\n', "metrics.listen", id="listen-port0"),
    pytest.param('[metrics]\nlisten = "h:x"\n', "metrics.listen", id="listen-port-x"),
    pytest.param('[metrics]\nlisten = "h:70000"\n', "metrics.listen", id="listen-port-big"),
    pytest.param('[metrics]\nlisten = ":9465"\n', "metrics.listen", id="listen-nohost"),
    pytest.param('[metrics]\nlisten = "h:"\n', "metrics.listen", id="listen-emptyport"),
    pytest.param("[metrics]\nlisten = 9465\n", "metrics.listen", id="listen-int"),
    pytest.param('[spool]\npath = ""\n', "spool.path", id="spool-path-empty"),
    pytest.param("[spool]\npath = 3\n", "spool.path", id="spool-path-int"),
    pytest.param("[relay]\nport = \n", "invalid TOML", id="invalid-toml"),
    pytest.param("[relay\n", "invalid TOML", id="invalid-toml-header"),
]


@pytest.mark.parametrize(("text", "needle"), BAD)
def test_invalid_config_raises_naming_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_text(tmp_path, text)
    message = str(exc.value)
    assert needle in message
    assert "\n" not in message and "\r" not in message
    assert message.strip() == message and message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as exc:
        load(path)
    message = str(exc.value)
    assert str(path) in message
    assert "\n" not in message


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path)
    assert "\n" not in str(exc.value)


def test_non_utf8_file(tmp_path: Path) -> None:
    # tomllib raises UnicodeDecodeError (not TOMLDecodeError) for such a file.
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[relay]\nhost = "\xff"\n')
    with pytest.raises(ConfigError) as exc:
        load(path)
    assert "\n" not in str(exc.value)


def test_listen_with_superscript_digit_port_is_config_error(tmp_path: Path) -> None:
    # "²".isdigit() is True but int("²") raises ValueError: the bad value must
    # still be a ConfigError naming the key, not an uncaught ValueError.
    with pytest.raises(ConfigError, match="metrics.listen"):
        load_text(tmp_path, '[metrics]\nlisten = "h:\u00b2"\n')


@pytest.mark.parametrize(
    "text",
    [
        pytest.param('[relay]\n"a\\nb" = 1\n', id="unknown-key-with-newline"),
        pytest.param('["x\\ny"]\nk = 1\n', id="unknown-section-with-newline"),
    ],
)
def test_error_message_is_one_line_even_for_odd_key_names(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_text(tmp_path, text)
    assert "\n" not in str(exc.value)


def test_spool_path_may_contain_spaces(tmp_path: Path) -> None:
    # A directory name with a space is an ordinary path; nothing in the
    # contract restricts the spool path the way a host name is restricted.
    cfg = load_text(tmp_path, '[spool]\npath = "/srv/mail spool"\n')
    assert cfg.spool.path == Path("/srv/mail spool")


# -- find() ---------------------------------------------------------------------


def test_find_explicit_path_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = write(tmp_path, "", "env.toml")
    monkeypatch.setenv(config.ENV_VAR, str(env_file))
    explicit = tmp_path / "explicit.toml"
    assert config.find(explicit) == explicit
    assert config.find(str(explicit)) == explicit


def test_find_uses_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = write(tmp_path, "[relay]\nport = 2626\n", "env.toml")
    monkeypatch.setenv(config.ENV_VAR, str(env_file))
    monkeypatch.setattr(config, "DEFAULT_PATHS", ())
    assert config.find(None) == env_file
    assert load().relay.port == 2626


def test_find_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = write(tmp_path, "", "default.toml")
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATHS", (tmp_path / "missing.toml", default))
    assert config.find(None) == default


@pytest.mark.parametrize("defaults", [(), ("missing",)], ids=["no-defaults", "nonexistent-default"])
def test_find_nothing_is_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, defaults) -> None:
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATHS", tuple(tmp_path / d for d in defaults))
    with pytest.raises(ConfigError) as exc:
        config.find(None)
    assert config.ENV_VAR in str(exc.value)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError):
        load()


def test_find_empty_env_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.ENV_VAR, "")
    monkeypatch.setattr(config, "DEFAULT_PATHS", ())
    with pytest.raises(ConfigError):
        config.find(None)


def test_schema_names_exactly_the_config_fields() -> None:
    sections = {
        "spool": config.SpoolConfig,
        "relay": config.RelayConfig,
        "delivery": config.DeliveryConfig,
        "retry": config.RetryConfig,
        "timeouts": config.Timeouts,
        "metrics": config.MetricsConfig,
        "addresses": config.AddressesConfig,
        "listener": config.ListenerConfig,
        "queue": config.QueueConfig,
    }
    assert set(confcheck.SCHEMA) == set(sections)
    for name, cls in sections.items():
        assert set(confcheck.SCHEMA[name]) == {f.name for f in fields(cls)}, name
    assert (config.RetryConfig.min_backoff, config.RetryConfig.max_backoff) == (
        confcheck.MIN_BACKOFF,
        confcheck.MAX_BACKOFF,
    )


@pytest.mark.parametrize(
    ("mode", "ok"), [(0o600, True), (0o640, True), (0o400, True), (0o644, False), (0o602, False)]
)
def test_password_file_others_may_read_is_refused(tmp_path: Path, mode: int, ok: bool) -> None:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    pw.chmod(mode)
    cfg = config.from_dict({"relay": {"username": "u", "password_file": "pw"}}, tmp_path)
    if ok:
        assert cfg.relay.password() == "secret"
    else:
        with pytest.raises(
            ConfigError, match=r"relay.password_file: .* can be read or written by every user"
        ):
            cfg.relay.password()


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("/etc/greenmail", "/var/spool/greenmail"),
        ("/etc", "/var/spool/greenmail"),
        ("/srv/app", "/srv/app/var/spool"),
        ("/etcetera/x", "/etcetera/x/var/spool"),
    ],
)
def test_the_default_spool_of_a_system_configuration_is_var_spool_greenmail(base: str, expected: str) -> None:
    cfg = config.from_dict({"relay": {"host": "127.0.0.1"}}, base=Path(base))
    assert cfg.spool.path == Path(expected)
    given = config.from_dict({"spool": {"path": "q"}}, base=Path(base))
    assert given.spool.path == Path(base) / "q"


def test_the_listeners_file_keys_may_be_empty_as_the_documented_defaults() -> None:
    raw = {"listener": {"listen": [], "tls_cert": "", "tls_key": "", "users_file": ""}}
    cfg = config.from_dict(raw, base=Path("/srv"))
    assert (cfg.listener.tls_cert, cfg.listener.tls_key, cfg.listener.users_file) == (None, None, None)
    with pytest.raises(ConfigError, match="listener.tls_cert"):
        config.from_dict({"listener": {"tls_cert": 3}}, base=Path("/srv"))
