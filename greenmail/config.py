"""Configuration: the TOML file and the frozen Config.

Owns: every setting's name, type and default; finding the file (--config or
$GREENMAIL_CONFIG); resolving relative paths against the file's directory.
What each key accepts is checked by confcheck.py. Nothing else in greenmail
reads settings from anywhere.
Must not touch: the spool, sockets, gevent.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from greenmail import confcache, confcheck
from greenmail.confcheck import AUTH_MECHANISMS, SCHEMA, TLS_MODES  # noqa: F401 - part of this API
from greenmail.errors import ConfigError

ENV_VAR = confcache.ENV_VAR
DEFAULT_PATHS = tuple(Path(p) for p in confcache.DEFAULT_PATHS)


@dataclass(frozen=True)
class SpoolConfig:
    path: Path
    prune_after: float = 30 * 86400  # seconds a file stays in failed/ or corrupt/; 0 = for ever


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
                with open(self.password_file) as f:
                    mode = os.fstat(f.fileno()).st_mode
                    if mode & 0o006:  # as ssh refuses a private key others may read
                        raise ConfigError(
                            f"relay.password_file: {self.password_file} can be read or written by every "
                            f"user (mode {mode & 0o777:04o}); make it private: chmod 600 (or 640 for a group)"
                        )
                    lines = f.read().splitlines()
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
    max_connections: int = confcheck.MAX_CONNECTIONS
    check_interval: float = 60
    connect_tries: int = 3
    shutdown_grace: float = 30
    processes: int = 1
    cluster_max_connections: int = 0  # all nodes of a shared queue together; 0: no such limit


@dataclass(frozen=True)
class RetryConfig:
    min_backoff: float = confcheck.MIN_BACKOFF
    max_backoff: float = confcheck.MAX_BACKOFF
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
class ListenerConfig:
    """[listener]: SMTP submission (listener.py); listens nowhere unless ``listen`` names addresses."""

    listen: tuple[str, ...] = ()
    allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # clients that may submit
    max_clients: int = 100
    max_message_size: int = 10240000
    max_recipients: int = 1000
    timeout: float = 300
    tls_cert: Path | None = None  # PEM: STARTTLS is offered when it is set (the key in it or in tls_key)
    tls_key: Path | None = None
    users_file: Path | None = None  # AUTH users (users.py); AUTH is offered after STARTTLS only

    @property
    def addresses(self) -> list[tuple[str, int]]:
        out = []
        for item in self.listen:
            host, _, port = item.rpartition(":")
            out.append((host.strip("[]"), int(port)))
        return out


@dataclass(frozen=True)
class AddressesConfig:
    """[addresses]: how local names are rewritten at submission (addresses.py)."""

    origin: str | None = None  # None: /etc/mailname's first line, else the host name
    aliases: Path | None = None
    admin: str | None = None
    hostname: str | None = None  # None: this host's FQDN

    def settings(self) -> dict[str, str | None]:
        """The Rewriter's keyword arguments (plain values: kept in the submission cache)."""
        return {
            "origin": self.origin,
            "hostname": self.hostname,
            "admin": self.admin,
            "aliases": str(self.aliases) if self.aliases else None,
        }


@dataclass(frozen=True)
class QueueConfig:
    """[queue]: which backend holds the queue (the spool, or PostgreSQL shared by several nodes)."""

    backend: str = "spool"
    dsn: str | None = None  # libpq connection string (backend = "postgresql")
    password_file: Path | None = None  # its first line is the password, read at start-up
    lease: float = 900  # seconds a node's claim lasts without a heartbeat
    node: str | None = None  # this daemon's name in the shared queue; None: the host's name


@dataclass(frozen=True)
class Config:
    spool: SpoolConfig
    relay: RelayConfig
    delivery: DeliveryConfig
    retry: RetryConfig
    timeouts: Timeouts
    metrics: MetricsConfig
    source: Path | None = None
    addresses: AddressesConfig = AddressesConfig()
    listener: ListenerConfig = ListenerConfig()
    queue: QueueConfig = QueueConfig()


