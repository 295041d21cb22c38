"""Container context from cgroups: the layouts runtimes and the kubelet make, parsed; and
processes placed in real cgroups with those paths, traced by the agent, their spans
carrying it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import require_bpf
from servers import free_port, need, wait_port

from deeptrace.agent.containers import CgroupReader, cgroup_of, parse_cgroup_path

ID = "3f1c9e0b7a52d4e8a1b6c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9"
UID = "0f2b3c4d-1a2b-4c5d-8e9f-0123456789ab"
SYSTEMD_UID = UID.replace("-", "_")


KIND_PATH = ("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
             f"kubelet-kubepods-besteffort-pod{SYSTEMD_UID}.slice/cri-containerd-{ID}.scope")


@pytest.mark.parametrize("path, runtime, cid, pod_uid, qos", [
    # Kubernetes, systemd driver: QoS slice, pod slice (dashes become underscores), runtime scope
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{SYSTEMD_UID}.slice/cri-containerd-{ID}.scope",
     "containerd", ID, UID, "Burstable"),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{SYSTEMD_UID}.slice/crio-{ID}.scope",
     "cri-o", ID, UID, "BestEffort"),
    (f"/kubepods.slice/kubepods-pod{SYSTEMD_UID}.slice/docker-{ID}.scope", "docker", ID, UID, "Guaranteed"),
    # Kubernetes, cgroupfs driver (k3s, kind): the id alone, the runtime not named
    (f"/kubepods/burstable/pod{UID}/{ID}", None, ID, UID, "Burstable"),
    (f"/kubepods/pod{UID}/{ID}", None, ID, UID, "Guaranteed"),
    (f"/kubepods/besteffort/pod{UID}", None, None, UID, "BestEffort"),  # the pod's own cgroup
    # kind, or a kubelet with --cgroup-root: prefixed slices
    (KIND_PATH, "containerd", ID, UID, "BestEffort"),
    # read from inside a cgroup namespace (the agent in a pod): relative to the reader's cgroup
    (f"/../../../besteffort/pod{UID}/{ID}", None, ID, UID, "BestEffort"),
    (f"/../../pod{UID}/{ID}", None, ID, UID, None),
    (f"/../../kubepods-besteffort-pod{SYSTEMD_UID}.slice/crio-{ID}.scope", "cri-o", ID, UID, "BestEffort"),
    # plain container hosts
    (f"/system.slice/docker-{ID}.scope", "docker", ID, None, None),
    (f"/docker/{ID}", "docker", ID, None, None),
    (f"/system.slice/containerd-{ID}.scope", "containerd", ID, None, None),
    (f"/system.slice/nerdctl-{ID}.scope", "containerd", ID, None, None),
    (f"/machine.slice/libpod-{ID}.scope", "podman", ID, None, None),
    (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope", "podman", ID, None, None),
    (f"/libpod_parent/libpod-{ID}", "podman", ID, None, None),
    (f"/machine.slice/libpod-{ID}.scope/container", "podman", ID, None, None),  # a nested cgroup inside it
    # not a container
    (f"/machine.slice/libpod-conmon-{ID}.scope", None, None, None, None),  # Podman's monitor
    (f"/system.slice/crio-conmon-{ID}.scope", None, None, None, None),
    ("/system.slice/nginx.service", None, None, None, None),
    ("/user.slice/user-1000.slice/session-3.scope", None, None, None, None),
    (f"/{ID}", None, None, None, None),  # an id with no runtime or pod above it
    (f"/docker/{ID[:12]}", None, None, None, None),  # short ids are not container ids
    (f"/pod{UID}/{ID}", None, None, None, None),  # "pod" outside kubepods
    ("/", None, None, None, None),
    ("", None, None, None, None),
])  # fmt: skip
def test_container_and_pod_from_cgroup_paths(path, runtime, cid, pod_uid, qos):
    c = parse_cgroup_path(path)
    assert (c.runtime, c.id, c.pod_uid, c.qos_class) == (runtime, cid, pod_uid, qos)


def test_a_cgroup_name_that_is_not_utf8_is_read(tmp_path):
    """Any user can name a cgroup of their own subtree with any bytes."""
    proc = tmp_path / "proc"
    (proc / "7").mkdir(parents=True)
    (proc / "7" / "cgroup").write_bytes(b"0::/user.slice/user-1000.slice/user@1000.service/app.slice/caf\xe9\n")
    c = CgroupReader(proc=str(proc))(7)
    assert c.cgroup.endswith("/app.slice/caf\ufffd") and c.id is None


def test_hostile_cgroup_paths_never_raise():
    rng = secrets.SystemRandom(7)
    alphabet = "/-_.:abcdef0123456789kubepodsliceope\n\0\xff"
    for _ in range(2000):
        path = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 200)))
        parse_cgroup_path(path)
        cgroup_of(path)


V1 = "\n".join([
    "12:pids:/docker/" + ID, "11:memory:/docker/" + ID, "4:cpu,cpuacct:/docker/" + ID,
    "1:name=systemd:/docker/" + ID, "0::/"])  # fmt: skip
V2 = f"0::/system.slice/docker-{ID}.scope"
# A hybrid host where the sandbox keeps some v1 controllers elsewhere (as on our test machines).
HYBRID = "\n".join(["9:name=systemd:/", "8:pids:/docker/" + ID, "4:memory:/process_api/07ac58d4797684d7fb2ed3e6", "0::/"])
HOST_SERVICE = "1:name=systemd:/system.slice/nginx.service\n0::/system.slice/nginx.service"


@pytest.mark.parametrize("text, path, v2", [
    (V1, "/docker/" + ID, False),
    (V2, f"/system.slice/docker-{ID}.scope", True),
    (HYBRID, "/docker/" + ID, False),
    (HOST_SERVICE, "/system.slice/nginx.service", True),
    ("0::/", None, False),
    ("", None, False),
    ("garbage without colons\n::\n0:", None, False),
])  # fmt: skip
def test_the_cgroup_that_places_a_process(text, path, v2):
    assert cgroup_of(text) == (path, v2)


# ---- real cgroups, real processes, traced ----

V2_ROOT = Path("/sys/fs/cgroup/unified") if Path("/sys/fs/cgroup/unified/cgroup.procs").exists() else Path("/sys/fs/cgroup")
V1_PIDS = Path("/sys/fs/cgroup/pids")


def _cgroup_dirs_reason() -> str | None:
    if os.geteuid() != 0:
        return "creating cgroups needs root"
    if not (V2_ROOT / "cgroup.procs").exists():
        return f"no cgroup v2 hierarchy at {V2_ROOT}"
    return None


class Cgroups:
    """Cgroup directories made for a test, removed (deepest first) after it."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    def make(self, path: Path) -> Path:
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            p.mkdir()
            self.made.append(p)
        return path

    def remove(self) -> None:
        for p in reversed(self.made):
            for _ in range(50):  # a process that just exited can hold it for a moment
                try:
                    p.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


