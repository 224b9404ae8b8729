"""The ``greenmail`` command: run, enqueue, queue ..., sink.

Owns: mapping options to calls and errors to one stderr line and an exit
code (sysexits). Holds no logic; imports lazily so that ``greenmail
enqueue`` starts fast (no gevent, no prometheus_client).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from greenmail import __version__
from greenmail.exits import (
    EX_CANTCREAT,
    EX_CONFIG,
    EX_DATAERR,
    EX_TEMPFAIL,
    EX_USAGE,
    fail,
    load_config,
    open_queue,
)

if TYPE_CHECKING:
    from greenmail.config import Config


def _inherited(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A subcommand's --config, else the one given before it (greenmail --config F queue list),
    else $GREENMAIL_CONFIG: an option on the command line wins over the environment wherever it is."""
    if value is not None and ctx.get_parameter_source(param.name or "") is not ParameterSource.ENVIRONMENT:
        return value
    parent = ctx.parent
    while parent is not None:
        if parent.params.get("config_path"):
            return parent.params["config_path"]
        parent = parent.parent
    return value


config_option = click.option(
    "--config",
    "config_path",
    envvar="GREENMAIL_CONFIG",
    type=click.Path(dir_okay=False),
    callback=_inherited,
    help="configuration file (default: $GREENMAIL_CONFIG, then /etc/greenmail/greenmail.toml)",
)


def setup_logging(
    verbose: bool = False,
    fmt: str = "text",
    config: Config | None = None,
    batched: bool = False,
    target: str = "stderr",
) -> None:
    """Logging to ``target`` in ``fmt`` (text or json); with ``config``, log the configuration line."""
    from greenmail import logfmt

    try:
        logfmt.setup(fmt, verbose, batched=batched, target=target)
    except OSError as e:
        fail(f"cannot log to {target}: {e.strerror or e}", EX_CANTCREAT)
    if config is not None:
        settings = logfmt.settings(config)
        logging.getLogger("greenmail").info(
            "configuration: %s",
            logfmt.settings_text(settings),
            extra={"fields": {"event": "config", "config": settings}},
        )


@click.group()
@click.version_option(__version__)  # not the distribution metadata: the Debian package has none
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="configuration file for the subcommand (it may also come after the subcommand)",
)
def main(config_path: str | None) -> None:
    """greenmail: a mail delivery daemon that sends a spool to an SMTP relay."""


@main.group("relay")
def relay_group() -> None:
    """The relay."""


@relay_group.command("test")
@config_option
def relay_test(config_path: str | None) -> None:
    """Connect, EHLO, STARTTLS and AUTH as configured; print what the relay offers; send nothing.

    Exit 0; 69 when the relay refuses (policy, TLS, authentication); 75 when it cannot be
    reached now; 78 for the configuration. One line on stderr says which step failed and why.
    """
    import socket

    from greenmail import relaytest
    from greenmail.errors import ConfigError, ConnectFailed, SmtpError

    cfg = load_config(config_path)
    try:
        for line in relaytest.run(cfg, cfg.relay.helo or socket.getfqdn()):
            click.echo(line)
    except ConfigError as e:
        fail(f"configuration error: {e}", EX_CONFIG)
    except SmtpError as e:
        stage = "connect" if isinstance(e, ConnectFailed) else e.stage or "connect"
        fail(f"relay test: {stage} failed: {e}", relaytest.exit_code(e))


@main.group("user")
def user_group() -> None:
    """The listener's AUTH users (listener.users_file)."""


@user_group.command("add")
@click.argument("name")
@click.option(
    "--users-file",
    type=click.Path(dir_okay=False),
    help="the file to write (default: listener.users_file of the configuration)",
)
@config_option
def user_add(name: str, users_file: str | None, config_path: str | None) -> None:
    """Add NAME (or change its password) with the password read from the first line of stdin.

    The file is replaced atomically, mode 0600; other users' lines are kept.
    """
    import os

    from greenmail import users
    from greenmail.errors import ConfigError

    if users_file is None:
        configured = load_config(config_path).listener.users_file
        if configured is None:
            fail("user add: give --users-file, or set listener.users_file in the configuration", EX_USAGE)
        users_file = str(configured)
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        fail("user add: no password on stdin", EX_USAGE)
    try:
        line = users.hash_line(name, password)
        kept = []
        if os.path.exists(users_file):
            users.load(users_file)  # a broken file is not rewritten
            with open(users_file, encoding="utf-8") as f:
                kept = [x for x in f.read().splitlines() if x.partition(":")[0] != name]
    except ConfigError as e:
        fail(f"user add: {e}", EX_CONFIG)
    tmp = f"{users_file}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join([*kept, line]) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, users_file)
    click.echo(f"{name}: added to {users_file}")


