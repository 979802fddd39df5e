#!/usr/bin/env bash
# Runs one test binary against a throwaway Redis Cluster of three masters on free loopback ports
# (client and bus ports both picked free, so nothing else on the machine is touched). The test
# gets the client ports in CLUSTER_PORTS, space-separated.
set -euo pipefail
dir=$(mktemp -d)
ports_py=$(dirname "$0")/../e2e/ports.py
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$dir"
  /usr/bin/python3 "$ports_py" release $$
}
trap cleanup EXIT
ports=()
read -r -a free < <(/usr/bin/python3 "$ports_py" reserve $$ 6)
for i in 0 1 2; do
  port=${free[$((2 * i))]}
  bus=${free[$((2 * i + 1))]}
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
