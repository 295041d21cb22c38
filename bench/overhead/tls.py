#!/usr/bin/env python3
"""Per-call cost of the agent's TLS uprobes (issue 15): ns per SSL_write and per SSL_read.

128-byte SSL_write and SSL_read calls over a TLS 1.3 connection on TCP loopback, made by
tls_loop.c with Debian's OpenSSL (libssl3), in these configurations, measured side by side
in one run:

  base      no BPF program attached
  uprobe    empty entry and return programs (empty_uprobe.bpf.c) on the OpenSSL functions
            the agent probes: the price of the uprobe mechanism itself
  entry     the empty entry program alone, where the agent's goes (the function's start)
  emulated  the empty entry program alone, on the function's first call instruction, which
            the kernel emulates; at the function's start it single-steps the instruction it
            replaced (entry - emulated: what that second trap costs)
  traced    the DeepTrace collector attached, this process traced: the TLS programs write
            the plaintext (reader draining the ring), the syscall hooks count the ciphertext
  untraced  the DeepTrace collector attached, this process not traced: the probes fire and
            filter it out, as for every other process using that libssl
  notls     the DeepTrace collector attached without its TLS probes (tls=False), this process
            not traced: what the syscall hooks alone cost it, so untraced - notls is what
            the uprobes add for a process the agent does not trace

In the collector's configurations another copy of the loop, idle, is traced, so that the
TLS probes stay attached to the libssl file while the measured loop runs untraced (uprobes
are set per file). The measured loop runs on CPU 1, this script and the agent's reader on
CPU 0, as in run.py (whose helpers this uses: a sample is taken only while no other process
has BPF tracing programs loaded, uprobes included). Configurations are interleaved and the
whole sequence repeated; each cell is the median. Run as root from the repository root
(about 3 minutes):

    .venv/bin/python bench/overhead/tls.py [--calls 100000] [--repeats 5] [--quick]

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))
sys.path.insert(0, str(HERE))

from run import (  # the syscall benchmark's pinning, reader and clean-sample helpers
    LOOP_CPU,
    OUT,
    RUNNER_CPU,
    Attached,
    Reader,
    bench_args,
    bpf_step,
    make,
    measure_clean,
    print_conditions,
    reading,
)

from deeptrace.agent.collector import Collector, CollectorConfig
from deeptrace.agent.libbpf import BpfObject
from deeptrace.agent.selection import Selection
from deeptrace.agent.tls import OPENSSL_PROBES, library_targets

CONFIGS = ("base", "uprobe", "entry", "emulated", "traced", "untraced", "notls")
WHAT = {
    "base": "nothing attached",
    "uprobe": "empty entry + return programs (empty_uprobe.bpf.c) on the functions the agent probes",
    "entry": "the empty entry program alone, at the function's first instruction",
    "emulated": "the empty entry program alone, at the function's first call instruction",
    "traced": "DeepTrace attached, this process traced (plaintext records written, reader draining)",
    "untraced": "DeepTrace attached, this process not traced (the probes fire and filter it out)",
    "notls": "DeepTrace attached without TLS probes (tls=False), this process not traced",
}
CALLS = ("ssl_write", "ssl_read")
FUNCTIONS = {"ssl_write": "SSL_write", "ssl_read": "SSL_read"}  # what each measured call calls
PAYLOAD = 128  # bytes per call, fixed in tls_loop.c


def build() -> tuple[Path, Path]:
    """Compile the loop program and the empty uprobe object if missing or stale."""
    loop = OUT / "tls_loop"
    src = HERE / "tls_loop.c"
    step = bpf_step("empty_uprobe")
    make([(src, loop, ["gcc", "-O2", "-Wall", "-o", str(loop), str(src), "-lssl", "-lcrypto"]), step])
    return loop, step[1]


def libssl_of(pid: int, timeout_s: float = 10.0) -> str:
    """The libssl file process `pid` maps (once its loader has mapped it), by a path that
    outlives it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for target in library_targets(pid):
            if target.library == "openssl":
                return os.path.realpath(target.path)
        time.sleep(0.01)
    raise SystemExit(f"tls_loop (pid {pid}) maps no libssl: is it linked with -lssl?")


