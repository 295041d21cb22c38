"""Kubernetes metadata (agent/kube.py): the real kubernetes client against a fake API server
(tests/kubefake.py) serving pods and services shaped like `kubectl get -o json` output."""

from __future__ import annotations

import copy
import json
import time
import urllib.request
from collections.abc import Callable, Iterator

import kubernetes.client
import pytest
from kubefake import FakeKubeAPI, fixture

from deeptrace.agent import kube
from deeptrace.agent.kube import KubeConfigError, KubeMetadata, Pod

NODE = "node-a"
WAIT = 10.0  # generous: the machine may be busy; every wait ends as soon as its condition holds


def wait_until(condition: Callable[[], object], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def pods_by_name() -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in fixture("pods")}


def parsed(name: str) -> Pod:
    return Pod.from_api(pods_by_name()[name])


def cid(value: str) -> str:
    return value.split("://")[1]


def container_ids(obj: dict) -> dict[str, str]:
    status = obj["status"]
    entries = status["containerStatuses"] + status.get("initContainerStatuses", [])
    return {e["name"]: e["containerID"] for e in entries}


def new_pod(name: str, ip: str, seed: str) -> dict:
    """Another replica of the checkout Deployment."""
    obj = copy.deepcopy(pods_by_name()["checkout-7d4b9c8f6d-x2k9p"])
    obj["metadata"].update(name=name, uid=f"0f0f0f0f-0000-4000-8000-{seed:0>12}")
    obj["status"].update(podIP=ip, podIPs=[{"ip": ip}])
    obj["status"].pop("initContainerStatuses")
    obj["status"]["containerStatuses"] = obj["status"]["containerStatuses"][:1]
    obj["status"]["containerStatuses"][0]["containerID"] = "containerd://" + seed * (64 // len(seed))
    return obj


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI(fixture("pods"), fixture("services")).up()
    yield api
    api.down()


@pytest.fixture
def start(fake: FakeKubeAPI) -> Iterator[Callable[..., KubeMetadata]]:
    """Starts a KubeMetadata on the fake (short back-off), stopped at the end of the test."""
    started = []

    def make(**kwargs) -> KubeMetadata:
        configuration = kubernetes.client.Configuration()
        configuration.host = fake.url
        options = {"watch_timeout": 60, "backoff": (0.05, 0.2), "request_timeout": (2.0, 5.0)} | kwargs
        metadata = KubeMetadata(kubernetes.client.ApiClient(configuration), NODE, **options)
        metadata.start()
        started.append(metadata)
        assert metadata.wait_synced(WAIT)
        return metadata

    yield make
    for metadata in started:
        metadata.stop()
        assert not metadata._pods.thread.is_alive() and not metadata._services.thread.is_alive()


# The pods and their attributes, from the fixtures alone.


def test_the_fixtures_are_valid_objects_of_the_official_api_schema():
    client = kubernetes.client.ApiClient()
    for name, list_type in (("pods", "V1PodList"), ("services", "V1ServiceList")):
        body = json.dumps({"kind": "List", "apiVersion": "v1", "metadata": {}, "items": fixture(name)})
        assert len(client.deserialize(body, list_type, "application/json").items) == len(fixture(name))


def test_the_workload_comes_from_the_owner_references():
    got = {name: (pod.workload_kind, pod.workload_name) for name, pod in
           ((name, Pod.from_api(obj)) for name, obj in pods_by_name().items())}  # fmt: skip
    assert got == {
        # ReplicaSet checkout-7d4b9c8f6d + label pod-template-hash=7d4b9c8f6d: its Deployment.
        "checkout-7d4b9c8f6d-x2k9p": ("deployment", "checkout"),
        "web-5c7f9b8d4-q8zlm": ("deployment", "web"),
        "cart-5d8f7c6b9-zt4wq": ("deployment", "cart"),
        "orders-db-0": ("statefulset", "orders-db"),
        "kube-proxy-7xk2m": ("daemonset", "kube-proxy"),
        "report-28417680-4x7vn": ("cronjob", "report"),  # a CronJob's run: <cronjob>-<scheduled minute>
        "legacy-worker-9kq2d": ("replicaset", "legacy-worker"),  # no pod-template-hash: no Deployment
        "debug-shell": (None, None),  # no owner
        "etcd-node-a": (None, None),  # a static pod's mirror, owned by its Node
    }


def test_a_replicaset_is_a_deployments_only_when_its_name_ends_with_the_pods_template_hash():
    obj = pods_by_name()["checkout-7d4b9c8f6d-x2k9p"]
    obj["metadata"]["labels"]["pod-template-hash"] = "5f6b7c8d9"  # not the ReplicaSet's suffix
    assert (Pod.from_api(obj).workload_kind, Pod.from_api(obj).workload_name) == (
        "replicaset",
        "checkout-7d4b9c8f6d",
    )
    obj["metadata"]["labels"]["pod-template-hash"] = "checkout-7d4b9c8f6d"  # the whole name: nothing left
    assert Pod.from_api(obj).workload_kind == "replicaset"
    # Several owners: the controller one counts.
    obj = pods_by_name()["orders-db-0"]
    obj["metadata"]["ownerReferences"].insert(
        0, {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u"}
    )
    assert Pod.from_api(obj).workload_name == "orders-db"


def test_the_pods_fields_and_its_containers_of_every_runtime():
    pod = parsed("checkout-7d4b9c8f6d-x2k9p")
    ids = container_ids(pods_by_name()["checkout-7d4b9c8f6d-x2k9p"])
    assert (pod.name, pod.namespace, pod.node, pod.qos_class, pod.ips, pod.host_network, pod.phase) == (
        "checkout-7d4b9c8f6d-x2k9p",
        "shop",
        NODE,
        "Burstable",
        ("10.244.1.17",),
        False,
        "Running",
    )
    assert pod.uid == pods_by_name()["checkout-7d4b9c8f6d-x2k9p"]["metadata"]["uid"]
    assert pod.labels["app"] == "checkout"
    # Init containers too; the runtime's prefix stripped, 64 hex digits left, as in the cgroup path.
    assert pod.containers == {cid(ids["checkout"]): "checkout", cid(ids["log-shipper"]): "log-shipper",
                              cid(ids["migrate"]): "migrate"}  # fmt: skip
    assert all(len(c) == 64 and int(c, 16) >= 0 for c in pod.containers)
    crio = parsed("orders-db-0")
    assert list(crio.containers.values()) == ["postgresql"] and crio.qos_class == "Guaranteed"
    assert pods_by_name()["orders-db-0"]["status"]["containerStatuses"][0]["containerID"].startswith(
        "cri-o://"
    )
    docker = parsed("report-28417680-4x7vn")
    assert pods_by_name()["report-28417680-4x7vn"]["status"]["containerStatuses"][0][
        "containerID"
    ].startswith("docker://")
    assert list(docker.containers.values()) == ["report"] and docker.phase == "Succeeded"
    assert sorted(parsed("debug-shell").containers.values()) == ["debug-shell", "debugger-8fxq2"]  # ephemeral
    assert parsed("kube-proxy-7xk2m").host_network
    etcd = parsed("etcd-node-a")
    assert etcd.annotations["kubernetes.io/config.source"] == "file"
    obj = pods_by_name()["debug-shell"]
    manifest = json.dumps(obj, indent=4)  # what `kubectl apply` keeps in the pod: not held (bounded memory)
    obj["metadata"]["annotations"] = {
        "kubectl.kubernetes.io/last-applied-configuration": manifest,
        "team": "ops",
    }
    assert len(manifest) > kube.MAX_ANNOTATION_BYTES and Pod.from_api(obj).annotations == {"team": "ops"}


def test_a_container_not_started_yet_has_no_id():
    obj = pods_by_name()["web-5c7f9b8d4-q8zlm"]
    status = obj["status"]["containerStatuses"][0]
    del status["containerID"]
    status["state"] = {"waiting": {"reason": "ContainerCreating"}}
    obj["status"].pop("podIPs")
    obj["status"]["podIP"] = "10.244.1.99"  # a server before dual-stack: podIP only
    pod = Pod.from_api(obj)
    assert pod.containers == {} and pod.ips == ("10.244.1.99",)


def test_attributes_have_opentelemetrys_names():
    obj = pods_by_name()["checkout-7d4b9c8f6d-x2k9p"]
    pod = Pod.from_api(obj)
    main = container_ids(obj)["checkout"]
    assert pod.attributes(main) == {
        "k8s.namespace.name": "shop",
        "k8s.pod.name": "checkout-7d4b9c8f6d-x2k9p",
        "k8s.pod.uid": obj["metadata"]["uid"],
        "k8s.node.name": NODE,
        "k8s.deployment.name": "checkout",
        "k8s.workload.kind": "deployment",
        "k8s.workload.name": "checkout",
        "k8s.container.name": "checkout",
    }
    assert pod.attributes(cid(main))["k8s.container.name"] == "checkout"  # with or without the runtime
    assert pod.attributes(cid(main).upper())["k8s.container.name"] == "checkout"
    assert "k8s.container.name" not in pod.attributes("f" * 64)  # another pod's container
    assert "k8s.container.name" not in pod.attributes(None)

    def workload_keys(name: str) -> dict[str, str]:
        return {k: v for k, v in parsed(name).attributes(None).items()
                if k not in ("k8s.namespace.name", "k8s.pod.name", "k8s.pod.uid", "k8s.node.name")}  # fmt: skip

    assert workload_keys("orders-db-0") == {"k8s.statefulset.name": "orders-db", "k8s.workload.kind": "statefulset",
                                            "k8s.workload.name": "orders-db"}  # fmt: skip
    assert workload_keys("kube-proxy-7xk2m") == {"k8s.daemonset.name": "kube-proxy", "k8s.workload.kind": "daemonset",
                                                 "k8s.workload.name": "kube-proxy"}  # fmt: skip
    assert workload_keys("report-28417680-4x7vn") == {"k8s.cronjob.name": "report", "k8s.job.name": "report-28417680",
                                                      "k8s.workload.kind": "cronjob", "k8s.workload.name": "report"}  # fmt: skip
    # A Job named by hand stays a Job.
    obj = pods_by_name()["report-28417680-4x7vn"]
    obj["metadata"]["ownerReferences"][0]["name"] = "migrate-2"
    assert Pod.from_api(obj).attributes()["k8s.workload.name"] == "migrate-2"
    assert "k8s.cronjob.name" not in Pod.from_api(obj).attributes()
    assert workload_keys("legacy-worker-9kq2d") == {"k8s.replicaset.name": "legacy-worker",
                                                    "k8s.workload.kind": "replicaset",
                                                    "k8s.workload.name": "legacy-worker"}  # fmt: skip
    assert workload_keys("debug-shell") == {}
    # An operator's own kind: DeepTrace's keys only (OpenTelemetry has no name for it).
    obj = pods_by_name()["orders-db-0"]
    obj["metadata"]["ownerReferences"][0].update(kind="Cluster", name="pg-main")
    assert {
        k: v for k, v in Pod.from_api(obj).attributes().items() if "workload" in k or "statefulset" in k
    } == {"k8s.workload.kind": "cluster", "k8s.workload.name": "pg-main"}


def test_service_name_follows_opentelemetrys_order():
    # The workload's name; a bare pod has none (the process's own rule names it).
    assert parsed("checkout-7d4b9c8f6d-x2k9p").service_name() == "checkout"
    assert parsed("kube-proxy-7xk2m").service_name() == "kube-proxy"
    assert parsed("report-28417680-4x7vn").service_name() == "report"  # every run of the CronJob
    assert parsed("debug-shell").service_name() is None
    # app.kubernetes.io/name before the workload; app.kubernetes.io/instance (a Helm release,
    # shared by a chart's components) is not used.
    assert parsed("web-5c7f9b8d4-q8zlm").service_name() == "storefront"
    assert parsed("orders-db-0").labels["app.kubernetes.io/instance"] == "orders-db"
    assert parsed("orders-db-0").service_name() == "postgresql"
    # The annotation first of all.
    obj = pods_by_name()["orders-db-0"]
    obj["metadata"]["annotations"] = {"resource.opentelemetry.io/service.name": "orders-store"}
    assert Pod.from_api(obj).service_name() == "orders-store"


# Against the fake API server.


def test_the_fake_honours_the_node_field_selector(fake):
    with urllib.request.urlopen(f"{fake.url}/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-b") as r:
        body = json.load(r)
    assert [p["metadata"]["name"] for p in body["items"]] == ["cart-5d8f7c6b9-zt4wq"]
    assert body["kind"] == "PodList" and int(body["metadata"]["resourceVersion"]) > 0
    with urllib.request.urlopen(f"{fake.url}/api/v1/pods") as r:
        assert len(json.load(r)["items"]) == len(fixture("pods"))


def test_the_first_lists_hold_this_nodes_pods_and_the_clusters_services(fake, start):
    metadata = start()
    names = pods_by_name()
    assert metadata.pod_by_uid(names["cart-5d8f7c6b9-zt4wq"]["metadata"]["uid"]) is None  # node-b's
    assert metadata.stats.pods == len(names) - 1
    assert metadata.stats.services == 5  # headless and ExternalName ones have no IP to name
    (pods_list,) = fake.lists("pods")
    assert pods_list["fieldSelector"] == f"spec.nodeName={NODE}" and pods_list["resourceVersion"] == "0"
    assert "fieldSelector" not in fake.lists("services")[0]
    # Then a watch of each from the list's version.
    wait_until(lambda: fake.open_watches("pods") and fake.open_watches("services"))
    watch = fake.watches("pods")[0]
    assert watch["fieldSelector"] == f"spec.nodeName={NODE}" and int(watch["resourceVersion"]) == fake.version
    assert watch["allowWatchBookmarks"] == "true" and watch["timeoutSeconds"] == "60"
    assert (metadata.stats.relists, metadata.stats.errors, metadata.stats.refused) == (0, 0, 0)


def test_lookups_by_container_id_and_by_uid(fake, start):
    metadata = start()
    obj = pods_by_name()["checkout-7d4b9c8f6d-x2k9p"]
    ids = container_ids(obj)
    assert metadata.pod_by_container(ids["checkout"]).name == "checkout-7d4b9c8f6d-x2k9p"
    assert metadata.pod_by_container(cid(ids["migrate"])).name == "checkout-7d4b9c8f6d-x2k9p"
    uid = obj["metadata"]["uid"]
    assert metadata.pod_by_uid(uid).name == "checkout-7d4b9c8f6d-x2k9p"
    assert (
        metadata.pod_by_uid(uid.replace("-", "_")).name == "checkout-7d4b9c8f6d-x2k9p"
    )  # a systemd cgroup's
    assert metadata.pod_by_container("0" * 64) is None and metadata.pod_by_uid("nope") is None


def test_added_modified_and_deleted_pods_after_the_start(fake, start):
    metadata = start()
    wait_until(lambda: fake.open_watches("pods"))
    # ADDED
    replica = new_pod("checkout-7d4b9c8f6d-m4p7r", "10.244.1.18", "a1")
    fake.apply("pods", replica)
    wait_until(lambda: metadata.pod_by_uid(replica["metadata"]["uid"]))
    assert metadata.pod_by_container("a1" * 32).name == "checkout-7d4b9c8f6d-m4p7r"
    assert metadata.peer_name("10.244.1.18") == "checkout"
    # MODIFIED: the container restarts, with a new id.
    restarted = copy.deepcopy(replica)
    restarted["status"]["containerStatuses"][0].update(
        containerID="containerd://" + "b2" * 32, restartCount=1
    )
    fake.apply("pods", restarted)
    wait_until(lambda: metadata.pod_by_container("b2" * 32))
    assert metadata.pod_by_container("a1" * 32) is None
    assert metadata.pod_by_uid(replica["metadata"]["uid"]).containers == {"b2" * 32: "checkout"}
    # DELETED: gone by every key.
    fake.delete("pods", replica["metadata"]["uid"])
    wait_until(lambda: metadata.pod_by_uid(replica["metadata"]["uid"]) is None)
    assert metadata.pod_by_container("b2" * 32) is None and metadata.peer_name("10.244.1.18") is None
    # Another node's pod is not sent.
    other = new_pod("elsewhere", "10.244.2.50", "c3")
    other["spec"]["nodeName"] = "node-b"
    fake.apply("pods", other)
    marker = new_pod("marker", "10.244.1.19", "d4")
    fake.apply("pods", marker)
    wait_until(lambda: metadata.pod_by_uid(marker["metadata"]["uid"]))
    assert metadata.pod_by_uid(other["metadata"]["uid"]) is None
    assert metadata.stats.events == 4 and metadata.stats.relists == 0


def test_a_watch_the_server_ends_is_reopened_from_the_last_version_without_losing_events(fake, start):
    metadata = start()
    wait_until(lambda: fake.open_watches("pods"))
    first = new_pod("checkout-7d4b9c8f6d-aaaaa", "10.244.1.70", "e5")
    fake.apply("pods", first)
    wait_until(lambda: metadata.pod_by_uid(first["metadata"]["uid"]))
    seen = fake.version
    # The watch ends (as at its timeout); changes happen before the next one is open.
    fake.hold_watches = True
    fake.close_watches()
    wait_until(lambda: metadata.stats.watch_restarts >= 1)
    second = new_pod("checkout-7d4b9c8f6d-bbbbb", "10.244.1.71", "f6")
    fake.apply("pods", second)
    fake.delete("pods", first["metadata"]["uid"])
    fake.release_watches()
    wait_until(lambda: metadata.pod_by_uid(second["metadata"]["uid"]))
    wait_until(lambda: metadata.pod_by_uid(first["metadata"]["uid"]) is None)
    assert int(fake.watches("pods")[-1]["resourceVersion"]) == seen  # from where it was, not a new list
    assert metadata.stats.relists == 0 and len(fake.lists("pods")) == 1 and metadata.stats.errors == 0


def test_a_watch_timing_out_is_reopened_from_the_bookmark(fake, start):
    metadata = start(watch_timeout=1)
    listed = fake.version
    # A pod changes: the version moves on, but no service event carries it to the services' watch.
    fake.apply("pods", new_pod("checkout-7d4b9c8f6d-fffff", "10.244.1.75", "f1"))
    wait_until(lambda: len(fake.watches("services")) >= 2)
    assert fake.watches("services")[0]["resourceVersion"] == str(listed)
    # The bookmark sent as the watch timed out carried it: the next watch starts there.
    assert fake.watches("services")[1]["resourceVersion"] == str(listed + 1) == str(fake.version)
    assert metadata.stats.watch_restarts >= 1 and metadata.stats.relists == 0


@pytest.mark.parametrize("gone_as", ["event", "status"])
def test_410_gone_lists_again_and_drops_what_was_deleted_meanwhile(fake, start, gone_as):
    metadata = start()
    wait_until(lambda: fake.open_watches("pods"))
    doomed = pods_by_name()["web-5c7f9b8d4-q8zlm"]
    born = new_pod("checkout-7d4b9c8f6d-ccccc", "10.244.1.72", "a7")
    # The watch ends; while none is open the pod is deleted and the history compacted, so the
    # DELETED event is never sent: the watch from the old version gets 410 Gone.
    fake.gone_as = gone_as
    fake.hold_watches = True
    fake.close_watches()
    wait_until(lambda: metadata.stats.watch_restarts >= 1)
    fake.delete("pods", doomed["metadata"]["uid"])
    fake.apply("pods", born)
    fake.compact()
    fake.release_watches()
    wait_until(lambda: metadata.stats.relists == 2)  # the services' history is compacted as well
    assert metadata.pod_by_uid(doomed["metadata"]["uid"]) is None
    assert metadata.peer_name("10.244.1.52") is None  # its IP too
    assert metadata.pod_by_uid(born["metadata"]["uid"]) is not None
    # The list after a 410 is a consistent read (resourceVersion ""), not from the cache ("0").
    assert [q["resourceVersion"] for q in fake.lists("pods")] == ["0", ""]
    assert [q["resourceVersion"] for q in fake.lists("services")] == ["0", ""]
    assert metadata.stats.errors == 0
    # And the watch goes on from the new list.
    wait_until(lambda: fake.open_watches("pods"))
    fake.delete("pods", born["metadata"]["uid"])
    wait_until(lambda: metadata.pod_by_uid(born["metadata"]["uid"]) is None)


def test_an_open_watch_told_410_by_an_error_event_lists_again(fake, start):
    metadata = start()
    wait_until(lambda: fake.open_watches("pods") and fake.open_watches("services"))
    fake.expire_watches()
    wait_until(lambda: metadata.stats.relists == 2)  # pods and services
    assert len(fake.lists("pods")) == 2 and len(fake.lists("services")) == 2
    assert metadata.stats.pods == len(fixture("pods")) - 1


def test_a_server_answering_410_to_every_fresh_watch_is_not_hammered(fake, start):
    fake.compacted = 10**9  # every watch is "too old", even one opened right from a list
    metadata = start()
    wait_until(lambda: metadata.stats.relists >= 6)  # pods' and services' together
    # Each 410 to the first watch after a list doubles the wait before the next list.
    assert metadata._pods.delay == metadata._services.delay == 0.2
    assert metadata.stats.errors == 0


def test_the_server_down_then_up_is_recovered_from(fake, start):
    metadata = start()
    wait_until(lambda: fake.open_watches("pods"))
    doomed = pods_by_name()["debug-shell"]["metadata"]["uid"]
    fake.down()
    # Each thread's watch breaks, then its next list finds no server (connection refused).
    wait_until(lambda: metadata.stats.errors >= 4)
    # Changes while the agent cannot see them; the new list shows them.
    fake.delete("pods", doomed)
    born = new_pod("checkout-7d4b9c8f6d-ddddd", "10.244.1.73", "b8")
    fake.apply("pods", born)
    fake.apply("services", {"metadata": {"name": "cart", "namespace": "shop", "uid": "5e5e5e5e-0000-4000-8000-000000000001"},
                            "spec": {"clusterIP": "10.96.33.9", "clusterIPs": ["10.96.33.9"], "type": "ClusterIP"}})  # fmt: skip
    fake.up()
    wait_until(lambda: metadata.pod_by_uid(born["metadata"]["uid"]))
    wait_until(lambda: metadata.peer_name("10.96.33.9") == "cart")
    assert metadata.pod_by_uid(doomed) is None
    assert metadata.stats.relists >= 2
    # After a failure the list may come from the cache again.
    assert fake.lists("pods")[-1]["resourceVersion"] == "0"


def test_what_is_held_is_bounded_and_what_is_refused_counted(fake, start):
    metadata = start(max_pods=3, max_services=2)
    assert (metadata.stats.pods, metadata.stats.services) == (3, 2)
    assert metadata.stats.refused == (len(fixture("pods")) - 1 - 3) + (5 - 2)
    wait_until(lambda: fake.open_watches("pods"))
    refused = metadata.stats.refused
    extra = new_pod("checkout-7d4b9c8f6d-eeeee", "10.244.1.74", "c9")
    fake.apply("pods", extra)
    wait_until(lambda: metadata.stats.refused == refused + 1)
    assert metadata.pod_by_uid(extra["metadata"]["uid"]) is None and metadata.stats.pods == 3
    # Room frees: the next change of the refused pod is taken in.
    held = next(iter(metadata._pods.store.objects))
    fake.delete("pods", held)
    fake.apply("pods", extra)
    wait_until(lambda: metadata.pod_by_uid(extra["metadata"]["uid"]))
    assert metadata.stats.pods == 3


def test_peer_names_from_pod_ips_and_service_cluster_ips(fake, start):
    metadata = start()
    assert metadata.peer_name("10.244.1.17") == "checkout"  # a pod of this node: its service_name()
    assert metadata.peer_name("10.244.1.23") == "postgresql"
    assert metadata.peer_name("10.244.1.52") == "storefront"
    assert metadata.peer_name("10.96.120.15") == "checkout"  # ClusterIPs: the Service's name
    assert metadata.peer_name("10.96.0.10") == "kube-dns"
    assert metadata.peer_name("10.96.201.44") == "orders-db"
    assert metadata.peer_name("fd00:10:96::4d03") == "storefront"  # dual stack
    assert metadata.peer_name("::ffff:10.96.0.1") == "kubernetes"  # from a dual-stack socket
    assert metadata.service_by_ip("10.96.120.15").namespace == "shop"
    assert metadata.peer_name("10.244.2.14") is None  # another node's pod
    assert metadata.peer_name("10.244.1.31") is None  # a finished Job's: its IP may be reused
    assert metadata.peer_name("203.0.113.9") is None
    # Services added, changed to ExternalName, deleted.
    wait_until(lambda: fake.open_watches("services"))
    service = {"metadata": {"name": "cart", "namespace": "shop", "uid": "5e5e5e5e-0000-4000-8000-000000000002"},
               "spec": {"clusterIP": "10.96.33.10", "clusterIPs": ["10.96.33.10"], "type": "ClusterIP"}}  # fmt: skip
    fake.apply("services", service)
    wait_until(lambda: metadata.peer_name("10.96.33.10") == "cart")
    fake.apply(
        "services",
        {"metadata": service["metadata"], "spec": {"type": "ExternalName", "externalName": "x.example"}},
    )
    wait_until(lambda: metadata.peer_name("10.96.33.10") is None)
    fake.apply("services", service)
    wait_until(lambda: metadata.peer_name("10.96.33.10") == "cart")
    fake.delete("services", service["metadata"]["uid"])
    wait_until(lambda: metadata.peer_name("10.96.33.10") is None)


def test_host_network_pods_are_never_named_by_their_ip(fake, start):
    metadata = start()
    host_ip = pods_by_name()["kube-proxy-7xk2m"]["status"]["podIP"]
    assert host_ip == pods_by_name()["etcd-node-a"]["status"]["podIP"] == "192.168.10.11"
    assert metadata.peer_name(host_ip) is None
    assert metadata.pod_by_container(
        container_ids(pods_by_name()["kube-proxy-7xk2m"])["kube-proxy"]
    ).host_network
    # Not even when a host-network pod arrives by a watch event.
    wait_until(lambda: fake.open_watches("pods"))
    pod = new_pod("node-exporter-abcde", "192.168.10.11", "d1")
    pod["spec"]["hostNetwork"] = True
    fake.apply("pods", pod)
    wait_until(lambda: metadata.pod_by_uid(pod["metadata"]["uid"]))
    assert metadata.peer_name("192.168.10.11") is None


def test_an_ip_passed_to_a_new_pod_stays_named_when_the_old_pod_goes(fake, start):
    metadata = start()
    wait_until(lambda: fake.open_watches("pods"))
    old = pods_by_name()["checkout-7d4b9c8f6d-x2k9p"]
    new = new_pod("web-5c7f9b8d4-zzzzz", "10.244.1.17", "e2")
    new["metadata"]["labels"] = {"app.kubernetes.io/name": "storefront", "pod-template-hash": "5c7f9b8d4"}
    fake.apply("pods", new)
    wait_until(lambda: metadata.peer_name("10.244.1.17") == "storefront")
    fake.delete("pods", old["metadata"]["uid"])
    wait_until(lambda: metadata.pod_by_uid(old["metadata"]["uid"]) is None)
    assert metadata.peer_name("10.244.1.17") == "storefront"


def test_start_does_not_block_and_stop_is_prompt(fake):
    fake.hold_watches = True  # the watches stay pending: the threads are blocked in a request
    configuration = kubernetes.client.Configuration()
    configuration.host = fake.url
    metadata = KubeMetadata(kubernetes.client.ApiClient(configuration), NODE, watch_timeout=600)
    began = time.monotonic()
    metadata.start()
    assert time.monotonic() - began < 1.0
    assert metadata.wait_synced(WAIT)
    fake.release_watches()
    wait_until(lambda: fake.open_watches("pods") and fake.open_watches("services"))
    began = time.monotonic()
    metadata.stop()
    assert time.monotonic() - began < 3.0  # not the watch's 600 s
    assert not metadata._pods.thread.is_alive() and not metadata._services.thread.is_alive()


def test_wait_synced_is_false_while_the_server_is_unreachable(fake):
    fake.down()
    configuration = kubernetes.client.Configuration()
    configuration.host = fake.url
    metadata = KubeMetadata(kubernetes.client.ApiClient(configuration), NODE, backoff=(0.05, 0.1))
    metadata.start()
    try:
        assert not metadata.wait_synced(0.3)
        assert metadata.peer_name("10.96.0.1") is None and metadata.pod_by_uid("x") is None
        wait_until(lambda: metadata.stats.errors >= 2)
        fake.up()
        assert metadata.wait_synced(WAIT)
    finally:
        metadata.stop()


# Configuration.


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    """An environment with neither a service account nor a kubeconfig."""
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "K8S_NODE_NAME", "NODE_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kube, "TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_from_environment_without_any_configuration_says_so(no_cluster):
    with pytest.raises(KubeConfigError) as error:
        KubeMetadata.from_environment("node-a")
    message = str(error.value)
    assert "no Kubernetes configuration" in message and "not in a pod" in message
    assert str(no_cluster / "no-kubeconfig") in message and "KUBECONFIG" in message


def test_from_environment_without_the_node_name_says_how_to_give_it(no_cluster):
    with pytest.raises(KubeConfigError, match="node's name is unknown.*K8S_NODE_NAME.*spec.nodeName"):
        KubeMetadata.from_environment(None)


def test_from_environment_in_a_pod_whose_service_account_is_unusable(no_cluster, monkeypatch):
    token = no_cluster / "token"
    token.write_text("t")
    monkeypatch.setattr(kube, "TOKEN_PATH", str(token))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    assert kube.in_cluster()
    # kubernetes.config reads the real token path, absent here.
    with pytest.raises(KubeConfigError, match="in a Kubernetes pod, but its service account is unusable"):
        KubeMetadata.from_environment("node-a")


def test_in_cluster_needs_the_token_and_the_service_host(no_cluster, monkeypatch):
    assert not kube.in_cluster()
    token = no_cluster / "token"
    token.write_text("t")
    monkeypatch.setattr(kube, "TOKEN_PATH", str(token))
    assert not kube.in_cluster()
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert kube.in_cluster()


def test_from_environment_with_a_kubeconfig_and_the_node_from_the_environment(no_cluster, monkeypatch, fake):
    config = no_cluster / "kubeconfig"
    config.write_text(f"""
apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster: {{server: "{fake.url}"}}
contexts:
- name: fake
  context: {{cluster: fake, user: agent}}
current-context: fake
users:
- name: agent
  user: {{token: not-checked}}
""")
    monkeypatch.setenv("KUBECONFIG", str(config))
    monkeypatch.setenv("K8S_NODE_NAME", NODE)
    metadata = KubeMetadata.from_environment(None, backoff=(0.05, 0.2))
    assert metadata.node_name == NODE
    assert metadata._api.api_client.configuration.host == fake.url
    metadata.start()
    try:
        assert metadata.wait_synced(WAIT)
        assert metadata.peer_name("10.96.120.15") == "checkout"
    finally:
        metadata.stop()


def test_a_terminating_pod_gives_its_ip_up():
    """A pod being deleted can still say Running; its IP may already be a new pod's."""
    obj = copy.deepcopy(pods_by_name()["checkout-7d4b9c8f6d-x2k9p"])
    assert ("ip", "10.244.1.17") in set(kube._pod_keys(Pod.from_api(obj)))
    obj["metadata"]["deletionTimestamp"] = "2024-05-14T10:00:00Z"
    assert not [k for k in kube._pod_keys(Pod.from_api(obj)) if k[0] == "ip"]
