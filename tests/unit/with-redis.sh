#!/usr/bin/env bash
# Runs one test binary against a throwaway redis-server on a free loopback port.
set -euo pipefail
dir=$(mktemp -d)
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
dead_port=$(free_port)  # nothing listens there: for connection-refused tests
redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --appendonly yes --appendfsync always \
  --save '' --daemonize no --unixsocket "$dir/redis.sock" --requirepass test-password \
  >"$dir/redis.log" 2>&1 &
pid=$!
trap 'kill -CONT $pid 2>/dev/null; kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  redis-cli -p "$port" -a test-password --no-auth-warning ping 2>/dev/null | grep -q PONG && break
  sleep 0.05
done
REDIS_PORT=$port REDIS_DEAD_PORT=$dead_port REDIS_SOCKET=$dir/redis.sock REDIS_PASSWORD=test-password \
  REDIS_PID=$pid "$@"
