"""Plaintext of TLS connections: uprobes on the TLS libraries the traced processes use.

The kernel programs (agent/bpf, "TLS libraries") read the plaintext at the library's read
and write functions; this module finds which library files the traced processes map
(/proc/PID/maps, and the executable itself for Go) and attaches those programs to each file
once. A uprobe is set on a file, not on a process: one attachment serves every process that
maps the file, those started later included, and the programs keep to the traced ones. A
file is let go when no traced process maps it any more.

Covered: OpenSSL 1.1 and 3 (libssl.so), GnuTLS (libgnutls.so), and Go's crypto/tls in Go
executables built for amd64 with their symbol table. Not covered: libraries linked
statically into other executables (BoringSSL in Envoy, OpenSSL in Node.js), Java's JSSE,
rustls, and TLS done with memory BIOs (the ciphertext is not moved by the library's own
socket calls: the plaintext is read, but its socket is not known).
"""

from __future__ import annotations

import os
import platform
import re
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

from deeptrace.agent.libbpf import BpfError, BpfObject

# (program, symbol, return probe) per library; every C function returns through tls_return.
OPENSSL_PROBES = (
    ("ssl_handshake_enter", "SSL_do_handshake"),
    ("ssl_read_enter", "SSL_read"),
    ("ssl_read_ex_enter", "SSL_read_ex"),
    ("ssl_write_enter", "SSL_write"),
    ("ssl_write_ex_enter", "SSL_write_ex"),
)
GNUTLS_PROBES = (
    ("gnutls_handshake_enter", "gnutls_handshake"),
    ("gnutls_recv_enter", "gnutls_record_recv"),
    ("gnutls_send_enter", "gnutls_record_send"),
)
C_RETURN_PROGRAM = "tls_return"
GO_FUNCTIONS = (
    ("go_tls_read_enter", "crypto/tls.(*Conn).Read"),
    ("go_tls_write_enter", "crypto/tls.(*Conn).Write"),
)
GO_RETURN_PROGRAM = "go_tls_return_probe"
# The itab that makes a *net.TCPConn a net.Conn (Go 1.20 renamed "go." symbols to "go:").
GO_TCPCONN_ITABS = ("go:itab.*net.TCPConn,net.Conn", "go.itab.*net.TCPConn,net.Conn")
GO_MIN_MINOR = 17  # Go 1.17 brought the register ABI on amd64, which the programs read
MAX_FUNCTION_BYTES = 1 << 20  # what a symbol may claim to span before the file is not believed

# File names of the shared libraries, by what they are: libssl.so.3, and the copies Python
# wheels bundle (libssl-a1b2c3d4.so.3).
_LIBRARIES = (
    (re.compile(r"libssl(-[0-9a-f]+)?\.so"), "openssl"),
    (re.compile(r"libgnutls(-[0-9a-f]+)?\.so"), "gnutls"),
)

# A process's maps are read again (it may load a library later: Python imports ssl when first
# asked to) at every sync during its first YOUNG_S after it is first seen, when most loading
# happens, and every RESCAN_S after that; reading them costs ~50 us a process.
YOUNG_S = 30.0
RESCAN_S = 10.0


@dataclass(frozen=True)
class Target:
    """One file to attach to: what library it is, and a path to it that this process can open."""

    library: str  # "openssl" | "gnutls" | "go"
    path: str  # through /proc/PID/root, so that a container's files are found
    key: tuple[int, int]  # (st_dev, st_ino): the file, however it is named
    name: str  # the file as its process names it, for people


@dataclass
class TlsStats:
    attached: dict[str, str] = field(default_factory=dict)  # file name -> library, files attached now
    errors: dict[str, str] = field(default_factory=dict)  # file name -> why it could not be attached
    probes: int = 0  # uprobes attached now


def library_targets(pid: int) -> list[Target]:
    """The TLS libraries process `pid` maps now (none if it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    seen: dict[str, str] = {}
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or b"x" not in parts[1]:
            continue  # only executable mappings hold the functions
        path = parts[5].decode(errors="replace")
        name = os.path.basename(path)
        for pattern, library in _LIBRARIES:
            if pattern.match(name) and not path.endswith(" (deleted)"):
                seen[path] = library
    out = []
    for path, library in seen.items():
        target = _target(pid, library, path)
        if target:
            out.append(target)
    return out


def _target(pid: int, library: str, path: str) -> Target | None:
    full = f"/proc/{pid}/root{path}"
    try:
        st = os.stat(full)
    except OSError:
        return None
    return Target(library, full, (st.st_dev, st.st_ino), path)


def system_targets() -> list[Target]:
    """The TLS libraries in the system's library path (`ldconfig -p`): what a process that
    starts later will most likely map."""
    try:
        out = subprocess.run(
            ["ldconfig", "-p"], check=False, capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = {}
    for line in out.splitlines():
        name, _, path = line.strip().partition(" => ")
        name = name.split(" ", 1)[0]
        if platform.machine() == "x86_64" and "x86-64" not in line:
            continue  # a 32-bit library: not what 64-bit processes map
        for pattern, library in _LIBRARIES:
            if pattern.match(name):
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                found[(st.st_dev, st.st_ino)] = Target(library, path, (st.st_dev, st.st_ino), path)
    return list(found.values())


def executable_target(pid: int) -> Target | None:
    """The process's executable, if it is a Go program (its TLS is its own, compiled in)."""
    try:
        st = os.stat(f"/proc/{pid}/exe")
        name = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return Target("go", f"/proc/{pid}/exe", (st.st_dev, st.st_ino), name)


