#!/usr/bin/env python3
"""greenmail benchmark: greenmail and its peers on the same workloads, in one run.

    sudo bench/setup.sh             # once: postfix, nullmailer + dma (unpacked), venv, py-spy
    sudo bench/run.py smoke         # every workload at small sizes, 1 run (~5 min)
    sudo bench/run.py all           # the full run (about 60 minutes on 2 cores)

    bench/run.py drain   [--n 10000,100000] [--conns 10,100] [--runs 3] [--peers greenmail,greenmail_p2,...]
    bench/run.py drain   --baseline REV [--n 10000] [--conns 10] [--runs 3]   # this tree vs REV, interleaved
    bench/run.py slow    [--n 10000] [--conns 1000] [--delay 2]
    bench/run.py latency [--m 200]
    bench/run.py enqueue [--n 10000] [--par 4]
    bench/run.py big     [--mb 50]
    bench/run.py profile [--n 10000] [--conns 10]
    bench/run.py table RESULTS_DIR [RESULTS_DIR ...]   # re-render table.md from raw.tsv files
    bench/run.py targets [--markdown | --check]        # the targets table of bench/README.md
    bench/run.py all --resume RESULTS_DIR              # finish an interrupted run

Every command writes bench/results/<UTC date-time>-<command>/ (table.md, raw.tsv,
env.txt); spools and per-run logs stay in $GREENMAIL_BENCH_WORK (/tmp/greenmail-bench).
Method, peers and targets: bench/README.md. Python stdlib only (runs in the project venv).
The harness is the package bench/ (bench/__init__.py lists its modules); this file is its
entry point.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venv"
HELPERS = ("_latsink", "_submit", "_fill")  # our own subprocesses: run by the right Python already

if __name__ == "__main__":
    if sys.argv[1:2] not in [[h] for h in HELPERS]:
        py = VENV / "bin" / "python"
        if py.exists() and Path(sys.prefix).resolve() != VENV.resolve():
            os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])
    # import the package bench/ from the repository root, not its modules from bench/ itself
    # (appended: a greenmail snapshot put first on the path must come before the working tree)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.append(str(HERE.parent))
    from bench.cli import run

    sys.exit(run(sys.argv[1:], __doc__ or ""))
