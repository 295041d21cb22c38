"""Thin ctypes binding over the system libbpf: the only module that calls it.

Only what the agent needs: open and load an object, size maps before load,
attach programs, and read/write map elements. libbpf's log is captured so that a
verifier rejection can be shown to the user instead of being lost on stderr.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from deeptrace.errors import DeepTraceError

_LIBBPF_NAMES = ("libbpf.so.1", "libbpf.so.0", "libbpf.so")

BPF_ANY = 0
BPF_NOEXIST = 1

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2


class BpfError(DeepTraceError):
    """A libbpf call failed; carries the tail of libbpf's own log."""

    def __init__(self, message: str, log_tail: list[str] | None = None):
        self.log_tail = log_tail or []
        if self.log_tail:
            message += "\n--- last lines of the libbpf / verifier log ---\n" + "\n".join(self.log_tail)
        super().__init__(message)


def _load_library() -> ctypes.CDLL:
    for name in _LIBBPF_NAMES:
        try:
            return ctypes.CDLL(name, use_errno=True)
        except OSError:
            continue
    found = ctypes.util.find_library("bpf")
    if found:
        return ctypes.CDLL(found, use_errno=True)
    raise DeepTraceError("libbpf is not installed (Debian: apt-get install libbpf1); run `make setup`")


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _Log:
    """Collects libbpf's messages; keeps the last lines for error reports."""

    def __init__(self, keep: int = 400):
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._libc = ctypes.CDLL(None)
        self._libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
        # libbpf prints a rejected program's whole verifier log in one message, and its end
        # says why: the buffer holds a long one (a va_list cannot be formatted twice).
        self._buf = ctypes.create_string_buffer(1 << 20)
        self.callback = _PRINT_FN(self._print)

    def _print(self, level: int, fmt: bytes, va_list: int) -> int:
        # On x86_64 (and arm64) a va_list argument is passed as a pointer, so it
        # can be handed straight to vsnprintf.
        n = self._libc.vsnprintf(self._buf, len(self._buf), fmt, va_list)
        text = self._buf.value.decode(errors="replace")
        for line in text.splitlines():
            if line.strip():
                self.lines.append(line)
        if level == LIBBPF_WARN and os.environ.get("DEEPTRACE_LIBBPF_VERBOSE"):
            os.write(2, self._buf.raw[: max(0, min(n, len(self._buf) - 1))])
        return 0

    def tail(self, n: int = 40) -> list[str]:
        return list(self.lines)[-n:]

    def clear(self) -> None:
        self.lines.clear()


class LibBpf:
    """The libbpf functions we call, with argument types declared once."""

    def __init__(self) -> None:
        lib = _load_library()
        vp, cp, i, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
        sigs = {
            "libbpf_set_print": (vp, [vp]),
            "libbpf_num_possible_cpus": (i, []),
            "bpf_object__open_file": (vp, [cp, vp]),
            "bpf_object__load": (i, [vp]),
            "bpf_object__close": (None, [vp]),
            "bpf_object__find_map_by_name": (vp, [vp, cp]),
            "bpf_object__next_program": (vp, [vp, vp]),
            "bpf_program__name": (cp, [vp]),
            "bpf_program__section_name": (cp, [vp]),
            "bpf_object__find_program_by_name": (vp, [vp, cp]),
            "bpf_program__attach_uprobe_opts": (vp, [vp, i, cp, ctypes.c_size_t, vp]),
            "bpf_program__attach": (vp, [vp]),
            "bpf_link__destroy": (i, [vp]),
            "bpf_map__fd": (i, [vp]),
            "bpf_map__set_max_entries": (i, [vp, u32]),
            "bpf_map__max_entries": (u32, [vp]),
            "bpf_map__key_size": (u32, [vp]),
            "bpf_map__value_size": (u32, [vp]),
            "bpf_map__set_initial_value": (i, [vp, vp, ctypes.c_size_t]),
            "bpf_map_update_elem": (i, [i, vp, vp, ctypes.c_uint64]),
            "bpf_map_lookup_elem": (i, [i, vp, vp]),
            "bpf_map_delete_elem": (i, [i, vp]),
            "bpf_map_get_next_key": (i, [i, vp, vp]),
        }
        for name, (restype, argtypes) in sigs.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        self.lib = lib
        self.log = _Log()
        lib.libbpf_set_print(ctypes.cast(self.log.callback, vp))

    def num_possible_cpus(self) -> int:
        n = self.lib.libbpf_num_possible_cpus()
        if n <= 0:
            raise BpfError(f"libbpf could not count the possible CPUs ({os.strerror(-n)})")
        return n


