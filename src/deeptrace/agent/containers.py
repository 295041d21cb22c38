"""Which container (and Kubernetes pod) a process runs in, from its cgroup.

Container runtimes name the cgroup they put a container in after the container's id, and
the kubelet names the pod's cgroup after the pod's UID and QoS class, so `/proc/PID/cgroup`
says all of it without asking any runtime. The layouts read here (systemd and cgroupfs
drivers; cgroup v2 and v1):

    /system.slice/docker-<id>.scope                       Docker, systemd driver
    /docker/<id>                                          Docker, cgroupfs driver
    /system.slice/containerd-<id>.scope, /system.slice/nerdctl-<id>.scope   containerd
    /machine.slice/libpod-<id>.scope, .../user@1000.service/user.slice/libpod-<id>.scope,
    /libpod_parent/libpod-<id>                            Podman (rootful, rootless, cgroupfs)
    /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID>.slice/cri-containerd-<id>.scope
    /kubepods.slice/kubepods-pod<UID>.slice/crio-<id>.scope               (Guaranteed QoS)
    /kubepods/besteffort/pod<UID>/<id>                    Kubernetes, cgroupfs driver (runtime not named)

The cgroup v2 id, the number eBPF's bpf_get_current_cgroup_id() gives, is the inode of the
cgroup's directory: one stat, no kernel change.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

# OpenTelemetry's names (container.*, k8s.pod.uid); the cgroup's and the QoS class are ours.
CONTAINER_ID = "container.id"
CONTAINER_RUNTIME = "container.runtime"
POD_UID = "k8s.pod.uid"
QOS_CLASS = "k8s.pod.qos_class"
CGROUP_PATH = "deeptrace.cgroup.path"
CGROUP_ID = "deeptrace.cgroup.id"

MAX_CGROUPS = 100_000  # cgroups indexed by id at most (a host has hundreds to thousands)

_ID = r"([0-9a-f]{64})"
# A container's own cgroup, by the prefix its runtime gives it ("conmon" cgroups hold the
# runtime's monitor process, not the container, and are not matched).
_SCOPES = (
    (re.compile(rf"^docker-{_ID}\.scope$"), "docker"),
    (re.compile(rf"^cri-containerd-{_ID}\.scope$"), "containerd"),
    (re.compile(rf"^containerd-{_ID}\.scope$"), "containerd"),
    (re.compile(rf"^nerdctl-{_ID}\.scope$"), "containerd"),
    (re.compile(rf"^crio-{_ID}\.scope$"), "cri-o"),
    (re.compile(rf"^libpod-{_ID}(\.scope)?$"), "podman"),
)
_PLAIN_ID = re.compile(rf"^{_ID}$")  # cgroupfs drivers: the id alone
_PARENT_RUNTIME = {"docker": "docker", "libpod_parent": "podman"}
_UID = r"([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
# kind and kubelets given --cgroup-root prefix the slices ("kubelet-kubepods-...").
_POD_SYSTEMD = re.compile(rf"^(?:[\w.-]+-)?kubepods(?:-(burstable|besteffort))?-pod{_UID}\.slice$")
_POD_CGROUPFS = re.compile(rf"^pod{_UID}$")
_QOS = {None: "Guaranteed", "burstable": "Burstable", "besteffort": "BestEffort"}


@dataclass(frozen=True)
class Container:
    """What a process's cgroup says about where it runs."""

    cgroup: str  # its path in the cgroup hierarchy
    cgroup_id: int | None = None  # cgroup v2 only
    runtime: str | None = None  # docker, containerd, cri-o, podman; None: not named by the path
    id: str | None = None  # the container's id (64 hex digits)
    pod_uid: str | None = None  # Kubernetes
    qos_class: str | None = None  # Guaranteed, Burstable, BestEffort

    @property
    def relative(self) -> bool:
        """Read from inside a cgroup namespace and not found in the host's hierarchy: the path
        is relative to the reader's own cgroup (`/../..`)."""
        return "/.." in self.cgroup

    def attributes(self) -> dict[str, str]:
        # The path only where it says more than the ids (a systemd unit, a slice): a container's
        # is ~190 bytes on every span, and its ids carry all it says. A relative one says little.
        out = {} if self.id or self.pod_uid or self.relative else {CGROUP_PATH: self.cgroup}
        if self.cgroup_id is not None:
            out[CGROUP_ID] = str(self.cgroup_id)
        for key, value in ((CONTAINER_ID, self.id), (CONTAINER_RUNTIME, self.runtime), (POD_UID, self.pod_uid),
                           (QOS_CLASS, self.qos_class)):  # fmt: skip
            if value:
                out[key] = value
        return out


