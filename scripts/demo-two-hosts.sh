#!/usr/bin/env bash
# The demo on two "hosts" (`make demo-two-hosts`): network namespaces deeptrace-hostA (nginx,
# gateway; 10.77.0.1) and deeptrace-hostB (catalog, cart, checkout, PostgreSQL, Redis;
# 10.77.0.2) on a bridge whose root-namespace address (10.77.0.254) serves the DeepTrace
# server. An agent per namespace, each tracing that namespace's processes; traces cross both.
# The namespaces and the bridge are removed on exit (demo/netns.py). Options as scripts/demo.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m demo.launch --two-hosts "$@"
