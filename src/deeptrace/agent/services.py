"""Service names and whereabouts of traced processes, read from /proc without touching them.

A thread's comm says `python` or `event_engine`; a service map needs `catalog`. In order
(OpenTelemetry's rules): the process's own OTEL_SERVICE_NAME (a service that already
declares its name keeps it); in Kubernetes, its pod's `app.kubernetes.io/name` label, then
its workload's name (agent/kube.py); then what its command line says it runs (a script, a
`-m` module, an app given to gunicorn/uvicorn, a jar); then the process's comm.

Where it runs (its cgroup, container, pod: agent/containers.py, agent/kube.py) goes on
every span of it as attributes (ProcessInfo.resource).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from deeptrace.agent.containers import CgroupReader
from deeptrace.capture.spans import ProcessInfo

if TYPE_CHECKING:
    from deeptrace.agent.kube import KubeMetadata

MAX_CACHED = 8192
INTERPRETERS = re.compile(r"^(python[\d.]*|pypy[\d.]*|node|nodejs|ruby[\d.]*|perl[\d.]*|php[\d.]*|java|bash|sh)$")
# Runners whose first `module:app` argument names the application they serve.
RUNNERS = {"gunicorn", "uvicorn", "hypercorn", "daphne", "granian", "celery", "flask", "waitress-serve"}
APP_SPEC = re.compile(r"^([A-Za-z_][\w.]*)(:[\w.()]+)?$")
PROCTITLE_APP = re.compile(r"\[([A-Za-z_][\w.]*):[\w.()]+\]")  # "gunicorn: worker [shop.catalog:app]"
SCRIPT_SUFFIX = re.compile(r"\.(py|js|mjs|cjs|rb|pl|php|jar|sh)$")


def from_cmdline(argv: list[str]) -> str | None:
    """The service an argv runs, or None when it does not say."""
    if not argv or not argv[0]:
        return None
    if len(argv) == 1 and (m := PROCTITLE_APP.search(argv[0])):
        return _last(m.group(1))
    prog = os.path.basename(argv[0].split()[0]).rstrip(":")  # "nginx: worker process"
    args = argv[1:]
    if prog in RUNNERS:
        return _app_arg(args) or prog
    if not INTERPRETERS.match(prog):
        return SCRIPT_SUFFIX.sub("", prog) or None
    if prog == "java":
        return _java_main(args)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-m" and i + 1 < len(args):
            module = args[i + 1]
            return (_app_arg(args[i + 2:]) or _last(module)) if _last(module) in RUNNERS else _last(module)
        if a in ("-c", "-e"):  # inline code names nothing
            return None
        if not a.startswith("-"):
            script = SCRIPT_SUFFIX.sub("", os.path.basename(a))
            return (_app_arg(args[i + 1:]) or script) if script in RUNNERS else script or None
        i += 1
    return None


def _last(dotted: str) -> str:
    return dotted.rsplit(".", 1)[-1]


def _app_arg(args: list[str]) -> str | None:
    """`users:app` in a runner's arguments (options and their values skipped)."""
    for a in args:
        if not a.startswith("-") and ":" in a and "/" not in a and (m := APP_SPEC.match(a)):
            return _last(m.group(1))
    return None


def _java_main(args: list[str]) -> str | None:
    takes_value = {"-cp", "-classpath", "--class-path", "-p", "--module-path"}
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-jar" and i + 1 < len(args):
            return SCRIPT_SUFFIX.sub("", os.path.basename(args[i + 1]))
        if a in takes_value:
            i += 2
            continue
        if not a.startswith("-"):
            return _last(a)
        i += 1
    return None


def _environ_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    for item in env.split(b"\0"):
        if item.startswith(b"OTEL_SERVICE_NAME="):
            return item[len(b"OTEL_SERVICE_NAME="):].decode(errors="replace").strip() or None
    return None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []


class Processes:
    """(pid, comm) -> ProcessInfo, cached: a process is looked up once per connection it opens
    at most, and /proc reads are not free. comm is in the key, so an exec'd or reused pid is
    read again. A process gone before the lookup keeps its comm. A pod the Kubernetes
    metadata does not know yet (its watch event still on the way) is asked for again after
    RETRY_S."""

    RETRY_S = 5.0

    def __init__(self, kube: KubeMetadata | None = None, cgroups: CgroupReader | None = None) -> None:
        self.kube = kube
        self._cgroups = cgroups or CgroupReader()
        self._cache: OrderedDict[tuple[int, str], tuple[ProcessInfo, float]] = OrderedDict()

    def use_kernel_cgroups(self, cgroup_id_of: Callable[[int], int | None]) -> None:
        """Name the containers of processes gone before their first lookup too (CgroupReader)."""
        self._cgroups = CgroupReader(cgroup_id_of)

    def __call__(self, pid: int, comm: str) -> ProcessInfo:
        key = (pid, comm)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        info, complete = self._describe(pid, comm)
        self._cache[key] = (info, math.inf if complete else now + self.RETRY_S)
        if len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        return info

    def _describe(self, pid: int, comm: str) -> tuple[ProcessInfo, bool]:
        try:
            container = self._cgroups(pid)
        except (OSError, ValueError):  # what /proc holds is not ours to trust: never fatal
            container = None
        pod = None
        if self.kube is not None and container is not None:
            pod = (container.id and self.kube.pod_by_container(container.id)) or (
                container.pod_uid and self.kube.pod_by_uid(container.pod_uid)) or None  # fmt: skip
        resource = container.attributes() if container else {}
        if pod is not None:
            resource.update(pod.attributes(container.id))
        service = (_environ_name(pid) or (pod.service_name() if pod else None) or from_cmdline(_cmdline(pid))
                   or comm)  # fmt: skip
        return ProcessInfo(service, tuple(resource.items())), self._complete(container, pod)

    def _complete(self, container, pod) -> bool:
        """Whether a later look could say more: the kernel's cgroup id not yet found in the
        hierarchy, or (with Kubernetes) a container the pod watch does not know yet (its pod's
        event, or the container's id in the pod's status, comes a moment after it starts)."""
        if container is None:
            return True
        if container.relative and container.cgroup_id is None:
            return False
        if self.kube is None or not (container.id or container.pod_uid):
            return True
        return pod is not None and (not container.id or container.id in pod.containers)
