"""The `deeptrace` command."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from contextlib import contextmanager

import click

from deeptrace import __version__
from deeptrace.errors import DeepTraceError
from deeptrace.schema import REQUIRED_KEYS


class _Stop:
    """Set by SIGINT/SIGTERM so the read loop ends and everything is detached."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, frame) -> None:
        self.requested = True


@contextmanager
def _open_out(path: str):
    if path == "-":
        yield sys.stdout
    else:
        with open(path, "w") as f:
            yield f


def _fail(e: DeepTraceError) -> None:
    click.echo(f"deeptrace: error: {e}", err=True)
    sys.exit(2)


@click.group()
@click.version_option(__version__, prog_name="deeptrace")
def main() -> None:
    """DeepTrace: non-intrusive distributed tracing with eBPF."""


def _collector_options(fn):
    """Options shared by every command that runs the collector."""
    options = [
        click.option("--pid", "pids", type=int, multiple=True,
                     help="Trace this process, its threads and its children (repeatable)."),
        click.option("--comm", "comms", multiple=True, help="Trace processes with this name, now and later (repeatable)."),
        click.option("--all", "trace_all", is_flag=True, help="Trace every process except this agent."),
        click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: until Ctrl-C)."),
        click.option("--out", "out_path", default="-", show_default=True, help="File for JSON lines, or - for stdout."),
        click.option("--capture", "capture_bytes", type=int, default=1024, show_default=True,
                     help="Payload bytes kept per record (0-16384)."),
        click.option("--ring-size", "ring_bytes", type=int, default=16 << 20, show_default=True,
                     help="Ring buffer bytes (power of two)."),
        click.option("--no-follow-forks", is_flag=True, help="Do not trace children forked after start."),
        click.option("--no-tls", is_flag=True, help="Do not read TLS connections' plaintext at their TLS libraries "
                     "(uprobes on OpenSSL, GnuTLS, Go's crypto/tls); they then give no spans."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


# How often the agent looks for requests the kernel holds that have waited past --timeout.
SWEEP_INTERVAL_S = 5.0


def _algorithm_option(fn):
    from deeptrace.association.names import ALGORITHM_NAMES, DEFAULT_ALGORITHM

    return click.option("--algorithm", type=click.Choice(ALGORITHM_NAMES), default=DEFAULT_ALGORITHM,
                        show_default=True, help="How calls are linked to the requests that made them when "
                        "no exact link exists (joint is ours; the rest are baselines).")(fn)  # fmt: skip


def _run(opts: dict, on_batch, on_tick=None, on_end=None, on_exchanges=None, assemble=(), sampling=False,
         dns_ports=(53,), on_start=None) -> None:  # fmt: skip
    """Run the collector until --duration or a signal: on_start(collector) once it runs, on_batch(records, out) for each
    batch, on_exchanges(events, wall_offset_ns, out) for each batch of exchanges the kernel
    assembled (of the protocols in `assemble`; DNS on `dns_ports`), on_tick(out) about once a
    second, on_end(collector, out) after the last batch. sampling: connections sampled under
    overload."""
    from deeptrace.agent.collector import Collector, CollectorConfig
    from deeptrace.agent.selection import Selection

    stop = _Stop()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        sel = Selection(list(opts["pids"]), list(opts["comms"]), opts["trace_all"])
        if sel.empty:
            raise DeepTraceError("say which processes to trace: --pid PID, --comm NAME or --all")
        config = CollectorConfig(selection=sel, capture_bytes=opts["capture_bytes"], ring_bytes=opts["ring_bytes"],
                                 follow_forks=not opts["no_follow_forks"], tls=not opts["no_tls"],
                                 assemble=tuple(assemble) if on_exchanges else (), sampling=sampling,
                                 dns_ports=tuple(dns_ports))  # fmt: skip
        with Collector(config) as collector, _open_out(opts["out_path"]) as out:
            if on_start:
                on_start(collector)
            click.echo(f"deeptrace: tracing {_describe(sel, collector)}; Ctrl-C to stop", err=True)
            deadline = time.monotonic() + opts["duration"] if opts["duration"] is not None else None
            next_tick = time.monotonic() + 1

            def one_batch(timeout_s: float) -> bool:
                records = collector.poll(timeout_s=timeout_s)
                exchanges = collector.poll_exchanges() if on_exchanges else ()
                if len(exchanges):
                    on_exchanges(exchanges, collector.wall_offset_ns, out)
                on_batch(records, out)
                return bool(records) or bool(len(exchanges))

            while not stop.requested and (deadline is None or time.monotonic() < deadline):
                one_batch(0.1)
                if on_tick and time.monotonic() >= next_tick:
                    next_tick += 1
                    on_tick(collector, out)
            while one_batch(0):  # what arrived before the programs are detached
                pass
            if on_end:
                on_end(collector, out)
            out.flush()
            _summary(collector)
    except DeepTraceError as e:
        _fail(e)
    except BrokenPipeError:
        sys.stderr.close()  # reader went away (e.g. `| head`): not an error


@main.command()
@_collector_options
@click.option("--format", "fmt", type=click.Choice(["json", "text"]), default="json", show_default=True,
              help="JSON lines, or one readable line per record.")
def record(fmt, **opts) -> None:
    """Write one JSON object per socket syscall of the traced processes."""
    from deeptrace.capture.records import format_text

    def write(batch, out) -> None:
        for rec in batch:
            out.write((format_text(rec) if fmt == "text" else json.dumps(rec.to_json_dict())) + "\n")
        if batch:
            out.flush()

    _run(opts, write)


@main.command()
@_collector_options
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True,
              help="Seconds a request waits for its response before it is reported as an error span.")
