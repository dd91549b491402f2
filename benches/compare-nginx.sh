#!/usr/bin/env bash
# Side-by-side load comparison: zapsign-proxy against nginx doing the same job (inject an
# `Authorization: Bearer` header, keep upstream connections alive), each limited to one worker, in front of the
# same nginx upstream answering 300 bytes of JSON. Three pairs (PAIRS):
#   tuned     zapsign-proxy in static mode at log level `warn`, nginx with `access_log off`;
#   defaults  zapsign-proxy as users run it: JWT mode (logged in against the bundled mock, `zapsign-proxy
#             mock-upstream`), `info` logs (one access line per request) to a file; nginx with its default
#             `access_log ... combined` to a file. After the runs the proxy is stopped (SIGTERM) and its access
#             lines are checked against its `zapsign_proxy_requests_total`;
#   close     one request per caller connection (wrk sends `Connection: close`) through an upstream serving TLS
#             (a test CA made here; both proxies verify the upstream with it); otherwise as `tuned`.
# Every zapsign-proxy runs with pacing off (`ZAPSIGN_PROXY_PACING_LIMIT=0`): the account limit it defaults to
# would throttle any load test. wrk (1 thread) drives each proxy of a pair in turn, A B A B, at 50 and 256
# connections, RUNS times each; the summary gives medians and zapsign-proxy/nginx ratios for req/s, p50 and p99
# latency, CPU time per request (from /proc) and RSS after the run. nginx counts as its master plus its worker
# (both run to proxy); zapsign-proxy is one process (its log writer thread included).
#
# Usage: benches/compare-nginx.sh            (DURATION=10 RUNS=3 CONNS="50 256" PAIRS="tuned defaults close")
# Installs nginx and wrk from Debian's packages when missing. Only 127.0.0.1; stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
RUNS=${RUNS:-3}
CONNS=${CONNS:-"50 256"}
PAIRS=${PAIRS:-"tuned defaults close"}
BASE_PORT=${BASE_PORT:-18081}
UPSTREAM_PORT=$BASE_PORT             # plain HTTP upstream
UPSTREAM_TLS_PORT=$((BASE_PORT + 1)) # the same upstream over TLS
MOCK_PORT=$((BASE_PORT + 2))         # the bundled mock: logins for the defaults pair
declare -A NGINX_PORT=([tuned]=$((BASE_PORT + 3)) [defaults]=$((BASE_PORT + 4)) [close]=$((BASE_PORT + 5)))
declare -A PROXY_PORT=([tuned]=$((BASE_PORT + 6)) [defaults]=$((BASE_PORT + 7)) [close]=$((BASE_PORT + 8)))
DEFAULTS_ADMIN_PORT=$((BASE_PORT + 9))

need() { command -v "$1" >/dev/null 2>&1 || { echo "installing $2"; apt-get install -y -q "$2" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "$2" >/dev/null; }; }; }
need wrk wrk
[ -x /usr/sbin/nginx ] || need nginx nginx-light
NGINX=/usr/sbin/nginx

[ -n "${PROXY_BIN:-}" ] || { echo "building zapsign-proxy (release)"; cargo build --release --quiet --bin zapsign-proxy; }
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

# A test CA and a certificate for 127.0.0.1 signed by it: the TLS upstream of the close pair.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=bench-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
  -keyout "$WORK/upstream.key" -out "$WORK/upstream.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$WORK/ext.cnf"
openssl x509 -req -in "$WORK/upstream.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial -days 2 \
  -extfile "$WORK/ext.cnf" -out "$WORK/upstream.pem" 2>/dev/null

write_nginx_conf upstream "$UPSTREAM_PORT" "server { listen 127.0.0.1:$UPSTREAM_PORT; location / { default_type application/json; return 200 '$BODY'; } }
  server { listen 127.0.0.1:$UPSTREAM_TLS_PORT ssl; ssl_certificate $WORK/upstream.pem; ssl_certificate_key $WORK/upstream.key;
    location / { default_type application/json; return 200 '$BODY'; } }"
PROXY_LOCATION="proxy_http_version 1.1; proxy_set_header Connection \"\";
    proxy_set_header Authorization \"Bearer $TOKEN\"; proxy_buffering on;"