_instance: LibBpf | None = None


def libbpf() -> LibBpf:
    global _instance
    if _instance is None:
        _instance = LibBpf()
    return _instance


def _errno_text(code: int) -> str:
    code = abs(code)
    return f"{errno.errorcode.get(code, code)}: {os.strerror(code)}"


class BpfMap:
    """A map of a loaded object, accessed by its fd with fixed-size keys and values
    (the sizes the object declares; for a per-CPU map, one CPU's value)."""

    def __init__(self, name: str, ptr: int, key_size: int, value_size: int):
        self.name = name
        self._ptr = ptr
        self.key_size = key_size
        self.value_size = value_size

    @property
    def fd(self) -> int:
        return libbpf().lib.bpf_map__fd(self._ptr)

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        rc = libbpf().lib.bpf_map_update_elem(self.fd, key, value, flags)
        if rc < 0:
            raise BpfError(f"update of map {self.name} failed ({_errno_text(rc)})")

    def lookup(self, key: bytes, value_size: int | None = None) -> bytes | None:
        buf = ctypes.create_string_buffer(value_size or self.value_size)
        if libbpf().lib.bpf_map_lookup_elem(self.fd, key, buf) < 0:
            return None
        return buf.raw

    def delete(self, key: bytes) -> bool:
        return libbpf().lib.bpf_map_delete_elem(self.fd, key) == 0

    def keys(self) -> list[bytes]:
        out: list[bytes] = []
        cur = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        lib = libbpf().lib
        prev = None
        while lib.bpf_map_get_next_key(self.fd, prev, nxt) == 0:
            out.append(nxt.raw)
            ctypes.memmove(cur, nxt, self.key_size)
            prev = cur
        return out


