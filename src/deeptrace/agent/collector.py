"""The collector: load and attach the kernel programs, keep the traced set current,
and turn the ring buffer into Records in batches."""

from __future__ import annotations

import gc
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deeptrace.agent import selection
from deeptrace.agent.libbpf import BpfError, BpfMap, BpfObject, libbpf
from deeptrace.agent.ringbuf import RingReader
from deeptrace.agent.sampling import SamplingControl
from deeptrace.agent.selection import Selection
from deeptrace.agent.system import kernel_has_btf_function, preflight
from deeptrace.agent.tls import TlsProbes
from deeptrace.capture.records import (
    CONFIG,
    COUNTERS,
    DNS_KEY,
    DNS_PORTS,
    EXCHANGE_PROTOCOLS,
    MAX_CAPTURE,
    PHASES,
    SAMPLE_SHIFT_MAX,
    TASK_COMM_LEN,
    XHEAD_MAX,
    XSTATE,
    XSTATE_PHASE_AT,
    XSTATE_REQ_END_AT,
    XSTATE_SAMPLED_OUT_AT,
    Record,
    RecordDecoder,
    exchange_dtype,
)
from deeptrace.errors import DeepTraceError

BPF_DIR = Path(__file__).parent / "bpf"
TYPED_READS_OBJECT = BPF_DIR / "deeptrace.bpf.o"
COMPAT_OBJECT = BPF_DIR / "deeptrace-compat.bpf.o"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_ONE = _U32.pack(1)
_SAMPLE_EVERY_S = 0.05  # how often the reader's backlog sets the sampling level
KERNEL_STEPS = 3  # how many steps above ours the kernel may raise the sampling level on its own


def bpf_object_path() -> Path:
    """DEEPTRACE_BPF_OBJECT if set; else the object built for kernels with
    bpf_rdonly_cast (6.2+, typed pointer reads), or the compat one."""
    override = os.environ.get("DEEPTRACE_BPF_OBJECT")
    if override:
        return Path(override)
    return TYPED_READS_OBJECT if kernel_has_btf_function("bpf_rdonly_cast") else COMPAT_OBJECT


@dataclass
class CollectorConfig:
    selection: Selection
    capture_bytes: int = 1024
    ring_bytes: int = 16 << 20  # power of two, >= one page
    # The kernel wakes the reader once per this many records of a CPU; the reader
    # also wakes on its poll timeout, so a trickle is never held back longer.
    wakeup_records: int = 128
    follow_forks: bool = True
    refresh_interval_s: float = 1.0
    bpf_object: Path = field(default_factory=bpf_object_path)
    # Protocols (capture.records.EXCHANGE_PROTOCOLS) whose exchanges the kernel assembles,
    # one event per request and response; empty: every connection comes as records.
    assemble: tuple[str, ...] = ()
    exchange_head: int = 256  # payload head per message of an exchange, multiple of 8
    exchange_ring_bytes: int = 8 << 20
    # UDP ports whose datagrams the kernel pairs as DNS (when "dns" is assembled); on any
    # other port DNS is framed in user space, as records.
    dns_ports: tuple[int, ...] = (53,)
    # Under overload, have the kernel write only some connections, whole (agent/sampling.py);
    # off: every record is written while there is room, and what finds none is lost.
    sampling: bool = False
    # Plaintext of TLS connections from uprobes on the TLS libraries the traced processes map
    # (agent/tls.py); off: TLS connections give no spans (their ciphertext is not written either).
    tls: bool = True

    def validate(self) -> None:
        self.selection.validate()
        unknown = set(self.assemble) - set(EXCHANGE_PROTOCOLS[1:])
        if unknown:
            raise DeepTraceError(f"the kernel assembles no {', '.join(sorted(unknown))} exchanges "
                                 f"(it does: {', '.join(EXCHANGE_PROTOCOLS[1:])})")  # fmt: skip
        if not 8 <= self.exchange_head <= XHEAD_MAX or self.exchange_head % 8:
            raise DeepTraceError(f"exchange head must be a multiple of 8 between 8 and {XHEAD_MAX} bytes")
        if len(self.dns_ports) > DNS_PORTS or not all(0 < p < 65536 for p in self.dns_ports):
            raise DeepTraceError(f"at most {DNS_PORTS} DNS ports, each between 1 and 65535")
        if self.wakeup_records < 1:
            raise DeepTraceError("wakeup_records must be at least 1")
        if not 0 <= self.capture_bytes <= MAX_CAPTURE:
            raise DeepTraceError(f"capture size must be between 0 and {MAX_CAPTURE} bytes")
        page = os.sysconf("SC_PAGE_SIZE")
        for size in (self.ring_bytes, self.exchange_ring_bytes):
            if size < page or size & (size - 1):
                raise DeepTraceError(f"ring buffer size must be a power of two of at least {page} bytes")


