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


@given(st.lists(st.dictionaries(st.text(max_size=8), st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(),
                                                                   st.lists(st.integers(0, 2**32)))),
                max_size=5))  # fmt: skip
def test_json_lines_read_back_as_the_dicts_written(dicts):
    """Spans go out as JSON lines through msgspec; any text, a lone surrogate from bytes kept
    with surrogateescape included (msgspec refuses those: that batch goes through json.dumps),
    reads back as it was, one line per span, in ASCII."""
    import json

    from deeptrace.capture.spans import json_lines

    text = json_lines(dicts)
    assert text.isascii() and len(text.splitlines()) == len(dicts)
    assert [json.loads(line) for line in text.splitlines()] == dicts


def test_json_lines_escape_what_is_not_utf8_as_json_dumps_does():
    import json

    from deeptrace.capture.spans import json_lines

    d = {"http.target": "/a\udcff", "n": 1}
    assert json_lines([d, {"n": 2}]) == json.dumps(d) + "\n" + json.dumps({"n": 2}) + "\n"
