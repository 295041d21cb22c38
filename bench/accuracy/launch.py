"""Starts the services it is given when their list arrives on stdin, stops them on SIGTERM/SIGINT.

The agent traces this process and, through forks, everything it starts: started first
and released by that line, it sees the services from their first syscall (connection
set-up and HTTP/2 header tables included). The load driver is not started from here, so
it is not traced and the entry service's requests are trace roots.

stdin: one JSON line, a list of {"argv": [...], "cwd": DIR, "env": {...}}.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys


class Stop(Exception):
    pass


def stop(signum, frame) -> None:
    raise Stop


def main() -> None:
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs = []
    try:
        for cmd in json.loads(sys.stdin.readline()):
            procs.append(subprocess.Popen(cmd["argv"], cwd=cmd.get("cwd"), env={**os.environ, **cmd.get("env", {})}))
        while True:
            signal.pause()
    except Stop:
        pass
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
