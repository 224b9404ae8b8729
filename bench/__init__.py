"""The greenmail benchmark harness, run through bench/run.py (see bench/README.md).

Modules, each owning one part:

* ``base``: paths, the log line, ``BenchError``, small file, port and percentile helpers
* ``procs``: our own child processes, the subreaper, orphans and strays
* ``sampling``: CPU and memory (RSS, PSS, VmHWM) of the measured process tree
* ``sinks``: the SMTP receivers the peers deliver to (smtp-sink, the latency sink)
* ``fill``: putting N messages into a queue (commands in parallel, greenmail's API)
* ``peers``: greenmail, Postfix, nullmailer, dma and the smtp-source ceiling, set up and driven
* ``results``: the measurement rows (raw.tsv), the code snapshot and env.txt
* ``workloads``: drain, slow relay, latency, enqueue, big message
* ``pyspy``: the profile workload and its summary
* ``targets``: the performance targets (one table) and their verdicts
* ``report``: table.md
* ``baseline``: drains of this tree and of a baseline revision, interleaved
* ``cli``: the command line
"""