@click.option("--format", "fmt", type=click.Choice(["json", "text"]), default="json", show_default=True,
              help="JSON lines, or one readable line per span.")
@click.option("--stats-interval", type=float, default=10.0, show_default=True,
              help="Seconds between the one-line stats on stderr.")
@click.option("--host", "host_name", default=None, help="Host name spans carry (default: this machine's).")
@click.option("--associate", is_flag=True, help="Link spans into traces before writing them (JSON only): each "
              "span gets trace_id, parent_span_id, link_method, link_confidence.")
@_algorithm_option
@click.option("--no-header-ids", is_flag=True, help="With --associate: ignore propagated ids in the traffic.")
@click.option("--hold", type=float, default=5.0, show_default=True,
              help="With --associate: seconds a span waits after it ended for its parent to be seen.")
@click.option("--server", "server_url", default=None, metavar="URL",
              help="Ship spans to this DeepTrace server (http://collector:8700) instead of writing them.")
@click.option("--token", envvar="DEEPTRACE_TOKEN", show_envvar=True, default=None,
              help="With --server: the server's ingest token.")
@click.option("--spool-dir", default="/var/lib/deeptrace/spool", show_default=True,
              type=click.Path(file_okay=False),
              help="With --server: where spans wait for the server (kept across restarts).")
@click.option("--spool-max-bytes", type=click.IntRange(min=1 << 20), default=256 << 20, show_default=True,
              help="With --server: spool size limit; past it the oldest batches are dropped (and counted).")
@click.option("--agent-id", default=None, help="With --server: this agent's id at the server "
              "(default: made once and kept in the spool directory).")
@click.option("--no-kernel-exchanges", is_flag=True, help="Frame every connection in user space from records, "
              "including the HTTP/1, Redis, Memcached and DNS traffic whose exchanges the kernel would otherwise pair.")
@click.option("--dns-port", "dns_ports", type=click.IntRange(1, 65535), multiple=True, default=(53,), show_default=True,
              help="UDP port whose datagrams the kernel pairs as DNS (repeat for up to 4); DNS on other ports is "
              "framed in user space.")
@click.option("--no-sampling", is_flag=True, help="Never sample: under overload, what finds the ring buffer full "
              "is lost (counted) instead of whole connections being left out (spans then carry sampling.weight).")
@click.option("--kube/--no-kube", "kube_mode", default=None, help="Name spans after Kubernetes pods and workloads, "
              "read from the API server (pods of this node, watched). Default: on when a service-account token "
              "is mounted (running in a cluster).")
@click.option("--node-name", envvar="NODE_NAME", show_envvar=True, default=None,
              help="With Kubernetes: this node's name (the DaemonSet passes spec.nodeName).")
