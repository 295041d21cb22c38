"""The server process: ingest and agent reports, the background linker, retention, and the
routes of the query API, Jaeger's API, metrics and the web UI."""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from deeptrace import __version__
from deeptrace.schema import AGENT_ID, AGENT_ID_RULE, INT64_MAX, MAX_BODY_BYTES
from deeptrace.server import api, errors_http, ingest, jaeger
from deeptrace.server.bodylimit import BodyLimit
from deeptrace.server.cluster import Membership, store_batch
from deeptrace.server.linker import Linker
from deeptrace.server.metrics import CONTENT_TYPE, Metrics
from deeptrace.server.store import open_store
from deeptrace.server.store.base import AgentInfo, DuplicateBatch, Store

log = logging.getLogger("deeptrace.server")
WEB_DIR = Path(__file__).parent / "web"
MAX_AGENT_REPORT_BYTES = 256 << 10  # an agent's heartbeat: host, kernel, version and its counters
MAX_OTHER_BODY_BYTES = 64 << 10


@dataclass
class ServerConfig:
    db: str = "deeptrace.duckdb"  # the store: a DuckDB file, or a URL (store.open_store)
    token: str | None = None  # None: ingest without auth (only with --no-auth)
    algorithm: str = "joint"
    header_ids: bool = True
    hold_s: float = 5.0
    context_s: float = 10.0
    retention_hours: float | None = 72.0
    retention_bytes: int | None = None
    retention_interval_s: float = 60.0
    max_backlog_spans: int = 2_000_000
    otlp_endpoint: str | None = None
    otlp_headers: dict[str, str] = field(default_factory=dict)
    read_auth: tuple[str, str] | None = None  # (user, password) for everything but the agents' writes
    address: str = ""  # where this server listens: told to the other servers of a shared store


class AgentReport(BaseModel):
    host: str = Field(max_length=255)
    kernel: str = Field(default="", max_length=255)
    version: str = Field(default="", max_length=64)
    started_ns: int = Field(default=0, ge=0, le=INT64_MAX)
    stats: dict = Field(default_factory=dict, max_length=256)


@dataclass
class IngestStats:
    batches: int = 0
    spans: int = 0
    duplicates: int = 0
    rejected: int = 0
    refused_backlog: int = 0
    unauthorized: int = 0
    bytes: int = 0
    read_refused: int = 0  # reads (UI, APIs, /metrics) without the --read-auth password


