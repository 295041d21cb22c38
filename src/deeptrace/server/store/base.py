"""The store interface: what the server asks of any storage engine, in four roles.

- BatchQueue: batches as agents sent them, durable before the agent hears "accepted",
  deduplicated by (agent, batch id), until their spans are written; and the dead letters.
- SpanWriter: linked spans in, old spans out (retention).
- SpanReader: search, traces, spans, the service map and time series.
- AgentRegistry: which agents report, from where, with what.
- Cluster (only stores several servers can share): which servers are alive, the batches
  each may take, and both ends of every accepted call, by call key, so that a call whose
  ends two servers link is joined all the same.

A Store is the first four. The embedded DuckDB store is one; reading is plain SQL shared by every
SQL engine (reading.SqlSpanReader, queries in sql.py), with what engines spell differently
behind a Dialect.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from deeptrace.association.exact import CallEnd


@dataclass
class TraceQuery:
    start_ns: int
    end_ns: int
    service: str | None = None
    operation: str | None = None
    status: str | None = None  # "ok" | "error"
    min_duration_ns: int | None = None
    max_duration_ns: int | None = None
    attributes: dict[str, str] = field(default_factory=dict)  # span attribute or column -> value
    sort: str = "start"  # "start" | "duration"
    descending: bool = True
    limit: int = 20
    offset: int = 0


@dataclass
class TraceSummary:
    trace_id: str
    root_service: str
    root_name: str
    start_ns: int
    duration_ns: int
    span_count: int
    error_count: int
    services: list[str]
    # Where the root span's process runs, when the agent knew (Kubernetes): "" when not.
    root_namespace: str = ""
    root_workload: str = ""


@dataclass
class Red:
    """Rate, errors, duration of a set of calls over a time range."""

    requests: int
    errors: int
    error_rate: float
    rate_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float


@dataclass
class MapNode:
    service: str
    red: Red


@dataclass
class MapEdge:
    source: str
    target: str
    red: Red


@dataclass
class ServiceMap:
    nodes: list[MapNode]
    edges: list[MapEdge]


@dataclass
class AgentInfo:
    agent_id: str
    host: str
    kernel: str
    version: str
    started_ns: int
    last_seen_ns: int
    stats: dict


@dataclass
class DeadLetter:
    """A span that was accepted but could not be linked or written: kept aside with why,
    so that it blocks nobody else's spans and can still be looked at."""

    agent_id: str
    batch_id: str
    span_id: str
    failed_ns: int
    reason: str
    span: str  # the span as JSON text, as far as it could be written out


@dataclass
class StoreStats:
    spans: int
    incoming_batches: int
    bytes_on_disk: int
    dead_letters: int = 0


class DuplicateBatch(Exception):
    """This (agent, batch) was stored before."""


class StoreUnavailable(Exception):
    """The store takes no writes now (disk full, I/O error): try again later. Any other
    exception from a write is about the data written."""


class BatchQueue(ABC):
    """Ingest: a batch is durable before the agent hears "accepted", and stays until linked."""

    @abstractmethod
    def accept_batch(self, agent_id: str, batch_id: str, body_gz: bytes, n_spans: int, now_ns: int) -> None:
        """Keep a batch (gzip JSON) until it is linked; raises DuplicateBatch if seen before."""

    @abstractmethod
    def incoming(self) -> list[tuple[str, str, bytes]]:
        """(agent_id, batch_id, body_gz) of every batch not yet fully linked, oldest first."""

    @abstractmethod
    def stored_span_ids(self, span_ids: list[str]) -> set[str]:
        """Which of these are stored or dead-lettered already (for replaying incoming batches
        after a crash)."""

    @abstractmethod
    def dead_letters(self, limit: int, offset: int = 0) -> tuple[list[DeadLetter], int]:
        """A page of dead letters, newest first, and how many there are."""


class SpanWriter(ABC):
    @abstractmethod
    def write_spans(self, spans: list[dict], done_batches: list[tuple[str, str]],
                    dead: list[DeadLetter] = ()) -> None:  # fmt: skip
        """Store linked spans and dead letters, and forget the incoming batches they completed,
        atomically. Raises StoreUnavailable when the store itself cannot write."""

    @abstractmethod
    def apply_retention(self, now_ns: int, max_age_ns: int | None, max_bytes: int | None) -> int:
        """Delete the oldest spans beyond the limits; returns how many."""


class SpanReader(ABC):
    @abstractmethod
    def trace(self, trace_id: str) -> list[dict]: ...

    @abstractmethod
    def traces(self, trace_ids: list[str]) -> dict[str, list[dict]]:
        """Several traces in one query: trace id -> spans by start."""

    @abstractmethod
    def span(self, span_id: str) -> dict | None: ...

    @abstractmethod
    def search(self, q: TraceQuery) -> tuple[list[TraceSummary], int]:
        """A page of traces with at least one span matching q, ordered by their matching spans'
        start or duration, and the total number that match."""

    @abstractmethod
    def services(self) -> list[str]: ...

    @abstractmethod
    def operations(self, service: str) -> list[tuple[str, str]]:
        """(name, kind) pairs."""

    @abstractmethod
    def service_map(self, start_ns: int, end_ns: int) -> ServiceMap: ...

    @abstractmethod
    def timeseries(self, start_ns: int, end_ns: int, step_ns: int, service: str | None = None,
                   edge: tuple[str, str] | None = None) -> list[tuple[int, Red]]: ...  # fmt: skip


class AgentRegistry(ABC):
    @abstractmethod
    def upsert_agent(self, agent: AgentInfo) -> None: ...

    @abstractmethod
    def agents(self) -> list[AgentInfo]: ...


class Cluster(ABC):
    """What servers that share a store need of it to share the linking (server/cluster.py)."""

    @abstractmethod
    def heartbeat(self, server_id: str, address: str, leaving: bool = False) -> None:
        """This server is alive (or, leaving, is not any more), by the store's clock."""

    @abstractmethod
    def live_servers(self, timeout_s: float) -> list[str]:
        """Servers whose last heartbeat is at most timeout_s old, by the store's clock."""

    @abstractmethod
    def record_call_ends(self, rows: list[CallEnd], now_ns: int) -> None:
        """Keep the call ends of an accepted batch (before it is acknowledged)."""

    @abstractmethod
    def call_ends(self, keys: list[str], kind: str) -> list[CallEnd]:
        """The accepted call ends of this kind with these keys."""

    @abstractmethod
    def stored_trace_ids(self, span_ids: list[str], start_ns: int, end_ns: int) -> dict[str, str]:
        """span_id -> trace_id of those of these spans that are stored (starting in the range)."""

    @abstractmethod
    def recent_batches(self, since_ns: int) -> list[tuple[str, str]]:
        """(agent_id, batch_id) of the batches received since then and not yet linked."""

    @abstractmethod
    def batches_of(self, agent_ids: list[str], keys: list[tuple[str, str]] = ()) -> list[tuple[str, str, bytes]]:
        """Like incoming(), for these agents' batches, or these batches."""


class Store(BatchQueue, SpanWriter, SpanReader, AgentRegistry):
    """Every role, and what concerns the whole store."""

    @abstractmethod
    def stats(self) -> StoreStats: ...

    @abstractmethod
    def close(self) -> None: ...
