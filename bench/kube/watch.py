#!/usr/bin/env python3
"""What the pod watch costs the agent (issue 16): agent/kube.py's KubeMetadata (the official
kubernetes client, list + watch) against the fake API server of the tests (tests/kubefake.py),
at a node's and a cluster's real sizes: 110 pods on the node (the kubelet's default maximum)
and 5,000 Services, then 250 pods and 20,000 Services.

The pods are the fixture pods (tests/kube_fixtures) copied and renamed, each with 2 containers
and its own pod IP; the Services are the fixture Services with a ClusterIP, likewise. Measured
for each size: the time from start() to wait_synced() (the first lists), the memory the
metadata holds, the CPU that watch events cost (container restarts: MODIFIED pods with a new
container id, at a steady rate) and how long until the agent sees the last one, and the
lookups' cost.

The fake server runs in this process, in threads (ThreadingHTTPServer, loopback HTTP/1.1, no
TLS). CPU is read per thread, each thread's own CPU clock read from the main thread
(pthread_getcpuclockid), not as process CPU minus an idle baseline: the process also holds the
fake and this script, whose CPU per event is as large as the metadata's. So the metadata's two
threads (`deeptrace-kube-pods`, `deeptrace-kube-services`) are counted apart from the fake's
(its accept loop and one handler thread per connection; plus its `apply`, timed in the main
thread) and from this script's main thread; an idle baseline shows what they use with no event.
Memory: tracemalloc, the Python heap allocated under agent/kube.py's frames and still live after
the first lists (not RSS, which holds the fake's answers and the imported modules too); the RSS
growth of the process's first KubeMetadata() (the client's import) is given apart. The lag of
an event: from just before the fake applies it to when the metadata's `_apply` returned
(wrapped to take the time in its thread); the last one also as `pod_by_container` sees it.

    .venv/bin/python bench/kube/watch.py [--sizes 110x5000,250x20000] [--events 1000 --blocks 3] [--rate 200]

Prints what it compared, one block per size; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import statistics
import sys
import threading
import time
import timeit
import tracemalloc
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

import kubernetes.client
import kubernetes.watch
from kubefake import FakeKubeAPI, fixture

from deeptrace.agent import kube
from deeptrace.agent.kube import KubeMetadata, Pod, Service

NODE = "node-a"
CLIENT_THREADS = ("deeptrace-kube-pods", "deeptrace-kube-services")
KUBE_PY = str(Path(kube.__file__).resolve())


# The cluster.


def _hex_id(*parts: object) -> str:
    return hashlib.sha256("-".join(map(str, parts)).encode()).hexdigest()


def build_pods(n: int) -> list[dict]:
    """n pods of NODE, copied from the fixture pods in turn: renamed, a UID, a pod IP, 2 containers."""
    base = fixture("pods")
    pods = []
    for i in range(n):
        obj = copy.deepcopy(base[i % len(base)])
        meta, spec, status = obj["metadata"], obj["spec"], obj["status"]
        meta["name"] = f"{meta['name']}-{i:03d}"
        meta["uid"] = f"{i:08x}-b0b0-4000-8000-{i:012x}"
        meta.pop("deletionTimestamp", None)
        spec["nodeName"] = NODE
        spec.pop("hostNetwork", None)  # every pod its own IP (a node's host-network pods have none)
        ip = f"10.244.{1 + i // 250}.{2 + i % 250}"
        status.update(podIP=ip, podIPs=[{"ip": ip}], phase="Running")
        status.pop("initContainerStatuses", None)
        statuses = status["containerStatuses"][:2]
        if len(statuses) < 2:  # a sidecar, in the spec and in the status
            sidecar = copy.deepcopy(statuses[0]) | {"name": "sidecar"}
            statuses.append(sidecar)
            spec["containers"] = spec["containers"][:1] + [
                copy.deepcopy(spec["containers"][0]) | {"name": "sidecar"}
            ]
        runtime = statuses[0]["containerID"].partition("://")[0]
        for slot, entry in enumerate(statuses):
            entry["containerID"] = f"{runtime}://{_hex_id(i, slot, 0)}"
        status["containerStatuses"] = statuses
        pods.append(obj)
    return pods


def build_services(n: int) -> list[dict]:
    """n Services with a ClusterIP, copied from the fixture ones in turn."""
    base = [s for s in fixture("services") if s["spec"].get("clusterIP") not in (None, "None")]
    services = []
    for i in range(n):
        obj = copy.deepcopy(base[i % len(base)])
        j = i + 4096  # past the fixtures' own addresses
        ip = f"10.{96 + (j >> 16)}.{(j >> 8) & 255}.{j & 255}"
        obj["metadata"]["name"] = f"{obj['metadata']['name']}-{i}"
        obj["metadata"]["uid"] = f"{i:08x}-5e5e-4000-8000-{i:012x}"
        obj["spec"].update(clusterIP=ip, clusterIPs=[ip])
        services.append(obj)
    return services


def restart(obj: dict, k: int, pod_index: int) -> str:
    """A container restart, as the kubelet reports it: a new container id; returns the id."""
    entry = obj["status"]["containerStatuses"][k % 2]
    runtime = entry["containerID"].partition("://")[0]
    new_id = _hex_id(pod_index, k % 2, k + 1)
    started = entry["state"].get("running", {}).get("startedAt", "2024-05-14T09:21:07Z")
    entry.update(containerID=f"{runtime}://{new_id}", restartCount=entry.get("restartCount", 0) + 1,
                 lastState={"terminated": {"exitCode": 137, "reason": "OOMKilled", "startedAt": started,
                                           "finishedAt": "2026-12-05T10:00:00Z", "containerID": entry["containerID"]}},
                 state={"running": {"startedAt": "2026-12-05T10:00:01Z"}})  # fmt: skip
    return new_id


# Measuring.


def thread_cpu() -> dict[int, tuple[str, float]]:
    """Each live thread's CPU time (its own clock, read from this thread), by thread id."""
    out = {}
    for t in threading.enumerate():
        try:
            out[t.ident] = (t.name, time.clock_gettime(time.pthread_getcpuclockid(t.ident)))
        except (OSError, TypeError):
            pass  # ended meanwhile
    return out


