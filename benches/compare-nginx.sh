#!/usr/bin/env bash
# Side-by-side load comparison: zapsign-proxy against nginx doing the same job (inject a 200-character
# `Authorization: Bearer` header, keep upstream connections alive), each limited to one worker, in front of the
# same nginx upstream answering 300 bytes of JSON. wrk (1 thread) drives each proxy in turn, A B A B, at 50 and
# 256 connections, RUNS times each; the summary gives medians and zapsign-proxy/nginx ratios for req/s, p50 and
# p99 latency, CPU time per request (from /proc) and RSS after the run. nginx counts as its master plus its
# worker (both run to proxy); zapsign-proxy is one process.
#
# Usage: benches/compare-nginx.sh            (DURATION=10 RUNS=3 CONNS="50 256" by default)
# Installs nginx and wrk from Debian's packages when missing. Only 127.0.0.1; stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
RUNS=${RUNS:-3}
CONNS=${CONNS:-"50 256"}
UPSTREAM_PORT=${UPSTREAM_PORT:-18081}
NGINX_PORT=${NGINX_PORT:-18082}
PROXY_PORT=${PROXY_PORT:-18083}

need() { command -v "$1" >/dev/null 2>&1 || { echo "installing $2"; apt-get install -y -q "$2" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "$2" >/dev/null; }; }; }
need wrk wrk
[ -x /usr/sbin/nginx ] || need nginx nginx-light
NGINX=/usr/sbin/nginx

echo "building zapsign-proxy (release)"
[ -n "${PROXY_BIN:-}" ] || cargo build --release --quiet --bin zapsign-proxy
PROXY_BIN=${PROXY_BIN:-target/release/zapsign-proxy}

WORK=$(mktemp -d /tmp/compare-nginx.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 0.3
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

TOKEN=$(printf 't%.0s' $(seq 1 200))
BODY=$(python3 -c 'import json; print(json.dumps({"open_id": 1, "token": "x" * 250}, separators=(",", ":"))[:300].ljust(300, " "))')

write_nginx_conf() { # name, listen port, server block
  mkdir -p "$WORK/$1"
  cat > "$WORK/$1/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/$1/nginx.pid;
error_log $WORK/$1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/$1/body;
  proxy_temp_path $WORK/$1/proxy;
  fastcgi_temp_path $WORK/$1/fastcgi;
  uwsgi_temp_path $WORK/$1/uwsgi;
  scgi_temp_path $WORK/$1/scgi;
  keepalive_requests 1000000;
  $3
}
CONF
}