@dataclass(frozen=True)
class GoFunction:
    offset: int  # in the file, where the uprobe goes
    returns: tuple[int, ...]  # file offsets of its RET instructions
    itab_delta: int  # the *net.TCPConn itab's address less the function's


def go_tls_functions(path: str) -> dict[str, GoFunction] | None:
    """crypto/tls's Read and Write in a Go executable, with their return instructions; None if
    it is not a Go 1.17+ program for amd64 with a symbol table, or has no crypto/tls. OSError if
    it cannot be opened (its process is gone)."""
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        try:
            elf = ELFFile(f)
            if elf["e_machine"] != "EM_X86_64" or (_go_minor(elf) or 0) < GO_MIN_MINOR:
                return None
            symtab = elf.get_section_by_name(".symtab")
            if symtab is None:
                return None  # stripped (-ldflags=-s): the functions cannot be found
            wanted = {name for _, name in GO_FUNCTIONS}
            found, itab = {}, None
            for sym in symtab.iter_symbols():
                if sym.name in wanted and sym["st_info"]["type"] == "STT_FUNC":
                    found[sym.name] = (sym["st_value"], sym["st_size"])
                elif sym.name in GO_TCPCONN_ITABS:
                    itab = sym["st_value"]
            if len(found) != len(wanted) or itab is None:
                return None
            out = {}
            for name, (vaddr, size) in found.items():
                offset = _file_offset(elf, vaddr)
                if offset is None or not 0 < size <= MAX_FUNCTION_BYTES:
                    return None
                f.seek(offset)
                code = f.read(size)
                returns = tuple(offset + r for r in _return_offsets(code, vaddr))
                out[name] = GoFunction(offset, returns, itab - vaddr)
            return out
        except (ELFError, ValueError, KeyError, IndexError, struct.error):
            return None


def _go_minor(elf) -> int | None:
    """The minor version of the Go that built it, from its .go.buildinfo; None if not Go."""
    section = elf.get_section_by_name(".go.buildinfo")
    if section is None:
        return None
    data = section.data()
    if len(data) < 33 or not data.startswith(b"\xff Go buildinf:"):
        return None
    if data[15] & 2:  # Go 1.18+: the version inline, after a varint length
        version = data[33 : 33 + data[32]]
    else:  # Go 1.17 and older: a pointer to the version's string header
        fmt = {4: "I", 8: "Q"}.get(data[14])
        if fmt is None:
            return None
        (header,) = struct.unpack_from("<" + fmt, data, 16)
        ptr, length = struct.unpack("<2" + fmt, _read_vaddr(elf, header, 2 * data[14]))
        version = _read_vaddr(elf, ptr, min(length, 64))
    m = re.match(rb"go1\.(\d+)", version)
    return int(m.group(1)) if m else None


def _read_vaddr(elf, vaddr: int, size: int) -> bytes:
    offset = _file_offset(elf, vaddr)
    if offset is None:
        raise ValueError(f"address {vaddr:#x} is in no segment")
    elf.stream.seek(offset)
    return elf.stream.read(size)


def _file_offset(elf, vaddr: int) -> int | None:
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= vaddr < seg["p_vaddr"] + seg["p_filesz"]:
            return vaddr - seg["p_vaddr"] + seg["p_offset"]
    return None


def _return_offsets(code: bytes, vaddr: int) -> list[int]:
    """Offsets in `code` of its RET instructions (decoded, so a 0xc3 inside another
    instruction is not taken for one)."""
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return [insn.address - vaddr for insn in md.disasm(code, vaddr) if insn.mnemonic == "ret"]


