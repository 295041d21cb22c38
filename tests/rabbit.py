"""A throwaway RabbitMQ broker (Debian's rabbitmq-server) on free loopback ports.

There is no systemd here, and the packaged wrapper runs the broker as the rabbitmq user with the
system's data and logs; so the broker's own start script is run directly, with everything it
writes in a temporary directory, a node name of its own, and its own epmd (Erlang's port mapper) on
a free port, so that brokers of other tests, or other runs, never meet.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from servers import free_port, need, wait_port

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
START_TIMEOUT_S = 120  # an Erlang VM booting the broker on a busy 2-core machine
STOP_TIMEOUT_S = 30


def _stop(proc: subprocess.Popen, timeout_s: float) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _beam_pid(script_pid: int) -> int:
    """The Erlang VM the start script runs as its child: the process that serves AMQP."""
    children = Path(f"/proc/{script_pid}/task/{script_pid}/children").read_text().split()
    for child in map(int, children):
        if Path(f"/proc/{child}/comm").read_text().strip().startswith("beam"):
            return child
    raise AssertionError(f"rabbitmq-server ({script_pid}) has no Erlang VM child: {children}")


@contextmanager
def rabbitmq():
    """Yields (pid of the broker's Erlang VM, AMQP port); guest/guest may log in over loopback."""
    if not RABBITMQ_SERVER.exists():
        pytest.fail(f"{RABBITMQ_SERVER} is missing: apt-get install rabbitmq-server", pytrace=False)
    port, dist_port, epmd_port = free_port(), free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="deeptrace-rabbitmq-") as d:
        Path(d, "enabled_plugins").write_text("[].\n")
        Path(d, "rabbitmq-env.conf").write_text("")
        env = {
            **os.environ,
            "HOME": d,  # the Erlang cookie is made here
            "ERL_EPMD_PORT": str(epmd_port),
            "RABBITMQ_NODENAME": f"deeptrace{port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CONF_ENV_FILE": f"{d}/rabbitmq-env.conf",
            "RABBITMQ_CONFIG_FILE": f"{d}/rabbitmq",  # none there: the defaults
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{d}/advanced.config",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{d}/enabled_plugins",
            "RABBITMQ_MNESIA_BASE": f"{d}/mnesia",
            "RABBITMQ_LOG_BASE": f"{d}/log",
            "RABBITMQ_PID_FILE": f"{d}/pid",
        }
        # Our own epmd in the foreground: the broker finds it on ERL_EPMD_PORT rather than starting
        # a daemon that would outlive the test.
        epmd = subprocess.Popen([need("epmd"), "-port", str(epmd_port), "-address", "127.0.0.1"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        log = open(Path(d, "server.out"), "wb")  # noqa: SIM115 (closed below, after the broker)
        broker = beam = None
        try:
            wait_port(epmd_port)
            # The script traps SIGTERM and stops the broker properly.
            broker = subprocess.Popen([str(RABBITMQ_SERVER)], env=env, cwd=d, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline and broker.poll() is None:
                try:
                    wait_port(port, timeout_s=1)
                    break
                except AssertionError:
                    pass
            if broker.poll() is not None or time.monotonic() >= deadline:
                out = Path(d, "server.out").read_text(errors="replace")[-2000:]
                raise AssertionError(f"rabbitmq-server did not listen on {port} in {START_TIMEOUT_S}s:\n{out}")
            beam = _beam_pid(broker.pid)
            yield beam, port
        finally:
            if broker is not None:
                _stop(broker, STOP_TIMEOUT_S)
            if beam is not None and Path(f"/proc/{beam}").exists():  # the script was killed, not its VM
                os.kill(beam, signal.SIGKILL)
            log.close()
            epmd.send_signal(signal.SIGTERM)
            _stop(epmd, 10)
