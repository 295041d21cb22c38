"""A fake Kubernetes API server: enough of /api/v1 pods and services for a list + watch client.

A real HTTP/1.1 server in a thread, answering what the official Python client asks:

- `GET /api/v1/pods` and `/api/v1/services`: a list (`PodList`, `ServiceList`) with the
  current resourceVersion; `fieldSelector=spec.nodeName=NODE` keeps that node's pods (any
  other field selector is refused with 400, as the API server refuses fields it does not index);
- the same with `watch=true`: a chunked stream of newline-delimited JSON events (ADDED,
  MODIFIED, DELETED, BOOKMARK when `allowWatchBookmarks=true`, ERROR) from the given
  resourceVersion on, ended after `timeoutSeconds`, or at once by `close_watches()`;
- history compacted by `compact()`: a watch from an older version gets 410 Gone, as an ERROR
  event carrying a Status (what the API server does) or, with `gone_as="status"`, as the
  HTTP status of the answer; `expire_watches()` sends that ERROR to the open watches;
- `down()` / `up()`: the server stops (listener closed, every connection cut) and comes back
  on the same port with its state.

Objects are JSON dicts shaped like `kubectl get -o json` output (tests/kube_fixtures).
"""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

FIXTURES = Path(__file__).parent / "kube_fixtures"
KINDS = {"pods": ("Pod", "PodList"), "services": ("Service", "ServiceList")}


def fixture(name: str) -> list[dict]:
    """The items of tests/kube_fixtures/NAME.json (fresh copies)."""
    return json.loads((FIXTURES / f"{name}.json").read_text())["items"]


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


class _Stream:
    """One open watch, as the fake sees it."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        self.handler = handler
        self.closed = False  # end it cleanly (as at its timeout)
        self.expired = False  # send a 410 ERROR event, then end it


class FakeKubeAPI:
    def __init__(self, pods: list[dict] = (), services: list[dict] = ()):
        self.cond = threading.Condition()
        self.version = 100
        self.objects: dict[str, dict[str, dict]] = {"pods": {}, "services": {}}  # kind -> uid -> object
        self.events: list[tuple[int, str, str, dict]] = []  # (version, kind, type, object)
        self.compacted = 0  # watches from a version below this get 410 Gone
        self.gone_as = "event"  # or "status": how a too-old watch is told
        self.hold_watches = False  # new watches wait (in the handler) until this is False
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, query) of every request
        self.streams: list[_Stream] = []
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        for obj in pods:
            self._put("pods", obj)
        for obj in services:
            self._put("services", obj)

    # The server.

    def up(self) -> FakeKubeAPI:
        fake = self

        class Handler(_Handler):
            api = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def down(self) -> None:
        """Stops listening and cuts every connection (open watches and idle keep-alive ones)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self.cond:
            for stream in self.streams:
                stream.closed = True
            connections = list(self._connections)
            self.cond.notify_all()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # The cluster's state; every change is an event at a new resourceVersion.

    def _put(self, kind: str, obj: dict) -> tuple[str, dict]:
        obj = copy.deepcopy(obj)
        obj.setdefault("kind", KINDS[kind][0])
        obj.setdefault("apiVersion", "v1")
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        uid = obj["metadata"]["uid"]
        kind_of_event = "MODIFIED" if uid in self.objects[kind] else "ADDED"
        self.objects[kind][uid] = obj
        self.events.append((self.version, kind, kind_of_event, obj))
        return kind_of_event, obj

    def apply(self, kind: str, obj: dict) -> None:
        """Creates or replaces an object (ADDED or MODIFIED to the watches)."""
        with self.cond:
            self._put(kind, obj)
            self.cond.notify_all()

    def delete(self, kind: str, uid: str) -> None:
        with self.cond:
            obj = copy.deepcopy(self.objects[kind].pop(uid))
            self.version += 1
            # A DELETED event carries the object's last state at the deletion's version.
            obj["metadata"]["resourceVersion"] = str(self.version)
            self.events.append((self.version, kind, "DELETED", obj))
            self.cond.notify_all()

    def compact(self) -> None:
        """Forgets the history: a watch from before now gets 410 Gone."""
        with self.cond:
            self.compacted = self.version
            self.events = []

    def close_watches(self) -> None:
        """Ends every open watch cleanly, as its timeout does."""
        with self.cond:
            for stream in self.streams:
                stream.closed = True
            self.cond.notify_all()

    def expire_watches(self) -> None:
        """Sends 410 Gone (an ERROR event) to every open watch and ends it."""
        with self.cond:
            for stream in self.streams:
                stream.expired = True
            self.cond.notify_all()

    def release_watches(self) -> None:
        with self.cond:
            self.hold_watches = False
            self.cond.notify_all()

    def open_watches(self, kind: str) -> int:
        with self.cond:
            return sum(1 for s in self.streams if s.handler.kind == kind and not (s.closed or s.expired))

    def lists(self, kind: str) -> list[dict[str, str]]:
        """The queries of the lists (not watches) of this kind received so far."""
        return [
            q for path, q in list(self.requests) if path == f"/api/v1/{kind}" and q.get("watch") != "true"
        ]

    def watches(self, kind: str) -> list[dict[str, str]]:
        return [
            q for path, q in list(self.requests) if path == f"/api/v1/{kind}" and q.get("watch") == "true"
        ]


