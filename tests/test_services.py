"""Service names from a process's command line and environment."""

import os
import subprocess
import sys
import time

import pytest

from deeptrace.agent.services import Processes, from_cmdline


@pytest.mark.parametrize("argv, name", [
    (["/usr/bin/python3", "-m", "demo.services.catalog"], "catalog"),
    (["python3", "-u", "/srv/users.py", "--port", "8001"], "users"),
    (["/venv/bin/python", "/venv/bin/gunicorn", "-w", "2", "-b", "127.0.0.1:8002", "inventory:app"], "inventory"),
    (["/venv/bin/python", "-m", "uvicorn", "--port", "8001", "shop.users:app"], "users"),
    (["uvicorn", "cart:app", "--host", "0.0.0.0"], "cart"),
    (["gunicorn: worker [shop.catalog:app]"], "catalog"),
    (["java", "-Xmx1g", "-cp", "a.jar:b.jar", "com.example.OrderService"], "OrderService"),
    (["java", "-jar", "/opt/billing.jar"], "billing"),
    (["node", "/srv/api/server.js"], "server"),
    (["nginx: worker process"], "nginx"),
    (["/usr/sbin/nginx", "-c", "/etc/nginx.conf"], "nginx"),
    (["python3", "-c", "print(1)"], None),
    (["python3"], None),
    ([], None),
])  # fmt: skip
def test_from_cmdline(argv, name):
    assert from_cmdline(argv) == name


def test_environment_name_wins_over_command_line():
    env = dict(os.environ, OTEL_SERVICE_NAME="checkout")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        names = Processes()
        deadline = time.monotonic() + 5
        while names(proc.pid, "python3").service != "checkout" and time.monotonic() < deadline:
            names = Processes()  # the first read may race the exec
            time.sleep(0.05)
        assert names(proc.pid, "python3").service == "checkout"
    finally:
        proc.kill()
        proc.wait()


def test_a_process_that_is_gone_keeps_its_comm():
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert Processes()(proc.pid, "true").service == "true"
