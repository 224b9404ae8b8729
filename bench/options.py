"""The subcommands and their options (argparse), with the default peers of each workload."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_DRAIN_PEERS = "greenmail,greenmail_p2,postfix,nullmailer,dma,anchor,anchor_reuse"
SLOW_PEERS = "greenmail,greenmail_p2,anchor_reuse"
LIVE_PEERS = "greenmail,postfix,nullmailer,dma"
ENQUEUE_PEERS = "greenmail,postfix,nullmailer,dma,greenmail_api,greenmail_api4"


def ints(s: str) -> list[int]:
    return [int(x.replace("_", "")) for x in s.split(",") if x]


def names(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


def _common(p: argparse.ArgumentParser, runs: int) -> None:
    p.add_argument("--runs", type=int, default=runs, help="repetitions (interleaved; median shown)")
    p.add_argument("--port", type=int, default=2625, help="sink port on 127.0.0.1 (latency sink: port+1)")
    p.add_argument("--out", type=Path, help="results directory (default bench/results/<date>-<command>)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per drain")
    p.add_argument(
        "--resume",
        type=Path,
        metavar="RESULTS_DIR",
        help="continue an interrupted run: keep its successful measurements, do the rest",
    )
    p.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run greenmail from the working tree instead of a copy taken at start",
    )
    p.add_argument(
        "--gm-fill",
        choices=("api", "cli"),
        default="api",
        help="how greenmail's queue is filled before a drain (default api; the enqueue "
        "workload measures the CLI)",
    )


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=doc.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("drain", help="N queued messages -> smtp-sink")
    _common(p, 3)
    p.add_argument("--n", type=ints, help="default 10000,100000 (with --baseline: 10000)")
    p.add_argument("--conns", type=ints, help="default 10,100 (with --baseline: 10)")
    p.add_argument("--peers", type=names, default=names(DEFAULT_DRAIN_PEERS))
    p.add_argument(
        "--large-n",
        type=int,
        default=10000,
        help="above this N only greenmail and the smtp-source ceilings run (0 = no limit)",
    )
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="instead of --peers: this tree's greenmail and REV's (a git revision), "
        "interleaved, and the ratio of their rates",
    )
    p.add_argument(
        "--baseline-peer",
        choices=("greenmail", "greenmail_pg"),
        default="greenmail",
        help="with --baseline: on the spool (greenmail) or on the shared queue (greenmail_pg)",
    )
    p.add_argument(
        "--tree",
        metavar="REV",
        help="with --baseline: REV's greenmail (exported like the baseline) in place of this tree's",
    )
    p = sub.add_parser("slow", help="slow relay: smtp-sink -w DELAY, many connections")
    _common(p, 3)
    p.add_argument("--n", type=ints, default=[10000])
    p.add_argument("--conns", type=ints, default=[1000])
    p.add_argument("--delay", type=int, default=2)
    p.add_argument("--peers", type=names, default=names(SLOW_PEERS))
    p = sub.add_parser("latency", help="enqueue -> sink latency, one message at a time")
    _common(p, 1)
    p.add_argument("--m", type=int, default=200)
    p.add_argument("--peers", type=names, default=names(LIVE_PEERS))
    p = sub.add_parser("enqueue", help="enqueue N messages, P in parallel; API rate")
    _common(p, 1)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--par", type=int, default=4)
    p.add_argument("--peers", type=names, default=names(ENQUEUE_PEERS))
    p = sub.add_parser("big", help="one big message: RSS growth of the idle daemon")
    _common(p, 3)
    p.add_argument("--mb", type=int, default=50)
    p.add_argument("--peers", type=names, default=names("greenmail,postfix"))
    p = sub.add_parser("listener", help="smtp-source -> the SMTP listener vs Postfix smtpd")
    _common(p, 1)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--sessions", type=ints, default=[10, 100], help="smtp-source -s (concurrent sessions)")
    p.add_argument("--no-e2e", action="store_true", help="leave out the end-to-end rows (relay = smtp-sink)")
    p.set_defaults(peers=["greenmail", "postfix"])  # what check_setup() needs; no --peers option
    p = sub.add_parser("profile", help="py-spy profile of greenmail run --once draining N")
    _common(p, 1)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--conns", type=int, default=10)
    p = sub.add_parser("all", help="every workload at full size")
    _common(p, 3)
    p.add_argument("--skip", type=names, default=[], help="workloads to leave out, e.g. enqueue,profile")
    p = sub.add_parser("smoke", help="every workload, small sizes, 1 run")
    _common(p, 1)
    p = sub.add_parser("table", help="re-render table.md from raw.tsv of results directories")
    p.add_argument("dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="write table.md + raw.tsv here (default: the first dir)")
    p = sub.add_parser("targets", help="the performance targets (the table in bench/README.md)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--markdown", action="store_true", help="print the README's table (the default)")
    how.add_argument("--check", action="store_true", help="exit 1 if bench/README.md's table differs")
    return ap