class Collector:
    """Kernel programs attached and the traced set maintained until close()."""

    def __init__(self, config: CollectorConfig):
        config.validate()
        self.config = config
        self._obj: BpfObject | None = None
        self._ring: RingReader | None = None
        self._exchange_ring: RingReader | None = None
        self._decoder = RecordDecoder()
        self.exchange_dtype = exchange_dtype(config.exchange_head)
        self._next_refresh = 0.0
        self.sampling = SamplingControl()
        self._next_sample = 0.0
        self._ring_lost = self._ring_written = 0  # ring-full drops and writes so far, for the sampling control
        self.received = 0
        self.received_exchanges = 0
        self.traced: set[int] = set()
        self.tls: TlsProbes | None = None

    # ---- life cycle ----

    def start(self) -> Collector:
        cfg = self.config
        preflight()
        path = Path(cfg.bpf_object)
        if not path.exists():
            raise DeepTraceError(f"BPF object {path} is not built: run `make bpf` (needs clang and bpftool)")
        obj = BpfObject(path)
        self._obj = obj
        try:
            obj.set_max_entries("RECORDS", cfg.ring_bytes)
            obj.set_max_entries("EXCHANGES", cfg.exchange_ring_bytes)
            obj.set_max_entries("SCRATCH", libbpf().num_possible_cpus())
            obj.set_read_only_data(self._settings())
            obj.load()
            self._maps()
            if cfg.sampling:
                self.set_sample_level(0)  # and how far the kernel may raise it on its own
            self._select_initial()
            obj.attach_all()
            if cfg.tls:
                sel = cfg.selection
                self.tls = TlsProbes(obj, eager=bool(sel.trace_all or sel.comms))
                self._sync_tls()
            self._ring = RingReader(self._records.fd, cfg.ring_bytes)
            self._exchange_ring = RingReader(self._exchanges.fd, cfg.exchange_ring_bytes)
            self._ring.watch(self._exchanges.fd)
        except BaseException:
            self.close()
            raise
        return self

    def _maps(self) -> None:
        obj = self._obj
        # Key and value sizes come from the object; those this module packs are checked once here.
        self._pids = self._sized(obj.map("PIDS"), _U32.size, _U32.size)
        self._cgroups = self._sized(obj.map("CGROUPS"), _U32.size, _U64.size)
        self._comms = self._sized(obj.map("COMMS"), TASK_COMM_LEN, _U32.size)
        self._counters = self._sized(obj.map("COUNTERS"), _U32.size, _U64.size)
        self._records = obj.map("RECORDS")
        self._exchanges = obj.map("EXCHANGES")
        self._sampling = self._sized(obj.map("SAMPLING"), _U32.size, _U32.size)
        self._xstate = self._sized(obj.map("XSTATE"), _U64.size, XSTATE.size)
        self._dns_pending = self._sized(obj.map("DNSPEND"), DNS_KEY.size, XSTATE.size)

    def _sized(self, m: BpfMap, key_size: int, value_size: int) -> BpfMap:
        if (m.key_size, m.value_size) != (key_size, value_size):
            raise DeepTraceError(
                f"map {m.name} of {self.config.bpf_object} has {m.key_size}-byte keys and {m.value_size}-byte "
                f"values, but the agent packs {key_size}-byte keys and {value_size}-byte values (an object "
                "built from another deeptrace.h? rebuild it with `make bpf`)"
            )
        return m

    def _settings(self) -> bytes:
        """struct dt_config, the programs' load-time settings (their `CFG`)."""
        cfg = self.config
        protocols = sum(1 << EXCHANGE_PROTOCOLS.index(p) for p in set(cfg.assemble))
        ports = list(cfg.dns_ports) + [0] * (DNS_PORTS - len(cfg.dns_ports))
        return CONFIG.pack(cfg.capture_bytes, int(cfg.selection.trace_all), os.getpid(), int(cfg.follow_forks),
                           cfg.wakeup_records, protocols, cfg.exchange_head, *ports, int(cfg.sampling), 0)  # fmt: skip

    def _select_initial(self) -> None:
        for name in self.config.selection.comms:
            self._comms.update(name.encode().ljust(TASK_COMM_LEN, b"\0"), _ONE)
        self._sync_traced(selection.initial_tgids(self.config.selection))

    def close(self) -> None:
        if self.tls:
            self.tls.close()
            self.tls = None
        for ring in (self._ring, self._exchange_ring):
            if ring:
                ring.close()
        self._ring = self._exchange_ring = None
        if self._obj:
            self._obj.close()
            self._obj = None

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- traced set ----

    def trace(self, pid: int) -> set[int]:
        """Trace one more process (a pid or any of its thread ids) and its descendants;
        returns the processes added."""
        tgid = selection.tgid_of(pid)
        if tgid is None:
            raise DeepTraceError(f"no process with pid {pid}")
        added = selection.with_descendants({tgid}, selection.parent_map())
        self._sync_traced(self.traced | added)
        return added

    def trace_comm(self, name: str) -> None:
        """Trace processes that exec with this name from now on (and those running now)."""
        self._comms.update(name.encode().ljust(TASK_COMM_LEN, b"\0"), _ONE)
        self._sync_traced(self.traced | {p for p in selection.all_tgids() if selection.comm_of(p) == name})

    def untrace(self, pid: int) -> None:
        self._pids.delete(_U32.pack(pid))
        self.traced.discard(pid)

    def cgroup_id(self, tgid: int) -> int | None:
        """The cgroup v2 id the process opened its latest connection in (None: none seen)."""
        value = self._cgroups.lookup(_U32.pack(tgid))
        return _U64.unpack(value)[0] if value else None

    def kernel_traced(self) -> set[int]:
        """The PIDS map as the kernel sees it (includes children it added on fork)."""
        return {_U32.unpack(k)[0] for k in self._pids.keys()}

    def _sync_traced(self, wanted: set[int]) -> None:
        for tgid in wanted:
            try:
                self._pids.update(_U32.pack(tgid), _ONE)
            except BpfError as e:
                raise DeepTraceError(f"cannot trace pid {tgid}: {e}") from None
        self.traced = set(wanted)
        self._sync_tls()

    def refresh(self) -> None:
        """Drop processes that exited; in --comm mode, add new name matches; attach to the
        TLS libraries the traced processes map."""
        if self.config.selection.trace_all:
            self._sync_tls()
            return
        current = self.kernel_traced()
        live = {t for t in current if selection.alive(t)}
        for tgid in current - live:
            self._pids.delete(_U32.pack(tgid))
        if self.config.selection.comms:
            wanted = set(self.config.selection.comms)
            live |= {p for p in selection.all_tgids() if p not in live and selection.comm_of(p) in wanted}
        self._sync_traced(live)

    def _sync_tls(self) -> None:
        if self.tls is None:
            return
        if self.config.selection.trace_all:
            pids = set(selection.all_tgids()) - {os.getpid()}
        else:
            pids = self.kernel_traced()
        self.tls.sync(pids, time.monotonic())

    # ---- reading ----

    def poll(self, timeout_s: float = 0.05, limit: int = 4096) -> list[Record]:
        """Records waiting in the ring buffer (at most `limit`), after waiting at most
        timeout_s for some. Bounded batches keep a backlog from becoming one huge
        list, which decodes about 30% slower (measured by bench/throughput)."""
        ring = self._ring
        if ring is None:
            raise DeepTraceError("collector is not started")
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + self.config.refresh_interval_s
            self.refresh()
        if self.config.sampling and now >= self._next_sample:
            self._next_sample = now + _SAMPLE_EVERY_S
            self._adjust_sampling(now)
        if ring.pending_bytes() == 0 and self._exchange_ring.pending_bytes() == 0 and timeout_s > 0:
            ring.wait(timeout_s)
        # Records hold no reference cycles, yet every one counts toward a cyclic
        # collection; pausing the collector while a batch is built saves ~20%.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            batch = ring.drain(self._decoder.decode, limit)
        finally:
            if gc_was_enabled:
                gc.enable()
        self.received += len(batch)
        return batch

    def _adjust_sampling(self, now: float) -> None:
        kernel_level = self.kernel_sample_level()
        if kernel_level > self.sampling.level:  # the kernel raised it: a ring passed half full
            self.sampling.adopt(kernel_level, now)
        backlog = max(self._ring.pending_bytes() / self.config.ring_bytes,
                      self._exchange_ring.pending_bytes() / self.config.exchange_ring_bytes)  # fmt: skip
        lost = self._counter("drop_ringbuf_full") + self._counter("drop_exchange_ringbuf_full")
        written = self._counter("submitted") + self._counter("exchanges")
        new_lost, new_written = lost - self._ring_lost, written - self._ring_written
        fraction = new_lost / (new_lost + new_written) if new_lost else 0.0
        if self.sampling.update(backlog, fraction, now):
            self.set_sample_level(self.sampling.level)
        self._ring_lost, self._ring_written = lost, written

    def kernel_sample_level(self) -> int:
        """The level in the kernel's SAMPLING map: the one set here, or higher where the kernel
        raised it itself (at most KERNEL_STEPS higher)."""
        return min(SAMPLE_SHIFT_MAX, _U32.unpack(self._sampling.lookup(_U32.pack(0)))[0])

    def set_sample_level(self, level: int) -> None:
        """From now on the kernel keeps connections with probability 1/2^level (sampling.py)."""
        if not 0 <= level <= SAMPLE_SHIFT_MAX:
            raise DeepTraceError(f"sampling level must be between 0 and {SAMPLE_SHIFT_MAX}")
        self.sampling.level = level
        self._sampling.update(_U32.pack(1), _U32.pack(min(SAMPLE_SHIFT_MAX, level + KERNEL_STEPS)))
        self._sampling.update(_U32.pack(0), _U32.pack(level))

    @property
    def wall_offset_ns(self) -> int:
        """What turns the kernel's CLOCK_MONOTONIC times into wall-clock time."""
        return self._decoder.wall_offset_ns

    def poll_exchanges(self, limit: int = 2048) -> np.ndarray:
        """Exchanges the kernel assembled since the last call (at most `limit`), as one
        array of `exchange_dtype` (no wait: poll() waits for either ring). A batch's spans and
        their JSON text live at once, about 7 KB per exchange: a reader behind its load (held
        to a CPU quota) that took a whole 8 MiB ring (13,000 exchanges) at once grew from 90 to
        200 MiB; batches of 2048 take ~20 MiB and are no slower (docs/benchmarks.md)."""
        if self._exchange_ring is None:
            raise DeepTraceError("collector is not started")
        events = self._exchange_ring.drain_array(self.exchange_dtype, limit)
        self.received_exchanges += len(events)
        return events

    def waiting_exchanges(self, ended_before_ns: int) -> tuple[np.ndarray, list[int]]:
        """Requests the kernel holds, whole, whose response has not come (or not all of it)
        though they ended before `ended_before_ns` (CLOCK_MONOTONIC): as exchange events
        (their response fields empty), with when each one's last byte moved. DNS queries are
        taken out of the kernel's map as well (on TCP the connection's next exchange takes
        the place of one; a datagram's entry stays until a response or this). One map lookup
        per held exchange: for a periodic sweep, not for every poll."""
        if self._obj is None:
            raise DeepTraceError("collector is not started")
        waiting = (PHASES.index("wait"), PHASES.index("resp"), PHASES.index("resp_chunked"))
        size, rows, ends = self.exchange_dtype.itemsize, [], []
        for held, taken_out in ((self._xstate, False), (self._dns_pending, True)):
            for key in held.keys():
                raw = held.lookup(key)
                if raw is None or raw[XSTATE_PHASE_AT] not in waiting:
                    continue
                (end,) = _U64.unpack_from(raw, XSTATE_REQ_END_AT)
                if end >= ended_before_ns:
                    continue
                if taken_out:
                    held.delete(key)
                if not raw[XSTATE_SAMPLED_OUT_AT]:
                    rows.append(raw[:size])
                    ends.append(end)
        return np.frombuffer(b"".join(rows), dtype=self.exchange_dtype), ends

    def counters(self) -> dict[str, int]:
        """Kernel-side counters summed over CPUs, by name (see capture.records.COUNTERS)."""
        return {name: self._counter(name) for name in COUNTERS}

    def _counter(self, name: str) -> int:
        raw = self._counters.lookup(_U32.pack(COUNTERS.index(name)),
                                    self._counters.value_size * libbpf().num_possible_cpus()) or b""  # fmt: skip
        return sum(struct.unpack(f"<{len(raw) // 8}Q", raw))

    def drops(self) -> dict[str, int]:
        return {k: v for k, v in self.counters().items() if k.startswith("drop_")}
