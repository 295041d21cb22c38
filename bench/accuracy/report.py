"""The results as a Markdown report (printed, and written for docs/benchmarks.md) and as JSON."""

from __future__ import annotations

import json
from pathlib import Path

OURS = "joint"
BASELINES = ("fifo", "wap5", "vpath", "txn")
TARGET_TRACE_ACCURACY = 0.95
TARGET_SECONDS_1M = 60
TARGET_CALIBRATION = 0.05
LEVELS_NOTE = (
    "Load levels (open-loop Poisson arrivals; in-flight: gateway requests sent and not yet answered, as the "
    "load driver saw them; CPU: cores busy while the load ran):"
)
ASSOCIATION_NOTE = (
    "Association with `header_ids=False` (pair accuracy over spans with known truth; calls: a CLIENT span to "
    "the request that made it; trace: a request's whole tree exactly right; ECE and max gap in points, max "
    "gap over bins of >= 50 links):"
)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(header))) + "|",
    ]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def targets(results: dict) -> list[tuple[str, bool | None, str]]:
    """(target, met?, the figures that decide it) for one workload; None when this run cannot tell."""
    levels = results["levels"]
    out = []
    if levels and all(OURS in lv["algorithms"] for lv in levels):
        top = levels[-1]
        acc = top["algorithms"][OURS]["trace_accuracy"]
        out.append((f"end-to-end trace accuracy >= {TARGET_TRACE_ACCURACY:.0%} at the highest load ({OURS})",
                    acc is not None and acc >= TARGET_TRACE_ACCURACY, f"{_pct(acc)}% at {top['target_rps']} req/s"))  # fmt: skip
        behind = [
            f"{b} at {lv['target_rps']} req/s"
            for lv in levels
            for b in BASELINES
            if b in lv["algorithms"]
            and (lv["algorithms"][b]["trace_accuracy"] or 0)
            >= (lv["algorithms"][OURS]["trace_accuracy"] or 0)
        ]
        out.append((f"{OURS} ahead of every baseline at every load (trace accuracy)", not behind,
                    "not ahead of " + ", ".join(behind) if behind else "ahead everywhere"))  # fmt: skip
        worst = max(max(lv["algorithms"][OURS]["calibration_all"]["ece"] or 0,
                        lv["algorithms"][OURS]["calibration_calls"]["ece"] or 0) for lv in levels)  # fmt: skip
        out.append((f"confidence calibrated within {TARGET_CALIBRATION * 100:.0f} points (ECE, all links and calls)",
                    worst <= TARGET_CALIBRATION, f"worst ECE {_pct(worst)} points"))  # fmt: skip
    if scale := results.get("scale"):
        s = scale["seconds_per_1m"]
        out.append((f"1M spans associated in under {TARGET_SECONDS_1M} s on one core", s < TARGET_SECONDS_1M,
                    f"{s} s per 1M ({scale['spans']} spans in {scale['seconds']} s)"))  # fmt: skip
    return out


def _levels(results: dict) -> list[str]:
    rows = []
    for lv in results["levels"]:
        load, cov, cpu = lv["load"], lv["coverage"], lv["cpu_cores"]
        rows.append([
            lv["target_rps"], load["achieved_rps"], load["errors"],
            f"{load['inflight_mean']} / {load['inflight_peak']}", f"{load['p50_ms']} / {load['p99_ms']}",
            f"{sum(cpu.values()) - cpu['agent']:.2f} / {cpu['agent']:.2f}", cov["spans"],
            f"{_pct(cov['records_mapped'] / max(1, cov['records']))}%",
            f"{_pct(cov['spans_with_truth'] / max(1, cov['spans']))}%",
            f"{cov['complete_traces']} / {cov['requests']}", cov["ambiguous_records"],
            f"{cov['payload_agrees']} / {cov['payload_checked']}",
        ])  # fmt: skip
    header = ["req/s target", "achieved", "errors", "in-flight mean / peak", "p50 / p99 ms",
              "CPU cores: services / agent", "spans", "truth records on a span", "spans with truth",
              "complete traces", "ambiguous records", "payload check"]  # fmt: skip
    return _table(header, rows)


def _association(results: dict) -> list[str]:
    rows = []
    for lv in results["levels"]:
        for name, r in lv["algorithms"].items():
            pa, ca, cc = r["pair_accuracy"], r["calibration_all"], r["calibration_calls"]
            rows.append([
                lv["target_rps"], f"**{name}**" if name == OURS else name, _pct(pa["all"]), _pct(pa["calls"]),
                _pct(r["trace_accuracy"]), _pct(ca["ece"]), _pct(cc["ece"]), _pct(cc["max_gap"]),
                r["seconds_per_10k"],
            ])  # fmt: skip
    header = ["req/s", "algorithm", "pair % (all)", "pair % (calls)", "trace %", "ECE all", "ECE calls",
              "max gap calls", "s per 10k spans"]  # fmt: skip
    return _table(header, rows)


def _scale(scale: dict) -> str:
    return (
        f"Scale: {scale['spans']:,} spans ({scale['copies']} time-shifted copies of {scale['level']}) linked by "
        f"`{scale['algorithm']}` on one core in {scale['seconds']} s: {scale['spans_per_s']:,} spans/s, "
        f"{scale['seconds_per_1m']} s per 1M spans, peak RSS {scale['max_rss_mib']} MiB, "
        f"{scale['links_across_copies']} links across copies."
    )


def markdown(results: dict) -> str:
    return "\n".join(_workload(w) for w in results["workloads"])


def _workload(results: dict) -> str:
    lines = [f"### {results['name']}", "", f"Workload: {results['workload']}", ""]
    lines += [LEVELS_NOTE, ""]
    lines += _levels(results)
    lines += ["", ASSOCIATION_NOTE, ""]
    lines += _association(results)
    if scale := results.get("scale"):
        lines += ["", _scale(scale)]
    lines += ["", "Targets:", ""]
    lines += [f"- {name}: **{'met' if met else 'NOT met'}** ({why})" for name, met, why in targets(results)]
    return "\n".join(lines) + "\n"


def write(results: dict, out_dir: Path, md_copy: Path | None = None) -> str:
    text = markdown(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(text)
    if md_copy is not None:
        md_copy.write_text(text)
    return text
