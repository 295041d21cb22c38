#!/usr/bin/env python3
"""`deeptrace replay` on packet captures made by others, against what tshark decodes from them.

    .venv/bin/python bench/captures/extract.py /tmp/foreign-captures   # once: see its --help
    .venv/bin/python bench/captures/run.py /tmp/foreign-captures [--protocol mysql] [--misses 8]

For every capture under DIR (pcap, pcapng), per protocol of our registry that tshark can
decode: the requests tshark decodes are the expected exchanges (with the response it paired,
if any). An expected exchange is matched by a span of ours of the same protocol on the same
connection whose start is within --tolerance-ms of the request (from its first TCP segment to
the frame tshark decoded it in); of those, "named" counts spans whose name holds what tshark
says the request is (method and path, SQL verb, command, query name) and "status" those that
agree with tshark's response on error or not (and on the HTTP status code). Unanswered
exchanges count in "status" when we have no error either. "extra" counts our spans of the
protocol that no expected exchange took.

tshark decodes a protocol on its registered ports; elsewhere it is told to (decode-as) where a
port's payload was left undecoded and either the capture's folder is named for a protocol
(zeek/redis/...) or our replay found that protocol there: the second is marked "ours" in the
per-file lines. A capture that replay refuses counts as 0 matched, with its reason. Output: a
table per protocol, per file the misses (what tshark saw, what we produced), a JSON last line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tshark

from deeptrace import protocols as registry
from deeptrace.capture import replay
from deeptrace.capture.pipeline import SpanPipeline
from deeptrace.errors import DeepTraceError

SUFFIXES = (".pcap", ".pcapng", ".cap")
COLUMNS = ("files", "expected", "answered", "matched", "named", "status", "extra")
# status: right / judged, where judged are the matched exchanges whose answer tshark saw (or none was due)


def our_protocols(wanted: str | None) -> tuple[list[str], list[str]]:
    """(measured, not measurable) among the protocols the registry lists now."""
    names = [spec.name for spec in registry.PROTOCOLS]
    if wanted:
        names = [n for n in names if n in wanted.split(",")]
    return [n for n in names if n in tshark.DISSECTORS], [n for n in names if n not in tshark.DISSECTORS]


def replayed(path: Path) -> tuple[list, str | None]:
    """Our spans for the capture, through the CLI's code path; a refusal or crash is a reason, not an end."""
    pipeline = SpanPipeline(host="pcap")
    stats = replay.ReplayStats()
    spans: list = []
    try:
        batch = []
        for rec in replay.records(path, stats):
            batch.append(rec)
            if len(batch) >= 4096:
                spans += pipeline.push(batch)
                batch = []
        spans += pipeline.push(batch) + pipeline.close_all(0)
    except DeepTraceError as e:
        return spans + pipeline.close_all(0), f"replay refused: {e}"
    except Exception as e:  # noqa: BLE001  (a bug of ours: shown, counted, and the run goes on)
        where = traceback.extract_tb(e.__traceback__)[-1]
        return spans, f"replay crashed: {type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})"
    return spans, None


def folder_hint(path: Path, top: Path) -> str | None:
    for part in reversed(path.relative_to(top).parts[:-1]):
        if part.lower() in tshark.FOLDER_HINTS:
            return tshark.FOLDER_HINTS[part.lower()]
    stem = path.name.split(".")[0].lower()
    return tshark.FOLDER_HINTS.get(stem)


def decode_as(frames: tshark.Frames, hint: str | None, spans: list, measured: list[str]) -> dict:
    """(l4, port) -> (protocol, why) for ports tshark left undecoded that a hint names."""
    undecoded = frames.undecoded()
    chosen = {}
    for l4, port in undecoded:
        for proto, ports in tshark.DEFAULT_PORTS.items():
            if port in ports and proto in measured:
                chosen[(l4, port)] = (proto, "port")
        if hint in measured and (l4, port) not in chosen and (l4 == "tcp" or hint == "dns"):
            chosen[(l4, port)] = (hint, "folder")
    for span in spans:
        # Spans do not say their transport: only DNS of ours runs on UDP.
        port = tshark.server_of(span)[1]
        key = ("udp" if span.protocol == "dns" and ("udp", port) in undecoded else "tcp", port)
        if key in undecoded and key not in chosen and span.protocol in measured:
            chosen[key] = (span.protocol, "ours")
    return chosen


