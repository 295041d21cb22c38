"""Starts the five services when a line arrives on stdin, stops them on SIGTERM/SIGINT.

The agent traces this process and, through forks, everything it starts: started first
and released by that line, it sees the services from their first syscall (connection
set-up and HTTP/2 header tables included). The load driver is not started from here, so
it is not traced and the gateway's requests are trace roots.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

SERVICES = ("pricing", "inventory", "users", "orders", "gateway")
HERE = Path(__file__).resolve().parent / "services"


class Stop(Exception):
    pass


def stop(signum, frame) -> None:
    raise Stop


def main() -> None:
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs = []
    try:
        sys.stdin.readline()
        for name in SERVICES:
            procs.append(subprocess.Popen([sys.executable, f"{name}.py"], cwd=HERE))
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
