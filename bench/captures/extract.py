#!/usr/bin/env python3
"""Copy public packet captures made by others out of git mirrors into a directory for run.py.

The captures are not ours and are not committed here: they come from two projects' test
suites, read out of bare git mirrors (no work tree needed):

- Zeek (github.com/zeek/zeek), testing/btest/Traces: http/, dns/, redis/, postgresql/,
  mysql/, mqtt.pcap; recorded mostly from real traffic, many starting mid-connection;
- DeepFlow (github.com/deepflowio/deepflow), agent/resources/test/flow_generator: amqp, dns,
  dubbo, http (HTTP/2, gRPC), kafka, memcached, mongo, mqtt, nats, postgre, redis, mysql.

    git clone --bare --filter=blob:none https://github.com/zeek/zeek /tmp/zeek.git
    git clone --bare --filter=blob:none https://github.com/deepflowio/deepflow /tmp/deepflow.git
    .venv/bin/python bench/captures/extract.py /tmp/foreign-captures \
        --zeek /tmp/zeek.git --deepflow /tmp/deepflow.git

(With --filter=blob:none only the captures' blobs are downloaded, when they are read.)
Each capture lands in OUT/<source>/<protocol folder>/; gzipped ones are unpacked, because
replay reads pcap/pcapng only. The commit each source was read at goes to OUT/SOURCES.txt.
"""

from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
from pathlib import Path

# source -> (default mirror on the machine this was written on, folder in the repo, what to take)
SOURCES = {
    "zeek": ("/work/.mirror/zeek+zeek/repo", "testing/btest/Traces",
             ("http/", "dns/", "redis/", "postgresql/", "mysql/", "mqtt.pcap")),
    "deepflow": ("/work/.mirror/deepflowio+deepflow/repo", "agent/resources/test/flow_generator",
                 ("amqp/", "dns/", "dubbo/", "http/", "http.pcap", "kafka/", "memcached/", "mongo/",
                  "mqtt/", "nats/", "postgre/", "redis/", "mysql/")),
}  # fmt: skip
SUFFIXES = (".pcap", ".pcapng", ".cap", ".pcap.gz", ".pcapng.gz")


def git(repo: str, *args: str) -> bytes:
    return subprocess.run(["git", "-C", repo, *args], check=True, capture_output=True).stdout


def wanted(path: str, folder: str, takes: tuple[str, ...]) -> bool:
    rel = path[len(folder) + 1 :]
    return rel.endswith(SUFFIXES) and any(rel == t or (t.endswith("/") and rel.startswith(t)) for t in takes)


def extract(name: str, repo: str, folder: str, takes: tuple[str, ...], out: Path) -> int:
    paths = git(repo, "ls-tree", "-r", "--name-only", "HEAD", folder).decode().splitlines()
    n = 0
    for path in paths:
        if not wanted(path, folder, takes):
            continue
        data = git(repo, "show", f"HEAD:{path}")
        rel = path[len(folder) + 1 :]
        if rel.endswith(".gz"):
            data, rel = gzip.decompress(data), rel[:-3]
        if "/" not in rel:  # a capture at the top: its name says the protocol (mqtt.pcap)
            rel = f"{Path(rel).stem}/{rel}"
        dest = out / name / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        n += 1
    commit = git(repo, "rev-parse", "HEAD").decode().strip()
    with open(out / "SOURCES.txt", "a") as f:
        f.write(f"{name}: {n} captures from {folder} at commit {commit}\n")
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory to write the captures to")
    for name, (default, _, _) in SOURCES.items():
        ap.add_argument(f"--{name}", default=default, metavar="GIT_DIR", help=f"mirror of {name} ({default})")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "SOURCES.txt").unlink(missing_ok=True)
    for name, (_, folder, takes) in SOURCES.items():
        repo = getattr(args, name)
        if not Path(repo).exists():
            print(f"{name}: no mirror at {repo} (clone it, see --help); skipped", file=sys.stderr)
            continue
        print(f"{name}: {extract(name, repo, folder, takes, args.out)} captures -> {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