class _UprobeOpts(ctypes.Structure):
    """struct bpf_uprobe_opts of libbpf 1.x."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("ref_ctr_offset", ctypes.c_size_t),
        ("bpf_cookie", ctypes.c_uint64),
        ("retprobe", ctypes.c_bool),
        ("func_name", ctypes.c_char_p),
    ]


# Programs attached one by one to user-space code (agent/tls.py), not by attach_all.
_UPROBE_SECTIONS = ("uprobe", "uretprobe")


class BpfObject:
    """One compiled .bpf.o: open, size maps, load (verify), attach every program."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lib = libbpf()
        self._links: list[int] = []
        self._lib.log.clear()
        ctypes.set_errno(0)
        self._obj = self._lib.lib.bpf_object__open_file(str(self.path).encode(), None)
        if not self._obj:
            err = ctypes.get_errno()
            raise BpfError(f"cannot open BPF object {self.path} ({_errno_text(err)})", self._lib.log.tail())
        self.loaded = False

    def _map_ptr(self, name: str) -> int:
        ptr = self._lib.lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not ptr:
            raise BpfError(f"BPF object {self.path} has no map named {name}")
        return ptr

    def set_max_entries(self, name: str, n: int) -> None:
        rc = self._lib.lib.bpf_map__set_max_entries(self._map_ptr(name), n)
        if rc < 0:
            raise BpfError(f"cannot size map {name} to {n} entries ({_errno_text(rc)})")

    def set_read_only_data(self, data: bytes) -> None:
        """The object's `const volatile` globals (its .rodata), before load: the verifier
        then treats them as constants."""
        ptr = self._map_ptr(".rodata")
        size = self._lib.lib.bpf_map__value_size(ptr)
        if size != len(data):
            raise BpfError(f"{self.path.name} has {size} bytes of read-only data, but {len(data)} were given "
                           "(an object built from another deeptrace.h? rebuild it with `make bpf`)")  # fmt: skip
        rc = self._lib.lib.bpf_map__set_initial_value(ptr, data, len(data))
        if rc < 0:
            raise BpfError(f"cannot set the read-only data of {self.path.name} ({_errno_text(rc)})")

    def load(self) -> None:
        self._lib.log.clear()
        rc = self._lib.lib.bpf_object__load(self._obj)
        if rc < 0:
            tail = self._lib.log.tail()
            hint = ""
            if abs(rc) == errno.EACCES or abs(rc) == errno.EINVAL or abs(rc) == errno.E2BIG:
                hint = " (the kernel's verifier rejected a program; its log follows)"
            raise BpfError(f"loading {self.path.name} failed ({_errno_text(rc)}){hint}", tail)
        self.loaded = True

    def map(self, name: str) -> BpfMap:
        """The map called `name`, with the key and value sizes the object declares."""
        ptr = self._map_ptr(name)
        lib = self._lib.lib
        return BpfMap(name, ptr, lib.bpf_map__key_size(ptr), lib.bpf_map__value_size(ptr))

    def program_names(self) -> list[str]:
        names = []
        prog = self._lib.lib.bpf_object__next_program(self._obj, None)
        while prog:
            names.append(self._lib.lib.bpf_program__name(prog).decode())
            prog = self._lib.lib.bpf_object__next_program(self._obj, prog)
        return names

    def attach_all(self) -> int:
        """Attach every program by its section name, uprobes excepted (they need a file to
        attach to: attach_uprobe); returns how many."""
        lib = self._lib.lib
        prog = lib.bpf_object__next_program(self._obj, None)
        while prog:
            if lib.bpf_program__section_name(prog).decode().split("/")[0] in _UPROBE_SECTIONS:
                prog = lib.bpf_object__next_program(self._obj, prog)
                continue
            ctypes.set_errno(0)
            link = lib.bpf_program__attach(prog)
            if not link:
                err = ctypes.get_errno()
                name = lib.bpf_program__name(prog).decode()
                self.detach_all()
                raise BpfError(f"cannot attach program {name} ({_errno_text(err)})", self._lib.log.tail())
            self._links.append(link)
            prog = lib.bpf_object__next_program(self._obj, prog)
        return len(self._links)

    def attach_uprobe(self, program: str, path: str, offset: int = 0, function: str | None = None,
                      retprobe: bool = False) -> int:
        """Attach `program` to the code at `offset` of the ELF file `path`, or at the start of
        its `function` (a symbol libbpf looks up) plus `offset`, in every process that maps
        the file. Returns the link, for detach()."""
        lib = self._lib.lib
        prog = lib.bpf_object__find_program_by_name(self._obj, program.encode())
        if not prog:
            raise BpfError(f"BPF object {self.path} has no program named {program}")
        opts = _UprobeOpts(ctypes.sizeof(_UprobeOpts), 0, 0, retprobe, function.encode() if function else None)
        self._lib.log.clear()
        ctypes.set_errno(0)
        link = lib.bpf_program__attach_uprobe_opts(prog, -1, path.encode(), offset, ctypes.byref(opts))
        if not link:
            err = ctypes.get_errno()
            where = f"{function}+{offset:#x}" if function else f"{offset:#x}"
            raise BpfError(f"cannot attach {program} to {path} at {where} ({_errno_text(err)})", self._lib.log.tail(5))
        return link

    def detach(self, link: int) -> None:
        self._lib.lib.bpf_link__destroy(link)

    def detach_all(self) -> None:
        while self._links:
            self._lib.lib.bpf_link__destroy(self._links.pop())

    def close(self) -> None:
        self.detach_all()
        if self._obj:
            self._lib.lib.bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
