"""Configuration: the TOML file, its validation and the frozen Config.

Owns: every setting's name, type, default and range; finding the file
(--config or $GREENMAIL_CONFIG); resolving relative paths against the file's
directory. Nothing else in greenmail reads settings from anywhere.
Must not touch: the spool, sockets, gevent.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from greenmail.errors import ConfigError

ENV_VAR = "GREENMAIL_CONFIG"
DEFAULT_PATHS = (Path("/etc/greenmail/greenmail.toml"),)


@dataclass(frozen=True)
class SpoolConfig:
    path: Path


TLS_MODES = ("starttls", "opportunistic", "implicit", "none")
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


@dataclass(frozen=True)
class RelayConfig:
    host: str = "127.0.0.1"
    port: int = 25
    hosts: tuple[str, ...] = ()  # "host:port" relays tried in order, instead of host/port
    helo: str | None = None  # None: this host's FQDN, resolved by the daemon
    tls: str | None = None  # None: opportunistic for a loopback relay, else starttls
    tls_verify: bool = True
    ca_file: Path | None = None
    tls_server_name: str | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    auth_allow_plaintext: bool = False
    max_messages_per_connection: int = 0
    rate_limit: float = 0
    pipelining: bool = True
    chunking: bool = True

    @property
    def relays(self) -> tuple[tuple[str, int], ...]:
        """The relays to try, in order."""
        if not self.hosts:
            return ((self.host, self.port),)
        return tuple(_split_host(h) for h in self.hosts)

    @property
    def tls_mode(self) -> str:
        if self.tls:
            return self.tls
        return "opportunistic" if all(_loopback(h) for h, _ in self.relays) else "starttls"

    def password(self) -> str | None:
        """The AUTH password from password_file (first line) or password_env; never logged."""
        if self.password_file is not None:
            try:
                lines = self.password_file.read_text().splitlines()
            except OSError as e:
                raise ConfigError(f"relay.password_file: cannot read it: {e.strerror}") from None
            return lines[0] if lines else ""
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"relay.password_env: ${self.password_env} is not set")
            return value
        return None


def _split_host(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    return host.strip("[]"), int(port)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        import ipaddress  # only the daemon asks

        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DeliveryConfig:
    max_connections: int = 10
    check_interval: float = 60
    connect_tries: int = 3
    shutdown_grace: float = 30


@dataclass(frozen=True)
class RetryConfig:
    min_backoff: float = 300
    max_backoff: float = 4000
    max_lifetime: float = 432000
    bounce: bool = True
    delay_warning: float = 0  # seconds; 0 = no "still trying" notice


@dataclass(frozen=True)
class Timeouts:
    connect: float = 30
    banner: float = 300
    command: float = 300
    data_init: float = 120
    data_block: float = 180
    data_end: float = 600


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9465"

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to listen on, or None when disabled."""
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Config:
    spool: SpoolConfig
    relay: RelayConfig
    delivery: DeliveryConfig
    retry: RetryConfig
    timeouts: Timeouts
    metrics: MetricsConfig
    source: Path | None = None


Check = Callable[[Any], str | None]  # returns a complaint, or None when fine


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_range(lo: int, hi: int) -> Check:
    def check(v: Any) -> str | None:
        if not _is_int(v) or not lo <= v <= hi:
            return f"expected an integer from {lo} to {hi}"
        return None

    return check


def _duration(v: Any) -> str | None:
    if not (_is_int(v) or isinstance(v, float)) or v < 0 or v != v or v == float("inf"):
        return "expected a non-negative number of seconds"
    return None


def _positive_duration(v: Any) -> str | None:
    if _duration(v) or v == 0:
        return "expected a positive number of seconds"
    return None


def _text(v: Any) -> str | None:
    if not isinstance(v, str) or not v.strip() or any(c.isspace() or ord(c) < 32 for c in v):
        return "expected a non-empty string without whitespace"
    return None


def _path(v: Any) -> str | None:
    if not isinstance(v, str) or not v or any(ord(c) < 32 for c in v):
        return "expected a non-empty path"
    return None


def _choice(options: tuple[str, ...]) -> Check:
    def check(v: Any) -> str | None:
        return None if v in options else "expected one of " + ", ".join(f'"{o}"' for o in options)

    return check


def _host_list(v: Any) -> str | None:
    if not isinstance(v, list) or not v:
        return 'expected a non-empty list of "host:port" strings'
    for item in v:
        if not isinstance(item, str) or _listen(item) or _text(item):
            return f'expected "host:port" strings (port 1-65535), not {item!r}'
    return None


def _mechanisms(v: Any) -> str | None:
    if not isinstance(v, list) or not v or any(m not in AUTH_MECHANISMS for m in v):
        return "expected a non-empty list from " + ", ".join(f'"{m}"' for m in AUTH_MECHANISMS)
    return None


def _boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "expected true or false"