def find(path: str | os.PathLike[str] | None) -> Path:
    """The config file to use: the argument, $GREENMAIL_CONFIG, or the system default."""
    found = confcache.find(os.fspath(path) if path else None, [str(p) for p in DEFAULT_PATHS])
    if found is None:
        raise ConfigError(f"no configuration: pass --config PATH or set ${ENV_VAR}")
    return Path(found)


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Read, validate and freeze the configuration; ConfigError names the bad key.

    Leaves the settings a submission needs in the cache beside the file (confcache.py).
    """
    file = find(path)
    try:
        with open(file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{file}: cannot read configuration: {e.strerror}") from None
    cfg = parse(data, file)
    from greenmail.addresses import MAILNAME

    confcache.store(str(file), submission_settings(cfg), [MAILNAME])
    return cfg


def submission_settings(cfg: Config) -> dict[str, Any]:
    """What ``greenmail enqueue`` needs of the configuration (kept by confcache.py).

    The host's names are resolved here, once (the cache is also keyed by
    /etc/mailname): a submission from the cache neither reads it nor asks the resolver.
    """
    from greenmail.addresses import Rewriter

    rw = Rewriter(**cfg.addresses.settings())
    queue: dict[str, Any] = {"backend": cfg.queue.backend}
    if cfg.queue.backend == "postgresql":
        from greenmail.logfmt import redact_dsn

        dsn = cfg.queue.dsn or ""
        if redact_dsn(dsn) == dsn:  # the cache is readable by all: never a password in it
            pf = cfg.queue.password_file
            queue.update(dsn=dsn, password_file=str(pf) if pf else None)
    return {
        **queue,
        "spool": str(cfg.spool.path),
        "addresses": {**cfg.addresses.settings(), "origin": rw.origin, "hostname": rw.hostname},
    }


def parse(data: bytes, file: Path) -> Config:
    """The configuration in ``data``, the contents of ``file``; ConfigError names the bad key."""
    try:
        raw = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: invalid TOML: {e}") from None
    return from_dict(raw, base=file.resolve().parent, source=file)


def from_dict(raw: dict[str, Any], base: Path, source: Path | None = None) -> Config:
    """Validate a parsed TOML document; relative paths resolve against ``base``."""
    sections = confcheck.validate(raw)
    return Config(
        spool=_spool(sections.get("spool", {}), base),
        relay=_relay(sections.get("relay", {}), base),
        delivery=DeliveryConfig(**sections.get("delivery", {})),
        retry=RetryConfig(**sections.get("retry", {})),
        timeouts=Timeouts(**sections.get("timeouts", {})),
        metrics=MetricsConfig(**sections.get("metrics", {})),
        source=source,
        addresses=_addresses(sections.get("addresses", {}), base),
        listener=_listener(sections.get("listener", {}), base),
        queue=_queue(sections.get("queue", {}), base),
    )


def _queue(values: dict[str, Any], base: Path) -> QueueConfig:
    v = dict(values)
    if v.get("password_file"):
        v["password_file"] = _under(base, v["password_file"])
    else:
        v.pop("password_file", None)
    return QueueConfig(**v)


def _listener(values: dict[str, Any], base: Path) -> ListenerConfig:
    v = {k: tuple(x) if isinstance(x, list) else x for k, x in values.items()}
    for key in ("tls_cert", "tls_key", "users_file"):
        if v.get(key):
            v[key] = _under(base, v[key])
        else:
            v.pop(key, None)
    return ListenerConfig(**v)


def _addresses(values: dict[str, Any], base: Path) -> AddressesConfig:
    v = dict(values)
    if "aliases" in v:
        v["aliases"] = _under(base, v["aliases"])
    return AddressesConfig(**v)


def _spool(values: dict[str, Any], base: Path) -> SpoolConfig:
    path = _under(base, values.get("path", default_spool(base)))
    return SpoolConfig(path, **{k: v for k, v in values.items() if k != "path"})


def default_spool(base: Path) -> str:
    """spool.path when the file gives none: /var/spool/greenmail for a system configuration
    (a file under /etc), else var/spool beside the file (a checkout, a test)."""
    return SYSTEM_SPOOL if base == Path("/etc") or Path("/etc") in base.parents else confcheck.SPOOL_PATH


SYSTEM_SPOOL = "/var/spool/greenmail"


def _under(base: Path, path: str) -> Path:
    """``path`` as given when absolute, else taken from ``base``; ``..`` steps resolved (links are not)."""
    return Path(os.path.normpath(base / path))


RELAY_PATHS = ("ca_file", "tls_cert_file", "tls_key_file", "password_file")


def _relay(values: dict[str, Any], base: Path) -> RelayConfig:
    """RelayConfig with paths resolved and lists frozen (confcheck checked the keys that go together)."""
    v = dict(values)
    for key in RELAY_PATHS:
        if key in v:
            v[key] = _under(base, v[key])
    for key in ("hosts", "auth_mechanisms"):
        if key in v:
            v[key] = tuple(v[key])
    return RelayConfig(**v)
