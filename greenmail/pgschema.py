"""The shared queue's schema in PostgreSQL: its tables, the enqueue function, and migrations.

Owns: the SQL that creates (``greenmail queue init``) or migrates the schema,
step by step and idempotently (the version is a row in greenmail_schema; each
step runs in one transaction under an advisory lock, so several nodes may run
init at once), and the check that a running node finds the version it knows.
Must not touch: claims, settlements, the daemon.
"""

from __future__ import annotations

from typing import Any

from greenmail.errors import ConfigError

INIT_LOCK = 0x6772656E  # pg_advisory_xact_lock key of `queue init` ("gren")
SLOTS_LOCK = 0x736C6F74  # pg_advisory_xact_lock key of the connection slots' grants ("slot")
CHANNEL = "greenmail"  # LISTEN/NOTIFY channel: "" new mail, "wake" an operator's `queue retry`

# Step n takes the schema from version n to n + 1.
STEPS: list[str] = [
    r"""
CREATE TABLE greenmail_messages (
    id           text PRIMARY KEY,
    sender       text NOT NULL,                -- '' is the null sender
    size         bigint NOT NULL,
    eight_bit    boolean NOT NULL,
    queued_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    status       text NOT NULL DEFAULT 'queued'
                 CHECK (status IN ('queued', 'active', 'failed', 'held')),
    attempts     integer NOT NULL DEFAULT 0,
    next_attempt timestamptz NOT NULL DEFAULT '-infinity',
    last_error   text,
    warned       boolean NOT NULL DEFAULT false,
    uid          integer,
    lease_owner  text,                         -- the node that claimed it (status 'active')
    lease_until  timestamptz,                  -- its claim ends then unless renewed
    lease_token  bigint                        -- fences that claim's settlement
);
CREATE INDEX greenmail_messages_due ON greenmail_messages (next_attempt, queued_at) WHERE status = 'queued';
CREATE INDEX greenmail_messages_leases ON greenmail_messages (lease_until) WHERE status = 'active';
CREATE SEQUENCE greenmail_lease_tokens;

CREATE TABLE greenmail_recipients (
    message_id text NOT NULL REFERENCES greenmail_messages ON DELETE CASCADE,
    position   integer NOT NULL,
    address    text NOT NULL CHECK (address !~ '[\r\n\x01-\x08\x0b\x0c\x0e-\x1f]' AND address <> ''),
    state      text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    reply      text,                           -- the relay's last reply for this recipient
    bounced    boolean NOT NULL DEFAULT false, -- the sender was told of its failure
    PRIMARY KEY (message_id, position),
    UNIQUE (message_id, address)
);

-- The message in chunks of up to 64 KiB: written and read a chunk at a time.
CREATE TABLE greenmail_chunks (
    message_id text NOT NULL REFERENCES greenmail_messages ON DELETE CASCADE,
    seq        integer NOT NULL,
    data       bytea NOT NULL,
    PRIMARY KEY (message_id, seq)
);

CREATE TABLE greenmail_nodes (
    name         text PRIMARY KEY,
    started      timestamptz NOT NULL,
    seen         timestamptz NOT NULL,
    outage_since timestamptz,                  -- the relay cannot be reached from this node
    outage       text
);

CREATE FUNCTION greenmail_new_id() RETURNS text LANGUAGE sql VOLATILE AS $$
    SELECT upper(lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000000)::bigint), 13, '0')
                 || lpad(to_hex(pg_backend_pid() & 1048575), 5, '0')
                 || substr(md5(random()::text), 1, 6))
$$;

-- New mail wakes idle nodes: one notification per statement, however many rows it inserted.
CREATE FUNCTION greenmail_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('greenmail', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER greenmail_new_mail AFTER INSERT ON greenmail_messages
    FOR EACH STATEMENT EXECUTE FUNCTION greenmail_notify();

-- Enqueue from SQL, inside the caller's transaction: the message is sent once that commits.
CREATE FUNCTION greenmail_enqueue(sender text, recipients text[], message bytea)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    qid text := greenmail_new_id();
BEGIN
    IF sender IS NULL OR sender ~ '[\r\n]' THEN
        RAISE EXCEPTION 'greenmail_enqueue: invalid sender' USING ERRCODE = '22023';
    END IF;
    IF coalesce(cardinality(recipients), 0) = 0 THEN
        RAISE EXCEPTION 'greenmail_enqueue: no recipients' USING ERRCODE = '22023';
    END IF;
    IF message IS NULL OR length(message) = 0 THEN
        RAISE EXCEPTION 'greenmail_enqueue: empty message' USING ERRCODE = '22023';
    END IF;
    INSERT INTO greenmail_messages (id, sender, size, eight_bit)
        VALUES (qid, sender, length(message), encode(message, 'hex') !~ '^([0-7][0-9a-f])*$');
    INSERT INTO greenmail_recipients (message_id, position, address)
        SELECT qid, min(n) - 1, r FROM unnest(recipients) WITH ORDINALITY AS u(r, n)
        GROUP BY r ORDER BY min(n);
    INSERT INTO greenmail_chunks (message_id, seq, data)
        SELECT qid, i, substring(message FROM i * 65536 + 1 FOR 65536)
        FROM generate_series(0, (length(message) - 1) / 65536) AS i;
    RETURN qid;
END
$$;
""",
    r"""
-- relay.rate_limit for the whole cluster (pglimits.py): the GCRA's theoretical arrival time.
CREATE TABLE greenmail_limits (
    name text PRIMARY KEY,
    tat  double precision NOT NULL          -- seconds since the epoch
);

-- How a message came (the listener's are counted as received{source="smtp"} by the node that
-- took them, the others as "local" by the node that claims them first) and whether a node has.
ALTER TABLE greenmail_messages
    ADD COLUMN source text NOT NULL DEFAULT 'local' CHECK (source IN ('local', 'smtp')),
    ADD COLUMN seen boolean NOT NULL DEFAULT false;

-- delivery.cluster_max_connections (pglimits.py): the connections each node may have open now,
-- a lease renewed by its heartbeat.
CREATE TABLE greenmail_slots (
    node  text PRIMARY KEY,
    n     integer NOT NULL CHECK (n >= 0),
    until timestamptz NOT NULL
);
""",
]
VERSION = len(STEPS)


def version(conn: Any) -> int:
    """The schema version of the database ``conn`` is connected to (0: none)."""
    row = conn.execute("SELECT to_regclass('greenmail_schema') IS NOT NULL").fetchone()
    if not row[0]:
        return 0
    row = conn.execute("SELECT max(version) FROM greenmail_schema").fetchone()
    return int(row[0] or 0)


def init(conn: Any) -> tuple[int, int]:
    """Create or migrate the schema to VERSION; (version before, after). Safe to run concurrently."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (INIT_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS greenmail_schema (version integer NOT NULL)")
        before = version(conn)
        if before > VERSION:
            raise ConfigError(
                f"the queue's schema is version {before}, newer than this greenmail's {VERSION}"
            )
        for n in range(before, VERSION):
            conn.execute(STEPS[n])
            conn.execute("INSERT INTO greenmail_schema (version) VALUES (%s)", (n + 1,))
    return before, VERSION


def check(conn: Any) -> None:
    """ConfigError unless the schema is the version this greenmail knows."""
    found = version(conn)
    if found != VERSION:
        hint = "run `greenmail queue init`" if found < VERSION else "upgrade greenmail"
        raise ConfigError(f"the queue's schema is version {found}, this greenmail needs {VERSION}: {hint}")
