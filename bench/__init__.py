"""The greenmail benchmark harness, run through bench/run.py (see bench/README.md).

Modules, each owning one part:

* ``cli`` (the checks, the lock, running a command) and ``options`` (argparse)
* ``base``: paths, the log line, ``BenchError``, small file, port and percentile helpers
* ``procs``: our own child processes, the subreaper, orphans and strays
* ``sampling``: CPU and memory (RSS, PSS, VmHWM) of the measured process tree
* ``sinks``: the SMTP receivers the peers deliver to (smtp-sink, the latency sink)
* ``fill``: putting N messages into a queue (commands in parallel, greenmail's API)
* ``peers``: greenmail, Postfix, nullmailer, dma and the smtp-source ceiling, set up and driven
* ``results``: the measurement rows (raw.tsv) and env.txt
* ``drain``: the drain workload (also the slow relay)
* ``workloads``: latency, enqueue, big message
* ``pyspy``: the profile workload and its summary
* ``targets``: the performance targets (one table), their verdicts, the README's table
* ``measures`` and ``query``: what each target computes from a run's rows, and the medians
* ``report``: table.md
* ``baseline``: drains of this tree and of a baseline revision, interleaved
* ``code``: the greenmail code measured (the snapshot, a baseline revision's export)
"""
