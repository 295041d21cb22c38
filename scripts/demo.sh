#!/usr/bin/env bash
# The one-command demo (`make demo`): a small shop of real services (nginx, aiohttp, Flask on
# gunicorn, FastAPI on uvicorn, PostgreSQL, Redis) under steady traffic, traced by a DeepTrace
# agent that ships to a DeepTrace server; open the UI address it prints. Runs until Ctrl-C.
# Options go to demo/launch.py, e.g. `scripts/demo.sh --seconds 60 --rate 50`. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m demo.launch "$@"
