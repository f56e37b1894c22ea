# Shared by the measure-* scripts: run leaderlink (release build) with given flags and drive it
# with ghz. Source it; then call ghz_run LABEL CALLERS PARTITION_COUNT -- LEADERLINK_FLAGS...
# Results: /tmp/ghz-LABEL.json; a summary line is printed.
set -euo pipefail
GHZ_BIN="$(scripts/fetch-tools ghz)/ghz"
cargo build --locked --release --quiet --bin leaderlink
DURATION="${DURATION:-20}"
VALUE="$(head -c 256 /dev/zero | tr '\0' x | base64 -w0)"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

ghz_run() {
    local label=$1 callers=$2 partitions=$3
    shift 4
    local port admin
    port="$(free_port)"
    admin="$(free_port)"
    target/release/leaderlink serve --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --metrics-listen 127.0.0.1:0 "$@" \
        >"/tmp/leaderlink-$label.log" 2>&1 &
    local pid=$!
    sleep 2
    # Partition = request number modulo the partition count (ghz numbers requests from 0).
    "$GHZ_BIN" --insecure --call leaderlink.v1.Forwarder/Forward \
        -d '{"acks":"ACKS_LEADER","partitions":[{"topic":"bench","partition":"{{mod .RequestNumber '"$partitions"'}}","records":[{"value":"'"$VALUE"'"}]}]}' \
        -c "$callers" -z "${DURATION}s" --connections 1 --timeout 30s -O json "127.0.0.1:$port" \
        >"/tmp/ghz-$label.json"
    kill -TERM "$pid"
    wait "$pid" || true
    python3 - "/tmp/ghz-$label.json" "$label" "$DURATION" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
lat = {d["percentage"]: d["latency"] / 1e6 for d in (r["latencyDistribution"] or [])}
ok = r["statusCodeDistribution"].get("OK", 0)
# ghz cancels the calls still in flight when the duration ends; they are not counted.
print(f"{sys.argv[2]:>24}: {ok / float(sys.argv[3]):9.1f} calls/s  ok={ok}  "
      f"p50={lat.get(50, 0):.1f} ms  p99={lat.get(99, 0):.1f} ms")
PY
}

ghz_ratio() {
    python3 - "$1" "$2" <<'PY'
import json, sys
ok = lambda l: json.load(open(f"/tmp/ghz-{l}.json"))["statusCodeDistribution"].get("OK", 0)
print(f"ratio {sys.argv[1]} / {sys.argv[2]}: {ok(sys.argv[1]) / max(ok(sys.argv[2]), 1):.2f}")
PY
}
