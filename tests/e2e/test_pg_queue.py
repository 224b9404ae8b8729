"""The shared queue on PostgreSQL end to end: real ``greenmail`` commands and daemons, a private
PostgreSQL (tests/pgserver.py) and an aiosmtpd relay on 127.0.0.1.

Schema init, enqueue by command and by SQL inside an application's transaction, the operator's
commands, several nodes draining one queue with every message sent exactly once, a node killed
mid-drain, and PostgreSQL stopped and started again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import support
from aiosmtpd_server import Relay, start_relay

from greenmail import pgschema

pytestmark = pytest.mark.timeout(240)


def psql(dsn: str, sql: str) -> str:
    """Run SQL with psql (the application's side); its unaligned output."""
    r = subprocess.run(
        ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", dsn, "-c", sql],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


def node_config(
    directory: Path, dsn: str, relay_port: int, node: str = "n1", **extra: dict[str, Any]
) -> Path:
    directory.mkdir(exist_ok=True)
    sections: dict[str, dict[str, Any]] = {
        "queue": {"backend": "postgresql", "dsn": dsn, "node": node, "lease": 10},
        "delivery": {"check_interval": 2},
        "retry": {"min_backoff": 1, "max_backoff": 2},
        "addresses": {"origin": "example.org", "hostname": "node.example.org"},
    }
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    return support.write_config(directory, relay_port, **sections)


@pytest.fixture
def relay(tmp_path: Path) -> Any:
    r = start_relay(tmp_path)
    yield r
    r.stop()


@pytest.fixture
def cfg(tmp_path: Path, pg_dsn: str, relay: Relay) -> Path:
    path = node_config(tmp_path / "n1", pg_dsn, relay.port)
    r = support.greenmail("queue", "init", config=path)
    assert r.returncode == 0, r.stderr
    return path


def listed(cfg: Path) -> list[dict[str, Any]]:
    r = support.greenmail("queue", "list", "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def enqueue_command(cfg: Path) -> list[str]:
    """`greenmail enqueue` of one message from a@example.org to b@example.net, its stdin to come."""
    return [
        *support.GREENMAIL,
        "enqueue",
        "--config",
        str(cfg),
        "--from",
        "a@example.org",
        "--to",
        "b@example.net",
    ]


def enqueue_numbered(dsn: str, n: int) -> None:
    """``n`` messages "Subject: m1" ... enqueued by one SQL statement (one notification)."""
    psql(
        dsn,
        "SELECT greenmail_enqueue('a@example.org', ARRAY['r' || i || '@example.net'],"
        " convert_to('Subject: m' || i || chr(10) || chr(10) || 'x', 'UTF8'))"
        f" FROM generate_series(1, {n}) i",
    )


def start_nodes(configs: list[Path], tmp_path: Path) -> list[support.Process]:
    """The schema made, then a daemon per configuration, each waited for until it has started."""
    assert support.greenmail("queue", "init", config=configs[0]).returncode == 0
    nodes = [support.daemon(c, tmp_path / f"n{i}.log") for i, c in enumerate(configs, 1)]
    for node in nodes:
        support.wait_until(lambda node=node: "greenmail started" in node.text(), 15, what="a node's start")
    return nodes


def subjects(relay: Relay) -> Counter[str]:
    out: Counter[str] = Counter()
    for m in relay.messages():
        for line in m.content.splitlines():
            if line.startswith(b"Subject: "):
                out[line[9:].decode()] += len(m.rcpt_tos)
    return out


# -- schema ---------------------------------------------------------------------------------


def test_init_creates_the_schema_once_and_says_so(tmp_path: Path, pg_dsn: str, relay: Relay) -> None:
    path = node_config(tmp_path / "n1", pg_dsn, relay.port)
    before = support.greenmail("queue", "list", config=path)
    assert before.returncode == 78 and b"greenmail queue init" in before.stderr
    procs = [
        subprocess.Popen(
            [*support.GREENMAIL, "queue", "init", "--config", str(path)],
            env=support.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    said = sorted(o[0].decode().strip() for o in outs)
    v = pgschema.VERSION
    assert said == [f"schema version {v} (was none)", *[f"schema version {v}: up to date"] * 2]
    versions = psql(pg_dsn, "SELECT string_agg(version::text, ',' ORDER BY version) FROM greenmail_schema")
    assert versions == ",".join(str(n) for n in range(1, v + 1))


def test_init_migrates_an_older_schema_step_by_step(tmp_path: Path, pg_dsn: str, relay: Relay) -> None:
    path = node_config(tmp_path / "n1", pg_dsn, relay.port)
    psql(pg_dsn, "CREATE TABLE greenmail_schema (version integer NOT NULL)")
    psql(pg_dsn, pgschema.STEPS[0] + "; INSERT INTO greenmail_schema VALUES (1)")
    qid = psql(pg_dsn, "SELECT greenmail_enqueue('a@example.org', ARRAY['b@example.net'], 'x'::bytea)")
    old = support.greenmail("queue", "list", config=path)
    assert old.returncode == 78 and b"version 1" in old.stderr
    r = support.greenmail("queue", "init", config=path)
    assert r.returncode == 0 and r.stdout.decode().strip() == f"schema version {pgschema.VERSION} (was 1)"
    assert [m["id"] for m in listed(path)] == [qid]  # the mail queued before the migration is kept


def test_init_on_the_spool_backend_is_a_usage_error(tmp_path: Path, relay: Relay) -> None:
    path = support.write_config(tmp_path, relay.port)
    r = support.greenmail("queue", "init", config=path)
    assert r.returncode == 64 and b"the spool needs no init" in r.stderr


# -- enqueue ----------------------------------------------------------------------------------


def test_enqueue_stores_rows_with_added_headers_and_each_recipient_once(cfg: Path, pg_dsn: str) -> None:
    qid = support.enqueue(
        cfg, b"Subject: hi\n\nbody \xc3\xa9\n", "app", "b@example.net", "c", "b@example.net"
    )
    [m] = listed(cfg)
    assert m["id"] == qid and m["state"] == "queued" and m["sender"] == "app@example.org"
    assert m["recipients"] == ["b@example.net", "c@example.org"]
    assert m["recipient_states"] == {"b@example.net": "pending", "c@example.org": "pending"}
    assert psql(pg_dsn, f"SELECT eight_bit, uid FROM greenmail_messages WHERE id = '{qid}'") == "t|0"
    shown = support.greenmail("queue", "show", qid, config=cfg)
    assert shown.returncode == 0
    body = shown.stdout.split(b"\n\n", 1)[1]
    assert b"From: <app@example.org>\n" in body and f"Message-ID: <{qid}@node.example.org>".encode() in body
    assert body.endswith(b"Subject: hi\n\nbody \xc3\xa9\n")


def test_bad_input_is_refused_and_leaves_nothing(cfg: Path, pg_dsn: str) -> None:
    empty = support.greenmail("enqueue", "--from", "a@example.org", "--to", "b@example.net", config=cfg)
    assert empty.returncode == 65 and b"empty message" in empty.stderr
    bad = support.greenmail("enqueue", "--from", "a@example.org", "--to", "b c@x", config=cfg, stdin=b"x\n")
    assert bad.returncode == 65
    assert psql(pg_dsn, "SELECT count(*) FROM greenmail_messages") == "0"
    assert psql(pg_dsn, "SELECT count(*) FROM greenmail_chunks") == "0"


def test_sql_enqueue_is_part_of_the_applications_transaction(cfg: Path, pg_dsn: str) -> None:
    psql(
        pg_dsn,
        "BEGIN; SELECT greenmail_enqueue('a@example.org', ARRAY['b@example.net'], 'x'::bytea); ROLLBACK",
    )
    assert listed(cfg) == []
    qid = psql(
        pg_dsn,
        "SELECT greenmail_enqueue('a@example.org', ARRAY['b@example.net', 'c@example.net', 'b@example.net'],"
        " convert_to('Subject: sql' || chr(10) || chr(10) || 'caf' || chr(233), 'UTF8'))",
    )
    [m] = listed(cfg)
    assert m["id"] == qid and len(qid) == 24 and m["recipients"] == ["b@example.net", "c@example.net"]
    assert psql(pg_dsn, f"SELECT eight_bit FROM greenmail_messages WHERE id = '{qid}'") == "t"
    plain = psql(pg_dsn, "SELECT greenmail_enqueue('', ARRAY['b@example.net'], 'plain ascii'::bytea)")
    assert psql(pg_dsn, f"SELECT eight_bit FROM greenmail_messages WHERE id = '{plain}'") == "f"
    for bad in (
        "ARRAY[]::text[], 'x'::bytea",
        "ARRAY['b@example.net'], ''::bytea",
        "ARRAY['a' || chr(10)], 'x'",
    ):
        r = subprocess.run(
            [
                "psql",
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                pg_dsn,
                "-c",
                f"SELECT greenmail_enqueue('a', {bad})",
            ],
            capture_output=True,
            timeout=60,
        )
        assert r.returncode != 0, bad
    assert len(listed(cfg)) == 2


def test_enqueue_exits_75_while_postgresql_cannot_be_reached(tmp_path: Path, relay: Relay) -> None:
    dsn = f"postgresql://greenmail@127.0.0.1:{support.free_port()}/nowhere"
    path = node_config(tmp_path / "n1", dsn, relay.port)
    r = support.greenmail(
        "enqueue", "--from", "a@example.org", "--to", "b@example.net", config=path, stdin=b"x\n"
    )
    assert r.returncode == 75 and b"PostgreSQL is unavailable" in r.stderr
    r = support.greenmail("queue", "list", config=path)
    assert r.returncode == 75


# -- delivery ----------------------------------------------------------------------------------


def test_a_node_delivers_new_mail_within_a_second_and_big_messages_whole(
    tmp_path: Path, cfg: Path, pg_dsn: str, relay: Relay
) -> None:
    d = support.daemon(cfg, tmp_path / "n1.log")
    try:
        support.wait_until(lambda: "greenmail started" in d.text(), 15, what="the daemon's start")
        big = b"Subject: big\n\n" + b"".join(b"line %07d of a big message\n" % i for i in range(200_000))
        support.enqueue(cfg, big, "a@example.org", "b@example.net")
        psql(
            pg_dsn,
            "SELECT greenmail_enqueue('a@example.org', ARRAY['c@example.net'], 'Subject: small'::bytea)",
        )
        support.wait_until(lambda: relay.count() >= 2, 10, what="both messages at the relay")
        [b] = [m for m in relay.messages() if m.rcpt_tos == ["b@example.net"]]
        assert b.content.replace(b"\r\n", b"\n").endswith(big[len(b"Subject: big\n") :])
        support.wait_until(lambda: psql(pg_dsn, "SELECT count(*) FROM greenmail_messages") == "0", 10)
    finally:
        assert d.stop() == 0, d.text()
    assert "(queue active)" in d.text() and "status=sent" in d.text()  # the mail log, complete once stopped


def test_a_refused_recipient_fails_and_the_rest_is_retried_per_recipient(
    tmp_path: Path, pg_dsn: str, relay: Relay
) -> None:
    from faultserver import FaultServer

    script = {"rcpt": {"when": {"bad@example.net": "550 5.1.1 no such user"}, "else": "250 2.1.5 ok"}}
    with FaultServer(script) as fault:
        path = node_config(tmp_path / "n1", pg_dsn, fault.port, retry={"bounce": False})
        assert support.greenmail("queue", "init", config=path).returncode == 0
        qid = support.enqueue(
            path, b"Subject: x\n\nx\n", "a@example.org", "ok@example.net", "bad@example.net"
        )
        r = support.greenmail("run", "--once", config=path)
        assert r.returncode == 0, r.stderr
        [m] = listed(path)
        assert m["id"] == qid and m["state"] == "failed"
        assert m["recipient_states"] == {"ok@example.net": "delivered", "bad@example.net": "failed"}
        assert "550 5.1.1" in psql(pg_dsn, "SELECT reply FROM greenmail_recipients WHERE state = 'failed'")
        retried = support.greenmail("queue", "retry", qid, config=path)
        assert retried.returncode == 0 and listed(path)[0]["recipient_states"]["bad@example.net"] == "pending"


def test_hold_release_and_delete_across_nodes(tmp_path: Path, cfg: Path, pg_dsn: str, relay: Relay) -> None:
    held = support.enqueue(cfg, b"Subject: held\n\nx\n", "a@example.org", "h@example.net")
    gone = support.enqueue(cfg, b"Subject: gone\n\nx\n", "a@example.org", "g@example.net")
    other = node_config(tmp_path / "n2", pg_dsn, relay.port, node="n2")
    assert support.greenmail("queue", "hold", held, config=other).stdout.decode().strip() == f"{held}: held"
    assert (
        support.greenmail("queue", "hold", held, config=cfg).stdout.decode().strip()
        == f"{held}: already held"
    )
    assert support.greenmail("queue", "delete", gone, config=other).returncode == 0
    missing = support.greenmail("queue", "delete", gone, config=cfg)
    assert missing.returncode == 65 and b"no such message" in missing.stderr
    d = support.daemon(cfg, tmp_path / "n1.log")
    try:
        support.wait_until(lambda: "greenmail started" in d.text(), 15, what="the daemon's start")
        sent = support.enqueue(cfg, b"Subject: sent\n\nx\n", "a@example.org", "s@example.net")
        support.wait_until(lambda: relay.count() >= 1, 10, what="the message that is not held")
        assert [m["id"] for m in listed(cfg)] == [held] and subjects(relay) == {"sent": 1}
        assert relay.message_ids() == [f"<{sent}@node.example.org>"]
        assert support.greenmail("queue", "release", held, config=other).returncode == 0
        support.wait_until(lambda: relay.count() >= 2, 5, what="the released message")
        assert sorted(subjects(relay)) == ["held", "sent"]
    finally:
        assert d.stop() == 0, d.text()


def test_three_nodes_drain_one_queue_and_send_every_message_exactly_once(
    tmp_path: Path, pg_dsn: str, relay: Relay
) -> None:
    configs = [node_config(tmp_path / f"n{i}", pg_dsn, relay.port, node=f"n{i}") for i in (1, 2, 3)]
    n = 300
    nodes = start_nodes(configs, tmp_path)
    try:
        enqueue_numbered(pg_dsn, n)
        support.wait_until(lambda: relay.count() >= n, 60, interval=0.2, what=f"{n} messages at the relay")
        support.wait_until(lambda: psql(pg_dsn, "SELECT count(*) FROM greenmail_messages") == "0", 15)
        got = subjects(relay)
        assert got == Counter({f"m{i}": 1 for i in range(1, n + 1)})
    finally:
        for node in nodes:
            assert node.stop() == 0, node.text()
    senders = [node.text().count("status=sent") for node in nodes]  # the logs are complete once stopped
    assert sum(senders) == n and all(senders), senders  # every node took part


def test_a_node_killed_mid_drain_leaves_nothing_behind(tmp_path: Path, pg_dsn: str) -> None:
    slow = start_relay(tmp_path, "slow", delay_data=0.3)  # messages in flight when the kill comes
    try:
        configs = [node_config(tmp_path / f"n{i}", pg_dsn, slow.port, node=f"n{i}") for i in (1, 2)]
        assert support.greenmail("queue", "init", config=configs[0]).returncode == 0
        n = 60
        enqueue_numbered(pg_dsn, n)
        victim = support.daemon(configs[0], tmp_path / "n1.log")
        support.wait_until(lambda: "status=sent" in victim.text(), 20, what="the first node sending")
        in_flight = int(psql(pg_dsn, "SELECT count(*) FROM greenmail_messages WHERE lease_owner = 'n1/0'"))
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        survivor = support.daemon(configs[1], tmp_path / "n2.log")
        try:
            # the victim's claims come back when their lease (10 s) ends: everything is sent
            support.wait_until(
                lambda: psql(pg_dsn, "SELECT count(*) FROM greenmail_messages") == "0",
                90,
                interval=0.5,
                what="the queue drained by the survivor",
            )
            got = subjects(slow)
            assert set(got) == {f"m{i}" for i in range(1, n + 1)}
            duplicates = sum(c - 1 for c in got.values())
            assert duplicates <= in_flight, (duplicates, in_flight)
        finally:
            assert survivor.stop() == 0, survivor.text()
    finally:
        slow.stop()


def test_postgresql_stopped_under_load_loses_nothing_and_the_node_recovers(
    tmp_path: Path, relay: Relay
) -> None:
    import pgserver

    with pgserver.temporary() as server:
        dsn = server.create_database("outage")
        path = node_config(
            tmp_path / "n1", dsn, relay.port, metrics={"listen": f"127.0.0.1:{support.free_port()}"}
        )
        assert support.greenmail("queue", "init", config=path).returncode == 0
        port = int(path.read_text().split('listen = "127.0.0.1:')[1].split('"')[0])
        d = support.daemon(path, tmp_path / "n1.log")
        try:
            support.wait_until(lambda: healthz(port) == 200, 15, what="a healthy node")
            first = [support.enqueue(path, f"Subject: a{i}\n\nx\n".encode()) for i in range(5)]
            server.stop()
            r = support.greenmail(
                "enqueue",
                "--from",
                "a@example.org",
                "--to",
                "b@example.net",
                config=path,
                stdin=b"Subject: refused\n\nx\n",
            )
            assert r.returncode == 75
            support.wait_until(lambda: healthz(port) == 503, 15, what="/healthz 503 while PostgreSQL is down")
            assert d.proc.poll() is None  # the node keeps running
            server.start_again()
            support.wait_until(lambda: healthz(port) == 200, 30, what="/healthz 200 again")
            later = [support.enqueue(path, f"Subject: b{i}\n\nx\n".encode()) for i in range(5)]
            support.wait_until(lambda: relay.count() >= 10, 30, what="all ten messages")
            assert set(subjects(relay)) == {f"a{i}" for i in range(5)} | {f"b{i}" for i in range(5)}
            assert len(first + later) == 10
        finally:
            assert d.stop() == 0, d.text()


def healthz(port: int) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_the_listener_writes_into_the_shared_queue_and_metrics_count_it(
    tmp_path: Path, pg_dsn: str, relay: Relay
) -> None:
    import smtplib
    import urllib.request

    listen, metrics = support.free_port(), support.free_port()
    path = node_config(
        tmp_path / "n1",
        pg_dsn,
        relay.port,
        listener={"listen": [f"127.0.0.1:{listen}"]},
        metrics={"listen": f"127.0.0.1:{metrics}"},
    )
    assert support.greenmail("queue", "init", config=path).returncode == 0
    held = support.enqueue(path, b"Subject: held\n\nx\n")
    assert support.greenmail("queue", "hold", held, config=path).returncode == 0
    d = support.daemon(path, tmp_path / "n1.log")
    try:
        support.wait_port(listen, 15)
        lines = b"".join(b"line %06d of the listener's message\r\n" % i for i in range(10_000))
        big = b"Subject: via the listener\r\n\r\n" + lines
        with smtplib.SMTP("127.0.0.1", listen, timeout=30) as smtp:
            smtp.sendmail("a@example.org", ["l@example.net"], big)
        support.wait_until(lambda: relay.count() >= 1, 10, what="the listener's message at the relay")
        [m] = relay.messages()
        assert m.rcpt_tos == ["l@example.net"] and m.content.endswith(lines)

        def held_gauge() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
                text = r.read().decode()
            return 'greenmail_spool_messages{state="held"} 1.0' in text

        support.wait_until(held_gauge, 10, what="the held message in the queue's gauge")
        enqueue_numbered(pg_dsn, 2)  # from an application: received{source="local"}
        support.wait_until(lambda: relay.count() >= 3, 10, what="the application's two messages")

        def received() -> list[str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
                return [
                    ln
                    for ln in r.read().decode().splitlines()
                    if ln.startswith("greenmail_messages_received")
                ]

        want = [
            'greenmail_messages_received_total{source="smtp"} 1.0',
            'greenmail_messages_received_total{source="local"} 2.0',
        ]
        try:
            support.wait_until(
                lambda: all(w in received() for w in want), 10, what="received: 1 by SMTP, 2 local"
            )
        except AssertionError as e:
            raise AssertionError(f"{e}: {received()}") from None
    finally:
        assert d.stop() == 0, d.text()


def test_a_claim_taken_over_is_never_sent_by_the_node_that_lost_it(tmp_path: Path, pg_dsn: str) -> None:
    """The lease of a message in flight ends (here: returned to the queue behind the node's back,
    as another node's check does with an expired lease): the heartbeat notices, the session stops
    before the final dot, and the message is sent exactly once, by whoever claims it next."""
    from faultserver import FaultServer

    script = {"data": {"wait": 6, "reply": "354 go ahead"}}  # every DATA waits: time to take the lease away
    with FaultServer(script) as fault:
        path = node_config(tmp_path / "n1", pg_dsn, fault.port, timeouts={"data_init": 20})
        assert support.greenmail("queue", "init", config=path).returncode == 0
        d = support.daemon(path, tmp_path / "n1.log")
        try:
            support.wait_until(lambda: "greenmail started" in d.text(), 15, what="the daemon's start")
            qid = support.enqueue(path, b"Subject: once\n\nx\n")
            active = f"SELECT count(*) FROM greenmail_messages WHERE id = '{qid}' AND status = 'active'"
            support.wait_until(lambda: psql(pg_dsn, active) == "1", 10, what="the message claimed")
            support.wait_until(lambda: "DATA" in fault.verbs(), 10, what="DATA sent")
            psql(
                pg_dsn,
                "UPDATE greenmail_messages SET status = 'queued', lease_owner = NULL, lease_until = NULL,"
                f" lease_token = NULL WHERE id = '{qid}'",
            )
            support.wait_until(lambda: len(fault.messages) >= 1, 20, what="the message sent once")
            support.wait_until(lambda: psql(pg_dsn, "SELECT count(*) FROM greenmail_messages") == "0", 20)
            support.wait_until(
                lambda: "lease on it ended" in d.text(), 20, what="the first session giving up"
            )
            assert len(fault.messages) == 1
        finally:
            assert d.stop() == 0, d.text()


def test_the_rate_limit_is_a_total_for_the_whole_cluster(tmp_path: Path, pg_dsn: str, relay: Relay) -> None:
    rate, n = 5, 16
    configs = [
        node_config(
            tmp_path / f"n{i}",
            pg_dsn,
            relay.port,
            node=f"n{i}",
            relay={"rate_limit": rate},
            delivery={"max_connections": 1},  # one message claimed at a time: both nodes take turns
        )
        for i in (1, 2)
    ]
    nodes = start_nodes(configs, tmp_path)
    try:
        enqueue_numbered(pg_dsn, n)
        support.wait_until(lambda: relay.count() >= n, 30, interval=0.1, what=f"{n} messages at the relay")
        times = sorted(p.stat().st_mtime for p in relay.out.glob("[0-9]*.json"))
    finally:
        for node in nodes:
            assert node.stop() == 0, node.text()
    senders = [node.text().count("status=sent") for node in nodes]
    assert all(senders), senders  # both nodes sent: the limit is theirs together
    # n messages at `rate` per second from both nodes together take at least (n - 1) / rate
    # (at `rate` each they would take half as long)
    assert times[-1] - times[0] >= (n - 1) / rate * 0.9, (times[-1] - times[0], senders)


def test_cluster_max_connections_caps_the_connections_of_all_nodes_together(
    tmp_path: Path, pg_dsn: str
) -> None:
    from faultserver import FaultServer

    with FaultServer({"data": {"wait": 0.3, "reply": "354 go ahead"}}) as fault:  # connections stay open
        configs = [
            node_config(tmp_path / f"n{i}", pg_dsn, fault.port, node=f"n{i}",
                        delivery={"max_connections": 10, "cluster_max_connections": 3})
            for i in (1, 2)
        ]  # fmt: skip
        nodes = start_nodes(configs, tmp_path)
        try:
            enqueue_numbered(pg_dsn, 30)
            support.wait_until(lambda: len(fault.messages) >= 30, 60, interval=0.1, what="30 messages sent")
            support.wait_until(lambda: psql(pg_dsn, "SELECT count(*) FROM greenmail_messages") == "0", 10)
            assert 2 <= fault.max_concurrent <= 3, fault.max_concurrent
            got = Counter(
                ln for m in fault.messages for ln in m["data"].splitlines() if ln.startswith(b"Subject")
            )
            assert len(got) == 30 and set(got.values()) == {1}  # each once
            # idle again: the slots go back (a node that stops gives its own back)
            support.wait_until(
                lambda: psql(pg_dsn, "SELECT coalesce(sum(n), 0) FROM greenmail_slots") == "0", 10
            )
        finally:
            for node in nodes:
                assert node.stop() == 0, node.text()


def test_sendmail_and_mailq_work_on_the_shared_queue(cfg: Path, pg_dsn: str) -> None:
    msg = b"To: someone@example.net, ops\nSubject: from php\n\nbody\n"
    r = support.greenmail("sendmail", "-C", str(cfg), "-t", "-i", "-f", "www@example.org", stdin=msg)
    assert r.returncode == 0, r.stderr
    [m] = listed(cfg)
    assert m["sender"] == "www@example.org" and m["recipients"] == ["someone@example.net", "ops@example.org"]
    q = support.greenmail("sendmail", "-C", str(cfg), "-bp")
    assert q.returncode == 0 and m["id"] in q.stdout.decode() and "1 Request" in q.stdout.decode()
    assert psql(pg_dsn, "SELECT uid FROM greenmail_messages") == "0"


def test_enqueue_needs_no_psycopg_and_a_big_message_still_arrives_whole(
    tmp_path: Path, cfg: Path, pg_dsn: str
) -> None:
    """A process per message: `greenmail enqueue` stores through libpq alone (psycopg made
    unimportable here), from the settings cache; a message too big to hold in memory goes the
    psycopg way, streamed."""
    blocker = tmp_path / "no-psycopg"
    (blocker / "psycopg").mkdir(parents=True)
    (blocker / "psycopg" / "__init__.py").write_text("raise ImportError('psycopg is not to be imported')\n")
    env = {**support.env(), "PYTHONPATH": f"{blocker}:{support.env()['PYTHONPATH']}"}
    cmd = enqueue_command(cfg)
    for _ in range(2):  # the first loads the configuration and leaves the cache, the second reads it
        r = subprocess.run(cmd, input=b"Subject: light\n\nx\n", capture_output=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
    assert len(listed(cfg)) == 2
    big = b"Subject: big\n\n" + b"z" * 70 + b"\n"
    big += (b"z" * 70 + b"\n") * (9 * 1024 * 1024 // 71)  # over the 8 MiB held in memory
    r = subprocess.run(cmd, input=big, capture_output=True, env=support.env(), timeout=120)
    assert r.returncode == 0, r.stderr
    qid = r.stdout.decode().strip()
    shown = support.greenmail("queue", "show", qid, config=cfg, timeout=120)
    assert shown.returncode == 0 and shown.stdout.endswith(big[len(b"Subject: big\n") :])
    size = int(psql(pg_dsn, f"SELECT size FROM greenmail_messages WHERE id = '{qid}'"))
    assert size > 9 * 1024 * 1024 and psql(
        pg_dsn, f"SELECT count(*) FROM greenmail_chunks WHERE message_id = '{qid}'"
    ) == str((size + 65535) // 65536)


def test_a_password_in_the_dsn_never_reaches_the_settings_cache_or_the_log(
    tmp_path: Path, relay: Relay
) -> None:
    path = node_config(tmp_path / "n1", "postgresql://greenmail:s3cret-pw@127.0.0.1:1/x", relay.port)
    r = support.greenmail("config", "check", config=path)
    assert r.returncode == 0 and b"s3cret-pw" not in r.stdout and b"greenmail:***@127.0.0.1" in r.stdout
    e = support.greenmail(
        "enqueue", "--from", "a@example.org", "--to", "b@example.net", config=path, stdin=b"x\n"
    )
    assert e.returncode == 75 and b"s3cret-pw" not in e.stderr  # nothing listens on port 1
    files = [f for f in path.parent.iterdir() if f.is_file()]
    assert any(f.name.endswith(".cache") for f in files), files  # the full load left its cache
    assert [f for f in files if b"s3cret-pw" in f.read_bytes()] == [path]


def test_several_delivery_processes_are_nodes_of_their_own(tmp_path: Path, pg_dsn: str, relay: Relay) -> None:
    path = node_config(tmp_path / "n1", pg_dsn, relay.port, delivery={"processes": 2, "max_connections": 4})
    [d] = start_nodes([path], tmp_path)
    try:
        nodes = "SELECT string_agg(name, ',' ORDER BY name) FROM greenmail_nodes"
        support.wait_until(lambda: psql(pg_dsn, nodes) == "n1/0,n1/1", 15, what="both delivery processes")
        enqueue_numbered(pg_dsn, 1000)
        support.wait_until(lambda: relay.count() >= 1000, 60, interval=0.1, what="1000 messages at the relay")
        support.wait_until(lambda: psql(pg_dsn, "SELECT count(*) FROM greenmail_messages") == "0", 10)
        assert subjects(relay) == Counter({f"m{i}": 1 for i in range(1, 1001)})
    finally:
        assert d.stop() == 0, d.text()
    senders = {
        line.split("[", 1)[1].split("]", 1)[0] for line in d.text().splitlines() if "status=sent" in line
    }
    assert len(senders) == 2, senders  # both processes sent (the pid in each mail log line)


def test_mail_past_its_lifetime_fails_while_the_relay_is_down_more_than_one_round_of_it(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Expiry claims EXPIRE messages at a time: 300 old ones all fail (and bounce) in one run."""
    from greenmail.pgqueue import EXPIRE

    old = EXPIRE + 44
    config = node_config(tmp_path / "n1", pg_dsn, support.free_port(), retry={"max_lifetime": 3600})
    assert support.greenmail("queue", "init", config=config).returncode == 0
    enqueue_numbered(pg_dsn, old)
    psql(pg_dsn, "UPDATE greenmail_messages SET queued_at = now() - interval '2 hours'")
    fresh = support.enqueue(config, b"Subject: new\n\nbody\n")

    r = support.greenmail("run", "--once", config=config, timeout=120)  # nobody listens on the relay port
    assert r.returncode == 0, r.stderr
    listing = {m["id"]: m for m in listed(config)}
    failed = [m for m in listing.values() if m["state"] == "failed"]
    assert len(failed) == old and all("expired" in m["last_error"] for m in failed)
    assert listing[fresh]["state"] == "queued" and listing[fresh]["attempts"] == 0
    bounces = [m for m in listing.values() if m["sender"] == ""]
    assert len(bounces) == old and {b["recipients"][0] for b in bounces} == {"a@example.org"}


def test_a_psycopg_older_than_3_2_is_refused_by_name(tmp_path: Path, cfg: Path) -> None:
    """Debian 12's python3-psycopg is 3.1.7: the daemon says so at start (exit 78), rather than
    failing later at its first wait for notifications."""
    old = tmp_path / "old-psycopg" / "psycopg"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text('__version__ = "3.1.7"\n')  # what the daemon reads of it
    env = {**support.env(), "PYTHONPATH": f"{old.parent}{os.pathsep}{support.ROOT}"}
    r = subprocess.run(
        [*support.GREENMAIL, "run", "--once", "--config", str(cfg)], capture_output=True, env=env, timeout=60
    )
    assert r.returncode == 78, r.stderr
    assert b"needs psycopg 3.2 or later (found 3.1.7)" in r.stderr


def test_sendmail_q_with_no_node_running_delivers_the_queue_itself(cfg: Path, relay: Relay) -> None:
    support.enqueue(cfg, b"Subject: queued\n\nx\n")
    r = support.greenmail("sendmail", "-C", str(cfg), "-q")
    assert r.returncode == 0, r.stderr
    assert subjects(relay) == {"queued": 1} and listed(cfg) == []


def test_an_enqueue_killed_before_its_message_ends_leaves_nothing(cfg: Path, pg_dsn: str) -> None:
    cmd = enqueue_command(cfg)
    for size in (100_000, 12 * 1024 * 1024):  # held in memory; streamed through psycopg
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=support.env())
        assert p.stdin is not None
        p.stdin.write(b"Subject: cut\n\n" + b"x" * 70 + b"\n" * (size // 71))
        p.stdin.flush()
        p.kill()
        p.wait(10)
        p.stdin.close()
    assert psql(pg_dsn, "SELECT count(*) FROM greenmail_messages") == "0"
    assert psql(pg_dsn, "SELECT count(*) FROM greenmail_chunks") == "0"


def test_a_big_enqueue_is_never_whole_in_memory(tmp_path: Path, cfg: Path, pg_dsn: str) -> None:
    size = 64 * 1024 * 1024
    message = tmp_path / "big.eml"
    with open(message, "wb") as f:
        f.write(b"Subject: big\n\n")
        f.write((b"y" * 99 + b"\n") * (size // 100))
    time_tool = support.need_tool("time", "time")
    cmd = [
        time_tool,
        "-f",
        "%M",
        *support.GREENMAIL,
        "enqueue",
        "--config",
        str(cfg),
        "--from",
        "a@example.org",
    ]
    with open(message, "rb") as stdin:
        r = subprocess.run(
            [*cmd, "--to", "b@example.net"], stdin=stdin, capture_output=True, env=support.env(), timeout=120
        )
    assert r.returncode == 0, r.stderr
    peak_kb = int(r.stderr.decode().strip().splitlines()[-1])
    assert peak_kb < 100 * 1024, peak_kb  # far below the 64 MiB message (and its copies)
    assert int(psql(pg_dsn, "SELECT size FROM greenmail_messages")) > size