@main.group("config")
def config_group() -> None:
    """The configuration file."""


@config_group.command("check")
@config_option
def config_check(config_path: str | None) -> None:
    """Check the configuration (and the files it names) and print the effective settings.

    Creates nothing: no spool, no settings cache. Exit 0, or 78 with the key or line at fault.
    """
    from greenmail import backends, config, logfmt
    from greenmail.errors import ConfigError

    try:
        file = config.find(config_path)
        try:
            data = file.read_bytes()
        except OSError as e:
            raise ConfigError(f"{file}: cannot read configuration: {e.strerror}") from None
        cfg = config.parse(data, file)
        cfg.relay.password()  # the password file's mode and readability (the secret is not printed)
        rewriter = backends.rewriter(cfg)
        if rewriter.aliases_path:
            rewriter.aliases  # noqa: B018 - reading it is the check
    except ConfigError as e:
        fail(f"configuration error: {e}", EX_CONFIG)
    click.echo(f"# {file}: ok")
    for key, value in logfmt.settings(cfg).items():
        if key != "source":
            click.echo(f"{key} = {','.join(value) if isinstance(value, list) else value}")


@main.command()
@config_option
@click.option("--from", "sender", required=True, help="envelope sender; '<>' is the null sender")
@click.option("--to", "recipients", required=True, multiple=True, help="envelope recipient (repeatable)")
def enqueue(config_path: str | None, sender: str, recipients: tuple[str, ...]) -> None:
    """Read one message on stdin, spool it, print its queue id."""
    from greenmail import submit

    submit.enqueue(config_path, sender, recipients)


def _log_target(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from greenmail import logfmt

    try:
        logfmt.parse_target(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


@main.command()
@config_option
@click.option("--once", is_flag=True, help="give every due message one attempt, then exit")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="log lines as text (Postfix style) or one JSON object per line",
)
@click.option(
    "--log-target",
    default="stderr",
    show_default=True,
    callback=_log_target,
    metavar="stderr|syslog[:SOCKET]|file:PATH",
    help="where log lines go: stderr (journald priorities under systemd), syslog (facility mail, "
    "/dev/log), or a file (reopened on SIGUSR1)",
)
@click.option("--worker", hidden=True, help="K/N: run as delivery process K of N (started by process 0)")
def run(
    config_path: str | None, once: bool, verbose: bool, log_format: str, log_target: str, worker: str | None
) -> None:
    """Run the delivery daemon in the foreground."""
    cfg = load_config(config_path)
    setup_logging(verbose, log_format, cfg, batched=True, target=log_target)  # pending lines: every 0.2 s
    from greenmail.daemon import Daemon
    from greenmail.errors import ConfigError, GreenmailError
    from greenmail.workers import parse_worker

    try:
        share = parse_worker(worker) if worker else None
    except ValueError as e:
        fail(str(e), EX_USAGE)
    args = [*(["--config", config_path] if config_path else []), "--log-format", log_format]
    args += ["--log-target", log_target]
    args += [*(["--once"] if once else []), *(["-v"] if verbose else [])]
    try:
        code = Daemon(cfg, once=once, worker=share, args=args).run()
    except ConfigError as e:
        fail(f"configuration error: {e}", EX_CONFIG)
    except GreenmailError as e:
        fail(str(e), EX_CANTCREAT)
    except OSError as e:
        fail(f"cannot start: {e}", EX_TEMPFAIL)
    sys.exit(code)


@main.group()
def queue() -> None:
    """Inspect and change the queue (safe while the daemon runs)."""


def _queue_call(config_path: str | None, fn: Callable[..., Any], *args: Any) -> Any:
    from greenmail.errors import ConfigError, MessageBusy, NotFound, QueueUnavailable

    try:
        return fn(open_queue(load_config(config_path)), *args)
    except NotFound as e:
        fail(str(e), EX_DATAERR)
    except (MessageBusy, QueueUnavailable) as e:
        fail(str(e), EX_TEMPFAIL)
    except ConfigError as e:  # the shared queue's schema missing or of another version
        fail(f"configuration error: {e}", EX_CONFIG)


@queue.command("init")
@config_option
def queue_init(config_path: str | None) -> None:
    """Create or migrate the shared queue's schema in PostgreSQL (idempotent)."""
    cfg = load_config(config_path)
    if cfg.queue.backend != "postgresql":
        fail(f'queue init: queue.backend is "{cfg.queue.backend}"; the spool needs no init', EX_USAGE)
    before, after = _queue_call(config_path, lambda q: q.init())
    if before == after:
        click.echo(f"schema version {after}: up to date")
    else:
        click.echo(f"schema version {after} (was {before or 'none'})")


@queue.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="a JSON list instead of a table")
def queue_list(config_path: str | None, as_json: bool) -> None:
    """One entry per message: id, state, size, attempts, sender, recipients."""
    from greenmail import admin

    infos = _queue_call(config_path, lambda q: q.list())
    if as_json:
        click.echo(json.dumps([i.as_json() for i in infos], indent=2))
        return
    for line in admin.table(infos):
        click.echo(line)


