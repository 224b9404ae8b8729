"""How a node claims from the shared queue, in PostgreSQL's own terms: the claim statement's plan
and the transactions a burst of sessions makes.

- A queue filled since its last ANALYZE looks nearly empty to the planner, which then prefers to
  fetch every due row and sort them (a cost that grows with the queue, paid by every claim). On
  the node's connections (pgqueue.SESSION) the claim walks the due index in order instead; on a
  plain connection (the negative control) the same statement sorts.
- Ten sessions asking at once are served by one claim (one transaction), not ten claims side by
  side that skip each other's locked rows.

Each case is a child process (psycopg imported after gevent patched select, as in the daemon),
greenmail imported from this source tree.
"""

from __future__ import annotations

import json
from typing import Any

import support

# argv: dsn, case, messages to enqueue. Prints one JSON line.
SCRIPT = r"""
import json, sys

from greenmail import pgdb, pgschema

pgdb.psycopg(cooperative=True)
import gevent

from greenmail import pgqueue

dsn, case, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = pgdb.connect(dsn, None)
pgschema.init(conn)
conn.execute("ALTER TABLE greenmail_messages SET (autovacuum_enabled = off)")  # no ANALYZE behind our back
conn.execute(
    "SELECT count(greenmail_enqueue('a@example.com', ARRAY['b@example.com'], %s))"
    " FROM generate_series(1, %s)",
    (b"Subject: claims\r\n\r\nHello.\r\n", n),
)


def node_types(plan):
    out = [(plan["Node Type"], plan.get("Index Name"))]
    for sub in plan.get("Plans", []):
        out += node_types(sub)
    return out


if case == "plan":
    params = {"n": 32, "node": "test", "lease": 60, "older": None, "small": pgqueue.IN_CLAIM}
    result = {}
    for label, settings in (("node", pgqueue.SESSION), ("plain", None)):
        c = pgdb.connect(dsn, None, settings=settings)
        with c.transaction(force_rollback=True):
            plan = c.execute("EXPLAIN (FORMAT JSON) " + pgqueue.CLAIM, params).fetchone()[0]
        result[label] = node_types(plan[0]["Plan"])
    print(json.dumps(result))
elif case == "burst":
    q = pgqueue.PgQueue(dsn, None, 60.0, connections=10)
    q.open()
    q.refresh()
    takers = [gevent.spawn(q.take) for _ in range(10)]
    gevent.joinall(takers, timeout=60, raise_error=True)
    ids = [t.value.id if t.value is not None else None for t in takers]
    claims, transactions = conn.execute(
        "SELECT count(*), count(DISTINCT xmin::text) FROM greenmail_messages WHERE status = 'active'"
    ).fetchone()
    print(json.dumps({"ids": ids, "claimed": claims, "transactions": transactions}))
"""


def run(dsn: str, case: str, messages: int) -> Any:
    out = support.python(SCRIPT, dsn, case, str(messages), timeout=120)
    return json.loads(out.strip().splitlines()[-1])


def test_the_claim_walks_the_due_index_even_when_statistics_lag(pg_dsn: str) -> None:
    plans = run(pg_dsn, "plan", 5000)
    assert ["Index Scan", "greenmail_messages_due"] in plans["node"], plans["node"]
    assert not any(kind == "Sort" for kind, _ in plans["node"]), plans["node"]
    # The control: the same statement on a connection without the node's settings sorts.
    assert any(kind == "Sort" for kind, _ in plans["plain"]), plans["plain"]


def test_sessions_asking_at_once_share_one_claim(pg_dsn: str) -> None:
    got = run(pg_dsn, "burst", 40)
    assert None not in got["ids"] and len(set(got["ids"])) == 10, got
    assert got["transactions"] == 1, got  # one claim statement leased them all
    assert got["claimed"] >= 10, got  # the sessions' ten, and the rest of that claim's batch
