"""Make the capture files of this directory again, from real servers and clients.

Run as root from the repository: `.venv/bin/python tests/captures/make_captures.py`.
Needs tcpdump, dumpcap/tshark/editcap/mergecap, nginx, redis, dnsmasq, curl, dig and
iproute2 and ethtool (network namespaces, veth). README.md says what each file holds; the
tests assert the spans replayed from the files kept here, so regenerating them means
checking those expectations again (sizes change with the versions of the tools).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from servers import dnsmasq, need, nginx, nginx_conf, redis

BIG = bytes(range(256)) * 80  # a 20 KiB body: many segments on a 1280-byte MTU


def run(*argv: str, ns: str | None = None, **kw) -> subprocess.CompletedProcess:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*prefix, *argv], check=True, capture_output=True, **kw)


@contextmanager
def capturing(argv: list[str], ready: str, ns: str | None = None):
    """A tcpdump/dumpcap running until the block ends (SIGINT: it writes out what it holds)."""
    prefix = ["ip", "netns", "exec", ns] if ns else []
    proc = subprocess.Popen([*prefix, *argv], stderr=subprocess.PIPE, text=True)
    try:
        while ready not in (line := proc.stderr.readline()):
            assert line or proc.poll() is None, f"{argv[0]} did not start"
        time.sleep(1)  # it says so a moment before packets are really taken
        yield
        time.sleep(1)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)


def tcpdump(iface: str, out: Path, flt: str, *extra: str, ns: str | None = None):
    argv = [need("tcpdump"), "-i", iface, "-U", "-w", str(out), *extra, *([flt] if flt else [])]
    return capturing(argv, "listening on", ns)


def dumpcap(iface: str, out: Path, flt: str, *extra: str, ns: str | None = None):
    argv = [need("dumpcap"), "-i", iface, "-w", str(out), *extra, *(["-f", flt] if flt else [])]
    return capturing(argv, "Capturing on", ns)


def loopback(tmp: Path) -> None:
    """HTTP/1 (nginx + curl), Redis, DNS over UDP and TCP on 127.0.0.1, seen by six captures at once."""
    (tmp / "nginx").mkdir()
    with nginx(tmp / "nginx") as (_, http), redis(tmp) as (_, rds), dnsmasq(tmp) as (_, dns):
        flt = f"port {http} or port {rds} or port {dns}"
        with ExitStack() as caps:
            caps.enter_context(tcpdump("lo", HERE / "lo.pcap", flt))
            caps.enter_context(tcpdump("lo", HERE / "lo-nano.pcap", flt, "--time-stamp-precision", "nano"))
            caps.enter_context(tcpdump("lo", HERE / "lo-snap96.pcap", flt, "-s", "96"))
            caps.enter_context(tcpdump("any", HERE / "any-sll.pcap", flt, "-y", "LINUX_SLL"))
            caps.enter_context(dumpcap("lo", HERE / "lo.pcapng", flt))
            caps.enter_context(dumpcap("any", HERE / "any-sll2.pcapng", flt, "-y", "LINUX_SLL2"))
            run("curl", "-s", f"http://127.0.0.1:{http}/hello")
            run("curl", "-s", f"http://127.0.0.1:{http}/missing/7")
            run("redis-cli", "-p", str(rds), "SET", "k", "v")
            run("redis-cli", "-p", str(rds), "GET", "k")
            run("dig", "@127.0.0.1", "-p", str(dns), "+short", "+tries=1", "web.test")
            run("dig", "@127.0.0.1", "-p", str(dns), "+short", "+tcp", "missing.test")
    # Conversions by Wireshark's tools: a nanosecond pcapng, and every packet twice.
    run("tshark", "-r", str(HERE / "lo-nano.pcap"), "-F", "pcapng", "-w", str(HERE / "lo-nano.pcapng"))
    run("mergecap", "-w", str(HERE / "lo-twice.pcapng"), str(HERE / "lo.pcapng"), str(HERE / "lo.pcapng"))


def ipv6(tmp: Path) -> None:
    """nginx on [::1] in a namespace of its own (a loopback with no one else's traffic, so the
    capture needs no filter: libpcap's `port` filter does not look past extension headers):
    curl, and a Python client whose socket adds a destination-options header to its packets."""
    conf = tmp / "nginx6.conf"
    conf.write_text(nginx_conf(tmp, 8080).replace("listen 127.0.0.1:", "listen [::1]:"))
    subprocess.run(["ip", "netns", "del", "dtv6"], check=False, capture_output=True)
    run("ip", "netns", "add", "dtv6")
    try:
        run("ip", "-n", "dtv6", "link", "set", "lo", "up")
        ngx = subprocess.Popen(["ip", "netns", "exec", "dtv6", need("nginx"), "-c", str(conf), "-e",
                                str(tmp / "error.log")])  # fmt: skip
        try:
            time.sleep(1)
            with dumpcap("lo", HERE / "ipv6-dstopts.pcapng", "", ns="dtv6"):
                run("curl", "-s", "-g", "http://[::1]:8080/hello", ns="dtv6")
                run(sys.executable, "-c", DSTOPTS_CLIENT, "8080", ns="dtv6")
        finally:
            ngx.terminate()
            ngx.wait(10)
    finally:
        run("ip", "netns", "del", "dtv6")


DSTOPTS_CLIENT = r"""
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
# IPV6_DSTOPTS (59): the kernel puts this destination-options header (a PadN of 4 bytes)
# in every packet of the connection, between the IPv6 header and TCP.
s.setsockopt(socket.IPPROTO_IPV6, 59, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
s.connect(("::1", int(sys.argv[1])))
s.sendall(b"GET /hello/ext HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
while s.recv(65536):
    pass
"""


def namespaces(tmp: Path) -> None:
    """Two network namespaces joined by a veth pair with an MTU of 1280, captured on the client's
    side: HTTP with a 20 KiB body (many segments), Redis, and DNS answers too large for the MTU
    (IP fragments, IPv4 and IPv6). (This kernel has no VLAN devices: the tests add 802.1Q and
    QinQ tags to these frames with dpkt.)"""
    for ns in ("dtsrv", "dtcli"):
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)  # left by an interrupted run
    try:
        for ns in ("dtsrv", "dtcli"):
            run("ip", "netns", "add", ns)
        run("ip", "link", "add", "s0", "netns", "dtsrv", "type", "veth", "peer", "name", "c0", "netns", "dtcli")
        for ns, dev, last in (("dtsrv", "s0", 1), ("dtcli", "c0", 2)):
            ip = ["ip", "-n", ns]
            run(*ip, "link", "set", "lo", "up")
            run(*ip, "link", "set", dev, "mtu", "1280", "up")
            run("ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off", ns=ns)  # packets as on a wire
            run(*ip, "addr", "add", f"10.9.0.{last}/24", "dev", dev)
            run(*ip, "addr", "add", f"fd09::{last}/64", "dev", dev, "nodad")
        (tmp / "srv").mkdir()
        (tmp / "srv" / "big.bin").write_bytes(BIG)
        for d in (tmp.parent, tmp, tmp / "srv"):
            d.chmod(0o755)  # nginx's workers are not root
        conf = tmp / "srv" / "nginx.conf"
        conf.write_text(nginx_conf(tmp / "srv", 80).replace("listen 127.0.0.1:80;", "listen 80;")
                        .replace("location /hello", f"location /big {{ alias {tmp}/srv/big.bin; }}\n        "
                                 "location /hello"))  # fmt: skip
        txt = ",".join(f'"{chr(97 + i) * 200}"' for i in range(10))  # 2000 bytes of TXT
        servers = [
            [need("nginx"), "-c", str(conf), "-e", str(tmp / "srv" / "error.log")],
            [need("redis-server"), "--port", "6379", "--bind", "0.0.0.0", "--save", "", "--appendonly", "no",
             "--dir", str(tmp), "--protected-mode", "no"],
            [need("dnsmasq"), "--no-daemon", "--port=53", "--listen-address=10.9.0.1,fd09::1", "--bind-interfaces",
             "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--pid-file=", "--edns-packet-max=4096",
             f"--txt-record=big.test,{txt}"],
        ]  # fmt: skip
        procs = [subprocess.Popen(["ip", "netns", "exec", "dtsrv", *argv], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for argv in servers]  # fmt: skip
        try:
            time.sleep(2)
            with tcpdump("c0", HERE / "veth.pcap", "", ns="dtcli"):
                run("curl", "-s", "-o", "/dev/null", "http://10.9.0.1/big", ns="dtcli")
                run("redis-cli", "-h", "10.9.0.1", "SET", "k", "v", ns="dtcli")
                run("dig", "@10.9.0.1", "+bufsize=4096", "+tries=1", "TXT", "big.test", ns="dtcli")
                run("dig", "@fd09::1", "+bufsize=4096", "+tries=1", "TXT", "big.test", ns="dtcli")
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)
    finally:
        for ns in ("dtsrv", "dtcli"):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


if __name__ == "__main__":
    steps = [globals()[name] for name in sys.argv[1:]] or [loopback, ipv6, namespaces]
    with tempfile.TemporaryDirectory() as d:
        for step in steps:
            (Path(d) / step.__name__).mkdir()
            step(Path(d) / step.__name__)
    for f in sorted(HERE.glob("*.pcap*")):
        print(f"{f.name:28} {f.stat().st_size:7} bytes")