@queue.command("show")
@config_option
@click.argument("qid")
def queue_show(config_path: str | None, qid: str) -> None:
    """Envelope, state and the message."""
    from greenmail import admin

    info, body = _queue_call(config_path, lambda q: q.show(qid))
    with body:
        for line in admin.description(info):
            click.echo(line)
        click.echo("")
        while chunk := body.read(65536):
            sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


@queue.command("delete")
@config_option
@click.argument("qid", required=False)
@click.option("--all-failed", "all_failed", is_flag=True, help="every message in failed/")
def queue_delete(config_path: str | None, qid: str | None, all_failed: bool) -> None:
    """Remove a message (not while it is being sent), or --all-failed."""
    if bool(qid) == all_failed:
        fail("queue delete: give a queue id or --all-failed", EX_USAGE)
    if all_failed:
        n = _queue_call(config_path, lambda q: q.delete_failed())
        click.echo(f"{n} failed message{'s' if n != 1 else ''} deleted")
    else:
        _queue_call(config_path, lambda q: q.delete(qid))
        click.echo(f"{qid}: deleted")


@queue.command("hold")
@config_option
@click.argument("qid")
def queue_hold(config_path: str | None, qid: str) -> None:
    """Keep a queued message from being sent until released."""
    _switch(config_path, "hold", qid, "held", "already held")


@queue.command("release")
@config_option
@click.argument("qid")
def queue_release(config_path: str | None, qid: str) -> None:
    """Give a held message back to the queue."""
    _switch(config_path, "release_hold", qid, "released", "was not held")


def _switch(config_path: str | None, op: str, qid: str, done: str, unchanged: str) -> None:
    changed = _queue_call(config_path, lambda q: getattr(q, op)(qid))
    click.echo(f"{qid}: {done if changed else unchanged}")


@queue.command("retry")
@config_option
@click.argument("qid", required=False)
@click.option("--all", "retry_all", is_flag=True, help="every deferred message")
def queue_retry(config_path: str | None, qid: str | None, retry_all: bool) -> None:
    """Make a deferred message (or --all) due now; a failed one is queued again."""
    if bool(qid) == retry_all:
        fail("queue retry: give a queue id or --all", EX_USAGE)
    if retry_all:
        n = _queue_call(config_path, _retry_all)
        click.echo(f"{n} message{'s' if n != 1 else ''} due now; a running daemon tries the whole queue now")
    else:
        changed = _queue_call(config_path, lambda q: q.retry(qid))
        click.echo(f"{qid}: {'due now' if changed else 'already due'}")


def _retry_all(q: Any) -> int:
    n = q.retry_all()
    q.wake()  # queued mail held back by an unreachable relay is tried now too
    return n