def first_calls(path: str, functions: list[str]) -> dict[str, int]:
    """Where each function's first `call` instruction is, from the function's start.

    A uprobe replaces an instruction with a breakpoint; after the breakpoint, the kernel
    emulates a call or a jump itself, but any other instruction (a function's first one is
    usually `sub $N,%rsp` or `push`/`endbr64`) it executes out of line, single-stepped: a
    second trap. The "emulated" configuration puts the probe on a call to show the first trap
    alone."""
    import capstone
    from elftools.elf.elffile import ELFFile

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    out = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        symbols = {
            s.name: s for s in elf.get_section_by_name(".dynsym").iter_symbols() if s.name in functions
        }
        for name in functions:
            vaddr, size = symbols[name]["st_value"], symbols[name]["st_size"]
            seg = next(g for g in elf.iter_segments()
                       if g["p_type"] == "PT_LOAD" and g["p_vaddr"] <= vaddr < g["p_vaddr"] + g["p_filesz"])  # fmt: skip
            f.seek(vaddr - seg["p_vaddr"] + seg["p_offset"])
            call = next((i for i in md.disasm(f.read(size), 0) if i.mnemonic == "call"), None)
            if call is None:
                raise SystemExit(f"{name} in {path} has no call instruction to put the emulated probe on")
            out[name] = call.address
    return out


@contextmanager
def empty_probes(empty: Path, probes: list[tuple[str, str, int, bool]]):
    """The empty programs attached as (program, path, function, offset in it, return probe)."""
    with BpfObject(empty) as obj:
        obj.load()
        links = []
        try:
            for program, path, function, offset, retprobe in probes:
                links.append(obj.attach_uprobe(program, path, offset, function=function, retprobe=retprobe))
            state = Attached()
            state.probes = len(links)
            yield state
        finally:
            for link in links:
                obj.detach(link)


@contextmanager
def attached(config: str, empty: Path, libssl: str, calls_at: dict[str, int], idle_pid: int, ring_bytes: int):
    if config == "base":
        yield Attached()
    elif config == "uprobe":  # the functions the agent probes, by the same names
        with empty_probes(empty, [(program, libssl, symbol, 0, ret) for _, symbol in OPENSSL_PROBES
                                  for program, ret in (("empty_enter", False), ("empty_return", True))]) as state:  # fmt: skip
            yield state
    elif config in ("entry", "emulated"):
        at = calls_at if config == "emulated" else dict.fromkeys(calls_at, 0)
        with empty_probes(
            empty, [("empty_enter", libssl, fn, off, False) for fn, off in at.items()]
        ) as state:
            yield state
    else:
        cfg = CollectorConfig(selection=Selection(), ring_bytes=ring_bytes, tls=config != "notls")
        with Collector(cfg) as collector:
            collector.trace(idle_pid)  # keeps the TLS probes on the libssl file (attached now)
            trace = collector.trace if config == "traced" else (lambda pid: None)
            with reading(Reader(collector), trace, collector.drops) as state:
                state.probes = collector.tls.stats.probes if collector.tls else 0
                yield state
            counters = collector.counters()
            state.tls_counters = {k: v for k, v in counters.items() if k.startswith(("tls_", "drop_tls"))}