def parse_cgroup_path(path: str) -> Container:
    """The container and pod a cgroup path names (fields None where it names none)."""
    runtime = container_id = pod_uid = qos = None
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        if m := _POD_SYSTEMD.match(part):
            pod_uid, qos = m.group(2).replace("_", "-"), _QOS[m.group(1)]
            continue
        # cgroupfs driver: under kubepods (or, read from inside a cgroup namespace, under "..":
        # the path is relative to the reader's own cgroup, and "kubepods" may be above it).
        if (m := _POD_CGROUPFS.match(part)) and i > 0 and ("kubepods" in parts[:i] or parts[0] == ".."):
            pod_uid = m.group(1).replace("_", "-")
            above = parts[i - 1]
            qos = _QOS[above] if above in ("burstable", "besteffort") else "Guaranteed" if above == "kubepods" else None
            continue
        for pattern, name in _SCOPES:
            if m := pattern.match(part):
                runtime, container_id = name, m.group(1)
                break
        else:
            if _PLAIN_ID.match(part) and i > 0 and (parts[i - 1] in _PARENT_RUNTIME or pod_uid):
                runtime, container_id = _PARENT_RUNTIME.get(parts[i - 1]), part
    return Container(path, None, runtime, container_id, pod_uid, qos)


def cgroup_of(text: str) -> tuple[str | None, bool]:
    """The cgroup path that places a process, from /proc/PID/cgroup's text, and whether it is
    the v2 one. The first that names a container or pod: the v2 path (`0::`), then the v1
    hierarchies' (runtimes make the same path in every v1 controller, but a hybrid host can
    leave some at its own). Else the v2 path, then systemd's v1 one, then the longest."""
    v2, systemd, v1 = None, None, []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif controllers == "name=systemd":
            systemd = path
        elif path:
            v1.append(path)
    ordered = [p for p in (v2, systemd, *sorted(v1, key=len, reverse=True)) if p and p != "/"]
    for path in ordered:
        found = parse_cgroup_path(path)
        if found.id or found.pod_uid:
            return path, path == v2
    return (ordered[0], ordered[0] == v2) if ordered else (None, False)


class CgroupReader:
    """A process's Container, read from /proc; for a process already gone (a short-lived
    client), from the cgroup v2 id the kernel noted for it (`cgroup_id_of`, the agent's
    Collector.cgroup_id), found in the v2 hierarchy by its inode."""

    RESCAN_S = 1.0  # the hierarchy is walked again for an unknown id at most this often

    def __init__(self, cgroup_id_of: Callable[[int], int | None] | None = None, proc: str = "/proc") -> None:
        self._proc = proc
        self._v2_mount = _cgroup2_mount(proc)
        self._cgroup_id_of = cgroup_id_of
        self._paths: dict[int, str] = {}  # v2 id -> path
        self._scanned = -math.inf

    def __call__(self, pid: int) -> Container | None:
        """None when nothing places the process (gone and never seen, or at the root)."""
        try:
            with open(f"{self._proc}/{pid}/cgroup", errors="replace") as f:  # a cgroup's name is any bytes
                text = f.read()
        except OSError:
            return self._from_kernel(pid)
        path, is_v2 = cgroup_of(text)
        if path is None:
            return None
        found = parse_cgroup_path(path)
        if found.relative:
            # Read from inside a cgroup namespace (the agent in a pod): the path is relative to
            # our own cgroup. The kernel's id names the cgroup in the host's hierarchy (which
            # the DaemonSet mounts); else the relative path still names the container.
            return self._from_kernel(pid) or found
        if is_v2 and self._v2_mount:
            try:
                found = replace(found, cgroup_id=os.stat(self._v2_mount + path).st_ino)
            except OSError:
                pass  # gone meanwhile, or under a cgroup namespace we cannot see into
        return found

    def _from_kernel(self, pid: int) -> Container | None:
        cgroup_id = self._cgroup_id_of(pid) if self._cgroup_id_of is not None else None
        if cgroup_id is None or self._v2_mount is None:
            return None
        path = self._paths.get(cgroup_id)
        if path is None and time.monotonic() - self._scanned >= self.RESCAN_S:
            self._scan()
            path = self._paths.get(cgroup_id)
        if path is None or path == "/":
            return None
        return replace(parse_cgroup_path(path), cgroup_id=cgroup_id)

    def _scan(self) -> None:
        self._scanned = time.monotonic()
        root = self._v2_mount
        paths = {}
        for top, _dirs, _files in os.walk(root):
            try:
                paths[os.stat(top).st_ino] = top[len(root):] or "/"
            except OSError:
                continue
            if len(paths) >= MAX_CGROUPS:
                break
        self._paths = paths


def _cgroup2_mount(proc: str) -> str | None:
    try:
        with open(f"{proc}/self/mountinfo") as f:
            for line in f:
                # ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS... - FSTYPE SOURCE SUPEROPTS
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split(" ")[4]
    except OSError:
        pass
    return None
