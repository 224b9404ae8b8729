"""The peers a workload measures, by the names used on the command line and in the tables."""

from __future__ import annotations

from collections.abc import Callable

from bench.base import BenchError
from bench.peers.anchor import Anchor
from bench.peers.base import Ctx, Peer
from bench.peers.greenmail import Greenmail
from bench.peers.greenmail_pg import GreenmailPg
from bench.peers.namespaced import Dma, Nullmailer
from bench.peers.postfix import Postfix

__all__ = [
    "Anchor",
    "Ctx",
    "Dma",
    "Greenmail",
    "GreenmailPg",
    "Nullmailer",
    "Peer",
    "Postfix",
    "PEERS",
    "make_peer",
]

PEERS: dict[str, Callable[[Ctx], Peer]] = {
    "greenmail": lambda ctx: Greenmail(ctx),
    "greenmail_p2": lambda ctx: Greenmail(ctx, processes=2),
    "greenmail_pg": lambda ctx: GreenmailPg(ctx),
    "greenmail_pg2": lambda ctx: GreenmailPg(ctx, nodes=2),
    "greenmail_pg3": lambda ctx: GreenmailPg(ctx, nodes=3),
    "postfix": lambda ctx: Postfix(ctx),
    "postfix_conns": lambda ctx: Postfix(ctx, match_conns=True),
    "nullmailer": lambda ctx: Nullmailer(ctx),
    "dma": lambda ctx: Dma(ctx),
    "anchor": lambda ctx: Anchor(ctx, reuse=False),
    "anchor_reuse": lambda ctx: Anchor(ctx, reuse=True),
}


def make_peer(ctx: Ctx, name: str) -> Peer:
    if name not in PEERS:
        raise BenchError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    return PEERS[name](ctx)
