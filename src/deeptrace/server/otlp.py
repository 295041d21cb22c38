"""OTLP export: our spans as OpenTelemetry spans, posted as protobuf over HTTP (OTLP/HTTP).

Mapping decisions (the OTLP receiving side is any OpenTelemetry collector or backend):

- Resource = the process that saw the exchange: `service.name`, `host.name`, `process.pid`,
  and where it runs: the span attributes named `k8s.*`, `container.*`, `deeptrace.cgroup.*`
  (schema.RESOURCE_ATTRIBUTE_PREFIXES) move there. Spans are grouped by resource, one
  ScopeSpans each, scope `deeptrace` and our version.
- Status: an `ok` span is exported as UNSET, not OK. The OTel trace API says instrumentation
  SHOULD leave the status unset unless there is an error, OK being reserved for an application
  developer or operator who explicitly marks the operation successful. DeepTrace is
  instrumentation that knows nothing about the application's intent, so UNSET is what it can
  honestly claim; backends treat UNSET as "not an error" anyway. `error` -> ERROR with the
  protocol's code (`404`, `WRONGTYPE`, `timeout`) as the message.
- Ids: ours are normally 32 (trace) and 16 (span) lowercase hex characters and become those
  bytes. Ids propagated from headers need not be: a shorter hex id is left-padded with zeros
  (how Jaeger's `uber-trace-id` and B3 write 64-bit and unpadded ids), anything else (not hex,
  too long, all zeros, which OTLP calls invalid) becomes the first bytes of its sha256. The
  mapping is a function of the string alone, so a parent and its children, converted in
  different batches or processes, still agree. A parent id that is empty or all zeros means
  "no parent" (the B3/Jaeger convention).
- Malformed span dicts (not a dict, ids or times missing or of the wrong type) are left out and
  counted, never raised on; an attribute that cannot be represented is counted in the span's
  `dropped_attributes_count`.
"""

from __future__ import annotations

import dataclasses
import email.utils
import hashlib
import json
import logging
import random
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Self
from urllib.parse import urlsplit, urlunsplit

import httpx
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1 import trace_pb2

from deeptrace import __version__
from deeptrace.schema import RESOURCE_ATTRIBUTE_PREFIXES

log = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"  # the OTLP/HTTP default path for traces
SCOPE_NAME = "deeptrace"
CONTENT_TYPE = "application/x-protobuf"
RETRYABLE_STATUS = frozenset({429, 502, 503, 504})  # the OTLP/HTTP spec's retryable answers
UNKNOWN_SERVICE = "unknown_service"  # the OTel resource semantic conventions' default

_KINDS = {
    "SERVER": trace_pb2.Span.SPAN_KIND_SERVER,
    "CLIENT": trace_pb2.Span.SPAN_KIND_CLIENT,
    "PRODUCER": trace_pb2.Span.SPAN_KIND_PRODUCER,
    "CONSUMER": trace_pb2.Span.SPAN_KIND_CONSUMER,
}
_HEX = re.compile(r"[0-9a-fA-F]+")  # bytes.fromhex alone would also accept spaces
_INT64 = range(-(2**63), 2**63)
_UINT64 = range(2**64)
_PORTS = range(65536)
_UDP_CAPABLE = frozenset({"dns"})  # protocols the agent also parses over UDP
_MAX_LOGGED_BODY = 512


# ---------------------------------------------------------------------------------------------
# Spans -> ExportTraceServiceRequest


class MalformedSpan(ValueError):
    """A span dict that cannot be exported; the message says which key is wrong."""


@dataclass(slots=True)
class Conversion:
    request: ExportTraceServiceRequest
    spans: int  # spans in the request
    skipped: int  # malformed span dicts left out


def id_bytes(value: str, size: int) -> bytes:
    """The `size` OTLP bytes for one of our ids (see the module's doc for the rules)."""
    if len(value) <= 2 * size and _HEX.fullmatch(value):
        raw = bytes.fromhex(value.rjust(2 * size, "0"))
        if any(raw):
            return raw
    # surrogatepass: ids parsed from JSON may hold lone surrogates, still a stable string
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()[:size]


def _parent_bytes(value: str) -> bytes:
    if not value.strip("0"):  # empty or all zeros: B3 and Jaeger write "no parent" so
        return b""
    return id_bytes(value, 8)


def spans_to_request(spans: Iterable[dict]) -> ExportTraceServiceRequest:
    """The OTLP request for these spans; malformed ones are left out (`convert_spans` counts them)."""
    return convert_spans(spans).request


