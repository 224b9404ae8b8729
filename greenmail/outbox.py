"""Delivery policy over a queue: what an attempt's results mean for the message.

Owns: applying the per-recipient results a session reports to the message's
state, the retry schedule (min_backoff doubling to max_backoff, with jitter),
expiry after max_lifetime, the notifications to the sender (bounces for
failed recipients, one "still trying" notice), and the counters of attempts,
recipients, requeues, bounces and expiries. The queue (queue.DeliveryQueue)
stores and moves messages; this module decides.
Must not touch: sockets, files, directory names.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from greenmail import bounce, maillog
from greenmail.config import RetryConfig
from greenmail.layout import HOST
from greenmail.metrics import Metrics
from greenmail.queue import Claim, DeliveryQueue

log = logging.getLogger("greenmail.queue")
bounce_log = logging.getLogger("greenmail.bounce")  # Postfix's bounce service: the notification lines


def direct_call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


@dataclass
class Attempt:
    """What one delivery attempt did, as the session reports it."""

    results: dict[str, tuple[str, str]] = field(default_factory=dict)  # rcpt -> (result, reply)
    error: str | None = None  # what decided the attempt (its last error)
    reason: str = "temporary"  # the requeue reason when recipients are left to try

    def count(self, result: str) -> int:
        return sum(1 for r, _ in self.results.values() if r == result)


class Outbox:
    def __init__(
        self,
        queue: DeliveryQueue,
        retry: RetryConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        shield: Callable[..., Any] = direct_call,
        hostname: str = HOST,
        relay: str | None = None,
        offload: Callable[..., Any] | None = None,
    ) -> None:
        self.queue = queue
        self.retry = retry
        self.hostname = hostname
        self.relay = relay
        self.metrics = metrics
        self.clock = clock
        self.shield = shield  # runs a settling step so that a kill cannot cut it in half
        self.offload = offload or (lambda fn, args=(), kwargs=None: fn(*args, **(kwargs or {})))
        self.started = clock()  # messages older than this were first seen at start-up (delays=a/...)

    @property
    def stopping(self) -> bool:
        return self.queue.stopping

    def take(self) -> Claim | None:
        """The next due message, claimed; None when nothing is due (or stopping)."""
        return self.queue.take()

    def expire_old(self) -> int:
        """Due messages older than max_lifetime fail now, even while the relay is unreachable."""
        expired = 0
        for claim in self.queue.take_older(self.clock() - self.retry.max_lifetime):
            claim.state.last_error = claim.state.last_error or "the relay could not be reached"
            self.finish(claim)  # past max_lifetime: its pending recipients fail as expired
            expired += 1
        return expired

    # -- settling a claim -----------------------------------------------------------

    def finish(self, claim: Claim, attempt: Attempt | None = None) -> str:
        """Settle a claim after an attempt (shielded from kills: see ``shield``).

        Returns "delivered", "deferred" or "failed" (the attempt's result).
        """
        attempt = attempt or Attempt()
        results = attempt.results
        if (
            all(r == "delivered" for r, _ in results.values())
            and len(results) == len(claim.recipients) - len(claim.state.recipients)
            and "failed" not in claim.state.recipients.values()
        ):
            return self._finish(claim, attempt)  # delivered: nothing in it can switch, so no kill lands
        return self.shield(self._finish, claim, attempt)

    def _finish(self, claim: Claim, attempt: Attempt) -> str:
        self._apply(claim, attempt)
        pending = claim.pending()
        age = self.clock() - claim.queued_at
        if pending and age > self.retry.max_lifetime:
            self._expire(claim, pending)
            pending = ()
        self._notify(claim, pending, age)
        next_at = math.ceil(self.clock() + self.jittered(claim.attempts + 1)) if pending else 0  # never early
        result = self.queue.settle(claim, next_at)
        if result == "delivered":
            maillog.emit(log, f"{claim.id}: removed", {"event": "removed", "queue_id": claim.id})
        elif result == "deferred":
            self.metrics.count("requeue", attempt.reason)
        self.metrics.count("attempt", result)
        return result

    def _apply(self, claim: Claim, attempt: Attempt) -> None:
        """Record an attempt's per-recipient results in the claim's state."""
        state = claim.state
        for rcpt, (result, reply) in attempt.results.items():
            if result == "delivered":
                state.recipients[rcpt] = "delivered"
            else:
                state.errors[rcpt] = reply
                if result == "failed":
                    state.recipients[rcpt] = "failed"
            self.metrics.count("recipient", result)
        if attempt.error is not None:
            state.last_error = attempt.error
        if any(r == "delivered" for r, _ in attempt.results.values()):
            self.metrics.observe("delay", max(0.0, time.time() - claim.queued_at))

    def release(self, claim: Claim, reason: str) -> None:
        """Put a claim back untouched (never attempted): due again as before, no attempt counted."""
        self.shield(self._release, claim, reason)

    def _release(self, claim: Claim, reason: str) -> None:
        self.queue.release(claim)
        self.metrics.count("requeue", reason)

    def backoff(self, attempts: int) -> float:
        """Delay before attempt ``attempts + 1``: min_backoff doubling, capped (no jitter)."""
        r = self.retry
        return min(r.max_backoff, r.min_backoff * 2 ** max(0, min(attempts - 1, 60)))

    def jittered(self, attempts: int) -> float:
        """The backoff plus up to a quarter more, so deferrals do not retry in lockstep."""
        delay = self.backoff(attempts)
        return delay + random.uniform(0, delay / 4)

    # -- notifications ---------------------------------------------------------------

    def _notify(self, claim: Claim, pending: tuple[str, ...], age: float) -> None:
        """Bounce newly failed recipients; warn once about long-delayed ones."""
        state = claim.state
        failed = state.unreported_failures()
        if failed:
            self._dsn(claim, failed, "failed")
            state.bounced.extend(failed)
        elif pending and self.retry.delay_warning and age > self.retry.delay_warning and not state.warned:
            self._dsn(claim, list(pending), "delayed")
            state.warned = True

    def _dsn(self, claim: Claim, rcpts: list[str], action: str) -> None:
        sender = claim.sender
        if not self.retry.bounce or not sender:  # never bounce a bounce
            if not sender and action == "failed":
                log.info("%s: null sender: no notification for %d failed recipients", claim.id, len(rcpts))
            return
        errors = claim.state.errors
        failures = [
            bounce.Failure(r, errors.get(r) or claim.state.last_error or "unknown", self.relay) for r in rcpts
        ]
        head = self.offload(claim.read_head, (bounce.MAX_HEADERS,))
        dsn = bounce.build(
            reporting_mta=self.hostname,
            original_sender=sender,
            queue_id=claim.id,
            arrival=claim.queued_at,
            failures=failures,
            original_headers=bounce.header_block(head),
            action=action,
        )
        qid = self.queue.enqueue("", [sender], dsn)
        if action == "failed":
            self.metrics.count("bounce")
        bounce_log.info(
            "%s: sender %s notification: %s", claim.id, "non-delivery" if action == "failed" else "delay", qid
        )

    def _expire(self, claim: Claim, pending: tuple[str, ...]) -> None:
        days = self.retry.max_lifetime / 86400
        why = f"message expired: undeliverable for {days:g} days; last error: {claim.state.last_error}"
        for rcpt in pending:
            claim.state.recipients[rcpt] = "failed"
            claim.state.errors[rcpt] = why
        claim.state.last_error = why
        self.metrics.count("expired")  # the session already counted these recipients for this attempt
        log.warning("%s: %s", claim.id, why)
