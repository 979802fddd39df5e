#!/usr/bin/env bash
# Runs one test binary against a throwaway Redis Cluster of three masters on free loopback ports
# (client and bus ports both picked free, so nothing else on the machine is touched). The test
# gets the client ports in CLUSTER_PORTS, space-separated.
set -euo pipefail
dir=$(mktemp -d)
free_port() { /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
ports=()
for i in 0 1 2; do
  port=$(free_port)
  bus=$(free_port)
  mkdir "$dir/$i"
  redis-server --port "$port" --cluster-port "$bus" --bind 127.0.0.1 --cluster-enabled yes \
    --cluster-config-file "$dir/$i/nodes.conf" --dir "$dir/$i" --save '' --appendonly no \
    --daemonize no >"$dir/$i/redis.log" 2>&1 &
  pids+=($!)
  ports+=("$port")
done
for port in "${ports[@]}"; do
  for _ in $(seq 100); do
    redis-cli -p "$port" ping 2>/dev/null | grep -q PONG && break
    sleep 0.05
  done
done
redis-cli --cluster create "127.0.0.1:${ports[0]}" "127.0.0.1:${ports[1]}" \
  "127.0.0.1:${ports[2]}" --cluster-replicas 0 --cluster-yes >"$dir/create.log" 2>&1 ||
  { cat "$dir/create.log" >&2; exit 1; }
# Every node must agree the cluster is up before the test looks at any of them.
for port in "${ports[@]}"; do
  for _ in $(seq 200); do
    redis-cli -p "$port" cluster info 2>/dev/null | grep -q 'cluster_state:ok' && break
    sleep 0.05
  done
done
CLUSTER_PORTS="${ports[*]}" "$@"