def match(expected: list[tshark.Exchange], spans: list, tol_ns: int) -> None:
    """Each exchange takes the nearest unused span of its protocol on its connection, in time order."""
    by_conn: dict[frozenset, list] = defaultdict(list)
    for s in spans:
        by_conn[tshark.conn_of(s)].append(s)
    used: set[int] = set()
    for ex in expected:
        near = [
            s for s in by_conn.get(ex.conn, ()) if ex.first_ns - tol_ns <= s.start_ns <= ex.last_ns + tol_ns
        ]
        ours = [s for s in near if s.protocol == ex.protocol and id(s) not in used]
        if ours:
            ex.match = min(ours, key=lambda s: abs(s.start_ns - ex.first_ns))
            used.add(id(ex.match))
        else:
            around = sorted(by_conn.get(ex.conn, ()), key=lambda s: abs(s.start_ns - ex.first_ns))
            ex.candidates = around[:2]


def named_right(ex: tshark.Exchange, span) -> bool:
    """Every token tshark gives is in our name (a tuple token: any of its forms). HTTP paths are
    compared segment by segment, where ours may put {id} for a segment (its normalisation)."""
    name = span.name.lower()
    if ex.protocol == "http" and len(ex.tokens) == 2:
        method, path = ex.tokens
        ours = name.split(" ", 1)
        return ours[0] == method.lower() and len(ours) == 2 and _path_fits(ours[1], path.lower())
    return all(any(t and t.lower() in name for t in (tok if isinstance(tok, tuple) else (tok,)))
               for tok in ex.tokens if tok)  # fmt: skip


def _path_fits(ours: str, path: str) -> bool:
    pattern = "".join("[^/]*" if part == "{id}" else re.escape(part) for part in re.split(r"(\{id\})", ours))
    return re.fullmatch(pattern, path) is not None


def judged(ex: tshark.Exchange) -> bool:
    """tshark saw the answer (or none is due): only then is our status compared with it."""
    return ex.resp_frame is not None or ex.one_way


def status_right(ex: tshark.Exchange, span) -> bool:
    if ex.one_way and ex.resp_frame is None:
        return span.status != "error"
    if bool(ex.error) != (span.status == "error"):
        return False
    if ex.protocol == "http" and ex.status and ex.status.isdigit():
        return span.status_code == ex.status
    return True


def measure(path: Path, top: Path, measured: list[str], tol_ns: int) -> dict:
    spans, refused = replayed(path)
    result = {"file": str(path.relative_to(top)), "refused": refused, "exchanges": [], "spans": spans,
              "decode_as": {}, "tshark_error": None}  # fmt: skip
    try:
        frames = tshark.frames(path)
        frames.resolve_servers(spans)
        chosen = decode_as(frames, folder_hint(path, top), spans, measured)
        result["decode_as"] = chosen
        root = tshark.pdml(path, {k: v[0] for k, v in chosen.items()}, measured)
        result["exchanges"] = tshark.exchanges(root, frames.times, measured, frames.servers)
    except Exception as e:  # noqa: BLE001  (tshark could not read it, or printed what we cannot parse)
        result["tshark_error"] = f"{type(e).__name__}: {e}"
        return result
    match(result["exchanges"], spans, tol_ns)
    return result


# ---- report ----


def tally(results: list[dict], measured: list[str]) -> dict[str, Counter]:
    table = {p: Counter() for p in measured}
    for r in results:
        seen = set()
        for ex in r["exchanges"]:
            row = table[ex.protocol]
            seen.add(ex.protocol)
            row["expected"] += 1
            row["answered"] += ex.resp_frame is not None or ex.one_way
            if ex.match is not None:
                row["matched"] += 1
                row["named"] += named_right(ex, ex.match)
                row["judged"] += judged(ex)
                row["status"] += judged(ex) and status_right(ex, ex.match)
        taken = {id(ex.match) for ex in r["exchanges"] if ex.match is not None}
        for s in r["spans"]:
            if s.protocol in table and id(s) not in taken:
                table[s.protocol]["extra"] += 1
                seen.add(s.protocol)
        for p in seen:
            table[p]["files"] += 1
    return table


def describe_span(span, ex: tshark.Exchange | None = None) -> str:
    at = f" at {(span.start_ns - ex.first_ns) / 1e6:+.3f} ms" if ex is not None else ""
    code = f" {span.status_code}" if span.status_code else ""
    return f"{span.protocol} {span.name[:60]!r} {span.status}{code}{at}"


