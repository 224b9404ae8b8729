"""The ceiling rows: Postfix's smtp-source sending the message file straight into the sink,
with no queue in between."""

from __future__ import annotations

import subprocess

from bench.base import MSG, RCPT, SENDER
from bench.peers.base import Ctx, Peer
from bench.procs import child_log, spawn


class Anchor(Peer):
    """The ceiling: Postfix's smtp-source blasting the message file straight into
    the sink, ``conns`` sessions in parallel; a new connection per message, or
    with -d one connection per session for all its messages (reuse)."""

    queueless = True

    def __init__(self, ctx: Ctx, reuse: bool) -> None:
        super().__init__(ctx)
        self.reuse = reuse
        self.name = "anchor_reuse" if reuse else "anchor"
        self.per_conns = True

    def drain(self, n: int, conns: int) -> subprocess.Popen:
        args = [
            "smtp-source",
            *(["-d"] if self.reuse else []),
            "-s",
            conns,
            "-m",
            n,
            "-f",
            SENDER,
            "-t",
            RCPT,
            "-F",
            MSG,
            f"127.0.0.1:{self.ctx.port}",
        ]
        return spawn(args, stdout=subprocess.DEVNULL, stderr=child_log(self.ctx.rundir / "smtp-source.log"))