def convert_spans(spans: Iterable[dict]) -> Conversion:
    """The OTLP request for these spans, with the count of malformed span dicts left out."""
    groups: dict[tuple, list[trace_pb2.Span]] = {}
    skipped = 0
    for s in spans:
        try:
            key, span = _convert_span(s)
        except MalformedSpan as exc:
            skipped += 1
            log.debug("span left out of OTLP export: %s", exc)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            # The checks below should leave protobuf nothing to refuse; if it still does, that
            # span alone is lost, never the batch.
            skipped += 1
            log.debug("span left out of OTLP export: %s: %s", type(exc).__name__, exc)
        else:
            groups.setdefault(key, []).append(span)
    request = ExportTraceServiceRequest()
    for (service, host, pid, where), members in groups.items():
        rs = request.resource_spans.add()
        rs.resource.attributes.extend(_resource_attributes(service, host, pid))
        rs.resource.attributes.extend(KeyValue(key=k, value=AnyValue(string_value=v)) for k, v in where)
        scope_spans = rs.scope_spans.add()
        scope_spans.scope.name = SCOPE_NAME
        scope_spans.scope.version = __version__
        scope_spans.spans.extend(members)
    return Conversion(request, sum(len(m) for m in groups.values()), skipped)


def _resource_attributes(service: str, host: str | None, pid: int | None) -> list[KeyValue]:
    out = [KeyValue(key="service.name", value=AnyValue(string_value=service))]
    if host is not None:
        out.append(KeyValue(key="host.name", value=AnyValue(string_value=host)))
    if pid is not None:
        out.append(KeyValue(key="process.pid", value=AnyValue(int_value=pid)))
    return out


def _convert_span(s: object) -> tuple[tuple, trace_pb2.Span]:
    if not isinstance(s, dict):
        raise MalformedSpan(f"not an object: {type(s).__name__}")
    trace_id, span_id = _required_id(s, "trace_id"), _required_id(s, "span_id")
    parent = s.get("parent_span_id")
    if parent is not None and not isinstance(parent, str):
        raise MalformedSpan(f"parent_span_id is {type(parent).__name__}")
    start, end = _time(s, "start_ns"), _time(s, "end_ns")
    kind = s.get("kind").upper() if isinstance(s.get("kind"), str) else ""
    span = trace_pb2.Span(
        trace_id=id_bytes(trace_id, 16),
        span_id=id_bytes(span_id, 8),
        parent_span_id=b"" if parent is None else _parent_bytes(parent),
        name=_name(s),
        kind=_KINDS.get(kind, trace_pb2.Span.SPAN_KIND_INTERNAL),
        start_time_unix_nano=start,
        end_time_unix_nano=end,
    )
    if s.get("status") == "error":
        code = s.get("status_code")
        span.status.code = trace_pb2.Status.STATUS_CODE_ERROR
        span.status.message = "" if code is None else _text(str(code))
    attributes, dropped = _merged_attributes(s, kind)
    where = tuple(sorted((k, _text(v)) for k, v in attributes.items()
                         if k.startswith(RESOURCE_ATTRIBUTE_PREFIXES) and isinstance(v, str)))  # fmt: skip
    for k, _ in where:
        del attributes[k]
    span.dropped_attributes_count = dropped + _add_attributes(span, attributes)
    return (*_resource_key(s), where), span


def _required_id(s: dict, key: str) -> str:
    value = s.get(key)
    if not isinstance(value, str) or not value:
        raise MalformedSpan(f"{key} is {value!r}")
    return value


def _time(s: dict, key: str) -> int:
    value = s.get(key)
    if not _is_int(value) or value not in _UINT64:
        raise MalformedSpan(f"{key} is {value!r}")
    return value


def _name(s: dict) -> str:
    for key in ("name", "protocol"):
        if isinstance(s.get(key), str) and s[key]:
            return _text(s[key])
    return "unknown"


