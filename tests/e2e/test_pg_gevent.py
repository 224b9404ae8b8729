"""psycopg under gevent, imported the way greenmail imports it (greenmail/pgdb.py): with select
patched first, ten greenlets' queries run at once on one thread; imported before any patching
(the negative control), each query blocks the hub and they run one after another. And the
database host's name: greenmail looks it up off the hub; psycopg alone (the control) on it.

Each case is a child process (a fresh interpreter: psycopg picks its wait function when it is first
imported), greenmail imported from this source tree."""

from __future__ import annotations

import re

import pytest
import support

SESSIONS = 10

# argv: dsn, "cooperative" or "plain", seconds each query sleeps. Prints max_active=N (the most
# sessions pg_stat_activity showed running pg_sleep at once) and where pgdb came from.
SCRIPT = r"""
import sys, time

dsn, mode, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
if mode == "plain":
    import psycopg  # before gevent has patched anything: psycopg's C wait blocks the hub

    from greenmail import pgdb
else:
    from greenmail import pgdb

    pgdb.psycopg(cooperative=True)  # patches select, then imports psycopg
import gevent

cooperative = mode != "plain"
conns = [pgdb.connect(dsn, None, cooperative=cooperative) for _ in range(SESSIONS + 1)]
watcher = conns.pop()
workers = [gevent.spawn(c.execute, "SELECT pg_sleep(%s)", (seconds,)) for c in conns]
ACTIVE = (
    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%%' AND state = 'active'"
    " AND datname = current_database()"
)
most, deadline = 0, time.monotonic() + 15
while most < SESSIONS and time.monotonic() < deadline and not all(w.ready() for w in workers):
    most = max(most, watcher.execute(ACTIVE).fetchone()[0])
    gevent.sleep(0.02)
gevent.joinall(workers, timeout=60, raise_error=True)
assert all(w.successful() for w in workers), [w.exception for w in workers]
print(f"max_active={most}")
print(f"pgdb={pgdb.__file__}")
""".replace("SESSIONS", str(SESSIONS))


def run(dsn: str, mode: str, seconds: float) -> int:
    out = support.python(SCRIPT, dsn, mode, str(seconds))
    assert f"pgdb={support.ROOT / 'greenmail' / 'pgdb.py'}" in out  # this tree's, not an installed one
    found = re.search(r"^max_active=(\d+)$", out, re.MULTILINE)
    assert found, out
    return int(found.group(1))


def test_cooperative_psycopg_runs_ten_queries_at_once(pg_dsn: str) -> None:
    assert run(pg_dsn, "cooperative", 2) == SESSIONS


def test_psycopg_imported_before_patching_runs_one_at_a_time(pg_dsn: str) -> None:
    """The negative control: the same script, psycopg imported before gevent patched select."""
    assert run(pg_dsn, "plain", 0.5) <= 1


# argv: dsn (its host a name), "greenmail" (pgdb.connect as the daemon's pool calls it) or "psycopg"
# (psycopg.connect as such: the negative control). Name lookups take 0.5 s (C's getaddrinfo
# wrapped); a greenlet ticks every 10 ms. Prints max_gap_ms=N (the longest the hub went without
# a tick while connecting).
LOOKUP = r"""
import sys, time

import _socket

real = _socket.getaddrinfo
def slow(*args, **kwargs):
    time.sleep(0.5)  # a slow DNS server
    return real(*args, **kwargs)
_socket.getaddrinfo = slow

from greenmail import pgdb

pg = pgdb.psycopg(cooperative=True)
import gevent

dsn, mode = sys.argv[1], sys.argv[2]
gaps, last = [], [time.monotonic()]
def tick():
    while True:
        gevent.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last[0])
        last[0] = now
ticker = gevent.spawn(tick)
gevent.sleep(0.05)
conn = pgdb.connect(dsn, None, cooperative=True) if mode == "greenmail" else pg.connect(dsn)
assert conn.execute("SELECT 1").fetchone()[0] == 1
gevent.sleep(0.05)
print(f"max_gap_ms={max(gaps) * 1000:.0f}")
"""


def lookup_gap(dsn: str, mode: str, hosts: int = 1) -> float:
    """``dsn`` with its host as "localhost", ``hosts`` times (a list of hosts, libpq's failover)."""
    server = re.search(r"@127\.0\.0\.1:(\d+)/", dsn)
    assert server, dsn
    named = dsn.replace(server.group(0), "@" + ",".join([f"localhost:{server.group(1)}"] * hosts) + "/")
    out = support.python(LOOKUP, named, mode)
    found = re.search(r"^max_gap_ms=(\d+)$", out, re.MULTILINE)
    assert found, out
    return int(found.group(1))


@pytest.mark.parametrize("hosts", [1, 2])
def test_the_database_hosts_name_is_looked_up_without_blocking_the_hub(pg_dsn: str, hosts: int) -> None:
    assert lookup_gap(pg_dsn, "greenmail", hosts) < 250


def test_psycopg_alone_looks_the_name_up_on_the_hub(pg_dsn: str) -> None:
    """The negative control: psycopg.connect with the same DSN blocks the hub for the lookup."""
    assert lookup_gap(pg_dsn, "psycopg") >= 450


UNKNOWN = r"""
from greenmail import pgdb
from greenmail.errors import QueueUnavailable

pgdb.psycopg(cooperative=True)
try:
    pgdb.connect("postgresql://greenmail@nosuch.invalid:5432/x", None, cooperative=True)
except QueueUnavailable as e:
    print(f"unavailable: {e}")
"""


def test_a_database_host_that_does_not_resolve_is_unavailable_and_named() -> None:
    out = support.python(UNKNOWN, timeout=60)
    assert "unavailable: PostgreSQL is unavailable: cannot resolve nosuch.invalid" in out, out
