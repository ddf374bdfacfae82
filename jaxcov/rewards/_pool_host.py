"""The clean process that owns the verifier workers (started by `pool.VerifierPool`).

Usage: python -m jaxcov.rewards._pool_host FD FUNCTION_PATH NUM_WORKERS MEMORY_MB

It imports and warms up the task function's module once, forks the workers from itself, then
answers ("run", tasks, timeout_s) requests on the socket FD until it reads None or EOF.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from multiprocessing.connection import Connection

from jaxcov.rewards.pool import WorkerPool, limit_process


def main(argv: list[str]) -> None:
    fd, function_path, num_workers, memory_mb = argv
    limit_process(0)  # die with the trainer; no memory cap for the host itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle, not ours
    conn = Connection(int(fd))
    module = importlib.import_module(function_path.partition(":")[0])
    if hasattr(module, "warm_up"):
        module.warm_up()  # before forking, so every worker starts warm
    pool = WorkerPool(function_path, int(num_workers), int(memory_mb), start_method="fork")
    pool.wait_ready()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        _, tasks, timeout_s = message
        results = pool.run(tasks, timeout_s)
        conn.send(("results", results, pool.restarts))
    pool.close()


if __name__ == "__main__":
    main(sys.argv[1:])