def cpu_by_role(before: dict, after: dict, process: float) -> dict[str, float]:
    """CPU seconds between two thread_cpu() readings: the metadata's threads, the fake's, this
    script's main thread, and what threads that ended meanwhile used (process CPU minus the rest)."""
    main = threading.main_thread().ident
    roles = {"client": 0.0, "fake": 0.0, "main": 0.0}
    for ident, (name, cpu) in after.items():
        spent = cpu - before.get(ident, (name, 0.0))[1]
        role = "main" if ident == main else "client" if name in CLIENT_THREADS else "fake"
        roles[role] += spent
    roles["ended"] = max(0.0, process - sum(roles.values()))
    return roles


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def new_metadata(fake: FakeKubeAPI, services: int) -> KubeMetadata:
    configuration = kubernetes.client.Configuration()
    configuration.host = fake.url
    return KubeMetadata(kubernetes.client.ApiClient(configuration), NODE, max_services=max(20000, services))


def sync_once(fake: FakeKubeAPI, services: int) -> tuple[KubeMetadata, float, dict[str, float]]:
    gc.collect()
    cpu0, proc0 = thread_cpu(), time.process_time()
    t0 = time.perf_counter()
    md = new_metadata(fake, services)
    md.start()
    if not md.wait_synced(120):
        raise SystemExit("the metadata did not sync in 120 s")
    wall = time.perf_counter() - t0
    return md, wall, cpu_by_role(cpu0, thread_cpu(), time.process_time() - proc0)


