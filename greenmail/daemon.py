"""Composition root and lifecycle of ``greenmail run``.

Owns: putting the pieces together, the owner lock, recovery of dead
daemons' claims, the metrics HTTP server, the scheduler and wake-up
greenlets (with a fatal handler: a silently dead scheduler is the worst
failure a queue runner can have), telling systemd how it is (READY=1 when
healthy, WATCHDOG=1 while the heartbeat is fresh, STOPPING=1), signals
(SIGUSR1: reopen the log file), and the graceful stop: stop
opening connections, let in-flight transactions finish within the grace
period, put back whatever is unfinished, exit 0.
Must not touch: SMTP details, file formats.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import time
from collections.abc import Sequence
from typing import Any

import gevent
from gevent import GreenletExit
from gevent.event import Event
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from greenmail import backends, logfmt, reload
from greenmail.config import Config, load
from greenmail.connection import Transport
from greenmail.errors import ConfigError
from greenmail.listener import Listener
from greenmail.metrics import Metrics, wsgi_app
from greenmail.notify import Notifier
from greenmail.outbox import Outbox
from greenmail.scheduler import Scheduler
from greenmail.session import Session
from greenmail.shaping import Throttle
from greenmail.workers import Link, Reports, Supervisor, share_config

log = logging.getLogger("greenmail")
LOG_INTERVAL = 0.2  # seconds: how long a log line may wait to be written with others
READY_POLL = 0.1  # seconds between looks at the health while starting (READY=1 for systemd)
HTTP_CLIENTS = 16  # /metrics and /healthz connections served at once
HTTP_TIMEOUT = 10.0  # seconds an HTTP client may be idle
HARMLESS = (signal.SIGUSR2,)  # logged, never fatal (SIGHUP reloads, SIGUSR1 reopens logs; SIGPIPE ignored)


class _MetricsServer(WSGIServer):
    """/metrics and /healthz: at most HTTP_CLIENTS at once (others wait to be accepted), idle ones dropped.

    So HTTP clients cannot take the descriptors delivery needs.
    """

    def handle(self, sock: Any, address: Any) -> None:
        sock.settimeout(HTTP_TIMEOUT)
        super().handle(sock, address)


def offload(fn: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
    """Run blocking file I/O in the hub's threadpool.

    If the calling greenlet is killed while the thread works, the operation
    is still waited for before the kill goes on: a rename whose outcome is
    unknown would be worse than a late stop.
    """
    result = gevent.get_hub().threadpool.spawn(fn, *args, **(kwargs or {}))
    try:
        return result.get()
    except GreenletExit:
        result.get()
        raise


def _write_logs() -> None:
    """Pending log lines reach the log within LOG_INTERVAL, even when no more come."""
    while True:
        gevent.sleep(LOG_INTERVAL)
        logfmt.flush()


def shielded(fn: Any, *args: Any) -> Any:
    """Run ``fn`` in its own greenlet; a kill of the caller waits for it to finish.

    Settling a claim (bounce, state, rename, counters) is one step: killed
    half-way it would leave the counters, the bounce and the file out of step.
    """
    g = gevent.spawn(fn, *args)
    try:
        return g.get()
    except GreenletExit:
        g.join()
        raise


class Daemon:
    """``greenmail run``: delivery process ``worker`` = (K, N); process 0 supervises the others.

    ``args`` are the command's options, for the children (``delivery.processes`` > 1).
    """

    def __init__(
        self,
        config: Config,
        once: bool = False,
        worker: tuple[int, int] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        worker = worker or (0, config.delivery.processes)
        self.worker = worker
        # process 0 speaks for the service; the variables are removed so no child inherits them
        self.notifier = Notifier.from_environ() if worker[0] == 0 else Notifier(None)
        self.metrics = Metrics(config.delivery.max_connections)  # the total, whichever the share
        config = share_config(config, worker)
        self.cfg = config
        self.once = once
        self.supervisor: Supervisor | None = None
        self.link: Link | None = None
        if worker[0] == 0 and worker[1] > 1:
            reports = Reports()
            self.metrics.others = reports.snapshots
            grace = config.delivery.shutdown_grace
            self.supervisor = Supervisor(worker[1], list(args), reports, once, grace)
        self.queue = backends.delivery_queue(config, offload, worker)
        self.metrics.queue_gauges = self.queue.gauges
        self.helo = config.relay.helo or socket.getfqdn()
        self.outbox = Outbox(
            self.queue,
            config.retry,
            self.metrics,
            hostname=self.helo,
            relay=config.relay.relays[0][0],
            shield=shielded,
            offload=offload,
        )
        self.throttle = Throttle(config.delivery.max_connections)
        self.limiter = backends.rate_limiter(config, self.queue)
        self.transport = Transport.build(
            config.relay, config.timeouts, self.metrics, self.helo, self.throttle
        )
        self.scheduler = Scheduler(
            config,
            self.queue,
            self.outbox,
            self.metrics,
            self._new_session,
            self.throttle,
            reconnect=not once,
            slots=backends.connection_slots(config, self.queue),
        )
        self.http: WSGIServer | None = None
        self.listener: Listener | None = None
        self._stop = Event()
        self._signalled = Event()
        self._fatal: BaseException | None = None

    def _new_session(self, on_greeted: Any) -> Any:
        return Session(self.transport, self.outbox, on_greeted, self.limiter, offload).run

    def run(self) -> int:
        """Run until stopped (or, with --once, until the pass is over); the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):  # first: a signal now still stops cleanly
            gevent.signal_handler(sig, self._on_signal, sig)
        for sig in HARMLESS:  # an operator's habit must never kill the daemon
            gevent.signal_handler(sig, self._on_harmless, sig)
        gevent.signal_handler(signal.SIGUSR1, self._reopen_logs)
        gevent.signal_handler(signal.SIGHUP, self._reload)
        moved = self.queue.open()
        try:
            if self.worker[0]:
                self._start_link()
            elif not self.once:
                if config_listens(self.cfg):  # first: once /metrics answers, the listener does too
                    self.listener = Listener(
                        self.cfg.listener,
                        self.queue.incoming,
                        backends.rewriter(self.cfg),
                        self.metrics,
                        offload,
                    )
                    self.listener.start()
                self._start_http()
            if self.supervisor is not None:
                self.supervisor.start()  # first: the children start up while this process does
            k, n = self.worker
            log.info(
                "greenmail started: %s relay=%s tls=%s max_connections=%d check_interval=%gs%s%s",
                self.queue.where, ",".join(f"{h}:{p}" for h, p in self.cfg.relay.relays),
                self.cfg.relay.tls_mode,
                self.cfg.delivery.max_connections, self.cfg.delivery.check_interval,
                f", delivery process {k}/{n}" if n > 1 else "",
                f", {moved} claims of dead daemons returned" if moved else "",
                extra={"fields": {"event": "start"}},
            )  # fmt: skip
            self._start(("once", self._run_once) if self.once else ("scheduler", self.scheduler.run))
            if not self.once:
                self._start(("wake-up watcher", self.scheduler.watch))
            self._start(("log writer", _write_logs))
            if self.notifier.enabled and not self.once:
                self._start(("systemd notifier", self._notify_systemd))
            self._stop.wait()
            self.notifier.stopping("stopping: finishing the transactions in flight")
            self._graceful_stop()
        finally:
            if self.supervisor is not None and not self.supervisor.stopping:
                self.supervisor.stop()  # an error ended this process: the children go too
                self.supervisor.join()
            if self.link is not None:
                self.link.last_report()
            if self.http is not None:
                self.http.stop(timeout=1)
            self.queue.close()
        if self.supervisor is not None and self.supervisor.failed:
            log.error("a delivery process ended with an error", extra={"fields": {"event": "stop"}})
            return 1
        if self._fatal is not None:
            log.critical(
                "greenmail stopped after a fatal error: %r", self._fatal, extra={"fields": {"event": "stop"}}
            )
            return 1
        log.info("greenmail stopped", extra={"fields": {"event": "stop"}})
        return 0

    def _on_signal(self, sig: int) -> None:
        log.info("signal %s: stopping", signal.Signals(sig).name)
        self._signalled.set()
        self._stop.set()

    def _on_harmless(self, sig: int) -> None:
        log.info("signal %s: nothing to do (greenmail goes on)", signal.Signals(sig).name)

    def _reload(self) -> None:
        """SIGHUP: read the configuration again; apply what can change live, keep the rest (logged).

        A file that does not load keeps every old setting. The delivery processes get the
        signal too and reload on their own. Sessions in flight finish with the old settings.
        """
        self._signal_children(signal.SIGHUP)
        try:
            new = share_config(load_config(self.cfg.source), self.worker)
            helo = new.relay.helo or socket.getfqdn()
            transport = Transport.build(new.relay, new.timeouts, self.metrics, helo, self.throttle)
        except ConfigError as e:
            log.error("signal SIGHUP: configuration not reloaded, the old settings stay: %s", e)
            return
        live, restart = reload.changes(self.cfg, new)
        for key in restart:
            log.warning("signal SIGHUP: %s changed: needs a restart (the old value stays until then)", key)
        self.cfg = self.scheduler.cfg = _keep(new, self.cfg)
        self.transport, self.helo = transport, helo
        self.outbox.retry = new.retry
        self.limiter.rate = new.relay.rate_limit
        self.throttle.set_limit(new.delivery.max_connections)
        if self.worker[0] == 0:
            self.metrics.max_connections = self.cfg.delivery.max_connections * self.worker[1]
        backends.reconfigure(self.queue, new)
        self.scheduler.fill()  # a higher limit opens sessions now
        log.info(
            "signal SIGHUP: configuration reloaded%s",
            f": {', '.join(live)} changed" if live else " (no setting changed)",
            extra={"fields": {"event": "reload", "changed": live, "need_restart": restart}},
        )

    def _signal_children(self, sig: int) -> None:
        if self.supervisor is not None:
            for proc in list(self.supervisor.procs.values()):
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)

    def _reopen_logs(self) -> None:
        """SIGUSR1: reopen the log file (after logrotate), in the delivery processes too."""
        files = logfmt.reopen()
        self._signal_children(signal.SIGUSR1)
        log.info("signal SIGUSR1: %s", "log file reopened" if files else "no log file to reopen")

    def _notify_systemd(self) -> None:
        """READY=1 once /healthz would answer 200; then WATCHDOG=1 at half the watchdog interval,
        only while the periodic check's heartbeat is fresh: a hung check stops the pings."""
        while not (health := self._healthy())[0]:
            if self._stop.wait(READY_POLL):
                return
        self.notifier.ready(f"running ({health[1]})")
        interval = self.notifier.watchdog_interval
        withheld = False
        while interval and not self._stop.is_set():  # after STOPPING=1 systemd no longer watches
            problem = self._heartbeat_problem()
            if problem is None:
                self.notifier.watchdog()
                if withheld:
                    log.info("periodic check fine again: watchdog notifications resume")
                    self.notifier.status("running")
            elif not withheld:
                log.error("%s: no watchdog notification until a periodic check succeeds", problem)
                self.notifier.status(f"no watchdog notification: {problem}")
            withheld = problem is not None
            self._stop.wait(interval / 2)

    def _fatal_error(self, greenlet: gevent.Greenlet) -> None:
        self._fatal = greenlet.exception
        log.critical("%s died: %r", getattr(greenlet, "name", "greenlet"), greenlet.exception)
        self._stop.set()

    def _start_link(self) -> None:
        """A child: report metrics to the supervisor; stop when it is gone."""
        link = self.link = Link(self.metrics, self._stop.set)
        self._start(("supervisor watcher", link.watch_parent))
        self._start(("metrics reporter", link.report_forever))

    def _start_http(self) -> None:
        addr = self.cfg.metrics.address
        if addr is None:
            return
        app = wsgi_app(self.metrics, self._healthy)
        error_log = logging.getLogger("greenmail.http")
        self.http = _MetricsServer(addr, app, log=None, error_log=error_log, spawn=Pool(HTTP_CLIENTS))
        self.http.start()
        log.info("metrics on http://%s:%d/metrics", *self.http.address[:2])

    def _heartbeat_problem(self) -> str | None:
        """What is wrong with the periodic check's heartbeat (None: it beat within 3 intervals)."""
        last = self.scheduler.last_check
        if not last:
            return "no periodic check has run yet"
        age = time.time() - last
        if age > 3 * self.cfg.delivery.check_interval:
            return f"stale: last periodic check {age:.1f}s ago"
        return None

    def _healthy(self) -> tuple[bool, str]:
        for problem in (self.scheduler.problem, self.queue.problem(), self._heartbeat_problem()):
            if problem is not None:
                if "Too many open files" in problem:
                    problem = f"out of file descriptors (ulimit -n): {problem}"
                return False, problem
        age = time.time() - self.scheduler.last_check
        missing = self.supervisor.missing() if self.supervisor is not None else []
        if missing:
            return False, f"delivery process {missing[0]}/{self.worker[1]} not running (restarting)"
        return True, f"ok: last periodic check {age:.1f}s ago"

    def _start(self, job: tuple[str, Any]) -> None:
        g = gevent.spawn(job[1])
        g.name = job[0]
        g.link_exception(self._fatal_error)

    def _run_once(self) -> None:
        """One pass: every due message gets an attempt; then stop."""
        sched = self.scheduler
        sched.check()
        while not self._stop.is_set():
            sched.pool.join()
            if (sched.idle() or not sched.fill()) and not len(sched.pool):
                break
        self._stop.set()

    def _graceful_stop(self) -> None:
        sup = self.supervisor
        if sup is not None and not (self.once and not self._signalled.is_set()):
            sup.stop()  # the children stop while this process does
        listening = None
        if self.listener is not None:  # no new submissions; those in progress get the grace period
            listening = gevent.spawn(self.listener.stop, self.cfg.delivery.shutdown_grace)
        self._stop_sessions()
        if listening is not None:
            listening.join()
        if sup is not None:
            if self.once:
                sup.wait(self._signalled)  # their passes end in their own time
                sup.stop()
            sup.join()

    def _stop_sessions(self) -> None:
        self.scheduler.stop()
        grace = self.cfg.delivery.shutdown_grace
        pool = self.scheduler.pool
        if len(pool):
            log.info("waiting up to %gs for %d sessions to finish", grace, len(pool))
            if not pool.join(timeout=grace):
                log.warning("grace period over: stopping %d sessions, their messages go back", len(pool))
                pool.kill(timeout=max(5.0, self.cfg.timeouts.command))
        self.queue.flush()  # the last removals made durable before exit


def load_config(path: Any) -> Config:
    """The configuration file read again (ConfigError when it does not load)."""
    return load(path)


def _keep(new: Config, old: Config) -> Config:
    """``new`` with the settings that need a restart as they were."""
    import dataclasses

    return dataclasses.replace(
        new,
        spool=dataclasses.replace(new.spool, path=old.spool.path),
        metrics=old.metrics,
        listener=old.listener,
        delivery=dataclasses.replace(new.delivery, processes=old.delivery.processes),
    )


def config_listens(cfg: Config) -> bool:
    return bool(cfg.listener.listen)
