#!/usr/bin/env bash
# Runs one test binary against a throwaway redis-server on a free loopback port.
set -euo pipefail
dir=$(mktemp -d)
ports_py=$(dirname "$0")/../e2e/ports.py
# dead_port: reserved but nothing listens there, for connection-refused tests
read -r port dead_port < <(/usr/bin/python3 "$ports_py" reserve $$ 2)
redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --appendonly yes --appendfsync always \
  --save '' --daemonize no --unixsocket "$dir/redis.sock" --requirepass test-password \
  >"$dir/redis.log" 2>&1 &
pid=$!
trap 'kill -CONT $pid 2>/dev/null; kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"
  /usr/bin/python3 "$ports_py" release $$' EXIT
for _ in $(seq 100); do
  redis-cli -p "$port" -a test-password --no-auth-warning ping 2>/dev/null | grep -q PONG && break
  sleep 0.05
done
REDIS_PORT=$port REDIS_DEAD_PORT=$dead_port REDIS_SOCKET=$dir/redis.sock REDIS_PASSWORD=test-password \
  REDIS_PID=$pid "$@"