class Server:
    """Everything a request handler may need, built once per process."""

    def __init__(self, config: ServerConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or open_store(config.db)
        self.ingest = IngestStats()
        self._counting = threading.Lock()
        self.started_ns = time.time_ns()
        self.metrics = Metrics(self.health, self.store.agents)
        self.exporter = None
        consumers = [self.metrics.observe]
        if config.otlp_endpoint:
            from deeptrace.server.otlp import OtlpExporter

            self.exporter = OtlpExporter(config.otlp_endpoint, headers=config.otlp_headers)
            consumers.append(self.exporter.submit)
        self.membership = Membership(self.store, config.address)
        self.linker = Linker(self.store, config.algorithm, config.header_ids, config.hold_s, config.context_s,
                             on_published=consumers, membership=self.membership)  # fmt: skip

    def health(self) -> dict[str, float]:
        s, ln = self.ingest, self.linker.stats
        out = {"ingest_batches_total": s.batches, "ingest_spans_total": s.spans,
               "ingest_duplicate_batches_total": s.duplicates, "ingest_rejected_batches_total": s.rejected,
               "ingest_refused_backlog_total": s.refused_backlog, "ingest_unauthorized_total": s.unauthorized,
               "ingest_bytes_total": s.bytes, "read_unauthorized_total": s.read_refused,
               "linker_backlog_spans": self.linker.backlog,
               "linker_published_spans_total": ln.spans_published, "linker_last_pass_seconds": ln.last_pass_s,
               "linker_write_errors_total": ln.write_errors, "linker_late_links_total": ln.late_links,
               "linker_link_errors_total": ln.link_errors, "linker_dead_letters_total": ln.dead_letters,
               "store_dead_letters": self.store.stats().dead_letters,
               "linker_remote_callers_total": ln.remote_callers,
               "linker_callers_never_stored_total": ln.callers_never_stored,
               "linker_spans_taken_over_total": ln.spans_taken_over,
               "cluster_servers": len(self.membership.servers),
               "uptime_seconds": (time.time_ns() - self.started_ns) / 1e9}  # fmt: skip
        if self.exporter is not None:
            e = self.exporter.stats
            out.update(otlp_exported_spans_total=e.exported_spans, otlp_dropped_spans_total=e.dropped_spans,
                       otlp_queued_spans=e.queued_spans)  # fmt: skip
        return out

    def status(self) -> dict:
        st = self.store.stats()
        return {"version": __version__, "ingest": asdict(self.ingest), "linker": asdict(self.linker.stats),
                "backlog_spans": self.linker.backlog, "store": asdict(st),
                "cluster": {"server_id": self.membership.server_id, "shared_store": self.membership.shared,
                            "servers": self.membership.servers},
                "otlp": asdict(self.exporter.stats) if self.exporter is not None else None}  # fmt: skip

    def count(self, **deltas: int) -> None:
        """Ingest counters: bumped from several worker threads at once, where `+=` can lose one."""
        with self._counting:
            for name, n in deltas.items():
                setattr(self.ingest, name, getattr(self.ingest, name) + n)

    def accept(self, raw: bytes, content_encoding: str | None) -> dict:
        """Parse, store durably, hand to the linker. Runs on a worker thread."""
        self.count(bytes=len(raw))
        try:
            batch = ingest.read_batch(raw, content_encoding)
        except ingest.BadBatch:
            self.count(rejected=1)
            raise
        if self.linker.backlog + len(batch.spans) > self.config.max_backlog_spans:
            self.count(refused_backlog=1)
            raise Backlogged()
        try:
            store_batch(self.store, batch, time.time_ns())
        except DuplicateBatch:
            self.count(duplicates=1)
            return {"accepted": 0, "duplicate": True}
        if self.membership.owns(batch.agent_id):  # else its owner takes it from the store
            self.linker.submit(batch.agent_id, batch.batch_id, batch.spans)
        self.count(batches=1, spans=len(batch.spans))
        return {"accepted": len(batch.spans), "duplicate": False}

    def retention_pass(self) -> int:
        c = self.config
        max_age = int(c.retention_hours * 3600e9) if c.retention_hours else None
        return self.store.apply_retention(time.time_ns(), max_age, c.retention_bytes)


class Backlogged(Exception):
    pass


def token_ok(authorization: str, token: str | None) -> bool:
    if token is None:
        return True
    scheme, _, value = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


def require_token(request: Request) -> None:
    if not token_ok(request.headers.get("authorization", ""), request.app.state.server.config.token):
        request.app.state.server.count(unauthorized=1)
        raise HTTPException(401, "missing or wrong token: send Authorization: Bearer TOKEN",
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def _agent_write(request: Request) -> bool:
    """What agents send, under their own token: spans and their reports."""
    return _agent_write_path(request.method, request.url.path)


def _agent_write_path(method: str, path: str) -> bool:
    return (method == "POST" and path == "/api/v1/spans") or (method == "PUT" and path.startswith("/api/v1/agents/"))


def _basic_auth_ok(header: str, user: str, password: str) -> bool:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given_user, _, given_password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    # Both compared, always: how long a refusal takes must not say which part was wrong.
    user_ok = hmac.compare_digest(given_user.encode(), user.encode())
    return hmac.compare_digest(given_password.encode(), password.encode()) and user_ok


def create_app(config: ServerConfig, store: Store | None = None) -> FastAPI:
    server = Server(config, store)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(server.membership.start)
        await run_in_threadpool(server.linker.recover)
        server.linker.start()
        retention = asyncio.create_task(_retention_loop(server))
        try:
            yield
        finally:
            retention.cancel()
            await run_in_threadpool(server.linker.close)
            await run_in_threadpool(server.membership.close)
            if server.exporter is not None:
                await run_in_threadpool(server.exporter.close, 10.0)
            await run_in_threadpool(server.store.close)

    app = FastAPI(title="DeepTrace", version=__version__, lifespan=lifespan)
    app.state.server = server

    if config.read_auth is not None:
        user, password = config.read_auth

        @app.middleware("http")
        async def require_read_auth(request: Request, call_next):
            # The UI, the query and Jaeger APIs, /metrics and the status: payload heads and
            # attributes can hold secrets. A browser asks for the password on its own.
            if _agent_write(request) or _basic_auth_ok(request.headers.get("authorization", ""), user, password):
                return await call_next(request)
            server.count(read_refused=1)
            return JSONResponse({"detail": "log in: HTTP Basic authentication (the server's --read-auth)"},
                                status_code=401, headers={"WWW-Authenticate": 'Basic realm="DeepTrace"'})  # fmt: skip

    @app.post("/api/v1/spans", dependencies=[Depends(require_token)])
    async def post_spans(request: Request):
        raw = await request.body()
        try:
            return await run_in_threadpool(server.accept, raw, request.headers.get("content-encoding"))
        except ingest.TooLarge as e:
            return JSONResponse({"detail": str(e)}, status_code=413)
        except ingest.BadBatch as e:
            return JSONResponse({"detail": str(e)}, status_code=400)
        except Backlogged:
            return JSONResponse({"detail": "server backlog is full; retry later"}, status_code=503,
                                headers={"Retry-After": "5"})  # fmt: skip

    @app.put("/api/v1/agents/{agent_id}", dependencies=[Depends(require_token)])
    async def put_agent(agent_id: str, report: AgentReport):
        if not AGENT_ID.match(agent_id):
            raise HTTPException(400, f"agent id must be {AGENT_ID_RULE}")
        info = AgentInfo(agent_id, report.host, report.kernel, report.version, report.started_ns, time.time_ns(),
                         report.stats)  # fmt: skip
        await run_in_threadpool(server.store.upsert_agent, info)
        return {"ok": True}

    @app.get("/metrics")
    def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/api/v1/status")
    def status():
        return server.status()

    app.include_router(api.router)
    app.include_router(jaeger.router)
    vendor = WEB_DIR / "node_modules"
    if vendor.is_dir():
        app.mount("/vendor", StaticFiles(directory=vendor), name="vendor")
    if WEB_DIR.is_dir():
        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    errors_http.install(app)

    def admits(scope: dict) -> bool:
        """Agents' writes are read only with their token (the route refuses the rest unread)."""
        if not _agent_write_path(scope["method"], scope["path"]):
            return True
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        return token_ok(authorization, config.token)

    app.add_middleware(BodyLimit, limit_for=body_limit, admits=admits,
                       on_refused=lambda path: server.count(rejected=1) if path == "/api/v1/spans" else None)  # fmt: skip
    return app


def body_limit(method: str, path: str) -> int:
    if method == "POST" and path == "/api/v1/spans":
        return MAX_BODY_BYTES
    if method == "PUT" and path.startswith("/api/v1/agents/"):
        return MAX_AGENT_REPORT_BYTES
    return MAX_OTHER_BODY_BYTES


async def _retention_loop(server: Server) -> None:
    while True:
        await asyncio.sleep(server.config.retention_interval_s)
        try:
            deleted = await run_in_threadpool(server.retention_pass)
            if deleted:
                log.info("retention: deleted %d spans", deleted)
        except Exception:
            log.exception("retention pass failed")

