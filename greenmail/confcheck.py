"""The configuration's rules: which sections and keys exist, what each accepts.

Owns: the schema (every key's check), the checks between keys and the
defaults those checks need. config.py builds the frozen Config on top of
``validate``.
Must not touch: reading files, the Config dataclasses.
"""

from __future__ import annotations

from greenmail.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Check = Callable[[Any], str | None]  # returns a complaint, or None when fine

TLS_MODES = ("starttls", "opportunistic", "implicit", "none")
BACKENDS = ("spool", "postgresql")
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
SPOOL_PATH = "var/spool"  # relative to the configuration file's directory
MIN_BACKOFF, MAX_BACKOFF = 300, 4000  # the retry defaults, checked against each other
MAX_CONNECTIONS = 10  # delivery.max_connections' default, checked against delivery.processes
MAX_PROCESSES = 64
TIMEOUTS = ("connect", "banner", "command", "data_init", "data_block", "data_end")


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


def _optional_path(v: Any) -> str | None:
    """A path, or "" for none (the listener's TLS and users files)."""
    return None if v == "" else _path(v)


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


def _listen_list(v: Any) -> str | None:
    if not isinstance(v, list):
        return 'expected a list of "HOST:PORT"'
    for item in v:
        why = _listen(item)
        if why or not item:
            return 'expected a list of "HOST:PORT" (port 1-65535)'
    return None


def _networks(v: Any) -> str | None:
    import ipaddress

    if not isinstance(v, list):
        return 'expected a list of networks, e.g. ["127.0.0.0/8", "::1/128"]'
    for item in v:
        try:
            ipaddress.ip_network(item, strict=False)
        except (ValueError, TypeError):
            return f"not a network: {item!r}"
    return None


def _domain(v: Any) -> str | None:
    if not isinstance(v, str) or not v:
        return "expected a domain name"
    if "@" in v or any(c.isspace() or c in "<>,[]" for c in v) or v.startswith(".") or ".." in v:
        return "expected a domain name (no @, spaces or brackets)"
    return None


def _mailbox(v: Any) -> str | None:
    if not isinstance(v, str) or v.count("@") < 1 or v.startswith("@") or v.endswith("@"):
        return "expected an address local@domain"
    if any(c.isspace() or c in "<>," for c in v):
        return "expected an address local@domain (no spaces, brackets or commas)"
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
    "spool": {"path": _path, "prune_after": _duration},
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
        "processes": _int_range(1, MAX_PROCESSES),
        "cluster_max_connections": _int_range(0, 10**6),
    },
    "retry": {
        "min_backoff": _duration,
        "max_backoff": _duration,
        "max_lifetime": _duration,
        "bounce": _boolean,
        "delay_warning": _duration,
    },
    "timeouts": {k: _positive_duration for k in TIMEOUTS},
    "metrics": {"listen": _listen},
    "listener": {
        "listen": _listen_list,
        "allow": _networks,
        "max_clients": _int_range(1, 100000),
        "max_message_size": _int_range(1, 2**40),
        "max_recipients": _int_range(1, 100000),
        "timeout": _positive_duration,
        "tls_cert": _optional_path,
        "tls_key": _optional_path,
        "users_file": _optional_path,
    },
    "addresses": {"origin": _domain, "aliases": _path, "admin": _mailbox, "hostname": _domain},
    "queue": {
        "backend": _choice(BACKENDS),
        "dsn": _text,
        "password_file": _optional_path,
        "lease": _positive_duration,
        "node": _domain,
    },
}


def _shown(name: str) -> str:
    """A name from the file, safe to print on one line."""
    return name if name.isprintable() else repr(name)


def validate(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The parsed document's sections (copies), checked; ConfigError names the first bad key."""
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
    lo = retry.get("min_backoff", MIN_BACKOFF)
    hi = retry.get("max_backoff", MAX_BACKOFF)
    if lo > hi:
        raise ConfigError(f"retry.max_backoff: must be >= retry.min_backoff ({lo}), got {hi}")
    _check_relay(out.get("relay", {}))
    queue = out.get("queue", {})
    if queue.get("backend") == "postgresql" and not queue.get("dsn"):
        raise ConfigError('queue.dsn: needed with queue.backend = "postgresql" (a libpq connection string)')
    if out.get("delivery", {}).get("cluster_max_connections") and queue.get("backend") != "postgresql":
        raise ConfigError('delivery.cluster_max_connections: needs queue.backend = "postgresql"')
    if queue.get("lease", 900) < 10:
        raise ConfigError(f"queue.lease: at least 10 seconds, got {queue['lease']}")
    delivery = out.get("delivery", {})
    procs, conns = delivery.get("processes", 1), delivery.get("max_connections", MAX_CONNECTIONS)
    if procs > conns:
        raise ConfigError(
            f"delivery.processes: must not exceed delivery.max_connections ({conns}), got {procs}"
        )
    return out


def _check_relay(v: dict[str, Any]) -> None:
    """The relay keys that go together."""
    if "hosts" in v and ("host" in v or "port" in v):
        raise ConfigError("relay.hosts: give either hosts or host/port, not both")
    if "username" in v and "password_file" not in v and "password_env" not in v:
        raise ConfigError("relay.username: needs relay.password_file or relay.password_env")
    if "password_file" in v and "password_env" in v:
        raise ConfigError("relay.password_env: give either password_file or password_env, not both")
    if "tls_key_file" in v and "tls_cert_file" not in v:
        raise ConfigError("relay.tls_key_file: needs relay.tls_cert_file")