def summarize(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    rows = {}
    for call in CALLS:
        m = {c: statistics.median(samples[c][call]) for c in CONFIGS}
        rows[call] = {
            **{f"{c}_ns": round(m[c], 1) for c in CONFIGS},
            **{f"{c}_minus_base_ns": round(m[c] - m["base"], 1) for c in CONFIGS if c != "base"},
            "return_probe_ns": round(m["uprobe"] - m["entry"], 1),  # the return probe, entry probe given
            "single_step_ns": round(m["entry"] - m["emulated"], 1),  # stepping the first instruction
            "traced_minus_uprobe_ns": round(m["traced"] - m["uprobe"], 1),  # the agent's programs' own work
            "untraced_minus_notls_ns": round(
                m["untraced"] - m["notls"], 1
            ),  # what TLS adds to other processes
            "traced_over_base": round(m["traced"] / m["base"], 3),
            "untraced_over_base": round(m["untraced"] / m["base"], 3),
            "range_ns": {
                c: [round(min(samples[c][call]), 1), round(max(samples[c][call]), 1)] for c in CONFIGS
            },
        }
    return rows


def print_table(rows: dict[str, dict]) -> None:
    print(f"{'config':9} " + " ".join(f"{call:>10} {'- base':>7}" for call in CALLS) + "  what")
    for c in CONFIGS:
        cells = " ".join(f"{rows[call][f'{c}_ns']:10.0f} {rows[call].get(f'{c}_minus_base_ns', 0):+7.0f}"
                         for call in CALLS)  # fmt: skip
        print(f"{c:9} {cells}  {WHAT[c]}")
    print()
    for key, what in (
        ("return_probe_ns", "the return probe (uprobe - entry)"),
        ("single_step_ns", "stepping the first instruction out of line (entry - emulated)"),
        ("traced_minus_uprobe_ns", "the agent's programs' own work when traced (traced - uprobe)"),
        ("untraced_minus_notls_ns", "what the TLS probes add to a process not traced (untraced - notls)"),
    ):
        print(f"{what}: " + ", ".join(f"{call} {rows[call][key]:+.0f} ns" for call in CALLS))


def main() -> None:
    args = bench_args(__doc__.split("\n")[0], repeats=5)
    loop, empty = build()
    # The idle copy: set up, waiting for its start line until the end of the run.
    idle = subprocess.Popen(
        [str(loop), "ssl_write", "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        libssl = libssl_of(idle.pid)
        calls_at = first_calls(libssl, list(FUNCTIONS.values()))
        samples = {c: {call: [] for call in CALLS} for c in CONFIGS}
        records, drops, tls_counters, probes, runs = Counter(), Counter(), Counter(), {}, Counter()
        unclean = 0
        for rep in range(args.repeats):
            for config in CONFIGS:
                with attached(config, empty, libssl, calls_at, idle.pid, args.ring_mib << 20) as state:

                    def start(pid: int, config=config, before_start=state.before_start) -> None:
                        runs[config] += 1  # a sample taken again (another tracer came) runs again
                        before_start(pid)

                    for call in CALLS:
                        ns, clean = measure_clean(loop, call, args.calls, start, args.max_wait)
                        samples[config][call].append(ns)
                        unclean += not clean
                records[config] += state.records
                drops.update({f"{config}.{k}": v for k, v in state.drops.items()})
                tls_counters.update(
                    {f"{config}.{k}": v for k, v in getattr(state, "tls_counters", {}).items()}
                )
                probes[config] = getattr(state, "probes", 0)
                print(f"repeat {rep + 1}/{args.repeats}: {config} done", file=sys.stderr)
    finally:
        idle_out, _ = idle.communicate("go\n", timeout=30)
    session = json.loads(idle_out)

    rows = summarize(samples)
    print_table(rows)
    print(f"\nns per call, median of {args.repeats} x {args.calls} calls of {PAYLOAD} bytes, {session['protocol']} "
          f"{session['cipher']} over TCP loopback, {libssl}; the loop on CPU {LOOP_CPU}, the reader on CPU {RUNNER_CPU}")  # fmt: skip
    print(f"uprobes attached: {', '.join(f'{c} {n}' for c, n in probes.items() if n)} (uprobe, traced, "
          f"untraced: an entry and a return probe on each of {', '.join(s for _, s in OPENSSL_PROBES)}; "
          f"emulated: at {', '.join(f'{fn}+{off:#x}' for fn, off in calls_at.items())})")  # fmt: skip
    # Traced: a record per measured call and one per untimed call of the other end.
    print(f"records read: traced {records['traced']:,} (expected {2 * args.calls * runs['traced']:,}: "
          f"{runs['traced']} runs of {args.calls:,} measured calls and as many untimed at the other end), "
          f"untraced {records['untraced']}, notls {records['notls']}")  # fmt: skip
    print("kernel TLS counters (summed over runs): "
          + ", ".join(f"{k} {v}" for k, v in sorted(tls_counters.items()) if v))  # fmt: skip
    print_conditions(drops, unclean)
    print(json.dumps({
        "benchmark": "overhead_tls", "calls": args.calls, "repeats": args.repeats, "payload_bytes": PAYLOAD,
        "protocol": session["protocol"], "cipher": session["cipher"], "libssl": libssl,
        "ring_bytes": args.ring_mib << 20, "per_call": rows, "probes": probes,
        "records": dict(records), "loop_runs": dict(runs), "tls_counters": dict(tls_counters), "drops": dict(drops),
        "total_drops": sum(drops.values()), "unclean_samples": unclean, "samples_ns": samples,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
