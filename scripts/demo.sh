#!/usr/bin/env bash
# The quick-start demo: start nginx on a free loopback port, trace it by the
# master's pid with `deeptrace record`, send it a few curl requests, and show
# what the kernel saw (readable lines, then the summary). Needs root.
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

echo "== nginx (pid $nginx_pid) on 127.0.0.1:$port; tracing it for 4 s"
"$DEEPTRACE" record --pid "$nginx_pid" --duration 4 --format text --out - 2> >(tee "$work/record.err" >&2) &
rec=$!
# Loading and verifying the programs takes a moment: send traffic once it says it is tracing.
for _ in $(seq 300); do grep -q tracing "$work/record.err" 2>/dev/null && break; sleep 0.05; done
curl -s -o /dev/null "http://127.0.0.1:$port/users/42"
curl -s -o /dev/null -H 'X-Request-ID: demo-1' "http://127.0.0.1:$port/users/7"
curl -s -o /dev/null "http://127.0.0.1:$port/missing"
wait "$rec"
echo "== JSON lines are the default: $DEEPTRACE record --pid $nginx_pid --duration 5 --out -"
