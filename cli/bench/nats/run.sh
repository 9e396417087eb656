#!/usr/bin/env bash
# civex against NATS JetStream, same machine, same run.
#
# Runs the two replication workloads of the civex benchmark issue on both
# systems, one after the other (never at the same time), and prints their
# rates and ratios:
#
#   live      entries produced on node/server 1, counted once held on
#             node/server 2 (civex: verified and durable; NATS: mirrored);
#   catch-up  a replica created after the origin holds them all.
#
# NATS: nats-server from Debian's packages (installed with apt-get if it is
# missing), two servers on loopback (a hub and a leaf node, each with its
# own file-backed JetStream), a stream on the hub and a mirror of it on the
# leaf; the client is bench.py (nats-py from PyPI, in a venv under this
# run's temporary directory).
# civex: `civex bench --parts live,catch-up` (release build, built with cargo
# first), its live publishes over one publish stream with the same number
# unanswered as NATS's acks in flight (--inflight).
#
# Usage: cli/bench/nats/run.sh [--live N] [--catch-up N] [--size BYTES]
#                              [--inflight N] [--keep]
# Environment: CIVEX_BIN (use this civex binary instead of building one),
# CARGO_TARGET_DIR (where cargo builds), TMPDIR (where the stores go).
set -euo pipefail

LIVE=100000
CATCHUP=1000000
SIZE=300
INFLIGHT=256
KEEP=0
NATS_PY="nats-py==2.16.0"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "run.sh: $*" >&2; exit 1; }
step() { echo; echo "== $*"; }

while (($#)); do
    case "$1" in
    --live) LIVE=${2:?--live needs a count}; shift 2 ;;
    --catch-up) CATCHUP=${2:?--catch-up needs a count}; shift 2 ;;
    --size) SIZE=${2:?--size needs bytes}; shift 2 ;;
    --inflight) INFLIGHT=${2:?--inflight needs a count}; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
done
for n in "$LIVE" "$CATCHUP" "$SIZE" "$INFLIGHT"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "counts and sizes must be positive integers, got '$n'"
done

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
[[ -f $REPO/Cargo.toml && -d $REPO/cli ]] || die "cannot find the civex workspace above $HERE"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/civex-vs-nats.XXXXXX")
SERVER_PIDS=()

stop_servers() {
    local pid
    for pid in "${SERVER_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            # nats-server exits on SIGTERM after closing its stores.
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    SERVER_PIDS=()
}

cleanup() {
    local status=$?
    stop_servers
    if ((KEEP)); then
        echo "run.sh: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "'$*' needs root (run as root, or install sudo)"
    fi
}

# --- Tools ------------------------------------------------------------------

step "tools"
if ! command -v nats-server >/dev/null; then
    echo "installing nats-server from Debian's packages"
    as_root apt-get update -qq || die "apt-get update failed"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null ||
        die "apt-get install nats-server failed"
fi
NATS_SERVER=$(command -v nats-server) || die "nats-server is not on PATH after installing it"
echo "$("$NATS_SERVER" --version)"

command -v python3 >/dev/null || {
    as_root apt-get install -y -qq python3 >/dev/null || die "cannot install python3"
}
if ! python3 -m venv "$WORK/venv" >/dev/null 2>&1; then
    echo "installing python3-venv from Debian's packages"
    rm -rf "$WORK/venv"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null ||
        die "apt-get install python3-venv failed"
    python3 -m venv "$WORK/venv" || die "python3 -m venv failed"
fi
PY=$WORK/venv/bin/python
"$PY" -m pip install -q --disable-pip-version-check "$NATS_PY" || die "pip install $NATS_PY failed"
echo "client: $("$PY" -m pip show nats-py 2>/dev/null | sed -n 's/^Version: /nats-py /p'), $("$PY" --version)"

if [[ -n ${CIVEX_BIN:-} ]]; then
    CIVEX=$CIVEX_BIN
else
    echo "building civex (release)"
    (cd "$REPO" && cargo build --release --quiet -p civex-cli --bin civex) ||
        die "cargo build --release -p civex-cli failed"
    CIVEX=${CARGO_TARGET_DIR:-$REPO/target}/release/civex
fi
[[ -x $CIVEX ]] || die "no civex binary at $CIVEX"

# --- NATS -------------------------------------------------------------------

free_ports() {
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}
read -r HUB_PORT LEAF_PORT LINK_PORT < <(free_ports 3)

