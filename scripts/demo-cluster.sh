#!/usr/bin/env bash
# The two-host demo with two DeepTrace servers (`make demo-cluster`): a private clickhouse-server
# (a temp dir, free ports on 127.0.0.1) holds the one store; `deeptrace server` on
# 10.77.0.254:8700 and :8701 share it, hostA's agent ships to the first, hostB's to the second,
# and either UI shows every trace whole (demo/README.md). Options as scripts/demo.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m demo.launch --cluster "$@"
