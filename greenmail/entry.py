"""The console entry point, and what ``greenmail enqueue`` needs without click.

Owns: the exit codes (sysexits), one-line error reporting, loading the
configuration and the spool for a command, the enqueue command itself, and
the dispatch: invoked as ``sendmail`` or ``mailq`` (symlinks), or a plain
``greenmail enqueue --config F --from A --to B`` — parsed here, so the
commonest call from applications does not pay for importing click; anything
else goes to the click group in cli.py.
A process per message pays for every import, so enqueue takes the light
modules (tomlmini, confcheck, dropoff: none imports pathlib, dataclasses,
tomllib, logging or typing) and turns to config.py only when tomlmini is not sure.
Must not touch: the daemon, gevent.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

    from greenmail.config import Config

EX_USAGE, EX_DATAERR, EX_SOFTWARE, EX_CANTCREAT, EX_TEMPFAIL, EX_CONFIG = 64, 65, 70, 73, 75, 78


def fail(message: str, code: int) -> NoReturn:
    sys.stderr.write(f"greenmail: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


def load_config(path: str | None) -> Config:
    from greenmail.config import load
    from greenmail.errors import ConfigError

    try:
        return load(path)
    except ConfigError as e:
        fail(f"configuration error: {e}", EX_CONFIG)


def open_spool(cfg: Config) -> Any:
    from greenmail.errors import GreenmailError
    from greenmail.spool import Spool

    spool = Spool(cfg.spool.path)
    try:
        spool.ensure()
    except GreenmailError as e:
        fail(str(e), EX_CANTCREAT)
    return spool


def spool_dir(config_path: str | None) -> str:
    """The spool directory the configuration names, as config.load would give it.

    Read with tomlmini and checked by confcheck — the rules config.load
    applies — when it can; config.load itself (tomllib) for a file tomlmini
    is not sure of, an unreadable file, or no --config / $GREENMAIL_CONFIG.
    """
    if config_path:
        from greenmail import confcheck, purepath, tomlmini
        from greenmail.errors import ConfigError

        file = purepath.pure(config_path)  # config.find's Path(config_path)
        try:
            with open(file, "rb") as f:
                data = f.read()
        except OSError:
            data = None  # config.load words the error
        raw = None if data is None else tomlmini.loads(data)
        if raw is not None:
            try:
                sections = confcheck.validate(raw)
            except ConfigError as e:
                fail(f"configuration error: {e}", EX_CONFIG)
            return confcheck.spool_dir(sections, purepath.parent(os.path.realpath(file)))
        if data is not None:
            from pathlib import Path

            from greenmail.config import parse

            try:
                return str(parse(data, Path(file)).spool.path)
            except ConfigError as e:
                fail(f"configuration error: {e}", EX_CONFIG)
    return str(load_config(config_path).spool.path)


def enqueue(config_path: str | None, sender: str, recipients: tuple[str, ...]) -> None:
    """``greenmail enqueue``: one message from stdin into the spool; prints its queue id."""
    from greenmail import dropoff
    from greenmail.errors import AddressError, EnqueueError, GreenmailError

    if not sender:  # the null sender is written '<>'; an empty --from is a mistake
        fail("invalid address: empty address (use '<>' for the null sender)", EX_USAGE)
    spool = spool_dir(config_path)
    try:
        dropoff.ensure(spool)
    except GreenmailError as e:
        fail(str(e), EX_CANTCREAT)
    try:
        qid = dropoff.enqueue_many(spool, [(sender, recipients, sys.stdin.buffer)])[0]
    except AddressError as e:
        fail(f"invalid address: {e}", EX_USAGE)
    except EnqueueError as e:
        fail(str(e), EX_DATAERR if "empty" in str(e) else EX_CANTCREAT)
    sys.stdout.write(qid + "\n")
    sys.stdout.flush()


def parse_enqueue(argv: list[str]) -> tuple[str | None, str, tuple[str, ...]] | None:
    """(config, sender, recipients) of a plain enqueue command line; None for anything else."""
    values: dict[str, list[str]] = {"--config": [], "--from": [], "--to": []}
    args = iter(argv)
    for arg in args:
        name, eq, value = arg.partition("=")
        if name not in values:
            return None
        if not eq:
            value = next(args, None)
            if value is None:
                return None
        values[name].append(value)
    if len(values["--from"]) != 1 or not values["--to"] or len(values["--config"]) > 1:
        return None  # click reports these usage errors
    config = values["--config"][0] if values["--config"] else os.environ.get("GREENMAIL_CONFIG")
    return config, values["--from"][0], tuple(values["--to"])


def main() -> None:
    """Console entry point."""
    name = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    if name not in ("sendmail", "mailq") and args[:1] == ["enqueue"]:
        parsed = parse_enqueue(args[1:])
        if parsed is not None:
            enqueue(*parsed)
            return
    from greenmail.cli import main as click_main

    if name == "sendmail":
        click_main(args=["sendmail", *args], prog_name="sendmail")
    elif name == "mailq":
        click_main(args=["queue", "list", *args], prog_name="mailq")
    else:
        click_main(prog_name="greenmail")