mkdir -p "$WORK/hub/js" "$WORK/leaf/js"
# JetStream's defaults otherwise: file store, sync_interval (fsync) every
# 2 minutes, acks once written to the file.
cat >"$WORK/hub/nats.conf" <<EOF
server_name: bench-hub
listen: 127.0.0.1:$HUB_PORT
jetstream { store_dir: "$WORK/hub/js", domain: hub }
leafnodes { listen: 127.0.0.1:$LINK_PORT }
EOF
cat >"$WORK/leaf/nats.conf" <<EOF
server_name: bench-leaf
listen: 127.0.0.1:$LEAF_PORT
jetstream { store_dir: "$WORK/leaf/js", domain: leaf }
leafnodes { remotes: [ { url: "nats-leaf://127.0.0.1:$LINK_PORT" } ] }
EOF

start_server() {
    local name=$1 port=$2
    "$NATS_SERVER" -c "$WORK/$name/nats.conf" -l "$WORK/$name/server.log" &
    SERVER_PIDS+=($!)
    for _ in $(seq 100); do
        kill -0 "${SERVER_PIDS[-1]}" 2>/dev/null || {
            tail -n 20 "$WORK/$name/server.log" >&2 || true
            die "nats-server ($name) exited at start"
        }
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "nats-server ($name) does not listen on 127.0.0.1:$port after 10 s"
}

step "NATS JetStream: live $LIVE and catch-up $CATCHUP messages of $SIZE bytes, $INFLIGHT acks in flight"
start_server hub "$HUB_PORT"
start_server leaf "$LEAF_PORT"
"$PY" "$HERE/bench.py" --hub "nats://127.0.0.1:$HUB_PORT" --leaf "nats://127.0.0.1:$LEAF_PORT" \
    --live "$LIVE" --catch-up "$CATCHUP" --size "$SIZE" --inflight "$INFLIGHT" \
    --json "$WORK/nats.json" || {
    for name in hub leaf; do
        echo "--- $name server log (last lines)" >&2
        tail -n 20 "$WORK/$name/server.log" >&2 || true
    done
    die "the NATS workloads failed"
}
stop_servers
rm -rf "$WORK/hub/js" "$WORK/leaf/js"

# --- civex ------------------------------------------------------------------

step "civex: $CIVEX bench --parts live,catch-up --live-entries $LIVE --entries $CATCHUP --in-flight $INFLIGHT"
if ! "$CIVEX" bench --parts live,catch-up --live-entries "$LIVE" --entries "$CATCHUP" \
    --in-flight "$INFLIGHT" --dir "$WORK" |
    tee "$WORK/civex.out"; then
    die "civex bench failed"
fi

# --- Table ------------------------------------------------------------------

civex_rate() { # the rate printed as "<n>/s<suffix>" on the line starting with $1
    local line
    line=$(grep -m1 -F -- "$1" "$WORK/civex.out") || die "civex printed no '$1' line"
    [[ $line =~ ([0-9]+)/s$2 ]] || die "cannot read a rate from: $line"
    echo "${BASH_REMATCH[1]}"
}
LIVE_A=$(civex_rate "live replication (a)" " end to end")
LIVE_B=$(civex_rate "live replication (b)" " end to end")
CATCH=$(civex_rate "catch-up: " "$")
read -r NATS_LIVE NATS_CATCH < <("$PY" -c '
import json, sys
r = json.load(open(sys.argv[1]))
print(round(r["live"]["rate"]), round(r["catch_up"]["rate"]))' "$WORK/nats.json") ||
    die "cannot read $WORK/nats.json"

row() { # workload civex nats target-ratio verdict-kind
    awk -v w="$1" -v c="$2" -v n="$3" -v t="$4" -v kind="$5" 'BEGIN {
        ratio = c / n
        if (kind == "target") verdict = (ratio >= t) ? "met" : "NOT met"
        else verdict = "(for information)"
        printf "%-40s %12d %10d %7.2fx %8s  %s\n", w, c, n, ratio, sprintf(">= %.2fx", t), verdict
    }'
}
step "civex vs NATS JetStream on $(nproc) cores ($(uname -m)), $(date -u +%Y-%m-%dT%H:%MZ)"
printf "%-40s %12s %10s %8s %8s  %s\n" "workload" "civex /s" "NATS /s" "ratio" "target" "verdict"
row "live $LIVE, (a) publish API on A" "$LIVE_A" "$NATS_LIVE" 0.75 target
row "live $LIVE, (b) replication only" "$LIVE_B" "$NATS_LIVE" 0.75 info
row "catch-up $CATCHUP" "$CATCH" "$NATS_CATCH" 1.00 target
cat <<EOF

civex counts an entry once node B holds it verified (hash chain and Ed25519
signature) and durable (fdatasync). NATS verifies nothing, and acks and
mirrors before fsync (JetStream's default: sync every 2 minutes).
Live (a) is the like-for-like row: both sides include producing on the
origin, one client keeping $INFLIGHT publishes unanswered (civex: one
publish stream; validation, signing and a durable commit on A per publish).
Live (b) leaves producing out (entries signed before the run, streamed into
A's replication path), so it shows what replication alone does; NATS's live
figure still includes its publish path.
EOF