def agent(timeout_s, fmt, stats_interval, host_name, associate, algorithm, no_header_ids, hold, server_url,
          token, spool_dir, spool_max_bytes, agent_id, no_kernel_exchanges, no_sampling, dns_ports, kube_mode,
          node_name, **opts) -> None:  # fmt: skip
    """Trace processes and write one JSON span per request/response exchange (or ship them to a
    server with --server)."""
    from deeptrace.agent.services import Processes
    from deeptrace.capture.pipeline import SpanPipeline
    from deeptrace.capture.records import EXCHANGE_PROTOCOLS  # every one the kernel can assemble, by default
    from deeptrace.capture.spans import format_text, json_lines

    kube = _kube_metadata(kube_mode, node_name)
    processes = Processes(kube)
    pipeline = SpanPipeline(host=host_name, timeout_ns=int(timeout_s * 1e9), process_info=processes,
                            peer_name=kube.peer_name if kube is not None else None)  # fmt: skip
    shipper, kernel = None, {"drops": 0, "sampled": 0, "sample_level": 0}  # counted on this thread, read by the heartbeat's
    if server_url is not None:
        from click.core import ParameterSource

        from deeptrace.agent.shipper import Shipper

        if associate:
            raise click.UsageError("--server ships spans to the server, which links them into traces itself; "
                                   "leave out --associate")  # fmt: skip
        if fmt == "text":
            raise click.UsageError("--server ships JSON spans; leave out --format text")
        if click.get_current_context().get_parameter_source("out_path") is not ParameterSource.DEFAULT:
            raise click.UsageError("--server ships spans instead of writing them; leave out --out")
        if not token:
            raise click.UsageError("--server needs the server's ingest token: --token TOKEN or DEEPTRACE_TOKEN")

        def agent_stats() -> dict:
            st = pipeline.stats
            return {"records": st.records, "exchanges": st.exchanges, "spans": st.spans, "drops": kernel["drops"],
                    "sampled": kernel["sampled"], "sample_level": kernel["sample_level"],
                    "open_connections": pipeline.open_connections}  # fmt: skip

        try:
            shipper = Shipper(server_url, token, spool_dir, agent_id=agent_id, max_spool_bytes=spool_max_bytes,
                              stats_provider=agent_stats, host=host_name)  # fmt: skip
        except DeepTraceError as e:
            _fail(e)
        click.echo(f"deeptrace: shipping spans to {shipper.server} as agent {shipper.agent_id} (spool "
                   f"{shipper.spool_dir}: {shipper.stats.spool_batches} batches waiting)", err=True)  # fmt: skip
    linker = None
    if associate:
        if fmt == "text":
            raise click.UsageError("--associate writes JSON lines; leave out --format text")
        from deeptrace.association.streaming import StreamingAssociator

        linker = StreamingAssociator(algorithm, header_ids=not no_header_ids, hold_s=hold)

    def emit(dicts, out) -> None:
        if dicts:
            out.write(json_lines(dicts))
            out.flush()

    def write(spans, out) -> None:
        if shipper is not None:
            if spans:
                shipper.submit([span.to_json_dict() for span in spans])
            return
        if linker is not None:
            linker.push([span.to_json_dict() for span in spans])
            return
        if spans:
            out.write("".join(format_text(span) + "\n" for span in spans) if fmt == "text"
                      else json_lines([span.to_json_dict() for span in spans]))  # fmt: skip
            out.flush()

    def exchanges(events, wall_offset_ns, out) -> None:
        if shipper is None and linker is None and fmt == "json":  # straight to JSON lines, no Span objects
            out.write(json_lines(pipeline.push_exchanges_json(events, wall_offset_ns)))
            out.flush()
        else:
            write(pipeline.push_exchanges(events, wall_offset_ns), out)

    next_stats = time.monotonic() + stats_interval
    next_sweep = time.monotonic() + SWEEP_INTERVAL_S

    def tick(collector, out) -> None:
        nonlocal next_stats, next_sweep
        write(pipeline.flush(time.time_ns()), out)
        if time.monotonic() >= next_sweep:  # requests the kernel holds that wait past --timeout
            next_sweep += SWEEP_INTERVAL_S
            events, ends = collector.waiting_exchanges(time.monotonic_ns() - pipeline.timeout_ns)
            if len(events):
                write(pipeline.expire_exchanges(events, ends, collector.wall_offset_ns), out)
        if linker is not None:
            emit(linker.pop_ready(time.time_ns()), out)
        if shipper is not None:
            counters = collector.counters()
            kernel["drops"] = sum(v for k, v in counters.items() if k.startswith("drop_"))
            kernel["sampled"], kernel["sample_level"] = _sampled_away(counters), collector.sampling.level
        if time.monotonic() >= next_stats:
            next_stats += stats_interval
            st, counters = pipeline.stats, collector.counters()
            drops = sum(v for k, v in counters.items() if k.startswith("drop_"))
            line = (f"deeptrace: records {st.records} exchanges {st.exchanges} spans {st.spans} drops {drops} "
                    f"sampled away {_sampled_away(counters)} (level {collector.sampling.level}) "
                    f"open connections {pipeline.open_connections}")  # fmt: skip
            if kube is not None:
                line += f"; kubernetes: {kube.stats.describe()}"
            click.echo(line + (f"; {shipper.stats.describe()}" if shipper is not None else ""), err=True)

    def end(collector, out) -> None:
        write(pipeline.close_all(time.time_ns()), out)
        # Requests the kernel still holds end as open connections do (the records path's).
        events, ends = collector.waiting_exchanges(time.monotonic_ns())
        write(pipeline.expire_exchanges(events, ends, collector.wall_offset_ns, "agent stopped"), out)
        if linker is not None:
            emit(linker.close(time.time_ns()), out)

    try:
        _run(opts, lambda batch, out: write(pipeline.push(batch), out), tick, end, on_exchanges=exchanges,
             assemble=() if no_kernel_exchanges else EXCHANGE_PROTOCOLS[1:], sampling=not no_sampling,
             dns_ports=dns_ports, on_start=lambda collector: processes.use_kernel_cgroups(collector.cgroup_id))  # fmt: skip
    finally:
        if kube is not None:
            kube.stop()
        if shipper is not None:
            # Seals the open batch; what the server does not take within the grace time stays spooled.
            shipper.close(timeout_s=5.0)
            click.echo(f"deeptrace: {shipper.stats.describe()} (server {shipper.server})", err=True)


