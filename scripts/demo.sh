#!/usr/bin/env bash
# The quick-start demo: start nginx on a free loopback port, trace it by the
# master's pid, send it a few curl requests, and show what the kernel saw
# (`deeptrace record`) and the spans the agent made of it (`deeptrace agent`).
# Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
DEEPTRACE=.venv/bin/deeptrace
work=$(mktemp -d /tmp/deeptrace-demo.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

cat > "$work/nginx.conf" <<CONF
daemon off;
worker_processes 2;
pid $work/nginx.pid;
error_log $work/error.log;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $work;
    proxy_temp_path $work;
    fastcgi_temp_path $work;
    uwsgi_temp_path $work;
    scgi_temp_path $work;
    server {
        listen 127.0.0.1:$port;
        location /users/ { default_type application/json; return 200 '{"id": 42, "name": "alice"}\n'; }
        location / { return 404; }
    }
}
CONF

nginx -c "$work/nginx.conf" -e "$work/error.log" &
nginx_pid=$!
cleanup() { kill "$nginx_pid" 2>/dev/null || true; wait "$nginx_pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done

echo "== nginx (pid $nginx_pid) on 127.0.0.1:$port"
# 1. The raw view: one record per socket syscall. 2. The agent: one span per request/response.
for mode in "record --format text" "agent --format text"; do
	echo "== deeptrace $mode --pid $nginx_pid --duration 4"
	rm -f "$work/run.err"
	"$DEEPTRACE" $mode --pid "$nginx_pid" --duration 4 --out - 2> >(tee "$work/run.err" >&2) &
	run=$!
	# Loading and verifying the programs takes a moment: send traffic once it says it is tracing.
	for _ in $(seq 300); do grep -q tracing "$work/run.err" 2>/dev/null && break; sleep 0.05; done
	curl -s -o /dev/null "http://127.0.0.1:$port/users/42"
	curl -s -o /dev/null -H 'X-Request-ID: demo-1' "http://127.0.0.1:$port/users/7"
	curl -s -o /dev/null "http://127.0.0.1:$port/missing"
	wait "$run"
done
echo "== JSON lines are the default: $DEEPTRACE agent --pid $nginx_pid --out -"
