"""systemd unit files read the way systemd reads them, enough to run a unit's ExecStart by hand:
sections, repeated keys, line continuations, Environment= / EnvironmentFile= and the ${VAR}
expansion of ExecStart, the capability lines, and the setpriv(1) command that gives a process
the same capabilities (tests/test_deploy.py; systemd cannot run units on the test machines).
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

# What systemd expands in ExecStart: ${VAR} anywhere, $VAR as a whole word (then split on spaces).
_BRACED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BARE_WORD = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")


@dataclass
class Unit:
    path: Path
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def values(self, key: str, section: str = "Service") -> list[str]:
        return [v for k, v in self.sections.get(section, []) if k == key]

    def value(self, key: str, section: str = "Service") -> str | None:
        """The last assignment wins, as in systemd (an empty one resets lists)."""
        vals = self.values(key, section)
        return vals[-1] if vals else None

    def capabilities(self, key: str) -> set[str]:
        """CapabilityBoundingSet= / AmbientCapabilities=: the union of the lines, an empty
        assignment resetting it; lower-case names without CAP_ (setpriv's spelling)."""
        caps: set[str] = set()
        for v in self.values(key):
            if not v.strip():
                caps = set()
                continue
            if v.startswith("~"):
                raise ValueError(f"{self.path}: {key}=~... (a deny list) is not supported here")
            caps |= {c.lower().removeprefix("cap_") for c in v.split()}
        return caps

    def environment(self, files: dict[str, Path] | None = None) -> dict[str, str]:
        """Environment= lines, then the EnvironmentFile= files (which override them); `files`
        maps a unit's path to the file a test wrote instead."""
        env: dict[str, str] = {}
        for v in self.values("Environment"):
            for item in shlex.split(v):
                k, _, val = item.partition("=")
                env[k] = val
        for f in self.values("EnvironmentFile"):
            optional = f.startswith("-")
            f = f.removeprefix("-")
            path = (files or {}).get(f, Path(f))
            if not path.exists():
                if optional:
                    continue
                raise FileNotFoundError(f"{self.path}: EnvironmentFile={f} does not exist (as {path})")
            env.update(read_environment_file(path))
        return env

    def exec_start(self, env: dict[str, str]) -> list[str]:
        """ExecStart split into argv with ${VAR} and $VAR expanded from `env` as systemd does."""
        (line,) = self.values("ExecStart")
        line = line.lstrip("@-:+!")
        argv = []
        for word in shlex.split(line):
            bare = _BARE_WORD.match(word)
            if bare:
                argv.extend(env.get(bare.group(1), "").split())
                continue

            def braced(m):
                if m.group(1) not in env:
                    raise KeyError(f"{self.path}: ExecStart uses ${{{m.group(1)}}}, which nothing sets")
                return env[m.group(1)]

            argv.append(_BRACED.sub(braced, word))
        return argv


def read_unit(path: Path) -> Unit:
    unit = Unit(path)
    section = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.sections.setdefault(section, [])
            continue
        if section is None or "=" not in line:
            raise ValueError(f"{path}: cannot read {line!r}")
        key, _, value = line.partition("=")
        unit.sections[section].append((key.strip(), value.strip()))
    return unit


def read_environment_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"{path}: {line!r} is no KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def known_capabilities() -> set[str]:
    out = subprocess.run(["setpriv", "--list-caps"], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def own_bounding_set() -> set[str]:
    """The capabilities this process could hand on (its bounding set)."""
    with open("/proc/self/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd:"))
    return capability_names(mask)


def capability_names(mask: int) -> set[str]:
    names = subprocess.run(
        ["setpriv", "--list-caps"], check=True, capture_output=True, text=True
    ).stdout.split()
    return {name for number, name in enumerate(names) if mask >> number & 1}


def effective_capabilities(pid: int) -> set[str]:
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return capability_names(mask)


def setpriv_argv(caps: set[str], no_new_privs: bool, user: str | None = None) -> list[str]:
    """A setpriv command line that leaves exactly `caps` (bounding, inheritable, ambient), as
    CapabilityBoundingSet= + AmbientCapabilities= do for a unit; `user` switches uid and gid."""
    listed = "".join(f",+{c}" for c in sorted(caps))
    argv = ["setpriv", f"--bounding-set=-all{listed}", f"--inh-caps=-all{listed}"]
    if user is not None:
        argv += [f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        argv += [f"--ambient-caps=-all{listed}"] if caps else []
    elif caps:
        argv += [f"--ambient-caps=-all{listed}"]
    if no_new_privs:
        argv.append("--no-new-privs")
    return argv


def syscall_groups() -> dict[str, list[str]]:
    """systemd's named system call sets (@system-service, ...), from systemd-analyze."""
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter"], check=True, capture_output=True, text=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.split()[0]
            groups[current] = []
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].append(line.strip())
    return groups


def allowed_syscalls(filters: list[str]) -> set[str]:
    """What SystemCallFilter= lines allow: the first sets the allow list, ~ lines subtract."""
    groups = syscall_groups()

    def expand(name: str, seen: frozenset = frozenset()) -> set[str]:
        if not name.startswith("@"):
            return {name}
        if name in seen:
            return set()
        return set().union(*(expand(n, seen | {name}) for n in groups[name]))

    allowed: set[str] | None = None
    for line in filters:
        deny = line.startswith("~")
        names = set().union(*(expand(n) for n in line.removeprefix("~").split()))
        if deny:
            allowed = (allowed if allowed is not None else set()) - names
        else:
            allowed = names if allowed is None else allowed | names
    return allowed or set()


def strace_summary_syscalls(path: Path) -> set[str]:
    """System call names in an `strace -c` summary."""
    names = set()
    for line in path.read_text().splitlines():
        parts = line.split()
        if (
            parts
            and re.fullmatch(r"[a-z_0-9]+", parts[-1])
            and parts[-1] != "total"
            and parts[0][0].isdigit()
        ):
            names.add(parts[-1])
    return names