def held_memory(fake: FakeKubeAPI, services: int) -> tuple[KubeMetadata, dict[str, int]]:
    """Python heap still allocated after the first lists, by where it was allocated: under
    agent/kube.py's frames (the metadata's threads: its stores, the client, its connections)
    or elsewhere (the fake answering, this script)."""
    gc.collect()
    tracemalloc.start(40)
    before = tracemalloc.take_snapshot()
    md = new_metadata(fake, services)
    md.start()
    md.wait_synced(120)
    time.sleep(0.3)  # the watches opened
    gc.collect()
    after = tracemalloc.take_snapshot()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    agent = other = 0
    for stat in after.compare_to(before, "traceback"):
        if any(frame.filename == KUBE_PY for frame in stat.traceback):
            agent += stat.size_diff
        else:
            other += stat.size_diff
    return md, {"agent_bytes": agent, "other_bytes": other, "process_peak_bytes": peak}


def run_events(fake: FakeKubeAPI, md: KubeMetadata, pods: list[dict], n: int, rate: float, seq: int) -> dict:
    """n container restarts at `rate` a second, pods in turn. The lag of each: from just before
    the fake applies it to when the metadata's _apply returned (a timestamp taken by a wrapper
    in the metadata's thread: polling lookups from here would take a CPU of the two); the last
    event's lag also as pod_by_container sees it (polled every 0.1 ms after the last change)."""
    current = [copy.deepcopy(p) for p in pods]
    sent: list[float] = []
    seen: list[float] = []
    apply = md._apply

    def timed_apply(kind, kind_of_event, obj) -> None:
        apply(kind, kind_of_event, obj)
        seen.append(time.perf_counter())

    md._apply = timed_apply
    apply_cpu = 0.0
    gc.collect()
    events0 = md.stats.events
    cpu0, proc0 = thread_cpu(), time.process_time()
    start = time.perf_counter()
    for k in range(n):
        left = start + k / rate - time.perf_counter()
        if left > 0:
            time.sleep(left)
        p = k % len(current)
        last = restart(current[p], seq + k // len(current), p)
        sent.append(time.perf_counter())
        c = time.thread_time()
        fake.apply("pods", current[p])
        apply_cpu += time.thread_time() - c
    while md.pod_by_container(last) is None:
        if time.perf_counter() - sent[-1] > 60:
            raise SystemExit("the last event was never seen")
        time.sleep(0.0001)
    last_lag = time.perf_counter() - sent[-1]
    wall = time.perf_counter() - start
    cpu = cpu_by_role(cpu0, thread_cpu(), time.process_time() - proc0)
    del md._apply
    if md.stats.events - events0 != n or len(seen) != n:
        raise SystemExit(f"{n} events sent, {md.stats.events - events0} applied")
    lags = sorted(b - a for a, b in zip(sent, seen))
    return {
        "events": n, "rate": rate, "wall_s": round(wall, 2),
        "cpu_ms": {k: round(v * 1e3, 1) for k, v in cpu.items()}, "fake_apply_cpu_ms": round(apply_cpu * 1e3, 1),
        "client_cpu_ms_per_1000": round(cpu["client"] / n * 1e6, 1),
        "fake_cpu_ms_per_1000": round((cpu["fake"] + apply_cpu) / n * 1e6, 1),
        "lag_ms": {"p50": round(lags[len(lags) // 2] * 1e3, 2), "p99": round(lags[int(len(lags) * 0.99)] * 1e3, 2),
                   "max": round(lags[-1] * 1e3, 2), "last_by_lookup": round(last_lag * 1e3, 2)},
    }  # fmt: skip


def run_burst(fake: FakeKubeAPI, md: KubeMetadata, pods: list[dict], n: int, seq: int) -> dict:
    """n restarts applied back to back (a rollout, a node's pods all restarting): when is the last seen?"""
    current = [copy.deepcopy(p) for p in pods]
    gc.collect()
    cpu0, proc0 = thread_cpu(), time.process_time()
    start = time.perf_counter()
    last = ""
    for k in range(n):
        p = k % len(current)
        last = restart(current[p], seq + k // len(current), p)
        fake.apply("pods", current[p])
    applied = time.perf_counter()
    while md.pod_by_container(last) is None:
        if time.perf_counter() - start > 60:
            raise SystemExit("the burst's last event was never seen")
        time.sleep(0.0001)
    seen = time.perf_counter()
    cpu = cpu_by_role(cpu0, thread_cpu(), time.process_time() - proc0)
    return {"events": n, "apply_s": round(applied - start, 3), "last_seen_after_apply_ms": round((seen - applied) * 1e3, 1),
            "last_seen_after_first_ms": round((seen - start) * 1e3, 1),
            "client_cpu_ms_per_1000": round(cpu["client"] / n * 1e6, 1)}  # fmt: skip


def idle(seconds: float) -> dict[str, float]:
    cpu0, proc0 = thread_cpu(), time.process_time()
    time.sleep(seconds)
    return {k: round(v, 4) for k, v in cpu_by_role(cpu0, thread_cpu(), time.process_time() - proc0).items()}


def lookups(md: KubeMetadata, pods: list[dict], services: list[dict]) -> dict[str, float]:
    """ns per call, best of 5 runs of 200,000 calls (timeit's loop included: ~10 ns)."""
    pod = pods[len(pods) // 2]
    held = md.pod_by_uid(pod["metadata"]["uid"])  # its container ids are the last restarts'
    cases = {
        "pod_by_container": (md.pod_by_container, next(iter(held.containers))),
        "pod_by_uid (systemd spelling)": (md.pod_by_uid, pod["metadata"]["uid"].replace("-", "_")),
        "peer_name(pod IP)": (md.peer_name, pod["status"]["podIP"]),
        "peer_name(ClusterIP)": (md.peer_name, services[len(services) // 2]["spec"]["clusterIP"]),
        "peer_name(unknown IP)": (md.peer_name, "192.0.2.77"),
    }
    out = {}
    for name, (func, arg) in cases.items():
        if func(arg) is None and "unknown" not in name:
            raise SystemExit(f"{name}: {arg} not found")
        timer = timeit.Timer("f(a)", globals={"f": func, "a": arg})
        out[name] = round(min(timer.repeat(5, 200_000)) / 200_000 * 1e9)
    return out


def unmarshal_costs(pods: list[dict]) -> dict[str, float]:
    """Per pod event, us: what the client does with a watch line as kube.py asks it
    (Watch(return_type="object").unmarshal_event: json.loads, then json.dumps and json.loads of
    the object again), json.loads alone, and Pod.from_api."""
    line = json.dumps({"type": "MODIFIED", "object": pods[0]})
    watch = kubernetes.watch.Watch(return_type="object")
    n = 2000
    return {
        "event_line_bytes": len(line),
        "unmarshal_event_us": round(min(timeit.repeat(lambda: watch.unmarshal_event(line, "object"), number=n,
                                                      repeat=3)) / n * 1e6, 1),
        "json_loads_us": round(min(timeit.repeat(lambda: json.loads(line), number=n, repeat=3)) / n * 1e6, 1),
        "pod_from_api_us": round(min(timeit.repeat(lambda: Pod.from_api(pods[0]), number=n, repeat=3)) / n * 1e6, 1),
    }  # fmt: skip


def first_construction() -> dict:
    """The first KubeMetadata() of the process: it imports the client's CoreV1Api module."""
    gc.collect()
    rss0, cpu0, t0 = rss(), time.thread_time(), time.perf_counter()
    KubeMetadata(kubernetes.client.ApiClient(kubernetes.client.Configuration()), NODE)
    wall, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    gc.collect()
    return {
        "wall_ms": round(wall * 1e3),
        "cpu_ms": round(cpu * 1e3),
        "rss_growth_mib": round((rss() - rss0) / 2**20, 1),
    }


def list_peak(fake: FakeKubeAPI) -> dict[str, float]:
    """What listing the Services holds at once: the answer's body (which the client reads whole)
    and its parsed JSON, before the Service objects are made from it: done here in the main
    thread, the body fetched first, under tracemalloc (the same calls as _list)."""
    with urllib.request.urlopen(f"{fake.url}/api/v1/services?resourceVersion=0") as answer:
        body = answer.read()
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    items = [Service.from_api(obj) for obj in json.loads(body)["items"]]
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert items
    return {"body_mib": round(len(body) / 2**20, 1), "parse_peak_mib": round((peak - base) / 2**20, 1),
            "services_held_mib": round((held - base) / 2**20, 1)}  # fmt: skip


def one_size(n_pods: int, n_services: int, args: argparse.Namespace) -> dict:
    pods, services = build_pods(n_pods), build_services(n_services)
    fake = FakeKubeAPI(pods, services)
    fake.compact()  # no history to scan on each watch wake-up (the fake's, not the client's, cost)
    fake.up()
    pod_bytes = sum(len(json.dumps(p)) for p in pods)
    service_bytes = sum(len(json.dumps(s)) for s in services)
    print(f"\n== {n_pods} pods on the node ({pod_bytes / n_pods:,.0f} JSON bytes each), "
          f"{n_services:,} Services ({service_bytes / n_services:,.0f} bytes each)")  # fmt: skip
    try:
        # 1. start() to wait_synced(), several times.
        walls, cpus = [], []
        for r in range(args.rounds):
            md, wall, cpu = sync_once(fake, n_services)
            md.stop()
            walls.append(wall)
            cpus.append(cpu)
            print(f"sync {r + 1}: start() -> wait_synced() {wall * 1e3:6.1f} ms; CPU: metadata threads "
                  f"{cpu['client'] * 1e3:6.1f} ms, fake {cpu['fake'] * 1e3:6.1f} ms, ended threads "
                  f"{cpu['ended'] * 1e3:4.1f} ms, main {cpu['main'] * 1e3:4.1f} ms")  # fmt: skip
        # 2. memory (tracemalloc, in a round of its own: it slows every allocation).
        peak = list_peak(fake)
        md, memory = held_memory(fake, n_services)
        assert md.stats.pods == n_pods and md.stats.services == n_services, md.stats.describe()
        print(f"memory held: {memory['agent_bytes'] / 2**20:.1f} MiB of Python heap allocated under agent/kube.py's "
              f"frames and live after the sync (tracemalloc; the rest of the process: "
              f"{memory['other_bytes'] / 2**20:+.1f} MiB); listing the Services holds at once the body "
              f"({peak['body_mib']} MiB) and its parsed JSON (+{peak['parse_peak_mib']} MiB)")  # fmt: skip
        # 3. watch events: an idle baseline, blocks at a steady rate, a burst.
        quiet = idle(args.idle)
        print(f"idle {args.idle:g} s: metadata threads {quiet['client'] * 1e3:.1f} ms CPU, "
              f"fake {quiet['fake'] * 1e3:.1f} ms")  # fmt: skip
        blocks = []
        for b in range(args.blocks):
            got = run_events(fake, md, pods, args.events, args.rate, seq=1 + b * args.events)
            blocks.append(got)
            c = got["cpu_ms"]
            print(f"block {b + 1}: {args.events:,} restarts at {args.rate:g}/s: metadata threads "
                  f"{got['client_cpu_ms_per_1000']} ms CPU per 1,000 events; fake {got['fake_cpu_ms_per_1000']} ms "
                  f"(handlers {c['fake']:.0f} ms + apply {got['fake_apply_cpu_ms']:.0f} ms); lag p50 "
                  f"{got['lag_ms']['p50']} ms, p99 {got['lag_ms']['p99']} ms, max {got['lag_ms']['max']} ms; "
                  f"last event by pod_by_container {got['lag_ms']['last_by_lookup']} ms")  # fmt: skip
        burst = run_burst(fake, md, pods, args.burst, seq=1 + args.blocks * args.events)
        print(f"burst of {args.burst:,} restarts back to back (applied in {burst['apply_s']} s): the last seen "
              f"{burst['last_seen_after_apply_ms']} ms after the last apply; metadata threads "
              f"{burst['client_cpu_ms_per_1000']} ms CPU per 1,000")  # fmt: skip
        # 4. lookups.
        costs = lookups(md, pods, services)
        print("lookups, ns per call: " + ", ".join(f"{k} {v}" for k, v in costs.items()))
        assert md.stats.errors == 0 and md.stats.relists == 0, md.stats.describe()
        md.stop()
    finally:
        fake.down()
    per_1000 = [b["client_cpu_ms_per_1000"] for b in blocks]
    return {
        "pods": n_pods, "services": n_services, "pod_json_bytes": round(pod_bytes / n_pods),
        "service_json_bytes": round(service_bytes / n_services),
        "sync_ms": {"median": round(statistics.median(walls) * 1e3, 1), "all": [round(w * 1e3, 1) for w in walls]},
        "sync_cpu_ms_median": {k: round(statistics.median(c[k] for c in cpus) * 1e3, 1) for k in cpus[0]},
        "memory_held_mib": round(memory["agent_bytes"] / 2**20, 2),
        "memory_rest_of_process_mib": round(memory["other_bytes"] / 2**20, 2), "services_list": peak,
        "idle_cpu_s": quiet,
        "client_cpu_ms_per_1000_events": {"median": statistics.median(per_1000), "all": per_1000},
        "fake_cpu_ms_per_1000_events": statistics.median(b["fake_cpu_ms_per_1000"] for b in blocks),
        "lag_ms_p50": statistics.median(b["lag_ms"]["p50"] for b in blocks),
        "lag_ms_p99": max(b["lag_ms"]["p99"] for b in blocks),
        "blocks": blocks, "burst": burst, "lookup_ns": costs,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="110x5000,250x20000", help="PODSxSERVICES, comma-separated")
    ap.add_argument("--rounds", type=int, default=3, help="syncs timed per size")
    ap.add_argument("--events", type=int, default=1000, help="container restarts per block, at a steady rate")
    ap.add_argument("--blocks", type=int, default=3, help="blocks of events per size")
    ap.add_argument("--rate", type=float, default=200.0, help="restarts a second")
    ap.add_argument("--burst", type=int, default=1000, help="restarts applied back to back")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of the idle baseline")
    args = ap.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    print(f"KubeMetadata (agent/kube.py, kubernetes client {kubernetes.__version__}) against tests/kubefake.py "
          f"in this process (threads, loopback HTTP, no TLS); {os.cpu_count()} CPUs; CPU per thread "
          f"(metadata threads vs the fake's vs this script's)")  # fmt: skip
    first = first_construction()
    print(
        f"the first KubeMetadata() of the process (it imports the client's CoreV1Api module): "
        f"{first['wall_ms']} ms, {first['cpu_ms']} ms CPU, RSS +{first['rss_growth_mib']} MiB"
    )
    micro = unmarshal_costs(build_pods(1))
    print(f"one pod event ({micro['event_line_bytes']:,} bytes) in the client: unmarshal_event as kube.py asks "
          f"(return_type='object') {micro['unmarshal_event_us']} us, json.loads alone {micro['json_loads_us']} us; "
          f"Pod.from_api {micro['pod_from_api_us']} us")  # fmt: skip
    results = [one_size(p, s, args) for p, s in sizes]
    print(json.dumps({"first_construction": first, "event_parse": micro, "sizes": results}))


if __name__ == "__main__":
    main()
