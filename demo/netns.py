"""Two "hosts" on one machine for the two-host demo: network namespaces on a bridge in the
root namespace, where the DeepTrace server runs.

    root namespace    bridge dtdemo0  10.77.0.254/24   deeptrace server, the traffic
    deeptrace-hostA   eth0            10.77.0.1/24     nginx, gateway
    deeptrace-hostB   eth0            10.77.0.2/24     catalog, cart, checkout, postgresql, redis
"""

from __future__ import annotations

import subprocess
from contextlib import contextmanager

from demo.infra import Host
from demo.procs import StartError

SUBNET = "10.77.0.0/24"
BRIDGE, ROOT_ADDR = "dtdemo0", "10.77.0.254"
HOSTS = (("hostA", "10.77.0.1"), ("hostB", "10.77.0.2"))


def _ip(*args: str, check: bool = True) -> str:
    try:
        r = subprocess.run(["ip", *args], check=False, capture_output=True, text=True)
    except FileNotFoundError:
        raise StartError("the two-host demo needs `ip` (iproute2): run `make setup`") from None
    if check and r.returncode != 0:
        raise StartError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")
    return r.stdout


def namespace(host: str) -> str:
    return f"deeptrace-{host}"


def _clear_leftovers() -> None:
    """What a killed run left behind is removed; a running demo's namespaces are not."""
    existing = {line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()}
    for host, _ in HOSTS:
        ns = namespace(host)
        if ns in existing:
            pids = _ip("netns", "pids", ns).split()
            if pids:
                raise StartError(
                    f"another two-host demo is running (namespace {ns} holds pids {' '.join(pids)}): "
                    "stop it first"
                )
            _ip("netns", "del", ns)
    _ip("link", "del", BRIDGE, check=False)
    if _ip("-4", "addr", "show", "to", SUBNET).strip():
        raise StartError(f"{SUBNET} is already in use on this machine; the two-host demo needs it")


@contextmanager
def two_hosts():
    """Yields (host A, host B, the root namespace's address on the bridge)."""
    _clear_leftovers()
    try:
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{ROOT_ADDR}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        hosts = []
        for name, addr in HOSTS:
            ns, veth = namespace(name), f"{BRIDGE}-{name[-1].lower()}"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", BRIDGE, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            hosts.append(Host(name, addr, ns))
        yield hosts[0], hosts[1], ROOT_ADDR
    finally:
        for name, _ in HOSTS:
            _ip("netns", "del", namespace(name), check=False)
        _ip("link", "del", BRIDGE, check=False)