write_nginx_conf tuned "${NGINX_PORT[tuned]}" "upstream zapsign { server 127.0.0.1:$UPSTREAM_PORT; keepalive 512; }
  server { listen 127.0.0.1:${NGINX_PORT[tuned]}; location / { proxy_pass http://zapsign; $PROXY_LOCATION } }"
write_nginx_conf defaults "${NGINX_PORT[defaults]}" "upstream zapsign { server 127.0.0.1:$UPSTREAM_PORT; keepalive 512; }
  server { listen 127.0.0.1:${NGINX_PORT[defaults]}; access_log $WORK/defaults/access.log combined;
    location / { proxy_pass http://zapsign; $PROXY_LOCATION } }"
write_nginx_conf close "${NGINX_PORT[close]}" "upstream zapsign { server 127.0.0.1:$UPSTREAM_TLS_PORT; keepalive 512; }
  server { listen 127.0.0.1:${NGINX_PORT[close]}; location / { proxy_pass https://zapsign; $PROXY_LOCATION
    proxy_ssl_verify on; proxy_ssl_trusted_certificate $WORK/ca.pem; proxy_ssl_name localhost; proxy_ssl_session_reuse on; } }"

$NGINX -c "$WORK/upstream/nginx.conf" & PIDS+=($!)
declare -A NGINX_MASTER NGINX_WORKER PROXY_PID
for pair in $PAIRS; do
  $NGINX -c "$WORK/$pair/nginx.conf" & NGINX_MASTER[$pair]=$!; PIDS+=($!)
done

# The tuned and close configurations; the defaults pair gets its own below.
static_conf() { # port, upstream url, extra
  cat <<CONF
[server]
listen = "127.0.0.1:$1"
workers = 1
[admin]
listen = ""
[upstream]
url = "$2"
$3
[auth]
mode = "static"
api_token = "$TOKEN"
[access]
allow_paths = ["/"]
[log]
level = "warn"
CONF
}
static_conf "${PROXY_PORT[tuned]}" "http://127.0.0.1:$UPSTREAM_PORT" "" > "$WORK/tuned.toml"
# As many idle upstream connections kept as nginx's `keepalive 512`: one-request callers at 256 at once would
# otherwise open (and TLS-handshake) a fresh upstream connection whenever more than the default 32 are idle.
static_conf "${PROXY_PORT[close]}" "https://127.0.0.1:$UPSTREAM_TLS_PORT" "ca_file = \"$WORK/ca.pem\"
max_idle_connections = 512" > "$WORK/close.toml"
# Defaults: nothing about logs or auth mode set, only where to listen, the upstream and the login endpoint.
cat > "$WORK/defaults.toml" <<CONF
[server]
listen = "127.0.0.1:${PROXY_PORT[defaults]}"
workers = 1
[admin]
listen = "127.0.0.1:$DEFAULTS_ADMIN_PORT"
[upstream]
url = "http://127.0.0.1:$UPSTREAM_PORT"
[auth]
url = "http://127.0.0.1:$MOCK_PORT"
organization_id = "1234"
username = "demo@example.com"
password = "demo-password"
[access]
allow_paths = ["/"]
CONF

if [[ " $PAIRS " == *" defaults "* ]]; then
  $PROXY_BIN mock-upstream --listen "127.0.0.1:$MOCK_PORT" >/dev/null 2>"$WORK/mock.log" & PIDS+=($!)
fi
for pair in $PAIRS; do
  env -u RUST_LOG ZAPSIGN_PROXY_WORKERS=1 ZAPSIGN_PROXY_PACING_LIMIT=0 \
    $PROXY_BIN --config "$WORK/$pair.toml" 2>"$WORK/$pair.log" & PROXY_PID[$pair]=$!; PIDS+=($!)
done

wait_port() { for _ in $(seq 1 100); do curl -s -o /dev/null "http://127.0.0.1:$1/api/v1/docs/" && return 0; sleep 0.1; done; echo "port $1 never answered"; exit 1; }
wait_ready() { for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$1/readyz" && return 0; sleep 0.1; done; echo "admin $1 never ready"; exit 1; }
wait_port "$UPSTREAM_PORT"
for pair in $PAIRS; do
  wait_port "${NGINX_PORT[$pair]}"; wait_port "${PROXY_PORT[$pair]}"
  [ "$pair" != defaults ] || wait_ready "$DEFAULTS_ADMIN_PORT"
  NGINX_WORKER[$pair]=$(pgrep -P "${NGINX_MASTER[$pair]}" | head -1)
  curl -s "http://127.0.0.1:${PROXY_PORT[$pair]}/api/v1/docs/" | head -c 60; echo " <- zapsign-proxy ($pair) answers"
  curl -s "http://127.0.0.1:${NGINX_PORT[$pair]}/api/v1/docs/" | head -c 60; echo " <- nginx ($pair) answers"
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }  # utime + stime, in clock ticks
rss_kib() { local t=0; for p in "$@"; do t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo $t; }

RESULTS="$WORK/results.tsv"
echo -e "pair\ttarget\tconns\trun\treqs\trps\tp50_ms\tp99_ms\tcpu_us_per_req\trss_kib" > "$RESULTS"
run_one() { # pair name port conns run pids...
  local pair=$1 name=$2 port=$3 conns=$4 run=$5; shift 5
  local before=0 after=0 p
  local extra=()
  [ "$pair" != close ] || extra=(-H "Connection: close")
  for p in "$@"; do before=$((before + $(ticks "$p"))); done
  wrk -t1 -c"$conns" -d"${DURATION}s" --latency "${extra[@]}" "http://127.0.0.1:$port/api/v1/docs/" > "$WORK/wrk.out"
  for p in "$@"; do after=$((after + $(ticks "$p"))); done
  sleep 0.5  # RSS "after the run": once the connections wrk opened are closed, for every target alike
  python3 - "$WORK/wrk.out" "$pair" "$name" "$conns" "$run" "$((after - before))" "$(getconf CLK_TCK)" "$(rss_kib "$@")" >> "$RESULTS" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
pair, name, conns, run, ticks, hz, rss = sys.argv[2:9]
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s|m|h)$", v)
    if not m:  # wrk's "-nan" and the like: say so, and keep the run
        print(f"{pair} {name}: unreadable latency {v!r} in:\n{text}", file=sys.stderr)
        return float("nan")
    n, unit = m.groups()
    return float(n) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}[unit]
reqs = int(re.search(r"(\d+) requests in", text).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
# Anchored: an unanchored "50%" also matches inside wrk's "+/- Stdev" column (e.g. "68.50%").
p50 = ms(re.search(r"^\s+50%\s+(\S+)", text, re.M).group(1))
p99 = ms(re.search(r"^\s+99%\s+(\S+)", text, re.M).group(1))
for what in ("Non-2xx or 3xx responses", "Socket errors"):
    m = re.search(what + r": (.*)", text)
    if m:
        print(f"{pair} {name}: {what}: {m.group(1)}", file=sys.stderr)
cpu_us = int(ticks) / int(hz) * 1e6 / max(reqs, 1)
print(f"{pair}\t{name}\t{conns}\t{run}\t{reqs}\t{rps:.0f}\t{p50:.3f}\t{p99:.3f}\t{cpu_us:.2f}\t{rss}")
PY
  tail -1 "$RESULTS"
}

requests_total() { curl -s "http://127.0.0.1:$DEFAULTS_ADMIN_PORT/metrics" | awk '/^zapsign_proxy_requests_total\{/ {n += $2} END {print n + 0}'; }

for pair in $PAIRS; do
  extra=()
  [ "$pair" != close ] || extra=(-H "Connection: close")
  for conns in $CONNS; do
    # Warm both (pools filled, caches hot) before measuring.
    wrk -t1 -c"$conns" -d2s "${extra[@]}" "http://127.0.0.1:${NGINX_PORT[$pair]}/api/v1/docs/" >/dev/null
    wrk -t1 -c"$conns" -d2s "${extra[@]}" "http://127.0.0.1:${PROXY_PORT[$pair]}/api/v1/docs/" >/dev/null
    for run in $(seq 1 "$RUNS"); do
      run_one "$pair" nginx "${NGINX_PORT[$pair]}" "$conns" "$run" "${NGINX_MASTER[$pair]}" "${NGINX_WORKER[$pair]}"
      run_one "$pair" zapsign-proxy "${PROXY_PORT[$pair]}" "$conns" "$run" "${PROXY_PID[$pair]}"
    done
  done
  if [ "$pair" = defaults ]; then
    # Every request the proxy counted has its access line, also the ones still queued at SIGTERM.
    counted=$(requests_total)
    dropped=$(curl -s "http://127.0.0.1:$DEFAULTS_ADMIN_PORT/metrics" | awk '/^zapsign_proxy_log_lines_dropped_total / {print $2}')
    kill -TERM "${PROXY_PID[defaults]}"; wait "${PROXY_PID[defaults]}" || true
    lines=$(grep -c ' served ' "$WORK/defaults.log" || true)
    echo "defaults: requests_total $counted, access lines $lines, dropped ${dropped:-?}, log $(du -h "$WORK/defaults.log" | cut -f1), nginx access.log $(du -h "$WORK/defaults/access.log" | cut -f1)"
    [ "$lines" = "$counted" ] || echo "defaults: ACCESS LINES LOST: $lines lines for $counted requests" >&2
  fi
done

python3 - "$RESULTS" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
pairs = list(dict.fromkeys(r["pair"] for r in rows))
conns_of = lambda p: sorted({r["conns"] for r in rows if r["pair"] == p}, key=int)
print()
print("| pair | conns | target | req/s | p50 ms | p99 ms | CPU µs/req | RSS MiB after |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
med = {}
for pair in pairs:
    for conns in conns_of(pair):
        for target in ("nginx", "zapsign-proxy"):
            sel = [r for r in rows if r["pair"] == pair and r["conns"] == conns and r["target"] == target]
            m = {k: statistics.median(float(r[k]) for r in sel) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req")}
            m["rss"] = float(sel[-1]["rss_kib"]) / 1024
            med[(pair, conns, target)] = m
            print(f"| {pair} | {conns} | {target} | {m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | {m['cpu_us_per_req']:.2f} | {m['rss']:.1f} |")
print()
print("| pair | conns | req/s ratio (≥1 better) | p99 ratio (≤1 better) | CPU/req ratio (≤1 better) | RSS ratio (≤1 better) |")
print("| --- | --- | --- | --- | --- | --- |")
for pair in pairs:
    for conns in conns_of(pair):
        z, n = med[(pair, conns, "zapsign-proxy")], med[(pair, conns, "nginx")]
        print(f"| {pair} | {conns} | {z['rps']/n['rps']:.2f} | {z['p99_ms']/n['p99_ms']:.2f} | {z['cpu_us_per_req']/n['cpu_us_per_req']:.2f} | {z['rss']/n['rss']:.2f} |")
PY
