"""capture/records.py mirrors agent/bpf/deeptrace.h: check every struct, enum and bound the
two share against the C compiler's own account of them.

The structs are read from the BTF of the compiled objects. The enums and #define bounds are
not in those objects (no variable has an enum type, and macros leave no type), so the header
is compiled here into a small probe whose BTF has one variable per enum and one array per
bound: the values are still the compiler's, not a reading of the text. Only the names of the
enums and bounds are taken from the header's text, so a new one fails here until Python
mirrors it (or it is listed as C-only)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from deeptrace.agent.collector import BPF_DIR, COMPAT_OBJECT, TYPED_READS_OBJECT
from deeptrace.capture import records

HEADER = BPF_DIR / "deeptrace.h"
# Bounds only the kernel programs use: Python has nothing that must agree with them.
C_ONLY_BOUNDS = {"DT_IOV_BATCH", "DT_XSCAN"}
# The Python name of each bound the two sides share.
BOUNDS = {
    "DT_MAX_CAPTURE": "MAX_CAPTURE",
    "DT_MAX_IOV": "MAX_IOV",
    "DT_MAX_MMSG": "MAX_MMSG",
    "DT_TASK_COMM_LEN": "TASK_COMM_LEN",
    "DT_XHEAD_MAX": "XHEAD_MAX",
    "DT_SAMPLE_SHIFT_MAX": "SAMPLE_SHIFT_MAX",
    "DT_DNS_PORTS": "DNS_PORTS",
}
# The header's own types, which the probe declares (it includes no kernel headers).
_PROBE_TYPES = """\
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef long long __s64;
"""


def btf_types(obj: Path) -> dict[int, dict]:
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(obj)], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    return {t["id"]: t for t in json.loads(out)["types"]}


def named(types: dict[int, dict], kind: str, name: str) -> dict:
    found = [t for t in types.values() if t["kind"] == kind and t["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} in the BTF"
    return found[0]


def struct_format(types: dict[int, dict], type_id: int) -> str:
    """The struct-module format of a member's C type: an integer by size and sign, or
    an array of bytes as 'Ns'."""
    t = types[type_id]
    while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE"):
        t = types[t["type_id"]]
    if t["kind"] == "INT":
        fmt = {1: "b", 2: "h", 4: "i", 8: "q"}[t["size"]]
        return fmt if t["encoding"] == "SIGNED" else fmt.upper()
    if t["kind"] == "ARRAY":
        element = struct_format(types, t["type_id"])
        return f"{t['nr_elems']}{'s' if element in ('b', 'B') else element}"
    if t["kind"] == "STRUCT":  # a nested struct, checked on its own: as bytes here
        return f"{t['size']}s"
    raise AssertionError(f"no struct format for BTF type {t}")


def c_struct(obj: Path, name: str) -> tuple[int, list[tuple[str, int, str]]]:
    """The struct's size and its members as (name, byte offset, struct format)."""
    types = btf_types(obj)
    t = named(types, "STRUCT", name)
    assert all(m["bits_offset"] % 8 == 0 for m in t["members"]), f"struct {name} has bit fields"
    return t["size"], [
        (m["name"], m["bits_offset"] // 8, struct_format(types, m["type_id"])) for m in t["members"]
    ]


def python_struct(fields: tuple[tuple[str, str], ...]) -> tuple[int, list[tuple[str, int, str]]]:
    members, off = [], 0
    for name, fmt in fields:
        members.append((name, off, fmt))
        off += struct.calcsize("<" + fmt)
    return off, members


@pytest.fixture(scope="module", params=[TYPED_READS_OBJECT, COMPAT_OBJECT], ids=lambda p: p.name)
def bpf_object(request) -> Path:
    if not request.param.exists():
        pytest.fail(f"{request.param} is not built: run `make bpf`", pytrace=False)
    return request.param


@pytest.fixture(scope="module")
def header_text() -> str:
    return HEADER.read_text()


@pytest.fixture(scope="module")
def compiled(header_text, tmp_path_factory) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """({enum name: {enumerator: value}}, {bound: value}) as the compiler sees the header."""
    if shutil.which("clang") is None:
        pytest.fail("clang is not installed: run `make setup`", pytrace=False)
    enums = re.findall(r"^enum (dt_\w+) \{", header_text, re.MULTILINE)
    bounds = re.findall(r"^#define (\w+)[ \t]", header_text, re.MULTILINE)
    probe = tmp_path_factory.mktemp("layout") / "probe.c"
    probe.write_text(_PROBE_TYPES + f'#include "{HEADER}"\n'
                     + "".join(f"enum {e} probe_enum_{e};\n" for e in enums)
                     + "".join(f"char probe_bound_{b}[{b}];\n" for b in bounds))  # fmt: skip
    obj = probe.with_suffix(".o")
    subprocess.run(["clang", "-target", "bpf", "-g", "-c", str(probe), "-o", str(obj)], check=True)
    types = btf_types(obj)
    enum_values = {e: {v["name"]: v["val"] for v in named(types, "ENUM", e)["values"]} for e in enums}
    variables = {t["name"]: types[t["type_id"]] for t in types.values() if t["kind"] == "VAR"}
    bound_values = {b: variables[f"probe_bound_{b}"]["nr_elems"] for b in bounds}
    return enum_values, bound_values


def test_record_header_matches_the_c_struct(bpf_object):
    assert python_struct(records.HEADER_FIELDS) == c_struct(bpf_object, "dt_record")
    assert records.HEADER_SIZE == records.HEADER.size == 120


def test_exchange_matches_the_c_struct(bpf_object):
    assert python_struct(records.EXCHANGE_FIELDS) == c_struct(bpf_object, "dt_exchange")
    size = python_struct(records.EXCHANGE_FIELDS)[0]
    assert size % 8 == 0, "heads follow the struct: it must keep them 8-byte aligned"
    assert records.exchange_dtype(256).itemsize == size + 2 * 256


def test_xstate_matches_the_c_struct(bpf_object):
    assert python_struct(records.XSTATE_FIELDS) == c_struct(bpf_object, "dt_xstate")
    assert records.XSTATE.size == python_struct(records.XSTATE_FIELDS)[0]
    assert records.EXCHANGE_SIZE == python_struct(records.EXCHANGE_FIELDS)[0]


def test_dns_key_matches_the_c_struct(bpf_object):
    assert python_struct(records.DNS_KEY_FIELDS) == c_struct(bpf_object, "dt_dns_key")
    assert records.DNS_KEY.size == python_struct(records.DNS_KEY_FIELDS)[0]


def test_exchange_flags_match_the_c_enum(compiled):
    python = {name: getattr(records, name) for name in dir(records) if name.startswith("XFLAG_")}
    assert {f"DT_XF_{name.removeprefix('XFLAG_')}": value for name, value in python.items()} == compiled[0]["dt_xflags"]


def test_phases_match_the_c_enum(compiled):
    assert compiled[0]["dt_xphase"] == {f"DT_PHASE_{p.upper()}": i for i, p in enumerate(records.PHASES)}


def test_exchange_protocols_match_the_c_enum(compiled):
    values = compiled[0]["dt_xproto"]
    assert values == {"DT_XP_NONE": 0, **{f"DT_XP_{p.upper()}": i for i, p in enumerate(records.EXCHANGE_PROTOCOLS) if i}}


def test_config_matches_the_c_struct(bpf_object):
    assert python_struct(records.CONFIG_FIELDS) == c_struct(bpf_object, "dt_config")
    assert records.CONFIG.size == python_struct(records.CONFIG_FIELDS)[0]


def test_every_enum_is_mirrored(compiled):
    enums, _ = compiled
    assert set(enums) == {"dt_syscall", "dt_direction", "dt_role", "dt_flags", "dt_counter", "dt_xproto", "dt_xphase",
                          "dt_xflags"}


def test_syscalls_match_the_c_enum(compiled):
    values = compiled[0]["dt_syscall"]
    assert {f"DT_SYS_{name.upper()}": i for i, name in enumerate(records.SYSCALLS) if i} == values
    assert records.SYSCALLS[0] not in {n.removeprefix("DT_SYS_").lower() for n in values}
    events = {values["DT_SYS_CONNECT"], values["DT_SYS_ACCEPT"], values["DT_SYS_CLOSE"]}
    assert records.DATA_SYSCALLS == tuple(
        records.SYSCALLS[v] for v in sorted(values.values()) if v not in events and v < values["DT_SYS_SSL_READ"]
    )
    assert set(records.TLS_LIBRARIES) == {records.SYSCALLS[v] for v in values.values() if v >= values["DT_SYS_SSL_READ"]}


def test_directions_match_the_c_enum(compiled):
    values = compiled[0]["dt_direction"]
    assert values == {
        "DT_DIR_NONE": 0,
        **{f"DT_DIR_{d.upper()}": i for i, d in enumerate(records.DIRECTIONS) if i},
    }
    assert records.DIRECTIONS[values["DT_DIR_NONE"]] is None


def test_roles_match_the_c_enum(compiled):
    assert compiled[0]["dt_role"] == {f"DT_ROLE_{r.upper()}": i for i, r in enumerate(records.ROLES)}


def test_flags_match_the_c_enum(compiled):
    python = {name: getattr(records, name) for name in dir(records) if name.startswith("FLAG_")}
    assert {f"DT_{name}": value for name, value in python.items()} == compiled[0]["dt_flags"]


def test_counters_match_the_c_enum(compiled):
    values = dict(compiled[0]["dt_counter"])
    assert values.pop("DT_CNT_MAX") == len(records.COUNTERS)
    assert {f"DT_CNT_{name.upper()}": i for i, name in enumerate(records.COUNTERS)} == values


def test_bounds_match_the_c_defines(compiled):
    _, bounds = compiled
    assert set(bounds) == set(BOUNDS) | C_ONLY_BOUNDS, (
        "a #define in deeptrace.h is neither mirrored nor C-only"
    )
    assert {c: getattr(records, py) for c, py in BOUNDS.items()} == {c: bounds[c] for c in BOUNDS}