@main.command()
@click.argument("capture", type=click.Path(dir_okay=False))
@click.option("--out", "out_path", default="-", show_default=True, help="File for span JSON lines, or - for stdout.")
@click.option("--format", "fmt", type=click.Choice(["json", "text"]), default="json", show_default=True,
              help="JSON lines, or one readable line per span.")
def replay(capture, out_path, fmt) -> None:
    """Spans from a pcap/pcapng capture, through the same parsers as the agent."""
    from deeptrace.capture import replay as replaying
    from deeptrace.capture.pipeline import SpanPipeline
    from deeptrace.capture.spans import format_text, json_lines

    pipeline = SpanPipeline(host="pcap")
    unreadable = None
    try:
        with _open_out(out_path) as out:
            def write(spans) -> None:
                out.write("".join(format_text(span) + "\n" for span in spans) if fmt == "text"
                          else json_lines([span.to_json_dict() for span in spans]))  # fmt: skip

            batch: list = []
            try:
                for rec in replaying.records(capture):
                    batch.append(rec)
                    if len(batch) >= 4096:
                        write(pipeline.push(batch))
                        batch = []
            except DeepTraceError as e:  # not a capture, or cut short: the packets before still count
                unreadable = e
            write(pipeline.push(batch))
            write(pipeline.close_all(time.time_ns()))
            out.flush()
        st = pipeline.stats
        if unreadable is None or st.records:  # a file that is no capture at all gets its one line only
            click.echo(f"deeptrace: {st.records} records from {capture}: {st.spans} spans, {st.unanswered} without "
                       f"response, {st.orphan_responses} responses without request, {st.undetected_connections} "
                       f"connections of no known protocol", err=True)  # fmt: skip
    except DeepTraceError as e:
        _fail(e)
    except BrokenPipeError:
        sys.stderr.close()
    if unreadable is not None:
        click.echo(f"deeptrace replay: {unreadable}", err=True)
        sys.exit(2)