def _listen(v: Any) -> str | None:
    if not isinstance(v, str):
        return 'expected "HOST:PORT" or ""'
    if v == "":
        return None
    host, sep, port = v.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        return 'expected "HOST:PORT" (port 1-65535) or "" to disable'
    return None


SCHEMA: dict[str, dict[str, Check]] = {
    "spool": {"path": _path},
    "relay": {
        "host": _text,
        "port": _int_range(1, 65535),
        "hosts": _host_list,
        "helo": _text,
        "tls": _choice(TLS_MODES),
        "tls_verify": _boolean,
        "ca_file": _path,
        "tls_server_name": _text,
        "tls_cert_file": _path,
        "tls_key_file": _path,
        "username": _text,
        "password_file": _path,
        "password_env": _text,
        "auth_mechanisms": _mechanisms,
        "auth_allow_plaintext": _boolean,
        "max_messages_per_connection": _int_range(0, 10**9),
        "rate_limit": _duration,
        "pipelining": _boolean,
        "chunking": _boolean,
    },
    "delivery": {
        "max_connections": _int_range(1, 100000),
        "check_interval": _positive_duration,
        "connect_tries": _int_range(1, 1000),
        "shutdown_grace": _duration,
    },
    "retry": {
        "min_backoff": _duration,
        "max_backoff": _duration,
        "max_lifetime": _duration,
        "bounce": _boolean,
        "delay_warning": _duration,
    },
    "timeouts": {k: _positive_duration for k in Timeouts.__dataclass_fields__},
    "metrics": {"listen": _listen},
}


def find(path: str | os.PathLike[str] | None) -> Path:
    """The config file to use: the argument, $GREENMAIL_CONFIG, or the system default."""
    if path:
        return Path(path)
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    raise ConfigError(f"no configuration: pass --config PATH or set ${ENV_VAR}")


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read, validate and freeze the configuration; ConfigError names the bad key."""
    file = find(path)
    try:
        with open(file, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{file}: cannot read configuration: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: invalid TOML: {e}") from None
    return from_dict(raw, base=file.resolve().parent, source=file)


def from_dict(raw: dict[str, Any], base: Path, source: Path | None = None) -> Config:
    """Validate a parsed TOML document; relative paths resolve against ``base``."""
    sections = _validate(raw)
    spool = sections.pop("spool", {})
    path = Path(spool.get("path", "var/spool"))
    return Config(
        spool=SpoolConfig(path=path if path.is_absolute() else base / path),
        relay=_relay(sections.get("relay", {}), base),
        delivery=DeliveryConfig(**sections.get("delivery", {})),
        retry=RetryConfig(**sections.get("retry", {})),
        timeouts=Timeouts(**sections.get("timeouts", {})),
        metrics=MetricsConfig(**sections.get("metrics", {})),
        source=source,
    )


RELAY_PATHS = ("ca_file", "tls_cert_file", "tls_key_file", "password_file")


def _relay(values: dict[str, Any], base: Path) -> RelayConfig:
    """RelayConfig with paths resolved, lists frozen, and the keys that go together checked."""
    v = dict(values)
    for key in RELAY_PATHS:
        if key in v:
            p = Path(v[key])
            v[key] = p if p.is_absolute() else base / p
    for key in ("hosts", "auth_mechanisms"):
        if key in v:
            v[key] = tuple(v[key])
    if "hosts" in v and ("host" in v or "port" in v):
        raise ConfigError("relay.hosts: give either hosts or host/port, not both")
    if "username" in v and "password_file" not in v and "password_env" not in v:
        raise ConfigError("relay.username: needs relay.password_file or relay.password_env")
    if "password_file" in v and "password_env" in v:
        raise ConfigError("relay.password_env: give either password_file or password_env, not both")
    if "tls_key_file" in v and "tls_cert_file" not in v:
        raise ConfigError("relay.tls_key_file: needs relay.tls_cert_file")
    return RelayConfig(**v)


def _shown(name: str) -> str:
    """A name from the file, safe to print on one line."""
    return name if name.isprintable() else repr(name)


def _validate(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in SCHEMA:
            raise ConfigError(f"unknown configuration section [{_shown(section)}]")
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a table [{section}]")
        for key, value in values.items():
            check = SCHEMA[section].get(key)
            if check is None:
                raise ConfigError(f"unknown configuration key {section}.{_shown(key)}")
            complaint = check(value)
            if complaint:
                raise ConfigError(f"{section}.{key}: {complaint}, got {value!r}")
        out[section] = dict(values)
    retry = out.get("retry", {})
    lo = retry.get("min_backoff", RetryConfig.min_backoff)
    hi = retry.get("max_backoff", RetryConfig.max_backoff)
    if lo > hi:
        raise ConfigError(f"retry.max_backoff: must be >= retry.min_backoff ({lo}), got {hi}")
    return out