def describe_expected(ex: tshark.Exchange) -> str:
    if ex.one_way:
        answer = "one-way"
    elif ex.resp_frame is None:
        answer = "no response seen"
    else:
        answer = (
            f"{'error' if ex.error else 'ok'}{' ' + ex.status if ex.status else ''} (frame {ex.resp_frame})"
        )
    return f"frame {ex.frame} {ex.protocol} {ex.name[:70]!r} -> {answer}"


def miss_lines(r: dict) -> list[str]:
    lines = []
    for ex in r["exchanges"]:
        span = ex.match
        if span is None:
            ends = " - ".join(f"{a}:{p}" for a, p in sorted(ex.conn))
            got = "; ".join(describe_span(s, ex) for s in ex.candidates) or f"no span on {ends}"
            lines.append(f"  MISS   {describe_expected(ex)}: ours: {got}")
        elif not named_right(ex, span) or (judged(ex) and not status_right(ex, span)):
            what = "NAME  " if not named_right(ex, span) else "STATUS"
            lines.append(f"  {what} {describe_expected(ex)}: ours: {describe_span(span)}")
    return lines


def print_report(results: list[dict], measured: list[str], unmeasured: list[str], max_misses: int) -> dict:
    table = tally(results, measured)
    print(f"{'protocol':12}" + "".join(f"{c:>12}" for c in COLUMNS))
    for p in measured:
        row = table[p]
        if not row["files"]:
            print(f"{p:12}{'no capture of it here':>48}")
            continue
        cells = [str(row["files"]), str(row["expected"]), str(row["answered"])]
        cells += [
            str(row["matched"]),
            str(row["named"]),
            f"{row['status']}/{row['judged']}",
            str(row["extra"]),
        ]
        print(f"{p:12}" + "".join(f"{c:>12}" for c in cells))
    total = sum((table[p] for p in measured), Counter())
    status = f"{total['status']}/{total['judged']}"
    print(f"{'all':12}{'':>12}{total['expected']:>12}{total['answered']:>12}{total['matched']:>12}"
          f"{total['named']:>12}{status:>12}{total['extra']:>12}")  # fmt: skip
    if unmeasured:
        print(f"not measured (tshark has no dissector for them): {', '.join(unmeasured)}")
    print()
    for r in results:
        notes = [r[k] for k in ("refused", "tshark_error") if r[k]]
        ours = sorted(
            f"{l4}/{port} as {p}" for (l4, port), (p, why) in r["decode_as"].items() if why == "ours"
        )
        if ours:
            notes.append("decode-as from our detection: " + ", ".join(ours))
        lines = miss_lines(r)
        if not lines and not r["refused"] and not r["tshark_error"]:
            continue
        n = len(r["exchanges"])
        print(f"{r['file']}: {sum(ex.match is not None for ex in r['exchanges'])}/{n} matched"
              + "".join(f"; {note}" for note in notes))  # fmt: skip
        shown = lines if max_misses <= 0 else lines[:max_misses]
        print("\n".join(shown) if shown else "", end="\n" if shown else "")
        if len(shown) < len(lines):
            print(f"  ... {len(lines) - len(shown)} more")
    return {
        "protocols": {p: {c: table[p][c] for c in (*COLUMNS, "judged")} for p in measured},
        "unmeasured": unmeasured,
        "files": len(results),
        "refused": {r["file"]: r["refused"] for r in results if r["refused"]},
        "tshark_errors": {r["file"]: r["tshark_error"] for r in results if r["tshark_error"]},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path, help="a directory tree of captures (see extract.py)")
    ap.add_argument("--protocol", help="only these protocols (comma-separated registry names)")
    ap.add_argument("--tolerance-ms", type=float, default=1.0, help="how far a span may start off (1 ms)")
    ap.add_argument("--misses", type=int, default=8, help="miss lines per file (0: all)")
    args = ap.parse_args()
    measured, unmeasured = our_protocols(args.protocol)
    files = sorted(p for p in args.dir.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES))
    if not files:
        print(f"no captures under {args.dir} (see bench/captures/extract.py)", file=sys.stderr)
        return 2
    tol_ns = int(args.tolerance_ms * 1_000_000)
    results = []
    for i, path in enumerate(files, 1):  # one at a time: tshark runs stay sequential
        if sys.stderr.isatty():
            print(
                f"\r[{i}/{len(files)}] {path.relative_to(args.dir)}"[:100].ljust(100), end="", file=sys.stderr
            )
        results.append(measure(path, args.dir, measured, tol_ns))
    if sys.stderr.isatty():
        print("\r".ljust(101), file=sys.stderr)
    summary = print_report(results, measured, unmeasured, args.misses)
    summary["tolerance_ms"] = args.tolerance_ms
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