@main.command()
@click.option("--listen", default="127.0.0.1:2525", show_default=True, help="HOST:PORT to accept SMTP on")
@click.option("--maildir", required=True, type=click.Path(file_okay=False), help="messages go to DIR/new/")
@config_option
def sink(listen: str, maildir: str, config_path: str | None) -> None:
    """A development SMTP receiver that stores every message it accepts (needs no --config)."""
    setup_logging()
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        fail(f"--listen: expected HOST:PORT, got {listen!r}", EX_USAGE)
    import gevent
    from gevent.event import Event

    from greenmail.sink import Sink

    try:
        server = Sink(maildir).serve(host.strip("[]"), int(port))
    except OSError as e:
        fail(f"sink: cannot listen on {listen}: {e.strerror or e}", EX_TEMPFAIL)
    logging.getLogger("greenmail.sink").info("sink listening on %s, storing in %s/new", listen, maildir)
    stop = Event()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, stop.set)
    stop.wait()
    server.stop(timeout=2)


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def sendmail(ctx: click.Context, argv: tuple[str, ...]) -> None:
    """The /usr/sbin/sendmail interface (-t -f -F -i -bp -q; recipients as arguments)."""
    from greenmail import sendmail as sm
    from greenmail.errors import AddressError, ConfigError, EnqueueError, QueueUnavailable
    from greenmail.submit import is_tempfail

    try:
        opts = sm.parse(list(argv))
    except sm.UsageError as e:
        fail(f"sendmail: {e}", EX_USAGE)
    if opts.mode == "list":
        from greenmail import admin

        for line in admin.table(_queue_call(opts.config, lambda q: q.list()), postfix=True):
            click.echo(line)
        return
    if opts.mode == "queue":  # ask the running daemon, say nothing; with none running, one pass here
        if not _queue_call(opts.config, lambda q: (q.retry_all(), q.wake())[1]):
            ctx.invoke(run, config_path=opts.config, once=True, verbose=False)
        return
    cfg = load_config(opts.config)
    from greenmail import backends

    rewriter = backends.rewriter(cfg)
    if opts.mode in ("aliases", "verify"):
        _sendmail_check(opts, rewriter)
        return
    queue = open_queue(cfg, EX_TEMPFAIL)
    if opts.mode == "smtp":
        from greenmail import server, smtpstdio

        smtp = server.Server(rewriter.hostname, queue.incoming, rewriter)
        smtpstdio.serve(smtp, sys.stdin.fileno(), sys.stdout.fileno())
        return
    try:
        message = sm.read_message(sys.stdin.buffer, opts.dot_ends)
        sender, rcpts, message = sm.prepare(opts, message, rewriter.origin)
        queue.enqueue(sender, rcpts, message)
    except sm.UsageError as e:
        fail(f"sendmail: {e}", EX_USAGE)
    except (AddressError, sm.DataError) as e:
        fail(f"sendmail: {e}", EX_DATAERR)
    except ConfigError as e:
        fail(f"sendmail: configuration error: {e}", EX_CONFIG)
    except EnqueueError as e:
        fail(f"sendmail: {e}", EX_TEMPFAIL if is_tempfail(e) else EX_DATAERR)
    except QueueUnavailable as e:
        fail(f"sendmail: {e}", EX_TEMPFAIL)


def _sendmail_check(opts: Any, rewriter: Any) -> None:
    """-bi / newaliases: the aliases file read (exit 78 naming its line); -bv: what each recipient becomes."""
    from greenmail import address
    from greenmail.addresses import explain
    from greenmail.errors import AddressError, ConfigError

    try:
        if opts.mode == "aliases":
            if rewriter.aliases_path:
                rewriter.aliases  # noqa: B018 - loading it is the check
            return
        if not opts.recipients:
            fail("sendmail: -bv needs recipients", EX_USAGE)
        bad = False
        for rcpt, targets in explain(rewriter, opts.recipients):
            try:
                for t in targets:
                    address.check(t)
                click.echo(f"{rcpt}: {', '.join(targets)}")
            except AddressError as e:
                click.echo(f"{rcpt}: undeliverable: {e}")
                bad = True
        if bad:
            sys.exit(EX_DATAERR)
    except ConfigError as e:
        fail(f"sendmail: configuration error: {e}", EX_CONFIG)