@pytest.fixture
def cgroups():
    reason = _cgroup_dirs_reason()
    if reason:
        pytest.skip(reason)
    made = Cgroups()
    yield made
    made.remove()


def in_cgroup(cgroup: Path, argv: list[str], **kw) -> subprocess.Popen:
    """argv started inside `cgroup`: a shell moves itself there, then execs it (as a runtime
    places a container's first process before it runs)."""
    script = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
    return subprocess.Popen(["sh", "-c", script, str(cgroup), *argv], **kw)


def test_a_process_in_a_pod_cgroup_is_read_with_its_cgroup_id(cgroups):
    pod = cgroups.make(V2_ROOT / "kubepods.slice" / "kubepods-burstable.slice" /
                       f"kubepods-burstable-pod{SYSTEMD_UID}.slice" / f"cri-containerd-{ID}.scope")  # fmt: skip
    p = in_cgroup(pod, ["sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{p.pid}/comm").read_text().strip() != "sleep" and time.monotonic() < deadline:
            time.sleep(0.02)
        c = CgroupReader()(p.pid)
        assert (c.runtime, c.id, c.pod_uid, c.qos_class) == ("containerd", ID, UID, "Burstable")
        assert c.cgroup_id == os.stat(pod).st_ino  # what bpf_get_current_cgroup_id() says for it
    finally:
        p.kill()
        p.wait()
    assert CgroupReader()(p.pid) is None  # gone


def test_a_process_in_no_container_keeps_its_cgroup_path(cgroups):
    unit = cgroups.make(V2_ROOT / "system.slice" / "shop-worker.service")
    p = in_cgroup(unit, ["sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{p.pid}/comm").read_text().strip() != "sleep" and time.monotonic() < deadline:
            time.sleep(0.02)
        attrs = CgroupReader()(p.pid).attributes()
    finally:
        p.kill()
        p.wait()
    assert attrs == {"deeptrace.cgroup.path": "/system.slice/shop-worker.service",
                     "deeptrace.cgroup.id": str(os.stat(unit).st_ino)}  # fmt: skip


def test_spans_of_processes_in_container_cgroups_carry_their_context(cgroups, tmp_path):
    """A server in a Kubernetes pod's container (cgroup v2, systemd driver), curl in a Docker
    container (v2) and in another (v1, cgroupfs driver), traced by `deeptrace agent`."""
    require_bpf()
    other = "9" * 64
    server_cg = cgroups.make(V2_ROOT / "kubepods.slice" / "kubepods-burstable.slice" /
                             f"kubepods-burstable-pod{SYSTEMD_UID}.slice" / f"cri-containerd-{ID}.scope")  # fmt: skip
    docker_v2 = cgroups.make(V2_ROOT / "system.slice" / f"docker-{other}.scope")
    if not (V1_PIDS / "cgroup.procs").exists():
        pytest.skip(f"no cgroup v1 pids hierarchy at {V1_PIDS} for the cgroupfs-driver layout")
    v1_id = uuid.uuid4().hex * 2
    docker_v1 = cgroups.make(V1_PIDS / "docker" / v1_id)
    port = free_port()
    server = in_cgroup(server_cg, [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                       cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    out = tmp_path / "spans.jsonl"
    try:
        wait_port(port)
        agent = subprocess.Popen([sys.executable, "-m", "deeptrace.cli", "agent", "--pid", str(server.pid),
                                  "--comm", "curl", "--comm", "v1client", "--duration", "6", "--out", str(out),
                                  "--no-kube"], stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert "tracing" in agent.stderr.readline()
        # curl is gone before its records are read: its container comes from the cgroup v2 id
        # the kernel noted. Under v1 there is no such id: that client stays a moment longer.
        c = in_cgroup(docker_v2, [need("curl"), "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/"])
        assert c.wait(timeout=30) == 0
        (tmp_path / "v1client").symlink_to(sys.executable)  # its comm: the name it was run by
        code = f"import urllib.request, time; urllib.request.urlopen('http://127.0.0.1:{port}/').read(); time.sleep(2)"
        c = in_cgroup(docker_v1, [str(tmp_path / "v1client"), "-c", code])
        assert c.wait(timeout=30) == 0
        _, err = agent.communicate(timeout=60)
        assert agent.returncode == 0, err
    finally:
        server.kill()
        server.wait()
    spans = [json.loads(line) for line in out.read_text().splitlines()]
    servers = [s for s in spans if s["kind"] == "SERVER" and s["lport"] == port]
    clients = sorted((s for s in spans if s["kind"] == "CLIENT" and s["rport"] == port),
                     key=lambda s: s["start_ns"])  # fmt: skip
    assert len(servers) == 2 and len(clients) == 2, [(s["kind"], s["service"]) for s in spans]
    for s in servers:
        a = s["attributes"]
        assert (a["container.id"], a["container.runtime"], a["k8s.pod.uid"], a["k8s.pod.qos_class"]) == (
            ID, "containerd", UID, "Burstable")  # fmt: skip
        assert a["deeptrace.cgroup.id"] == str(os.stat(server_cg).st_ino)
        assert "deeptrace.cgroup.path" not in a  # the ids say it all
    first, second = (c["attributes"] for c in clients)
    assert (first["container.id"], first["container.runtime"]) == (other, "docker")
    assert "deeptrace.cgroup.id" in first and "k8s.pod.uid" not in first
    assert (second["container.id"], second["container.runtime"]) == (v1_id, "docker")
    assert "deeptrace.cgroup.id" not in second  # a v1 cgroup has no such id
    assert [c["service"] for c in clients] == ["curl", "v1client"]


# ---- in a cluster: the agent's pod watch (agent/kube.py) against a fake API server ----


def test_processes_retry_a_pod_the_metadata_does_not_know_yet():
    """The pod's ADDED event can come after its first connection: that answer is not kept."""
    from kubefake import fixture

    from deeptrace.agent.containers import Container
    from deeptrace.agent.kube import Pod
    from deeptrace.agent.services import Processes

    obj = next(p for p in fixture("pods") if p["metadata"]["name"] == "checkout-7d4b9c8f6d-x2k9p")
    pod = Pod.from_api(obj)
    cid = next(iter(pod.containers))

    class Kube:  # what the watch has so far: nothing, then the pod
        known: Pod | None = None

        def pod_by_container(self, container_id):
            return self.known if self.known and container_id in self.known.containers else None

        def pod_by_uid(self, uid):
            return None

    where = Container("/kubepods/burstable/pod" + pod.uid + "/" + cid, None, None, cid, pod.uid, "Burstable")
    kube = Kube()
    processes = Processes(kube, cgroups=lambda pid: where)
    processes.RETRY_S = 0.0
    first = processes(os.getpid(), "python3")
    assert dict(first.resource)["container.id"] == cid and "k8s.pod.name" not in dict(first.resource)
    # The pod is known, but its status does not list this container's id yet (the kubelet
    # reports it a moment after the container starts): asked again too.
    assert processes._complete(where, replace(pod, containers={})) is False
    kube.known = pod
    second = dict(processes(os.getpid(), "python3").resource)
    assert (second["k8s.pod.name"], second["k8s.namespace.name"], second["k8s.workload.name"]) == (
        "checkout-7d4b9c8f6d-x2k9p", "shop", "checkout")  # fmt: skip
    assert processes(os.getpid(), "python3").service == "checkout"


def test_the_agent_in_a_cluster_names_spans_after_pods_and_workloads(cgroups, tmp_path):
    """`deeptrace agent --kube` with a kubeconfig that points at a fake API server serving a
    Deployment's pod (real pod JSON) whose container is the traced server: its spans carry the
    pod, namespace, workload and container names and are named after the Deployment; a call to
    the pod's IP from elsewhere carries the pod's service as peer.service."""
    require_bpf()
    from kubefake import FakeKubeAPI, fixture

    obj = next(p for p in fixture("pods") if p["metadata"]["name"] == "checkout-7d4b9c8f6d-x2k9p")
    obj["metadata"]["uid"] = UID
    obj["status"]["containerStatuses"][0]["containerID"] = "containerd://" + ID
    obj["status"].update(podIP="127.0.0.2", podIPs=[{"ip": "127.0.0.2"}])  # reachable here
    api = FakeKubeAPI([obj], []).up()
    config = tmp_path / "kubeconfig"
    config.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{api.url}"}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: agent}}}}]
current-context: fake
users: [{{name: agent, user: {{token: not-checked}}}}]
""")
    pod_cg = cgroups.make(V2_ROOT / "kubepods.slice" / "kubepods-burstable.slice" /
                          f"kubepods-burstable-pod{SYSTEMD_UID}.slice" / f"cri-containerd-{ID}.scope")  # fmt: skip
    port = free_port()
    server = in_cgroup(pod_cg, [sys.executable, "-m", "http.server", "--bind", "127.0.0.2", str(port)],
                       cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    out = tmp_path / "spans.jsonl"
    env = {**os.environ, "KUBECONFIG": str(config), "NODE_NAME": "node-a"}
    try:
        wait_port(port, host="127.0.0.2")
        agent = subprocess.Popen([sys.executable, "-m", "deeptrace.cli", "agent", "--pid", str(server.pid),
                                  "--comm", "curl", "--duration", "5", "--out", str(out), "--kube"],
                                 stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        started = agent.stderr.readline() + agent.stderr.readline()
        assert "kubernetes: node node-a, 1 pods" in started and "tracing" in started, started
        subprocess.run([need("curl"), "-s", "-o", "/dev/null", f"http://127.0.0.2:{port}/"], check=True, timeout=30)
        _, err = agent.communicate(timeout=60)
        assert agent.returncode == 0, err
    finally:
        server.kill()
        server.wait()
        api.down()
    spans = [json.loads(line) for line in out.read_text().splitlines()]
    (served,) = [s for s in spans if s["kind"] == "SERVER" and s["lport"] == port]
    (call,) = [s for s in spans if s["kind"] == "CLIENT" and s["rport"] == port]
    a = served["attributes"]
    assert served["service"] == "checkout"
    assert {k: a[k] for k in ("k8s.namespace.name", "k8s.pod.name", "k8s.pod.uid", "k8s.node.name",
                              "k8s.deployment.name", "k8s.workload.kind", "k8s.workload.name",
                              "k8s.container.name", "container.id", "container.runtime")} == {
        "k8s.namespace.name": "shop", "k8s.pod.name": "checkout-7d4b9c8f6d-x2k9p", "k8s.pod.uid": UID,
        "k8s.node.name": "node-a", "k8s.deployment.name": "checkout", "k8s.workload.kind": "deployment",
        "k8s.workload.name": "checkout", "k8s.container.name": "checkout", "container.id": ID,
        "container.runtime": "containerd"}  # fmt: skip
    assert call["service"] == "curl" and call["attributes"]["peer.service"] == "checkout"
    assert "k8s.pod.name" not in call["attributes"]


def test_read_from_inside_a_cgroup_namespace(tmp_path):
    """The agent in a pod (hostPID, its own cgroup namespace) reads other pods' cgroups relative
    to its own (`/../..`): the container is still named; the kernel's id finds the full path in
    the host's hierarchy the DaemonSet mounts."""
    host = tmp_path / "cgroup"
    scope = host / "kubepods.slice" / "kubepods-burstable.slice" / f"kubepods-burstable-pod{SYSTEMD_UID}.slice" / (
        f"cri-containerd-{ID}.scope")  # fmt: skip
    scope.mkdir(parents=True)
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(f"30 25 0:26 / {host} rw,nosuid - cgroup2 cgroup2 rw\n")
    (proc / "42").mkdir()
    (proc / "42" / "cgroup").write_text(
        f"0::/../../kubepods-burstable-pod{SYSTEMD_UID}.slice/cri-containerd-{ID}.scope\n")  # fmt: skip
    alone = CgroupReader(proc=str(proc))(42)
    assert (alone.id, alone.pod_uid, alone.cgroup_id) == (ID, UID, None)
    with_kernel = CgroupReader(lambda pid: os.stat(scope).st_ino, proc=str(proc))(42)
    assert (with_kernel.id, with_kernel.pod_uid, with_kernel.qos_class) == (ID, UID, "Burstable")
    assert with_kernel.cgroup_id == os.stat(scope).st_ino
    assert with_kernel.cgroup == "/" + str(scope.relative_to(host))