write_nginx_conf upstream "$UPSTREAM_PORT" "server { listen 127.0.0.1:$UPSTREAM_PORT; location / { default_type application/json; return 200 '$BODY'; } }"
write_nginx_conf proxy "$NGINX_PORT" "upstream zapsign { server 127.0.0.1:$UPSTREAM_PORT; keepalive 512; }
  server { listen 127.0.0.1:$NGINX_PORT; location / {
    proxy_pass http://zapsign; proxy_http_version 1.1; proxy_set_header Connection \"\";
    proxy_set_header Authorization \"Bearer $TOKEN\"; proxy_buffering on; } }"

$NGINX -c "$WORK/upstream/nginx.conf" & PIDS+=($!)
$NGINX -c "$WORK/proxy/nginx.conf" & NGINX_MASTER=$!; PIDS+=($NGINX_MASTER)

cat > "$WORK/proxy.toml" <<CONF
[server]
listen = "127.0.0.1:$PROXY_PORT"
workers = 1
[admin]
listen = ""
[upstream]
url = "http://127.0.0.1:$UPSTREAM_PORT"
[auth]
mode = "static"
api_token = "$TOKEN"
[access]
allow_paths = ["/"]
[log]
level = "warn"
CONF
ZAPSIGN_PROXY_WORKERS=1 $PROXY_BIN --config "$WORK/proxy.toml" 2>"$WORK/proxy.log" & PROXY_PID=$!; PIDS+=($PROXY_PID)

wait_port() { for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$1/api/v1/docs/" && return 0; sleep 0.1; done; echo "port $1 never answered"; exit 1; }
wait_port "$UPSTREAM_PORT"; wait_port "$NGINX_PORT"; wait_port "$PROXY_PORT"
NGINX_WORKER=$(pgrep -P "$NGINX_MASTER" | head -1)
curl -s "http://127.0.0.1:$PROXY_PORT/api/v1/docs/" | head -c 60; echo " <- zapsign-proxy answers"

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime, in clock ticks
rss_kib() { local t=0; for p in "$@"; do t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo $t; }

RESULTS="$WORK/results.tsv"
echo -e "target\tconns\trun\treqs\trps\tp50_ms\tp99_ms\tcpu_us_per_req\trss_kib" > "$RESULTS"
run_one() { # name port conns run pids...
  local name=$1 port=$2 conns=$3 run=$4; shift 4
  local before=0 after=0 p
  for p in "$@"; do before=$((before + $(ticks "$p"))); done
  wrk -t1 -c"$conns" -d"${DURATION}s" --latency "http://127.0.0.1:$port/api/v1/docs/" > "$WORK/wrk.out"
  for p in "$@"; do after=$((after + $(ticks "$p"))); done
  sleep 0.5  # RSS "after the run": once the connections wrk opened are closed, for every target alike
  python3 - "$WORK/wrk.out" "$name" "$conns" "$run" "$((after - before))" "$(getconf CLK_TCK)" "$(rss_kib "$@")" >> "$RESULTS" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
name, conns, run, ticks, hz, rss = sys.argv[2:8]
def ms(v):
    n, unit = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
reqs = int(re.search(r"(\d+) requests in", text).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50 = ms(re.search(r"50%\s+(\S+)", text).group(1))
p99 = ms(re.search(r"99%\s+(\S+)", text).group(1))
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
if errors:
    print(f"{name}: {errors.group(1)} non-2xx responses", file=sys.stderr)
cpu_us = int(ticks) / int(hz) * 1e6 / max(reqs, 1)
print(f"{name}\t{conns}\t{run}\t{reqs}\t{rps:.0f}\t{p50:.3f}\t{p99:.3f}\t{cpu_us:.2f}\t{rss}")
PY
  tail -1 "$RESULTS"
}

for conns in $CONNS; do
  # Warm both (pools filled, caches hot) before measuring.
  wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$NGINX_PORT/api/v1/docs/" >/dev/null
  wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$PROXY_PORT/api/v1/docs/" >/dev/null
  for run in $(seq 1 "$RUNS"); do
    run_one nginx "$NGINX_PORT" "$conns" "$run" "$NGINX_MASTER" "$NGINX_WORKER"
    run_one zapsign-proxy "$PROXY_PORT" "$conns" "$run" "$PROXY_PID"
  done
done

python3 - "$RESULTS" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
print()
print("| conns | target | req/s | p50 ms | p99 ms | CPU µs/req | RSS MiB after |")
print("| --- | --- | --- | --- | --- | --- | --- |")
med = {}
for conns in sorted({r["conns"] for r in rows}, key=int):
    for target in ("nginx", "zapsign-proxy"):
        sel = [r for r in rows if r["conns"] == conns and r["target"] == target]
        m = {k: statistics.median(float(r[k]) for r in sel) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")}
        m["rss"] = float(sel[-1]["rss_kib"]) / 1024
        med[(conns, target)] = m
        print(f"| {conns} | {target} | {m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {m['cpu_us_per_req']:.2f} | {m['rss']:.1f} |")
print()
print("| conns | req/s ratio (≥1 better) | p99 ratio (≤1 better) | CPU/req ratio (≤1 better) | RSS ratio (≤1 better) |")
print("| --- | --- | --- | --- | --- |")
for conns in sorted({c for c, _ in med}, key=int):
    z, n = med[(conns, "zapsign-proxy")], med[(conns, "nginx")]
    print(f"| {conns} | {z['rps']/n['rps']:.2f} | {z['p99_ms']/n['p99_ms']:.2f} | {z['cpu_us_per_req']/n['cpu_us_per_req']:.2f} | {z['rss']/n['rss']:.2f} |")
PY