def _read_spans(path: str) -> list[dict]:
    spans = []
    with click.open_file(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DeepTraceError(f"{path}:{n}: not a JSON line ({e.msg})") from None
            missing = [k for k in REQUIRED_KEYS if k not in d]
            if missing:
                raise DeepTraceError(f"{path}:{n}: not a span (no {', '.join(missing)}); "
                                     "expected the JSON lines `deeptrace agent` writes")  # fmt: skip
            spans.append(d)
    return spans


@main.command()
@click.argument("spans_file", metavar="SPANS.jsonl", default="-")
@_algorithm_option
@click.option("--no-header-ids", is_flag=True, help="Ignore propagated ids (traceparent, b3, uber-trace-id, "
              "X-Request-ID) in the traffic.")  # fmt: skip
@click.option("--out", "out_path", default="-", show_default=True, help="File for linked span JSON lines, or -.")
def associate(spans_file, algorithm, no_header_ids, out_path) -> None:
    """Link spans into traces: fill in trace_id, parent_span_id, link_method and
    link_confidence of each span in SPANS.jsonl (the agent's output; - for stdin)."""
    from collections import Counter

    from deeptrace.association.associate import associate as link
    from deeptrace.capture.spans import json_lines

    try:
        spans = _read_spans(spans_file)
        started = time.perf_counter()
        link(spans, algorithm, header_ids=not no_header_ids)
        took = time.perf_counter() - started
        with _open_out(out_path) as out:
            out.write(json_lines(spans))
        methods = Counter(d["link_method"] for d in spans)
        traces = len({d["trace_id"] for d in spans})
        click.echo(f"deeptrace: {len(spans)} spans in {traces} traces ({algorithm}, {took:.2f} s): "
                   + ", ".join(f"{m} {n}" for m, n in sorted(methods.items())), err=True)  # fmt: skip
    except DeepTraceError as e:
        _fail(e)
    except BrokenPipeError:
        sys.stderr.close()


def _describe(sel, collector) -> str:
    if sel.trace_all:
        return "all processes"
    parts = []
    if sel.pids:
        parts.append("pid " + ",".join(map(str, sel.pids)))
    if sel.comms:
        parts.append("name " + ",".join(sel.comms))
    return " and ".join(parts) + f" ({len(collector.traced)} processes now)" + _describe_tls(collector)


def _describe_tls(collector) -> str:
    if collector.tls is None:
        return "; TLS plaintext off"
    stats = collector.tls.stats
    attached = ", ".join(f"{os.path.basename(name)} ({library})" for name, library in sorted(stats.attached.items()))
    return f"; TLS plaintext from {attached or 'the TLS libraries traced processes map, when they do'}"


def _kube_metadata(mode: bool | None, node_name: str | None):
    """The pod watch, started (None when off). Asked for (--kube) and impossible is an error;
    found by itself (a service-account token) and impossible is a warning."""
    if mode is False:
        return None
    from deeptrace.agent import kube

    if mode is None and not kube.in_cluster():
        return None
    try:
        metadata = kube.KubeMetadata.from_environment(node_name)
    except DeepTraceError as e:
        if mode:
            _fail(e)
        click.echo(f"deeptrace: warning: no Kubernetes metadata: {e}", err=True)
        return None
    metadata.start()
    synced = metadata.wait_synced(timeout=10.0)
    click.echo(f"deeptrace: kubernetes: node {metadata.node_name}, "
               + (metadata.stats.describe() if synced else "first list still on its way"), err=True)  # fmt: skip
    return metadata


def _sampled_away(counters: dict[str, int]) -> int:
    """Records and exchanges the kernel did not write because sampling left their connection out."""
    return counters["sampled_records"] + counters["sampled_exchanges"]


def _summary(collector) -> None:
    counters = collector.counters()
    drops = {k[5:]: v for k, v in counters.items() if k.startswith("drop_") and v}
    skipped = {k[5:]: v for k, v in counters.items() if k.startswith("skip_") and v}
    line = (
        f"deeptrace: {collector.received} records "
        f"(kernel submitted {counters['submitted']}, truncated {counters['truncated']}), "
        f"{collector.received_exchanges} exchanges (kernel submitted {counters['exchanges']}; connections "
        f"assembled {counters['conn_assembled']}, handed over {counters['conn_handed_over']}); "
        f"drops: {sum(drops.values())}"
    )
    if collector.config.sampling:
        line += (f"; sampled away: {counters['sampled_records']} records, {counters['sampled_exchanges']} exchanges "
                 f"({counters['conn_sampled_out']} connections left out when first seen; level now "
                 f"{collector.sampling.level})")  # fmt: skip
    if drops:
        line += " (" + ", ".join(f"{k} {v}" for k, v in drops.items()) + ")"
    if skipped:
        line += "; not reported: " + ", ".join(f"{k} {v}" for k, v in skipped.items())
    if counters["tls_plaintext"] or counters["tls_ciphertext"]:
        line += (f"; TLS: {counters['tls_plaintext']} plaintext records, {counters['tls_ciphertext']} ciphertext "
                 "calls not written")  # fmt: skip
    if collector.tls is not None and collector.tls.stats.errors:
        line += "; TLS libraries not attached: " + ", ".join(f"{k} ({v})" for k, v in collector.tls.stats.errors.items())
    click.echo(line, err=True)


def _add_server_command() -> None:
    from deeptrace.server.main import server

    main.add_command(server)


_add_server_command()

if __name__ == "__main__":
    main()
