"""Checks and set-up the kernel side needs, each failing with a message that says what to do."""

from __future__ import annotations

import ctypes
import os
import platform
import resource
from pathlib import Path

from deeptrace.errors import DeepTraceError

BTF_PATH = Path("/sys/kernel/btf/vmlinux")
TRACEFS_DIRS = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
MIN_KERNEL = (5, 8)  # BPF ring buffer


def kernel_version(release: str | None = None) -> tuple[int, int]:
    release = release or platform.release()
    parts = release.split("-", 1)[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise DeepTraceError(f"cannot read the kernel version from {release!r}") from None


def _mount(source: str, target: Path, fstype: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(source.encode(), str(target).encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise DeepTraceError(
            f"cannot mount {fstype} on {target} ({os.strerror(err)}); "
            f"mount it by hand: mount -t {fstype} {source} {target}"
        )


def ensure_tracefs() -> Path:
    """libbpf attaches tracepoints by their id under tracefs; mount it if nobody has."""
    for d in TRACEFS_DIRS:
        if (d / "events").is_dir():
            return d
    target = TRACEFS_DIRS[0]
    if not target.is_dir():
        raise DeepTraceError(f"{target} does not exist: this kernel has no tracefs (CONFIG_TRACING)")
    _mount("tracefs", target, "tracefs")
    if not (target / "events").is_dir():
        raise DeepTraceError(f"tracefs mounted on {target} but has no events/: kernel built without tracepoints?")
    return target


def raise_memlock() -> None:
    """Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones to the cgroup."""
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError) as e:
        if kernel_version() < (5, 11):
            soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            raise DeepTraceError(
                f"cannot raise the locked-memory limit ({e}); it is {soft} bytes and this kernel "
                "charges BPF maps to it: run `ulimit -l unlimited` first"
            ) from None


def kernel_has_btf_function(name: str) -> bool:
    """Whether the running kernel's BTF names this function (helpers and kfuncs
    backported to older kernels count too, which a version check would miss)."""
    try:
        return f"\0{name}\0".encode() in BTF_PATH.read_bytes()
    except OSError:
        return False


def preflight() -> None:
    """Everything that must hold before a BPF object is loaded."""
    if os.geteuid() != 0:
        raise DeepTraceError("deeptrace must run as root: it loads eBPF programs into the kernel (try sudo)")
    if kernel_version() < MIN_KERNEL:
        raise DeepTraceError(
            f"kernel {platform.release()} is too old: DeepTrace needs {MIN_KERNEL[0]}.{MIN_KERNEL[1]} or newer"
        )
    if not BTF_PATH.exists():
        raise DeepTraceError(
            f"{BTF_PATH} is missing: the kernel was built without BTF (CONFIG_DEBUG_INFO_BTF=y), "
            "which DeepTrace's CO-RE programs need"
        )
    ensure_tracefs()
    raise_memlock()
