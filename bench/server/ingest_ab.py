"""Ingest (parse, check, store durably) of two source trees side by side, on one core, and the
agent's own check of each span before it ships it (`check_span`).

Each tree's own bench/server/run.py times `bench_ingest_in_process` with its own code, in a
subprocess, alternating between the trees so that both see the same machine; the ratio is
what to read. For example, against the commit before a change:

    git worktree add /tmp/before HEAD~1
    .venv/bin/python bench/server/ingest_ab.py /tmp/before .
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ONE_RUN = """
import json, random, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, {bench!r})
import run
from synth import shop_spans
now = time.time_ns()
spans = shop_spans({traces}, now - 600 * 10**9, now, random.Random(3))
run.pin_to_one_core()
with tempfile.TemporaryDirectory() as t:
    result = run.bench_ingest_in_process(spans, Path(t))
try:
    from deeptrace.schema import check_span
except ImportError:  # before the schema module
    from deeptrace.server.ingest import check_span
t0 = time.process_time()
for d in spans:
    check_span(d)
result["check_us_per_span"] = round((time.process_time() - t0) / len(spans) * 1e6, 2)
print(json.dumps(result))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs=2, help="two checkouts: before, after")
    ap.add_argument("--spans", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rates: dict[str, list[int]] = {t: [] for t in args.trees}
    checks: dict[str, list[float]] = {t: [] for t in args.trees}
    for r in range(args.rounds):
        for tree in args.trees:
            code = ONE_RUN.format(bench=str(Path(tree).resolve() / "bench" / "server"), traces=args.spans // 4)
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            rates[tree].append(result["spans_per_cpu_s"])
            checks[tree].append(result["check_us_per_span"])
            print(f"round {r + 1}: {tree}: ingest {result['spans_per_cpu_s']:,} spans per CPU second, "
                  f"agent check {result['check_us_per_span']} us per span", file=sys.stderr)  # fmt: skip
    before, after = (statistics.median(rates[t]) for t in args.trees)
    check_before, check_after = (statistics.median(checks[t]) for t in args.trees)
    print(json.dumps({"spans": args.spans, "before": args.trees[0], "after": args.trees[1],
                      "ingest_before_spans_per_cpu_s": before, "ingest_after_spans_per_cpu_s": after,
                      "ingest_ratio": round(after / before, 3), "check_before_us_per_span": check_before,
                      "check_after_us_per_span": check_after}))  # fmt: skip


if __name__ == "__main__":
    main()
