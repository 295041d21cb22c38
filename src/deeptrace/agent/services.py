"""Service names for traced processes, read from /proc without touching the process.

A thread's comm says `python` or `event_engine`; a service map needs `catalog`. In order:
the process's own OTEL_SERVICE_NAME (the OpenTelemetry convention, so a service that
already declares its name keeps it), then what its command line says it runs (a script,
a `-m` module, an app given to gunicorn/uvicorn, a jar), then the process's comm.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict

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


class ServiceNames:
    """pid -> service name, cached: a process's name is looked up once per connection it
    opens at most, and /proc reads are not free. A process gone before the lookup keeps its
    comm."""

    def __init__(self) -> None:
        self._cache: OrderedDict[tuple[int, str], str] = OrderedDict()

    def __call__(self, pid: int, comm: str) -> str:
        key = (pid, comm)  # comm in the key: an exec'd or reused pid gets looked up again
        name = self._cache.get(key)
        if name is None:
            name = _environ_name(pid) or from_cmdline(_cmdline(pid)) or comm
            self._cache[key] = name
            if len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return name