def _resource_key(s: dict) -> tuple[str, str | None, int | None]:
    service, host, pid = s.get("service"), s.get("host"), s.get("pid")
    return (
        _text(service) if isinstance(service, str) and service else UNKNOWN_SERVICE,
        _text(host) if isinstance(host, str) and host else None,
        pid if _is_int(pid) and pid in _INT64 else None,
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value: str) -> str:
    """The string as valid UTF-8, which protobuf requires: JSON can carry lone surrogates."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


# ---------------------------------------------------------------------------------------------
# Attributes


def _merged_attributes(s: dict, kind: str) -> tuple[dict[str, object], int]:
    """The span's own attributes, then the ones from its fields (those win on a clash: they are
    what every component agrees on). Returns them with the count of ones dropped."""
    merged: dict[str, object] = {}
    dropped = 0
    raw = s.get("attributes")
    if isinstance(raw, dict):
        for key, value in raw.items():
            merged[key if isinstance(key, str) else str(key)] = value
    elif raw is not None:
        dropped += 1
    fields, bad = _field_attributes(s, kind)
    merged.update(fields)
    return merged, dropped + bad


# (span key, attribute, check): each present value of the right type becomes the attribute.
_STR, _INT, _PORT = "str", "int", "port"
_FIELD_ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("raddr", "network.peer.address", _STR),
    ("rport", "network.peer.port", _PORT),
    ("laddr", "network.local.address", _STR),
    ("lport", "network.local.port", _PORT),
    ("protocol", "deeptrace.protocol", _STR),
    ("link_method", "deeptrace.link_method", _STR),
    ("peer_service", "deeptrace.peer_service", _STR),
    ("tid", "thread.id", _INT),
    ("resp_tid", "deeptrace.response.thread.id", _INT),
    ("req_size", "deeptrace.request.size", _INT),
    ("resp_size", "deeptrace.response.size", _INT),
    ("conn_id", "deeptrace.connection.id", _INT),
)


def _field_attributes(s: dict, kind: str) -> tuple[dict[str, object], int]:
    out: dict[str, object] = {}
    bad = 0
    for key, attribute, check in _FIELD_ATTRIBUTES:
        value = s.get(key)
        if value is None:
            continue
        if _fits(value, check):
            out[attribute] = value
        else:
            bad += 1
    confidence = s.get("link_confidence")
    if isinstance(confidence, (int, float)) and not isinstance(confidence, bool):
        out["deeptrace.link_confidence"] = float(confidence)
    elif confidence is not None:
        bad += 1
    if s.get("status_code") is not None:
        out["deeptrace.status_code"] = str(s["status_code"])
    # The peer is the server of a CLIENT span and the client of a SERVER span (semconv).
    side = {"CLIENT": "server", "SERVER": "client"}.get(kind)
    if side and "network.peer.address" in out:
        out[f"{side}.address"] = out["network.peer.address"]
    if side and "network.peer.port" in out:
        out[f"{side}.port"] = out["network.peer.port"]
    out["network.transport"] = _transport(s)
    if "network.peer.address" in out:
        out["network.type"] = "ipv6" if ":" in out["network.peer.address"] else "ipv4"
    return out, bad


def _fits(value: object, check: str) -> bool:
    if check == _STR:
        return isinstance(value, str) and bool(value)
    if check == _PORT:
        return _is_int(value) and value in _PORTS
    return _is_int(value) and value in _INT64


def _transport(s: dict) -> str:
    # Spans carry no transport, but only TCP spans have byte ranges, and only DNS runs on UDP.
    udp = s.get("protocol") in _UDP_CAPABLE and s.get("req_seq") is None
    return "udp" if udp else "tcp"


def _add_attributes(span: trace_pb2.Span, attributes: dict[str, object]) -> int:
    """Adds them to the span; returns how many could not be (no key, or a null value, which
    OTel attributes cannot hold)."""
    dropped = 0
    for key, value in attributes.items():
        if not key or value is None:
            dropped += 1
            continue
        kv = span.attributes.add()
        kv.key = _text(key)
        _set_value(kv.value, value)
    return dropped


def _set_value(out: AnyValue, value: object) -> None:
    if isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        if value in _INT64:
            out.int_value = value
        else:
            out.string_value = str(value)
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, str):
        out.string_value = _text(value)
    elif isinstance(value, (bytes, bytearray)):
        out.bytes_value = bytes(value)
    elif isinstance(value, (list, tuple)) and (item_type := _array_type(value)) is not None:
        out.array_value.SetInParent()  # an empty list is still an array, not an empty value
        for item in value:
            _set_value(out.array_value.values.add(), float(item) if item_type is float else item)
    else:
        out.string_value = _json(value)


def _array_type(values: list | tuple) -> type | None:
    """The one element type OTel can hold the list as, or None: attribute arrays are primitives
    of one type. Ints among floats become floats, as JSON does not tell them apart."""
    kinds: set[type] = set()
    for v in values:
        if isinstance(v, bool):
            kinds.add(bool)
        elif isinstance(v, int):
            if v not in _INT64:
                return None
            kinds.add(int)
        elif isinstance(v, float):
            kinds.add(float)
        elif isinstance(v, str):
            kinds.add(str)
        else:
            return None
    if kinds == {int, float}:
        return float
    if len(kinds) > 1:
        return None
    return kinds.pop() if kinds else str


def _json(value: object) -> str:
    try:
        text = json.dumps(value, default=str, ensure_ascii=False, skipkeys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):  # circular or absurdly deep
        text = repr(value)
    return _text(text)


# ---------------------------------------------------------------------------------------------
# The exporter


@dataclass(slots=True)
class OtlpStats:
    submitted_spans: int = 0
    exported_spans: int = 0  # accepted by the receiver
    dropped_spans: int = 0  # never to be exported, for any reason (malformed ones included)
    malformed_spans: int = 0
    failed_requests: int = 0  # posts that did not succeed, retried or not
    retried_requests: int = 0
    queued_spans: int = 0  # waiting, the batch in flight included
    last_error: str | None = None


@dataclass(slots=True)
class _Outcome:
    ok: bool
    retryable: bool = False
    error: str | None = None
    retry_after_s: float | None = None
    rejected: int = 0  # spans a receiver refused in a partial success


def traces_url(endpoint: str) -> str:
    """The URL to post to: the endpoint, with the OTLP default path when it has none."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"OTLP endpoint must be an http(s) URL, not {endpoint!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path=TRACES_PATH)
    return urlunsplit(parts)


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential back-off with equal jitter: half of each step is fixed, so no retry comes at
    once, half random, so exporters that failed together do not retry together."""
    step = min(max_s, base_s * 2 ** (attempt - 1))
    return step / 2 + random.uniform(0, step / 2)


def retry_after_s(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay seconds or an HTTP date), None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OtlpExporter:
    """Posts spans to an OTLP/HTTP receiver from a background thread.

    `submit` never blocks: spans wait in a bounded queue, the oldest dropped (and counted) when
    it is full, because the newest spans are the ones an operator is looking at. Batches that
    fail on the connection or with 429/502/503/504 are retried with back-off; other failures,
    and retries exhausted, drop the batch (counted). Invariant once idle:
    submitted_spans == exported_spans + dropped_spans + queued_spans.
    """

    def __init__(self, endpoint: str, headers: dict | None = None, timeout_s: float = 10.0,
                 max_queue_spans: int = 100_000, batch_spans: int = 512, *, max_tries: int = 5,
                 backoff_base_s: float = 0.5, backoff_max_s: float = 30.0) -> None:  # fmt: skip
        if max_queue_spans < 1 or batch_spans < 1 or max_tries < 1:
            raise ValueError("max_queue_spans, batch_spans and max_tries must be at least 1")
        self.url = traces_url(endpoint)
        self.max_queue_spans = max_queue_spans
        self.batch_spans = batch_spans
        self.max_tries = max_tries
        self.backoff_base_s = backoff_base_s
        # Also bounds a server's Retry-After: the queue must not stall on one server's word.
        self.backoff_max_s = backoff_max_s
        # Made here, not in the thread, so that bad headers fail the caller, not the thread.
        all_headers = httpx.Headers({"User-Agent": f"deeptrace/{__version__}"})
        all_headers.update(headers or {})
        all_headers["Content-Type"] = CONTENT_TYPE  # replaces a caller's, whatever its case
        self._client = httpx.Client(headers=all_headers, timeout=timeout_s)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # spans queued, or closing
        self._idle = threading.Condition(self._lock)  # a batch finished
        self._queue: deque[dict] = deque()
        self._inflight = 0
        self._closing = False
        self._abort = threading.Event()  # close timed out: stop retrying, drop what is left
        self._stats = OtlpStats()
        self._thread = threading.Thread(target=self._run, name="deeptrace-otlp", daemon=True)
        self._thread.start()

    # -- the caller's side

    def submit(self, spans: Iterable[dict]) -> None:
        spans = list(spans)
        with self._lock:
            self._stats.submitted_spans += len(spans)
            if self._closing:
                self._drop(len(spans), "submitted after close")
                return
            self._queue.extend(spans)
            over = len(self._queue) - self.max_queue_spans
            if over > 0:
                for _ in range(over):
                    self._queue.popleft()
                self._drop(over, "queue full")
            self._work.notify()

    @property
    def stats(self) -> OtlpStats:
        with self._lock:
            return dataclasses.replace(self._stats, queued_spans=len(self._queue) + self._inflight)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Waits until everything submitted so far is exported or dropped; False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._queue and not self._inflight, timeout_s)

    def close(self, timeout_s: float = 10.0) -> bool:
        """Exports what is queued, then stops. False when that took longer than timeout_s: then
        retries stop and what is left is dropped (counted) once the request in flight returns."""
        with self._lock:
            self._closing = True
            self._work.notify_all()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._abort.set()
            return False
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the thread's side

    def _run(self) -> None:
        try:
            while (batch := self._take()) is not None:
                try:
                    self._export(batch)
                except Exception as exc:  # the thread must outlive any one batch
                    log.exception("OTLP export of %d spans failed", len(batch))
                    with self._lock:  # what is in flight: malformed spans are already counted
                        self._drop(self._inflight, f"{type(exc).__name__}: {exc}")
                finally:
                    with self._lock:
                        self._inflight = 0
                        self._idle.notify_all()
        finally:
            self._client.close()

    def _take(self) -> list[dict] | None:
        """The next batch: whatever is queued, up to batch_spans (while a post is in flight
        spans gather, so batches grow with load); None when closing and done."""
        with self._lock:
            while not self._queue and not self._closing:
                self._work.wait()
            if self._abort.is_set() or not self._queue:
                self._drop(len(self._queue), "exporter closed")
                self._queue.clear()
                self._idle.notify_all()
                return None
            batch = [self._queue.popleft() for _ in range(min(self.batch_spans, len(self._queue)))]
            self._inflight = len(batch)
            return batch

    def _export(self, batch: list[dict]) -> None:
        conversion = convert_spans(batch)
        body = conversion.request.SerializeToString()
        with self._lock:
            self._stats.malformed_spans += conversion.skipped
            self._drop(conversion.skipped, f"{conversion.skipped} malformed spans left out")
            self._inflight = conversion.spans
        if conversion.spans:
            self._deliver(body, conversion.spans)

    def _deliver(self, body: bytes, count: int) -> None:
        for attempt in range(1, self.max_tries + 1):
            outcome = self._post(body)
            if outcome.ok:
                with self._lock:
                    rejected = min(count, outcome.rejected)
                    self._stats.exported_spans += count - rejected
                    self._drop(rejected, outcome.error)
                return
            with self._lock:
                self._stats.failed_requests += 1
                self._stats.last_error = outcome.error
            if not outcome.retryable or attempt == self.max_tries or self._abort.is_set():
                break
            delay = outcome.retry_after_s
            if delay is None:
                delay = backoff_s(attempt, self.backoff_base_s, self.backoff_max_s)
            with self._lock:
                self._stats.retried_requests += 1
            if self._abort.wait(min(delay, self.backoff_max_s)):
                break
        log.warning("OTLP export to %s: dropped %d spans after %d tries: %s", self.url, count, attempt,
                    outcome.error)  # fmt: skip
        with self._lock:
            self._drop(count, outcome.error)

    def _post(self, body: bytes) -> _Outcome:
        try:
            response = self._client.post(self.url, content=body)
        except httpx.TransportError as exc:  # refused, reset, timed out: the receiver may come back
            return _Outcome(False, retryable=True, error=f"{type(exc).__name__}: {exc}")
        except httpx.HTTPError as exc:
            return _Outcome(False, error=f"{type(exc).__name__}: {exc}")
        if response.is_success:
            return _accepted(response)
        error = f"HTTP {response.status_code}: {response.text[:_MAX_LOGGED_BODY]}"
        if response.status_code in RETRYABLE_STATUS:
            return _Outcome(False, True, error, retry_after_s(response.headers.get("Retry-After")))
        return _Outcome(False, error=error)

    def _drop(self, count: int, reason: str | None) -> None:
        """Counts dropped spans; the lock is held."""
        if count:
            self._stats.dropped_spans += count
            if reason:
                self._stats.last_error = reason


def _accepted(response: httpx.Response) -> _Outcome:
    """A 2xx answer; a partial success names spans the receiver refused after all."""
    if not response.content or "protobuf" not in response.headers.get("Content-Type", ""):
        return _Outcome(True)
    try:
        partial = ExportTraceServiceResponse.FromString(response.content).partial_success
    except DecodeError:
        return _Outcome(True)
    if partial.rejected_spans <= 0:
        return _Outcome(True)
    error = f"receiver rejected {partial.rejected_spans} spans: {partial.error_message}"
    log.warning("OTLP export: %s", error)
    return _Outcome(True, error=error, rejected=partial.rejected_spans)