class TlsProbes:
    """The uprobes attached for the traced processes; sync() keeps them current."""

    def __init__(self, obj: BpfObject, eager: bool = False):
        """eager: attach to the system's TLS libraries at once and keep them, for processes
        that start later (traced by name, or all): a short-lived one (curl, wget) can come and
        go between two syncs. Their functions then stop in every process that calls them,
        traced or not (the cost is in docs/benchmarks.md)."""
        self._obj = obj
        self._go_itabs = obj.map("GO_TCPCONN_ITABS")
        self._links: dict[tuple[int, int], list[int]] = {}  # file -> its uprobe links
        self._names: dict[tuple[int, int], str] = {}
        self._users: dict[tuple[int, int], set[int]] = {}  # file -> traced pids mapping it
        self._scanned: dict[
            int, tuple[float, float, list[Target]]
        ] = {}  # pid -> (first seen, last read, what it maps)
        self._failed: set[tuple[int, int]] = set()  # files that cannot be attached: not tried again
        self.stats = TlsStats()
        self._go = platform.machine() == "x86_64"
        self._pinned: set[tuple[int, int]] = set()
        if eager:
            for target in system_targets():
                self._attach(target)
                if target.key in self._links:
                    self._pinned.add(target.key)

    def sync(self, pids: Iterable[int], now: float) -> None:
        """Attach to what the traced processes `pids` map; let go of what none of them does."""
        pids = set(pids)
        for pid in list(self._scanned):
            if pid not in pids:
                del self._scanned[pid]
        users: dict[tuple[int, int], set[int]] = {}
        for pid in pids:
            first, last, targets = self._scanned.get(pid, (now, None, []))
            if last is None or now - first < YOUNG_S or now - last >= RESCAN_S:
                targets = library_targets(pid)
                exe = executable_target(pid) if self._go else None
                if exe:
                    targets.append(exe)
                self._scanned[pid] = (first, now, targets)
            for target in targets:
                if target.key not in self._links and target.key not in self._failed:
                    self._attach(target)
                if target.key in self._links:
                    users.setdefault(target.key, set()).add(pid)
        for key in list(self._links):
            if key not in users and key not in self._pinned:
                self._detach(key)
        self._users = users

    def _attach(self, target: Target) -> None:
        try:
            links = self._probe(target)
        except OSError:
            return  # its process is gone: another that maps the file will be seen
        except BpfError as e:
            if target.path.startswith("/proc/") and not os.path.exists(target.path):
                return  # its process is gone: another that maps the file will be seen
            self.stats.errors[target.name] = str(e).splitlines()[0]
            if not any(code in str(e) for code in ("EMFILE", "ENFILE", "ENOMEM")):
                self._failed.add(target.key)  # else out of descriptors or memory for now: tried again
            return
        except Exception as e:  # noqa: BLE001 - a file that breaks the ELF reader must not stop the agent
            self._failed.add(target.key)
            self.stats.errors[target.name] = f"unreadable: {e!r}"[:200]
            return
        if links is None:  # not a Go program with crypto/tls: nothing to attach, ever
            self._failed.add(target.key)
            return
        self._links[target.key] = links
        self._names[target.key] = target.name
        self.stats.attached[target.name] = target.library
        self.stats.probes += len(links)

    def _probe(self, target: Target) -> list[int] | None:
        links: list[int] = []
        try:
            if target.library == "go":
                functions = go_tls_functions(target.path)
                if functions is None:
                    return None
                for program, name in GO_FUNCTIONS:
                    fn = functions[name]
                    self._go_itabs.update(struct.pack("<q", fn.itab_delta), b"\x01")
                    # Returns first: an entry probed before its returns could begin a call that never ends.
                    for ret in fn.returns:
                        links.append(self._obj.attach_uprobe(GO_RETURN_PROGRAM, target.path, ret))
                    links.append(self._obj.attach_uprobe(program, target.path, fn.offset))
                return links
            probes = OPENSSL_PROBES if target.library == "openssl" else GNUTLS_PROBES
            for program, symbol in probes:
                # The return first: an entry probed before its return could begin a call that
                # never ends, and the thread's socket calls would be taken for the library's.
                try:
                    links.append(
                        self._obj.attach_uprobe(C_RETURN_PROGRAM, target.path, function=symbol, retprobe=True)
                    )
                except BpfError:
                    if symbol.endswith("_ex"):
                        continue  # OpenSSL 1.1.0 and older have no SSL_read_ex/SSL_write_ex
                    raise
                links.append(self._obj.attach_uprobe(program, target.path, function=symbol))
            return links
        except BpfError:
            for link in links:
                self._obj.detach(link)
            raise

    def _detach(self, key: tuple[int, int]) -> None:
        links = self._links.pop(key)
        for link in links:
            self._obj.detach(link)
        self.stats.probes -= len(links)
        self.stats.attached.pop(self._names.pop(key), None)

    def close(self) -> None:
        for key in list(self._links):
            self._detach(key)
