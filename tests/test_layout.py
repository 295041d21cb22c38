"""records.py mirrors struct dt_record: check it against the object's BTF, which
is the C compiler's own account of the layout."""

from __future__ import annotations

import re
import struct
import subprocess

import pytest

from deeptrace.agent.collector import bpf_object_path
from deeptrace.agent.records import CONFIG, COUNTERS, HEADER_FIELDS, HEADER_SIZE


def btf_struct(name: str) -> tuple[int, list[tuple[str, int]]]:
    obj = bpf_object_path()
    if not obj.exists():
        pytest.fail(f"{obj} is not built: run `make bpf`", pytrace=False)
    text = subprocess.run(["bpftool", "btf", "dump", "file", str(obj)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    m = re.search(rf"STRUCT '{name}' size=(\d+) vlen=\d+\n((?:\t.*\n)+)", text)
    assert m, f"struct {name} not in the object's BTF"
    members = re.findall(r"'(\w+)' type_id=\d+ bits_offset=(\d+)", m.group(2))
    return int(m.group(1)), [(n, int(bits) // 8) for n, bits in members]


def test_record_header_matches_the_c_struct():
    size, members = btf_struct("dt_record")
    offsets, off = [], 0
    for name, fmt in HEADER_FIELDS:
        offsets.append((name, off))
        off += struct.calcsize("<" + fmt)
    assert offsets == members
    assert HEADER_SIZE == size == 120


def test_config_matches_the_c_struct():
    size, members = btf_struct("dt_config")
    assert [n for n, _ in members] == ["capture_bytes", "trace_all", "agent_tgid", "follow_forks", "wakeup_records"]
    assert CONFIG.size == size


def test_counter_names_match_the_c_enum():
    src = (bpf_object_path().parent / "deeptrace.h").read_text()
    enum = re.search(r"enum dt_counter \{(.*?)\};", src, re.DOTALL).group(1)
    names = [n.lower() for n in re.findall(r"DT_CNT_(\w+)", enum) if n != "MAX"]
    assert tuple(names) == COUNTERS