def _selects(query: dict[str, str], obj: dict) -> bool:
    selector = query.get("fieldSelector")
    if not selector:
        return True
    _, _, node = selector.partition("=")
    return (obj.get("spec") or {}).get("nodeName") == node


class _Handler(BaseHTTPRequestHandler):
    api: FakeKubeAPI
    protocol_version = "HTTP/1.1"  # chunked watches and keep-alive, as the API server
    kind = ""

    def setup(self) -> None:
        super().setup()
        with self.api.cond:
            self.api._connections.add(self.connection)

    def finish(self) -> None:
        with self.api.cond:
            self.api._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:
        pass  # quiet tests

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        with self.api.cond:
            self.api.requests.append((url.path, query))
        kind = url.path.removeprefix("/api/v1/")
        if url.path not in ("/api/v1/pods", "/api/v1/services"):
            return self._json(
                404, status(404, "NotFound", f"the server could not find the requested resource ({url.path})")
            )
        selector = query.get("fieldSelector")
        if selector and not (kind == "pods" and selector.startswith("spec.nodeName=")):
            return self._json(
                400, status(400, "BadRequest", f'field label not supported: "{selector.split("=")[0]}"')
            )
        self.kind = kind
        if query.get("watch") == "true":
            return self._watch(kind, query)
        with self.api.cond:
            items = [copy.deepcopy(o) for o in self.api.objects[kind].values() if _selects(query, o)]
            version = self.api.version
        for item in items:  # a list's items carry no kind or apiVersion of their own
            item.pop("kind", None)
            item.pop("apiVersion", None)
        self._json(200, {"kind": KINDS[kind][1], "apiVersion": "v1", "metadata": {"resourceVersion": str(version)},
                         "items": items})  # fmt: skip

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, kind_of_event: str, obj: dict) -> None:
        self._chunk(json.dumps({"type": kind_of_event, "object": obj}).encode() + b"\n")

    def _watch(self, kind: str, query: dict[str, str]) -> None:
        api = self.api
        since = int(query.get("resourceVersion") or 0)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        stream = _Stream(self)
        with api.cond:
            while api.hold_watches:
                api.cond.wait(0.05)
            too_old = 0 < since < api.compacted
            if too_old and api.gone_as == "status":
                return self._json(
                    410, status(410, "Expired", f"too old resource version: {since} ({api.compacted})")
                )
            api.streams.append(stream)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if too_old:
                stream.expired = True
            elif since == 0:  # "any version": the current state first, as ADDED events
                with api.cond:
                    current = [copy.deepcopy(o) for o in api.objects[kind].values() if _selects(query, o)]
                    since = api.version
                for obj in current:
                    self._event("ADDED", obj)
            while True:
                with api.cond:
                    while True:
                        pending = [e for e in api.events if e[0] > since and e[1] == kind]
                        left = deadline - time.monotonic()
                        if pending or stream.closed or stream.expired or left <= 0:
                            break
                        api.cond.wait(min(left, 0.5))
                    version = api.version
                if stream.expired:
                    self._event(
                        "ERROR",
                        status(410, "Expired", f"too old resource version: {since} ({api.compacted})"),
                    )
                    break
                if stream.closed:
                    break
                for event_version, _, kind_of_event, obj in pending:
                    since = event_version
                    if _selects(query, obj):
                        self._event(kind_of_event, obj)
                if not pending and left <= 0:
                    if query.get("allowWatchBookmarks") == "true":
                        # Before it ends a watch at its timeout the API server tells the version
                        # reached, so that the next watch starts there (even with no event).
                        self._event("BOOKMARK", {"kind": KINDS[kind][0], "apiVersion": "v1",
                                                 "metadata": {"resourceVersion": str(version)}})  # fmt: skip
                    break
            self._chunk(b"")  # the last chunk: a clean end of the response
        except OSError:
            self.close_connection = True  # the client (or down()) cut it
        finally:
            with api.cond:
                if stream in api.streams:
                    api.streams.remove(stream)
