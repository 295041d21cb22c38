"""Pieces that need no kernel: preflight messages and the record decoder on any bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deeptrace.agent import system
from deeptrace.agent.selection import Selection
from deeptrace.capture.records import HEADER_SIZE, RecordDecoder
from deeptrace.errors import DeepTraceError


def test_kernel_version_parsing():
    assert system.kernel_version("6.18.44-fc-v669") == (6, 18)
    assert system.kernel_version("5.8.0") == (5, 8)
    with pytest.raises(DeepTraceError, match="kernel version"):
        system.kernel_version("weird")


def test_missing_btf_is_explained(monkeypatch, tmp_path):
    monkeypatch.setattr(system.os, "geteuid", lambda: 0)
    monkeypatch.setattr(system, "BTF_PATH", tmp_path / "vmlinux")
    with pytest.raises(DeepTraceError, match="CONFIG_DEBUG_INFO_BTF"):
        system.preflight()


def test_old_kernel_is_explained(monkeypatch):
    monkeypatch.setattr(system.os, "geteuid", lambda: 0)
    monkeypatch.setattr(system.platform, "release", lambda: "5.4.0-generic")
    with pytest.raises(DeepTraceError, match="5.8 or newer"):
        system.preflight()


def test_all_cannot_be_combined_with_pids():
    with pytest.raises(DeepTraceError, match="do not combine"):
        Selection(pids=[1], trace_all=True).validate()


@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE + 64))
def test_decoder_accepts_any_header_bytes(raw):
    rec = RecordDecoder(wall_offset_ns=0).decode(raw)
    assert len(rec.payload) <= len(raw) - HEADER_SIZE
    assert isinstance(rec.to_json_dict(), dict)
