"""The console entry point: ``greenmail``, and ``sendmail`` / ``mailq`` through symlinks.

Owns: the dispatch by program name; a plain ``greenmail enqueue --config F
--from A --to B`` command line is parsed here and handed to submit.py, so
the commonest call from applications does not import click; anything else
goes to the click group in cli.py.
Must not touch: the daemon, gevent.
"""

from __future__ import annotations

import os
import sys

from greenmail.submit import enqueue


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
    if name not in ("sendmail", "mailq", "newaliases") and args[:1] == ["enqueue"]:
        parsed = parse_enqueue(args[1:])
        if parsed is not None:
            enqueue(*parsed)
            return
    from greenmail.cli import main as click_main

    if name == "sendmail":
        click_main(args=["sendmail", *args], prog_name="sendmail")
    elif name == "mailq" and "--json" in args:
        click_main(args=["queue", "list", *args], prog_name="mailq")
    elif name == "mailq":  # sendmail -bp: the list with Postfix's summary line
        click_main(args=["sendmail", "-bp", *args], prog_name="mailq")
    elif name == "newaliases":
        click_main(args=["sendmail", "-bi", *args], prog_name="newaliases")
    else:
        click_main(prog_name="greenmail")
