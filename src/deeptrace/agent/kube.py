"""Kubernetes metadata for the processes the agent traces: which pod, workload and service.

The agent knows a process's container id and pod UID from its cgroup (containers.py); this
module keeps, from the Kubernetes API server, what those ids mean: the pods of this node (by
UID, by container id and by IP) and the cluster's Services (by ClusterIP), so a span can say
`k8s.deployment.name=checkout` and a peer address can be named `checkout`.

It follows the API server the way Kubernetes' own controllers do (a "reflector"): list, then
watch from the list's resourceVersion, never poll. One daemon thread per kind of object:

- pods: `spec.nodeName=<node>` only (a node runs at most a few hundred), so every agent of a
  large cluster does not hold, nor make the API server send, every pod of the cluster;
- services: the whole cluster, since a ClusterIP that a client connects to may be any Service.

A watch is opened with `timeoutSeconds`, so the server ends it after a while and it is reopened
from the last resourceVersion seen (no event is lost in between). When that version is too old
(the server has compacted its history: 410 Gone, as an HTTP status or as an ERROR event in the
stream) or the connection fails, the thread lists again, which also drops what was deleted
while it was not watching; connection failures back off (1 s doubling to 30 s by default).
What is held is bounded (`max_pods`, `max_services`); what does not fit is counted in
`stats.refused`, and is taken in later when room frees and the object changes or is listed again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import kubernetes.client
import kubernetes.config
import kubernetes.watch
import urllib3
from kubernetes.client.exceptions import ApiException

from deeptrace.agent.containers import POD_UID
from deeptrace.errors import DeepTraceError

log = logging.getLogger(__name__)

# Where a pod finds its service account (kubernetes.config's in-cluster loader reads the same).
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount/token"
# The environment variables a DaemonSet usually sets from the downward API (spec.nodeName).
NODE_NAME_VARIABLES = ("K8S_NODE_NAME", "NODE_NAME")

# OpenTelemetry's attribute names (semantic conventions, k8s.* and service.*).
NAMESPACE = "k8s.namespace.name"
POD_NAME = "k8s.pod.name"
NODE_NAME = "k8s.node.name"
CONTAINER_NAME = "k8s.container.name"
# DeepTrace's own: one key to search on whatever the kind of workload.
WORKLOAD_KIND = "k8s.workload.kind"
WORKLOAD_NAME = "k8s.workload.name"
# The workload kinds OpenTelemetry names an attribute for: k8s.<kind>.name.
OTEL_WORKLOAD_KINDS = ("deployment", "replicaset", "statefulset", "daemonset", "cronjob", "job")

# How OpenTelemetry derives service.name for a pod (semantic conventions, "Populating resource
# attributes in Kubernetes"); see Pod.service_name.
SERVICE_NAME_ANNOTATION = "resource.opentelemetry.io/service.name"
NAME_LABEL = "app.kubernetes.io/name"

# A pod whose phase is one of these has stopped: its IP may already be another pod's.
CRONJOB_RUN = re.compile(r"^(.+)-[0-9]{8,}$")  # a CronJob's Job: <cronjob>-<scheduled minute>
FINISHED_PHASES = ("Succeeded", "Failed")
# A pod's annotations may hold up to 256 KiB (a whole manifest in kubectl's last-applied one):
# longer values are not kept, so that what is held is bounded in bytes as well as in pods.
MAX_ANNOTATION_BYTES = 4096


class KubeConfigError(DeepTraceError):
    """No way to reach the Kubernetes API, said so that a user knows what to set."""


def in_cluster() -> bool:
    """Whether this process runs in a pod with a service account (for the agent's auto mode)."""
    return os.path.isfile(TOKEN_PATH) and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def container_id_of(value: str) -> str:
    """A container id as the cgroup path gives it: `containerd://<hex>` -> `<hex>`."""
    return value.rpartition("://")[2].strip().lower()


@dataclass(frozen=True)
class Pod:
    """What the agent keeps of a pod (built from the API's JSON by `Pod.from_api`)."""

    uid: str
    name: str
    namespace: str
    node: str
    labels: dict[str, str]
    annotations: dict[str, str]  # those up to MAX_ANNOTATION_BYTES long
    workload_kind: str | None  # deployment, statefulset, daemonset, job, replicaset, ...; None: bare pod
    workload_name: str | None
    qos_class: str | None  # Guaranteed, Burstable, BestEffort
    ips: tuple[str, ...]
    containers: dict[str, str]  # container id (hex, no runtime prefix) -> container name
    host_network: bool
    phase: str | None = None  # Pending, Running, Succeeded, Failed, Unknown
    deleting: bool = False  # metadata.deletionTimestamp set: on its way out
    job: str | None = None  # a CronJob's pod: the Job (the run) it belongs to

    @classmethod
    def from_api(cls, obj: dict[str, Any]) -> Pod:
        """A pod from its JSON as the API server sends it (`kubectl get pod -o json`)."""
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        labels = dict(meta.get("labels") or {})
        kind, name = _workload(meta.get("ownerReferences") or [], labels)
        ips = tuple(entry["ip"] for entry in status.get("podIPs") or () if entry.get("ip"))
        if not ips and status.get("podIP"):  # servers before dual-stack (1.16) give podIP only
            ips = (status["podIP"],)
        containers = {}
        for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
            for entry in status.get(key) or ():
                # A container not started yet has no id.
                if entry.get("containerID") and entry.get("name"):
                    containers[container_id_of(entry["containerID"])] = entry["name"]
        return cls(
            uid=meta.get("uid", ""),
            name=meta.get("name", ""),
            namespace=meta.get("namespace", ""),
            node=spec.get("nodeName") or "",
            labels=labels,
            annotations={
                k: v for k, v in (meta.get("annotations") or {}).items() if len(v) <= MAX_ANNOTATION_BYTES
            },
            workload_kind=kind,
            workload_name=name,
            qos_class=status.get("qosClass"),
            ips=ips,
            containers=containers,
            host_network=bool(spec.get("hostNetwork")),
            phase=status.get("phase"),
            deleting=bool(meta.get("deletionTimestamp")),
            job=next((o.get("name") for o in meta.get("ownerReferences") or () if o.get("kind") == "Job"), None)
            if kind == "cronjob" else None,
        )

    def attributes(self, container_id: str | None = None) -> dict[str, str]:
        """The span attributes this pod gives (OpenTelemetry's names where it has them).

        `k8s.container.name` is the container's name in the pod's spec, OpenTelemetry's name for
        it (`container.name` is the runtime's own, globally unique name, not this)."""
        out = {NAMESPACE: self.namespace, POD_NAME: self.name, POD_UID: self.uid}
        if self.node:
            out[NODE_NAME] = self.node
        if self.workload_kind and self.workload_name:
            if self.workload_kind in OTEL_WORKLOAD_KINDS:
                out[f"k8s.{self.workload_kind}.name"] = self.workload_name
            if self.workload_kind == "cronjob" and self.job:
                out["k8s.job.name"] = self.job
            out[WORKLOAD_KIND] = self.workload_kind
            out[WORKLOAD_NAME] = self.workload_name
        if container_id:
            container = self.containers.get(container_id_of(container_id))
            if container:
                out[CONTAINER_NAME] = container
        return out

    def service_name(self) -> str | None:
        """The pod's service name (after OTEL_SERVICE_NAME, which the caller takes from the
        process's environment): the annotation `resource.opentelemetry.io/service.name`, the
        label `app.kubernetes.io/name`, then the workload's name; None for a bare pod, which
        the process's own rule then names (agent/services.py).

        OpenTelemetry's conventions ("Populating resource attributes in Kubernetes") also put
        the label `app.kubernetes.io/instance` before `app.kubernetes.io/name`, and the pod's
        name last. Neither is used: Helm sets `instance` to the release, the same for every
        component of a chart (its database and its cache would be one service in the map), and
        a bare pod's generated name says less than the program it runs. A Job started by a
        CronJob is named as the Job (see `_workload`)."""
        for value in (self.annotations.get(SERVICE_NAME_ANNOTATION), self.labels.get(NAME_LABEL), self.workload_name):
            if value:
                return value
        return None

    @property
    def running(self) -> bool:
        """Not stopped for good: its IP is still its own."""
        return self.phase not in FINISHED_PHASES


def _workload(owners: list[dict[str, Any]], labels: dict[str, str]) -> tuple[str | None, str | None]:
    """The workload that runs a pod, from its ownerReferences alone (no further API call).

    - A ReplicaSet whose name is `<deployment>-<pod-template-hash>`, the pod carrying that
      `pod-template-hash` label, belongs to the Deployment (that is how the Deployment
      controller names them); any other ReplicaSet is reported as itself.
    - A Job named `<name>-<8 or more digits>` is a CronJob's run (the CronJob controller names
      its Jobs after the scheduled minute, 8 digits since 1973): reported as the CronJob, so
      its runs are one service, not one each (the pod does not carry the CronJob's name, and
      asking for the Job's owner would be an API call per run). `k8s.job.name` still names the
      run. A Job named so by hand would be taken for a CronJob's; any other Job is itself.
    - StatefulSet, DaemonSet, ReplicationController and others (operators' own kinds): the
      owner's kind in lower case and its name. A static pod's mirror is owned by its Node,
      which is no workload: such a pod is bare (None, None), as is a pod with no owner.
    """
    if not owners:
        return None, None
    owner = next((o for o in owners if o.get("controller")), owners[0])
    kind, name = owner.get("kind") or "", owner.get("name") or ""
    if not kind or not name or kind == "Node":
        return None, None
    if kind == "ReplicaSet":
        template_hash = labels.get("pod-template-hash")
        if template_hash and name.endswith("-" + template_hash) and len(name) > len(template_hash) + 1:
            return "deployment", name[: -len(template_hash) - 1]
    if kind == "Job" and (m := CRONJOB_RUN.match(name)):
        return "cronjob", m.group(1)
    return kind.lower(), name


@dataclass(frozen=True)
class Service:
    """A Service with a virtual IP (ClusterIP); headless and ExternalName ones are not kept."""

    uid: str
    name: str
    namespace: str
    cluster_ips: tuple[str, ...]

    @classmethod
    def from_api(cls, obj: dict[str, Any]) -> Service:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
        return cls(
            uid=meta.get("uid", ""),
            name=meta.get("name", ""),
            namespace=meta.get("namespace", ""),
            cluster_ips=tuple(ip for ip in ips if ip and ip != "None"),  # "None": headless
        )


@dataclass
class KubeStats:
    """Counters of the metadata cache (read by the agent's stats; written under the lock)."""

    pods: int = 0  # pods held now
    services: int = 0  # services held now
    relists: int = 0  # lists after the first of each kind (410 Gone, reconnects)
    watch_restarts: int = 0  # watches reopened after the server ended them
    errors: int = 0  # failed requests and broken watches
    refused: int = 0  # objects not kept for the caps (max_pods, max_services)
    events: int = 0  # watch events applied (ADDED, MODIFIED, DELETED)

    def describe(self) -> str:
        return (f"{self.pods} pods, {self.services} services, {self.events} events, {self.relists} relists, "
                f"{self.watch_restarts} watch restarts, {self.errors} errors, {self.refused} refused")  # fmt: skip


class _Store:
    """Objects by UID, at most `cap` of them, with one index from keys to objects.

    Not thread-safe: the caller holds KubeMetadata's lock."""

    def __init__(self, cap: int, index_keys: Callable[[Any], Iterable[tuple[str, str]]]):
        self.cap = cap
        self.objects: dict[str, Any] = {}
        self.index: dict[tuple[str, str], Any] = {}
        self._index_keys = index_keys

    def put(self, uid: str, obj: Any) -> bool:
        """Add or replace; False when it is new and there is no room."""
        old = self.objects.get(uid)
        if old is None and len(self.objects) >= self.cap:
            return False
        if old is not None:
            self._unindex(old)
        self.objects[uid] = obj
        for key in self._index_keys(obj):
            self.index[key] = obj
        return True

    def remove(self, uid: str) -> None:
        old = self.objects.pop(uid, None)
        if old is not None:
            self._unindex(old)

    def replace_all(self, items: Iterable[tuple[str, Any]]) -> int:
        """Hold exactly these (a fresh list); returns how many did not fit."""
        self.objects, self.index = {}, {}
        return sum(not self.put(uid, obj) for uid, obj in items)

    def _unindex(self, old: Any) -> None:
        for key in self._index_keys(old):
            # Only if the key is still this object's: an IP may have passed to a newer pod.
            if self.index.get(key) is old:
                del self.index[key]


def _pod_keys(pod: Pod) -> Iterable[tuple[str, str]]:
    for container_id in pod.containers:
        yield "container", container_id
    # A host-network pod's IPs are the node's, shared by every such pod and by the node itself:
    # they name none of them. A finished pod's IP may already be another pod's, and so may a
    # terminating one's (a late event of it must not take the IP back from the new pod).
    if not pod.host_network and pod.running and not pod.deleting:
        for ip in pod.ips:
            yield "ip", ip


def _service_keys(service: Service) -> Iterable[tuple[str, str]]:
    for ip in service.cluster_ips:
        yield "ip", ip


def _normalize_ip(ip: str) -> str:
    # A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d; the API gives a.b.c.d.
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip


@dataclass
class _Kind:
    """One kind of object followed by list + watch in its own thread."""

    name: str  # "pods", "services"
    list_func: Callable[..., Any]
    selector: dict[str, str]  # extra arguments of list and watch (field_selector)
    parse: Callable[[dict[str, Any]], Pod | Service]
    store: _Store
    synced: threading.Event = field(default_factory=threading.Event)
    # The client's Watch, kept so that stop() can shut its socket down.
    watch: kubernetes.watch.Watch = field(
        default_factory=lambda: kubernetes.watch.Watch(return_type="object")
    )
    thread: threading.Thread | None = None
    delay: float = 0.0  # the wait before the next attempt after a failure (back-off)
    fresh: bool = True  # the watch is the first after a list, and has had no event yet


class _Gone(Exception):
    """The resourceVersion we watch from is too old: list again."""

    def __init__(self, fresh: bool):
        super().__init__("410 Gone")
        self.fresh = fresh  # told to the first watch after a list, before any event


class KubeMetadata:
    """The pods of this node and the cluster's Services, kept current from the API server.

    `start()` returns at once; lookups answer from what has arrived so far (None before the
    first lists: `wait_synced` waits for them). Lookups are safe from any thread."""

    def __init__(self, api_client: kubernetes.client.ApiClient, node_name: str, max_pods: int = 5000,
                 max_services: int = 20000, *, watch_timeout: int = 300, backoff: tuple[float, float] = (1.0, 30.0),
                 request_timeout: tuple[float, float] = (10.0, 60.0)):  # fmt: skip
        """`watch_timeout`: seconds after which the server ends a watch (it is then reopened);
        `backoff`: first and longest wait after a failure; `request_timeout`: connect and read
        timeouts of a list (a watch's read timeout is its own timeout plus the read timeout,
        so a dead connection is noticed)."""
        if not node_name:
            raise KubeConfigError("the Kubernetes node's name is needed to select its pods")
        self.node_name = node_name
        self.stats = KubeStats()
        self._api = kubernetes.client.CoreV1Api(api_client)
        self._watch_timeout = watch_timeout
        self._backoff = backoff
        self._request_timeout = request_timeout
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._pods = _Kind("pods", self._api.list_pod_for_all_namespaces, {"field_selector": f"spec.nodeName={node_name}"},
                           Pod.from_api, _Store(max_pods, _pod_keys))  # fmt: skip
        self._services = _Kind("services", self._api.list_service_for_all_namespaces, {}, Service.from_api,
                               _Store(max_services, _service_keys))  # fmt: skip

    @classmethod
    def from_environment(cls, node_name: str | None, **kwargs: Any) -> KubeMetadata:
        """Connects as a pod's service account when in a pod, else with the kubeconfig
        (KUBECONFIG, else ~/.kube/config). The node's name, when not given, comes from
        K8S_NODE_NAME or NODE_NAME (a DaemonSet sets one from the downward API)."""
        node_name = node_name or next((os.environ[v] for v in NODE_NAME_VARIABLES if os.environ.get(v)), None)
        if not node_name:
            raise KubeConfigError(
                "the Kubernetes node's name is unknown: give it, or set K8S_NODE_NAME in the agent's pod "
                "from the downward API (env: - name: K8S_NODE_NAME, valueFrom: fieldRef: fieldPath: spec.nodeName)"
            )
        configuration = kubernetes.client.Configuration()
        if in_cluster():
            try:
                kubernetes.config.load_incluster_config(client_configuration=configuration)
            except kubernetes.config.ConfigException as e:
                raise KubeConfigError(
                    f"running in a Kubernetes pod, but its service account is unusable: {e}"
                ) from e
        else:
            path = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
            try:
                kubernetes.config.load_kube_config(config_file=path, client_configuration=configuration)
            except (kubernetes.config.ConfigException, OSError, ValueError) as e:
                raise KubeConfigError(
                    f"no Kubernetes configuration: not in a pod (no service-account token at {TOKEN_PATH} "
                    f"or KUBERNETES_SERVICE_HOST unset) and no usable kubeconfig at {path} "
                    f"(KUBECONFIG, else ~/.kube/config): {e}"
                ) from e
        # urllib3 would retry a refused connection three times at once, warning each time; the
        # threads' back-off is the retrying.
        configuration.retries = 0
        return cls(kubernetes.client.ApiClient(configuration), node_name, **kwargs)

    # Lifecycle.

    def start(self) -> None:
        for kind in (self._pods, self._services):
            kind.thread = threading.Thread(target=self._run, args=(kind,), name=f"deeptrace-kube-{kind.name}",
                                           daemon=True)  # fmt: skip
            kind.thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the threads: a watch blocked on its socket is woken by shutting the socket down."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for kind in (self._pods, self._services):
            while kind.thread is not None and kind.thread.is_alive() and time.monotonic() < deadline:
                # Again and again: a watch being opened right now has no socket to shut down yet.
                kind.watch.stop()
                kind.thread.join(0.05)

    def wait_synced(self, timeout: float) -> bool:
        """Whether the first lists of pods and of services are in (waiting up to `timeout` s)."""
        deadline = time.monotonic() + timeout
        return all(
            kind.synced.wait(max(0.0, deadline - time.monotonic())) for kind in (self._pods, self._services)
        )

    # Lookups.

    def pod_by_container(self, container_id: str) -> Pod | None:
        with self._lock:
            return self._pods.store.index.get(("container", container_id_of(container_id)))

    def pod_by_uid(self, uid: str) -> Pod | None:
        # The kubelet's cgroup names spell the UID with underscores under the systemd driver.
        with self._lock:
            return self._pods.store.objects.get(uid.replace("_", "-"))

    def peer_name(self, ip: str) -> str | None:
        """A name for the other end of a connection, from its IP.

        A pod of this node: its service_name() (a bare pod: its name). A Service's ClusterIP (what a client in the pod
        connects to; kube-proxy translates it below the socket): the Service's name alone, not
        `<service>.<namespace>`, so that it reads like the service.name that the called pods'
        own spans carry (usually the same word). Host-network pods are never named by IP (theirs
        is the node's), nor are pods of other nodes (not followed here): None."""
        ip = _normalize_ip(ip)
        with self._lock:
            pod = self._pods.store.index.get(("ip", ip))
            service = self._services.store.index.get(("ip", ip)) if pod is None else None
        if pod is not None:
            return pod.service_name() or pod.name  # a bare pod's process is not known from here
        return service.name if service is not None else None

    def service_by_ip(self, ip: str) -> Service | None:
        """The Service whose ClusterIP this is (its namespace too, which peer_name leaves out)."""
        with self._lock:
            return self._services.store.index.get(("ip", _normalize_ip(ip)))

    # The threads.

    def _run(self, kind: _Kind) -> None:
        first, consistent = True, False
        kind.delay = self._backoff[0]
        while not self._stopping.is_set():
            try:
                version = self._list(kind, consistent=consistent, first=first)
                first, consistent = False, False
                while not self._stopping.is_set():
                    version = self._watch(kind, version)
                    if self._stopping.is_set():
                        return
                    kind.delay = self._backoff[0]  # a watch that lasted its time: the server is well
                    kind.fresh = False
                    with self._lock:
                        self.stats.watch_restarts += 1
            except _Gone as gone:
                # List again at once, as the API's documentation asks; the next list is a
                # consistent read, as the cache that "0" reads may be as old as what expired.
                consistent = True
                log.info("kubernetes %s: watch expired (410 Gone), listing again", kind.name)
                # A server that answers 410 to the watch opened right from a fresh list would
                # make this spin: back off then.
                if gone.fresh and self._pause(kind):
                    return
            except Exception as e:  # noqa: BLE001 - whatever failed, the thread must outlive it
                if self._stopping.is_set():
                    return
                with self._lock:
                    self.stats.errors += 1
                log.warning("kubernetes %s: %s; retrying in %.1f s", kind.name, _describe(e), kind.delay)
                consistent = False
                if self._pause(kind):
                    return

    def _pause(self, kind: _Kind) -> bool:
        """Waits the kind's back-off delay and doubles it; True when stopped meanwhile."""
        stopped = self._stopping.wait(kind.delay)
        kind.delay = min(kind.delay * 2, self._backoff[1])
        return stopped

    def _list(self, kind: _Kind, consistent: bool, first: bool) -> str:
        """Lists every object of the kind and holds exactly those; returns the list's version."""
        # resourceVersion "0" lets the API server answer from its cache instead of a quorum read
        # of etcd: cheap when every node's agent lists at once (client-go does the same). After
        # a 410 the cache may be as old as what expired, so then "" (the latest).
        response = kind.list_func(**kind.selector, resource_version="" if consistent else "0",
                                  _preload_content=False, _request_timeout=self._request_timeout)  # fmt: skip
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        items = []
        for obj in body.get("items") or ():
            parsed = kind.parse(obj)
            if parsed.uid and (not isinstance(parsed, Service) or parsed.cluster_ips):
                items.append((parsed.uid, parsed))
        with self._lock:
            self.stats.refused += kind.store.replace_all(items)
            self._count()
            if not first:
                self.stats.relists += 1
        kind.synced.set()
        kind.fresh = True
        return (body.get("metadata") or {}).get("resourceVersion") or "0"

    def _watch(self, kind: _Kind, version: str) -> str:
        """Applies the watch's events until the server ends it; returns the last version seen."""
        connect, read = self._request_timeout
        try:
            events = kind.watch.stream(kind.list_func, **kind.selector, resource_version=version,
                                       timeout_seconds=self._watch_timeout, allow_watch_bookmarks=True,
                                       _request_timeout=(connect, self._watch_timeout + read))  # fmt: skip
            for event in events:
                if self._stopping.is_set():
                    break
                obj = event.get("raw_object") or {}
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                kind.fresh = False
                kind.delay = self._backoff[0]  # events flow: the next failure starts the back-off anew
                if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    self._apply(kind, event["type"], obj)
        except ApiException as e:
            # The client raises the ERROR event of an expired watch, and a 410 answer to the
            # request itself, both as this.
            if e.status == 410:
                raise _Gone(kind.fresh) from e
            raise
        return version

    def _apply(self, kind: _Kind, kind_of_event: str, obj: dict[str, Any]) -> None:
        parsed = kind.parse(obj)
        if not parsed.uid:
            return
        with self._lock:
            self.stats.events += 1
            # A Service that lost its ClusterIP (changed to ExternalName) is no longer kept.
            if kind_of_event == "DELETED" or (isinstance(parsed, Service) and not parsed.cluster_ips):
                kind.store.remove(parsed.uid)
            elif not kind.store.put(parsed.uid, parsed):
                self.stats.refused += 1
            self._count()

    def _count(self) -> None:
        self.stats.pods = len(self._pods.store.objects)
        self.stats.services = len(self._services.store.objects)


def _describe(error: Exception) -> str:
    if isinstance(error, ApiException):
        return f"API server answered {error.status} {error.reason or ''}".strip()
    if isinstance(error, urllib3.exceptions.MaxRetryError) and error.reason is not None:
        error = error.reason  # what failed (connection refused, timed out), without the URL again
    # One line, cut short: some errors nest their causes at length.
    return re.sub(r"\s+", " ", f"{type(error).__name__}: {error}")[:300]
