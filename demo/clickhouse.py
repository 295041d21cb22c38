"""A private clickhouse-server (Debian's): its config, data and log in a directory of its own,
listening on one address and the ports given, stopped with whoever started it. The cluster
demo keeps its DeepTrace servers' one store there; the tests (tests/clickhouse.py) start
theirs from the same config."""

from __future__ import annotations

from pathlib import Path

from demo.infra import Host, binary, http_ok
from demo.procs import Proc

DATABASE = "deeptrace"

CONFIG = """<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><console>1</console></logger>
    <tcp_port>{tcp}</tcp_port>
    <http_port>{http}</http_port>
    <interserver_http_port>{interserver}</interserver_http_port>
    <listen_host>{listen}</listen_host>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/tmp/</tmp_path>
    <user_files_path>{dir}/user_files/</user_files_path>
    <format_schema_path>{dir}/format_schemas/</format_schema_path>
    <users_config>{dir}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>5368709</mark_cache_size>
    <remote_servers>{remote}</remote_servers>
</yandex>
"""
# One user, `default`, no password: reachable from the loopback (and the listen address) only.
USERS = """<?xml version="1.0"?>
<yandex>
    <profiles><default></default></profiles>
    <users><default><password></password><networks>{networks}</networks>
        <profile>default</profile><quota>default</quota></default></users>
    <quotas><default></default></quotas>
</yandex>
"""


def configure(
    directory: Path, tcp: int, http: int, interserver: int, listen: str = "127.0.0.1", remote: str = ""
) -> Path:
    """Writes config.xml and users.xml into `directory` (which must exist); returns the config.
    `remote` is the <remote_servers> content (clusters of shards), if any."""
    directory = Path(directory)
    networks = dict.fromkeys(["127.0.0.1", "::1", listen])  # in order, once each
    (directory / "users.xml").write_text(USERS.format(networks="".join(f"<ip>{ip}</ip>" for ip in networks)))
    config = directory / "config.xml"
    config.write_text(
        CONFIG.format(
            tcp=tcp, http=http, interserver=interserver, listen=listen, dir=directory, remote=remote
        )
    )
    return config


def argv(config: Path) -> list[str]:
    return [binary("clickhouse-server"), f"--config-file={config}"]


def _kept(proc: Proc) -> Proc:
    return proc


def clickhouse(
    host: Host, work: Path, tcp: int, http: int, interserver: int, started=_kept, timeout_s: float = 60.0
) -> Proc:
    """clickhouse-server in `work`/clickhouse, waited for until it answers /ping. As in
    demo/infra.py, the process goes to `started` before the wait."""
    directory = work / "clickhouse"
    directory.mkdir()
    config = configure(directory, tcp, http, interserver, listen=host.addr)
    log = work / "clickhouse-server.log"
    proc = started(Proc("clickhouse-server", host.argv(argv(config)), log, cwd=directory))
    # Its ports open together; a probe of the native one would only leave a warning in its log.
    ping = f"http://{host.addr}:{http}/ping"
    proc.wait_until(lambda: http_ok(ping), f"answering {ping} (native protocol on :{tcp})", timeout_s)
    return proc


def store_url(host: Host, tcp: int, database: str = DATABASE) -> str:
    """What `deeptrace server --store` takes for this server's `database`."""
    return f"clickhouse://{host.addr}:{tcp}/{database}"
