"""Which queue backend a configuration names, opened for the commands or for the daemon.

Owns: choosing and building the queue implementation (the maildir
spool, or PostgreSQL shared by several nodes) behind the interfaces of
queue.py, so that the CLI and the daemon never name a backend's module.
Must not touch: what the backends do.
"""

from __future__ import annotations

from typing import Any

from greenmail.addresses import Rewriter
from greenmail.config import Config
from greenmail.queue import DeliveryQueue, QueueAdmin


def admin_queue(cfg: Config) -> QueueAdmin:
    """The queue for enqueue and the operator's commands, created where missing (else SpoolError)."""
    if cfg.queue.backend == "postgresql":
        from greenmail.pgadmin import PgAdmin

        return PgAdmin(cfg.queue.dsn or "", cfg.queue.password_file, rewriter(cfg))
    from greenmail.spool import Spool

    spool = Spool(cfg.spool.path, rewriter=rewriter(cfg))
    spool.ensure()
    return spool


def delivery_queue(cfg: Config, offload: Any, worker: tuple[int, int]) -> DeliveryQueue:
    """The queue as one delivery process of the daemon sees it."""
    if cfg.queue.backend == "postgresql":
        from greenmail.pgqueue import PgQueue

        q = cfg.queue
        batch = cfg.delivery.max_connections
        return PgQueue(
            q.dsn or "", q.password_file, q.lease, worker, node=q.node, connections=10, batch=batch
        )
    from greenmail.spool import Spool
    from greenmail.spoolqueue import SpoolQueue

    spool = Spool(cfg.spool.path, rewriter=rewriter(cfg))
    return SpoolQueue(spool, offload, worker=worker, prune_after=cfg.spool.prune_after)


def rate_limiter(cfg: Config, queue: DeliveryQueue) -> Any:
    """relay.rate_limit: per process on the spool, for the whole cluster on the shared queue."""
    if cfg.queue.backend == "postgresql":
        from greenmail.pglimits import SharedRate

        q: Any = queue
        return SharedRate(q.pool, cfg.relay.rate_limit)
    from greenmail.shaping import RateLimiter

    return RateLimiter(cfg.relay.rate_limit)


def connection_slots(cfg: Config, queue: DeliveryQueue) -> Any:
    """delivery.cluster_max_connections on the shared queue (None: no cluster-wide limit)."""
    if cfg.queue.backend != "postgresql" or not cfg.delivery.cluster_max_connections:
        return None
    from greenmail.pglimits import SharedSlots

    q: Any = queue
    return SharedSlots(q.pool, q.node, cfg.delivery.cluster_max_connections, q.slot_lease)


def reconfigure(queue: DeliveryQueue, cfg: Config) -> None:
    """A reloaded configuration's queue settings (SIGHUP): the rewriting of pickups, pruning."""
    from greenmail.spoolqueue import SpoolQueue

    if isinstance(queue, SpoolQueue):
        queue.spool.rewriter = rewriter(cfg)
        queue.prune_after = cfg.spool.prune_after


def rewriter(cfg: Config) -> Rewriter:
    """The address rewriting of [addresses], applied at submission."""
    return Rewriter(**cfg.addresses.settings())
