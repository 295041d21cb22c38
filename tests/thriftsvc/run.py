"""A Calculator server or client process for the live tests, on the Apache Thrift library.

    run.py server {simple|threaded} PROTOCOL TRANSPORT [multiplexed]   prints its port, serves on a line
    run.py client PORT PROTOCOL TRANSPORT [multiplexed] [counting]     see PLAN

On a line on stdin the client connects, makes the WARM calls and says "warm"; on the next
(the test may start tracing in between: the connection is then older than the tracing) it
makes the PLAN calls on the same connection, checks every answer and says "done"."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from thrift.server import TServer
from thrift.Thrift import TApplicationException
from thrift.TMultiplexedProcessor import TMultiplexedProcessor
from thrift.transport import TSocket
from thriftsvc.calc import (
    PROTOCOLS,
    SERVICE,
    TRANSPORTS,
    Client,
    DivideByZero,
    Handler,
    Point,
    Processor,
    client_protocol,
)

ECHO = "e" * 3000  # a message larger than the agent captures of one syscall
WARM = [("add", {"a": 1, "b": 1}, 2), ("add", {"a": 2, "b": 2}, 4)]
# (method, arguments, what the client must get: a value, or an exception type and text)
PLAN = [
    ("add", {"a": 2, "b": 3}, 5),
    ("echo", {"text": ECHO}, ECHO),
    ("divide", {"a": 7, "b": 0}, (DivideByZero, "cannot divide 7 by zero")),
    ("log", {"line": "one way"}, None),
    ("ping", {}, None),
    ("nosuch", {}, (TApplicationException, "Unknown function nosuch")),
    ("stats", {"series": {"a": [1, 2], "b": [3]}, "flags": {True, False},
               "points": [Point(x=1, y=2, label="p")], "scale": 0.5},
     [1.5, 1.5, 1.0, 2.0]),
    ("crash", {}, (TApplicationException, "the handler failed")),
    ("add", {"a": 40, "b": 2}, 42),
]  # fmt: skip


def serve(kind: str, protocol: str, transport: str, multiplexed: bool) -> None:
    processor = Processor(Handler())
    if multiplexed:
        mux = TMultiplexedProcessor()
        mux.registerProcessor(SERVICE, processor)
        processor = mux
    sock = TSocket.TServerSocket(host="127.0.0.1", port=0)
    sock.listen()
    sock.listen = lambda: None  # serve() listens again, which would bind another port 0
    print(sock.handle.getsockname()[1], flush=True)
    sys.stdin.readline()  # accept only once the test has had its say (tracing this process or not)
    server_class = TServer.TSimpleServer if kind == "simple" else TServer.TThreadedServer
    server = server_class(processor, sock, TRANSPORTS[transport], PROTOCOLS[protocol])
    if kind == "threaded":
        server.daemon = True
    server.serve()


def check(client: Client, calls) -> None:
    for method, kwargs, want in calls:
        try:
            got = client.call(method, **kwargs)
        except Exception as e:  # noqa: BLE001 - compared with what the plan expects
            assert isinstance(want, tuple) and isinstance(e, want[0]) and str(e) == want[1], (method, e)
            continue
        assert got == want, (method, got, want)


def main(argv: list[str]) -> None:
    role, flags = argv[0], set(argv[4:])
    if role == "server":
        serve(argv[1], argv[2], argv[3], "multiplexed" in flags)
        return
    sock = TSocket.TSocket("127.0.0.1", int(argv[1]))
    trans, prot = client_protocol(sock, argv[2], argv[3], "multiplexed" in flags)
    sys.stdin.readline()  # the test traces this process first, or not
    trans.open()
    client = Client(prot, counting="counting" in flags)
    check(client, WARM)
    print("warm", flush=True)
    sys.stdin.readline()
    check(client, PLAN)
    print("done", flush=True)
    sys.stdin.readline()  # keep the connection open until the test has its records
    trans.close()


if __name__ == "__main__":
    main(sys.argv[1:])
