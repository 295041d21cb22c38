"""Message brokers from Debian packages (nats-server, mosquitto) on free loopback ports with
a temporary config, and a relay that records the bytes a real client and broker exchange."""

from __future__ import annotations

import socket
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

from servers import free_port, need, serving

USER, PASSWORD = "alice", "s3cret-Pw"

NATS_CONF = """
listen: 127.0.0.1:{port}
authorization {{
  users = [
    {{user: {user}, password: {password}, permissions: {{publish: {{deny: ["forbidden.>"]}}}}}}
  ]
}}
"""

MOSQUITTO_CONF = """
listener {port} 127.0.0.1
allow_anonymous false
password_file {dir}/passwd
persistence false
log_dest none
user root
"""


@contextmanager
def nats_server(tmp_path: Path):
    """nats-server with one user (USER/PASSWORD) who may not publish to forbidden.>; yields (pid, port)."""
    port = free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(NATS_CONF.format(port=port, user=USER, password=PASSWORD))
    with serving([need("nats-server"), "-c", str(conf)], port, stderr=subprocess.DEVNULL) as pid:
        yield pid, port


@contextmanager
def mosquitto(tmp_path: Path):
    """mosquitto with one user (USER/PASSWORD), no anonymous access; yields (pid, port)."""
    port = free_port()
    subprocess.run([need("mosquitto_passwd"), "-b", "-c", str(tmp_path / "passwd"), USER, PASSWORD], check=True,
                   capture_output=True)  # fmt: skip
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(MOSQUITTO_CONF.format(port=port, dir=tmp_path))
    with serving([need("mosquitto"), "-c", str(conf)], port, stderr=subprocess.DEVNULL) as pid:
        yield pid, port


class Relay:
    """A TCP relay on a free port to a broker: records what each side sent, in syscall-sized
    pieces, as a list of (from_client, bytes) in the order they were relayed."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pieces: list[tuple[bool, bytes]] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self.target))
        for src, dst, from_client in ((client, server, True), (server, client, False)):
            t = threading.Thread(target=self._pump, args=(src, dst, from_client), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.pieces.append((from_client, data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (dst, src):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> list[tuple[bool, bytes]]:
        self.listener.close()
        for t in self._threads:
            t.join(5)
        return self.pieces


def attached_mid_stream(collector, store, broker_pid: int, client_argv: list[str]) -> tuple[list, list]:
    """A client that connects and works first (it prints "ready"), untraced; then the agent
    attaches to the broker and the client, and the client goes on ("go" on its stdin) until it
    prints "done". Returns the client's and the broker's records."""
    import sys

    client = subprocess.Popen([sys.executable, "-c", *client_argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert client.stdout.readline().strip() == "ready", client.stderr.read()
        collector.trace(broker_pid)
        collector.trace(client.pid)
        out, err = client.communicate("go\n", timeout=60)
    finally:
        client.kill()
    assert out.strip() == "done", err
    return store.settle(client.pid, quiet_s=0.5), store.settle(broker_pid, quiet_s=0.5)


def server_records(pieces: list[tuple[bool, bytes]], role: str = "server", capture: int = 1024,
                   first_seq: tuple[int, int] = (1000, 900000)) -> list:  # fmt: skip
    """The records a server-side agent would make of these pieces (one syscall each, the
    first `capture` bytes of each captured), then a close."""
    from deeptrace.capture.records import Record

    seq = {"ingress": first_seq[0], "egress": first_seq[1]}
    out, t = [], 1_000_000
    for from_client, data in pieces:
        direction = "ingress" if from_client else "egress"
        start = seq[direction]
        seq[direction] = (start + len(data)) % 2**32
        t += 1000
        out.append(Record(10, 11, "broker", "read" if from_client else "write", direction, "ipv4", "tcp",
                          "127.0.0.1", 4222, "127.0.0.1", 5555, role, 7, 3, t, t + 10, start, seq[direction],
                          len(data), len(data), 0, 0, data[:capture]))  # fmt: skip
    t += 1000
    out.append(Record(10, 11, "broker", "close", None, "ipv4", "tcp", "127.0.0.1", 4222, "127.0.0.1", 5555, role, 7,
                      3, t, t, 0, 0, 0, 0, 0, 0, b""))  # fmt: skip
    return out
