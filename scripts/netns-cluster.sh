#!/usr/bin/env bash
# A multi-host skep cluster on one machine, in network namespaces, and the checks run against it.
#
#   scripts/netns-cluster.sh can-run            exit 0 if namespaces can be made here, else say why
#   scripts/netns-cluster.sh check [SCENARIO..] run the scenarios (default: all), PASS/FAIL each;
#                                               exit 0 only if every one passed
#   scripts/netns-cluster.sh cleanup            remove what a killed run may have left behind
#
# Topology (see docs/MULTIHOST.md): a bridge skepbr0 in its own namespace skep-net, and one veth
# pair from it to each of skep-q (queen, 10.77.0.1), skep-a (pool A, 10.77.0.2) and skep-b (pool B,
# 10.77.0.3). Nothing is added to the root namespace, so no traffic leaves the namespaces made here.
#
# Environment: SKEP_BIN_DIR (default target/debug), SKEP_NETNS_KEEP_LOGS=DIR (copy the daemons'
# logs there before cleanup), SKEP_NETNS_VERBOSE=1 (print the logs' tails even when all passed).
# Needs root and iproute2. Every wait is bounded; everything made is removed on exit, INT or TERM.
set -euo pipefail
cd "$(dirname "$0")/.."

# === names and addresses ===

NS_NET=skep-net
NS_Q=skep-q
NS_A=skep-a
NS_B=skep-b
ALL_NS=("$NS_Q" "$NS_A" "$NS_B" "$NS_NET")
BRIDGE=skepbr0
SUBNET_PREFIX=10.77.0
IP_Q=$SUBNET_PREFIX.1
IP_A=$SUBNET_PREFIX.2
IP_B=$SUBNET_PREFIX.3
QUEEN_PORT=7700
POOL_PORT=7800
# The queen listens on a non-loopback address, so it serves TLS (--tls auto): every hop below is
# TLS, and the pools trust only the queen's CA.
QUEEN_URL=https://$IP_Q:$QUEEN_PORT
LOCK_FILE=/run/lock/skep-netns-cluster.lock
WAIT_S=30 # the bound on every "until ..." wait

BIN_DIR="${SKEP_BIN_DIR:-target/debug}"
ALL_SCENARIOS=(basic enrollment failover partition revoke)

log() { printf '[netns-cluster] %s\n' "$*" >&2; }

# === capability probe ===

# Prints why this machine cannot run the cluster and returns 1, or returns 0.
can_run() {
  if [ "$(uname -s)" != Linux ]; then
    echo "cannot run: network namespaces need Linux (this is $(uname -s))"
    return 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "cannot run: creating network namespaces needs root (run as root, e.g. sudo $0 check)"
    return 1
  fi
  if ! command -v ip >/dev/null; then
    echo "cannot run: 'ip' (iproute2) is missing; scripts/install-deps.sh installs it as root"
    return 1
  fi
  local tool
  for tool in python3 setsid flock timeout; do
    if ! command -v "$tool" >/dev/null; then
      echo "cannot run: '$tool' is missing (python3 reads the CLI's JSON; the others are util-linux/coreutils)"
      return 1
    fi
  done
  local ns="skep-probe-$$" out
  if ! out=$(ip netns add "$ns" 2>&1); then
    echo "cannot run: 'ip netns add' failed: $out"
    return 1
  fi
  local ok=1
  if ! out=$(ip netns exec "$ns" true 2>&1); then
    echo "cannot run: 'ip netns exec' failed: $out"
    ok=0
  elif ! out=$(ip -n "$ns" link add skepprobebr type bridge 2>&1); then
    echo "cannot run: cannot create a bridge in a namespace: $out"
    ok=0
  elif ! out=$(ip -n "$ns" link add skepprobe0 type veth peer name skepprobe1 2>&1); then
    echo "cannot run: cannot create a veth pair in a namespace: $out"
    ok=0
  fi
  ip netns del "$ns" >/dev/null 2>&1 || true
  [ "$ok" = 1 ]
}

# === cleanup ===

# Kills every process in our namespaces and deletes them (the bridge and veths go with skep-net and
# the pool namespaces). Safe to run when nothing exists.
teardown_net() {
  local ns pids
  for ns in "${ALL_NS[@]}"; do
    [ -e "/run/netns/$ns" ] || continue
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -TERM $pids 2>/dev/null || true
  done
  local end=$((SECONDS + 5)) left
  while ((SECONDS < end)); do
    left=""
    for ns in "${ALL_NS[@]}"; do
      [ -e "/run/netns/$ns" ] && left+=$(ip netns pids "$ns" 2>/dev/null || true)
    done
    [ -z "$left" ] && break
    sleep 0.2
  done
  for ns in "${ALL_NS[@]}"; do
    [ -e "/run/netns/$ns" ] || continue
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
  done
  for ns in "${ALL_NS[@]}"; do
    [ -e "/run/netns/$ns" ] && ip netns del "$ns" 2>/dev/null || true
  done
  # Only if an older version of this script put the bridge in the root namespace.
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE" 2>/dev/null || true
}

TMP=""
CLEANED=0
cleanup() {
  local rc=$?
  [ "$CLEANED" = 1 ] && return
  CLEANED=1
  set +e
  local pid
  for pid in "${BG_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  teardown_net
  if [ -n "$TMP" ] && [ -d "$TMP" ]; then
    if [ -n "${SKEP_NETNS_KEEP_LOGS:-}" ]; then
      mkdir -p "$SKEP_NETNS_KEEP_LOGS" && cp -r "$TMP/logs/." "$SKEP_NETNS_KEEP_LOGS/" &&
        log "logs kept in $SKEP_NETNS_KEEP_LOGS"
    fi
    rm -rf "$TMP"
  fi
  return "$rc"
}

# === network ===

setup_net() {
  ip netns add "$NS_NET"
  ip -n "$NS_NET" link set lo up
  ip -n "$NS_NET" link add "$BRIDGE" type bridge
  ip -n "$NS_NET" link set "$BRIDGE" up
  local spec ns addr
  for spec in "$NS_Q:$IP_Q" "$NS_A:$IP_A" "$NS_B:$IP_B"; do
    ns=${spec%%:*}
    addr=${spec#*:}
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    # Bridge side "v-<ns>" (e.g. v-skep-b) stays in skep-net; the other end is eth0 inside $ns.
    ip -n "$NS_NET" link add "v-$ns" type veth peer name eth0 netns "$ns"
    ip -n "$NS_NET" link set "v-$ns" master "$BRIDGE"
    ip -n "$NS_NET" link set "v-$ns" up
    ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
  done
  local end=$((SECONDS + WAIT_S))
  until reachable "$NS_A" "$IP_Q" && reachable "$NS_B" "$IP_Q" && reachable "$NS_Q" "$IP_B"; do
    if ((SECONDS >= end)); then
      log "namespaces cannot reach each other through $BRIDGE"
      return 1
    fi
    sleep 0.2
  done
}

# reachable NS IP: a TCP connect from NS to IP port 9 is answered (refused counts: the host is
# there). No ping needed.
reachable() {
  ip netns exec "$1" python3 -c '
import socket, sys
s = socket.socket()
s.settimeout(1)
try:
    s.connect((sys.argv[1], 9))
except ConnectionRefusedError:
    pass
except OSError:
    sys.exit(1)
' "$2" 2>/dev/null
}

# Bridge-side link of a namespace: cutting it is pulling that machine's cable.
link_set() { ip -n "$NS_NET" link set "v-$1" "$2"; }

# === daemons ===

BG_PIDS=()
declare -A POOL_PID=() POOL_ID=() POOL_NS=() POOL_IP=() POOL_PORT_OF=() POOL_DIR=() POOL_TOKEN=()
ADMIN_TOKEN=""
QUEEN_CA=""

# Starts a command in namespace $1, in its own process group (so its children can be killed with
# it), logging to $TMP/logs/$2.log. Sets STARTED_PID.
start_in_ns() {
  local ns=$1 name=$2
  shift 2
  # Not a process-group leader here, so setsid execs (no fork): $! is the daemon's pid and pgid.
  # fd 9 (the run lock) is closed for it, so a daemon outliving a SIGKILLed run holds no lock.
  setsid ip netns exec "$ns" "$@" >>"$TMP/logs/$name.log" 2>&1 </dev/null 9>&- &
  STARTED_PID=$!
  BG_PIDS+=("$STARTED_PID")
  # Killing daemons is the point of some scenarios: no "Killed" job notices from bash.
  disown "$STARTED_PID" 2>/dev/null || true
}

alive() { kill -0 "$1" 2>/dev/null; }

# SIGKILLs a daemon's whole process group (the pool and its workers).
kill_group() { kill -KILL -- "-$1" 2>/dev/null || kill -KILL "$1" 2>/dev/null || true; }

start_queen() {
  mkdir -p "$TMP/queen-parent"
  local dir=$TMP/queen-parent/queen
  start_in_ns "$NS_Q" queen "$BIN/skep-queen" --data-dir "$dir" \
    --listen "$IP_Q:$QUEEN_PORT" --heartbeat-interval 200ms \
    --rate-limit 1000000/1s --bad-auth-limit 1000000/1s
  local pid=$STARTED_PID end=$((SECONDS + WAIT_S))
  until [ -s "$dir/listen.addr" ] && [ -s "$dir/admin.token" ]; do
    if ! alive "$pid" || ((SECONDS >= end)); then
      log "queen did not start (see its log below)"
      tail -n 20 "$TMP/logs/queen.log" >&2 || true
      return 1
    fi
    sleep 0.2
  done
  ADMIN_TOKEN=$dir/admin.token
  QUEEN_CA=$dir/tls/ca.pem
}

# start_pool KEY NS IP PORT TOKEN_FILE DATA_DIR: pool "pool-KEY"; does not wait for it.
start_pool() {
  local key=$1
  POOL_NS[$key]=$2
  POOL_IP[$key]=$3
  POOL_PORT_OF[$key]=$4
  POOL_TOKEN[$key]=$5
  POOL_DIR[$key]=$6
  # An enrollment token carries the CA fingerprint (token@sha256) and the pool pins it; a pool
  # started with the admin token is given the CA file, as an operator would copy it.
  local ca_args=()
  grep -q @ "$5" || ca_args=(--queen-ca "$QUEEN_CA")
  start_in_ns "$2" "pool-$key" "$BIN/skep-pool" --data-dir "$6" --queen "$QUEEN_URL" \
    "${ca_args[@]}" --token-file "$5" --listen "$3:$4" --advertise "https://$3:$4" \
    --workers 2 --engine synthetic --model synthetic \
    --synthetic-ttft 5ms --synthetic-tps 20 --name "pool-$key"
  POOL_PID[$key]=$STARTED_PID
}

restart_pool() {
  local key=$1
  start_pool "$key" "${POOL_NS[$key]}" "${POOL_IP[$key]}" "${POOL_PORT_OF[$key]}" \
    "${POOL_TOKEN[$key]}" "${POOL_DIR[$key]}"
}

stop_pool() {
  local key=$1
  local pid=${POOL_PID[$key]:-}
  [ -n "$pid" ] || return 0
  kill -TERM -- "-$pid" 2>/dev/null || true
  local end=$((SECONDS + 5))
  while alive "$pid" && ((SECONDS < end)); do sleep 0.1; done
  kill_group "$pid"
  forget_pool "$key"
}

# SIGKILLs pool KEY with its workers, as a crash would.
kill_pool() {
  kill_group "${POOL_PID[$1]}"
  forget_pool "$1"
}

# The queen lists a stopped pool as healthy until it misses a few heartbeats: wait (bounded) for
# that, so that a healthy entry seen later is the restarted process (whatever its node id).
forget_pool() {
  local id=${POOL_ID[$1]:-}
  POOL_ID[$1]=""
  POOL_PID[$1]=""
  if [ -n "$id" ] && ! wait_not_healthy "$id" >/dev/null; then
    log "node $id (pool-$1) still healthy ${WAIT_S}s after its process was stopped"
  fi
}

# === talking to the queen (always from inside skep-q) ===

# skep CLI as admin; every call bounded by `timeout`.
cli() {
  ip netns exec "$NS_Q" timeout "${CLI_TIMEOUT:-20}" "$BIN/skep" --queen "$QUEEN_URL" \
    --ca-file "$QUEEN_CA" --token-file "$ADMIN_TOKEN" "$@" 9>&-
}

nodes_json() { cli nodes list --json 2>/dev/null || true; }

# py_json MODE ARG...: queries JSON lines on stdin (output of `nodes list --json` or
# `submit --json`).
py_json() {
  python3 -c '
import json, sys
mode, args = sys.argv[1], sys.argv[2:]
rows = []
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
if mode == "state-of-id":          # node state by id, or "absent"
    print(next((r.get("state") for r in rows if r.get("id") == args[0]), "absent"))
elif mode == "name-of-id":
    print(next((r.get("name", "") for r in rows if r.get("id") == args[0]), ""))
elif mode == "healthy-id-of-name": # a healthy node with that name whose id is not excluded
    excluded = args[1].split() if len(args) > 1 else []
    print(next((r["id"] for r in rows if r.get("name") == args[0]
                and r.get("state") == "healthy" and r.get("id") not in excluded), ""))
elif mode == "healthy-names":
    print(" ".join(sorted(r.get("name", "") for r in rows if r.get("state") == "healthy")))
elif mode == "names":
    print(" ".join(sorted(r.get("name", "") for r in rows)))
elif mode == "event-field":        # one line per matching event
    for r in rows:
        if r.get("event") == args[0]:
            print(r.get(args[1], ""))
elif mode == "field":              # a field of the first object
    print(rows[0].get(args[0], "") if rows else "")
' "$@"
}

healthy_id_of() { nodes_json | py_json healthy-id-of-name "$1" "${2:-}"; }
state_of_id() { nodes_json | py_json state-of-id "$1"; }
name_of_id() { nodes_json | py_json name-of-id "$1"; }

# Waits (bounded) until pool KEY shows healthy; sets POOL_ID[KEY].
wait_healthy() {
  local key=$1 end=$((SECONDS + ${2:-$WAIT_S})) id
  while :; do
    id=$(healthy_id_of "pool-$key")
    if [ -n "$id" ]; then
      POOL_ID[$key]=$id
      return 0
    fi
    if ((SECONDS >= end)); then return 1; fi
    if [ -n "${POOL_PID[$key]:-}" ] && ! alive "${POOL_PID[$key]}"; then return 1; fi
    sleep 0.3
  done
}

# Waits (bounded) until node ID is no longer healthy (suspect, dead or gone); prints that state.
wait_not_healthy() {
  local id=$1 end=$((SECONDS + ${2:-$WAIT_S})) st
  while :; do
    st=$(state_of_id "$id")
    if [ "$st" != healthy ]; then
      echo "$st"
      return 0
    fi
    if ((SECONDS >= end)); then return 1; fi
    sleep 0.3
  done
}

# Makes sure pools A and B run and are healthy (restarting one a scenario killed); sets ID_A, ID_B.
ensure_pools() {
  local key
  for key in a b; do
    if [ -z "${POOL_PID[$key]:-}" ] || ! alive "${POOL_PID[$key]}"; then
      [ -z "${POOL_PID[$key]:-}" ] || kill_pool "$key"
      restart_pool "$key"
    fi
  done
  wait_healthy a || { REASON="pool-a not healthy within ${WAIT_S}s"; return 1; }
  wait_healthy b || { REASON="pool-b not healthy within ${WAIT_S}s"; return 1; }
  ID_A=${POOL_ID[a]}
  ID_B=${POOL_ID[b]}
}

# submit_job OUT_FILE MAX_TOKENS [DEADLINE]: a JSON-streamed synthetic job; returns skep's exit code.
submit_job() {
  local out=$1 n=$2 deadline=${3:-30s}
  CLI_TIMEOUT=60 cli submit --model synthetic --deadline "$deadline" --max-tokens "$n" --json \
    "hello from the netns cluster" >"$out" 2>"$out.err"
}

# === scenarios ===
# Each returns 0 on pass; on failure it sets REASON and returns 1.

REASON=""
ID_A=""
ID_B=""

scenario_basic() {
  ensure_pools || return 1
  local out=$TMP/basic.json rc=0
  submit_job "$out" 5 || rc=$?
  [ "$rc" = 0 ] || { REASON="submit exited $rc: $(tail -c 300 "$out.err")"; return 1; }
  local node
  node=$(py_json event-field dispatched node_id <"$out" | tail -n 1)
  [ -n "$(py_json event-field done job_id <"$out")" ] || { REASON="no done event"; return 1; }
  case "$node" in
  "$ID_A" | "$ID_B") ;;
  *) REASON="job ran on '$node', which is neither pool-a ($ID_A) nor pool-b ($ID_B)"; return 1 ;;
  esac
  # Both hops are TLS: the pools advertise https URLs the queen accepted, and the CLI above
  # reached the queen only through its CA.
  local plain
  plain=$(nodes_json | grep -c '"http://' || true)
  [ "$plain" = 0 ] || { REASON="$plain node(s) registered with a plaintext URL"; return 1; }
  if ip netns exec "$NS_Q" timeout 5 "$BIN/skep" --queen "http://$IP_Q:$QUEEN_PORT" \
    --token-file "$ADMIN_TOKEN" jobs list >/dev/null 2>&1 9>&-; then
    REASON="the queen answered a plaintext call on its TLS listener"
    return 1
  fi
  REASON="pool-a and pool-b healthy over TLS; job done on $(name_of_id "$node")"
}

scenario_enrollment() {
  ensure_pools || return 1
  local enroll=$TMP/enroll.token err
  rm -f "$enroll"
  if ! err=$(cli token create --enroll --ttl 1h --out "$enroll" 2>&1 >/dev/null); then
    REASON="'skep token create --enroll --ttl 1h --out FILE' failed: $(printf '%s' "$err" | head -c 300)"
    return 1
  fi
  [ -s "$enroll" ] || { REASON="enrollment token file $enroll is empty or missing"; return 1; }

  # Pool C enrolls with the fresh token from an empty data dir.
  start_pool c "$NS_B" "$IP_B" $((POOL_PORT + 1)) "$enroll" "$TMP/pool-c"
  wait_healthy c || {
    REASON="pool-c did not become healthy with a fresh enrollment token: $(tail -n 3 "$TMP/logs/pool-c.log" | tr '\n' ' ' | head -c 400)"
    stop_pool c
    return 1
  }
  # Its node credentials are stored in its data dir (anything but listen.addr), 0600. Lanes are
  # memfds and leave no file there.
  local stored loose
  stored=$(find "$TMP/pool-c" -type f ! -name listen.addr -printf '%P ')
  loose=$(find "$TMP/pool-c" -type f ! -name listen.addr -perm /077 -printf '%P ')
  if [ -z "$stored" ] || [ -n "$loose" ]; then
    REASON="pool-c enrolled but its stored credentials are missing or not 0600 (files: ${stored:-none}; too open: ${loose:-none})"
    stop_pool c
    return 1
  fi

  # It keeps working from its stored credentials: restart it with the (now used) token.
  stop_pool c
  restart_pool c
  if ! wait_healthy c; then
    REASON="enrolled pool-c did not come back healthy after a restart (stored credentials not used?): $(tail -n 3 "$TMP/logs/pool-c.log" | tr '\n' ' ' | head -c 400)"
    stop_pool c
    return 1
  fi
  stop_pool c

  # Pool D reuses the spent token from another empty data dir: it must not get in. It runs under
  # `timeout 10` (exit 124: still running after 10 s) so that its exit code can be read.
  local rcfile=$TMP/pool-d.rc
  (
    rc=0
    ip netns exec "$NS_B" timeout 10 "$BIN/skep-pool" --data-dir "$TMP/pool-d" \
      --queen "$QUEEN_URL" --token-file "$enroll" --listen "$IP_B:$((POOL_PORT + 2))" \
      --advertise "https://$IP_B:$((POOL_PORT + 2))" --workers 1 --engine synthetic \
      --name pool-d >>"$TMP/logs/pool-d.log" 2>&1 </dev/null 9>&- || rc=$?
    echo "$rc" >"$rcfile"
  ) &
  local pid_d=$! end=$((SECONDS + 15)) seen=""
  BG_PIDS+=("$pid_d")
  while ((SECONDS < end)); do
    if nodes_json | py_json names | tr ' ' '\n' | grep -qx pool-d; then
      seen=1
      break
    fi
    [ -s "$rcfile" ] && break
    sleep 0.3
  done
  # Stop it if still running: its `timeout` (the subshell's child) passes TERM on to skep-pool.
  [ -s "$rcfile" ] || pkill -TERM -P "$pid_d" 2>/dev/null || true
  wait "$pid_d" 2>/dev/null || true
  local rc
  rc=$(cat "$rcfile" 2>/dev/null || echo unknown)
  [ "$rc" = 124 ] && rc=running
  if [ -n "$seen" ]; then
    REASON="pool-d enrolled with an already used enrollment token (it appears in nodes list)"
    return 1
  fi
  if [ "$rc" = 0 ] || [ "$rc" = unknown ]; then
    REASON="pool-d exited '$rc' after reusing a spent enrollment token"
    return 1
  fi
  if [ "$rc" = running ] &&
    ! grep -qE 'ERROR|WARN|[Ee]rror:|denied|[Uu]nauthenticated|[Ii]nvalid' "$TMP/logs/pool-d.log"; then
    REASON="pool-d (spent token) is still running and logged no error"
    return 1
  fi
  REASON="fresh token enrolled pool-c (0600 data dir, survives restart); reuse refused (pool-d: $([ "$rc" = running ] && echo "error logged" || echo "exit $rc"))"
}

scenario_failover() {
  ensure_pools || return 1
  local out=$TMP/failover.json pid rc=0
  : >"$out"
  submit_job "$out" 60 &
  pid=$!
  BG_PIDS+=("$pid")
  # Wait until the job is dispatched and producing tokens, so the kill lands mid-job.
  local end=$((SECONDS + WAIT_S)) first=""
  while ((SECONDS < end)); do
    if [ -n "$(py_json event-field token index <"$out" 2>/dev/null | head -n 1)" ]; then
      first=$(py_json event-field dispatched node_id <"$out" | head -n 1)
      break
    fi
    alive "$pid" || break
    sleep 0.05
  done
  if [ -z "$first" ]; then
    wait "$pid" || rc=$?
    REASON="job never started streaming tokens (submit exit $rc): $(tail -c 300 "$out.err")"
    return 1
  fi
  local victim survivor
  case "$first" in
  "$ID_A") victim=a survivor=b ;;
  "$ID_B") victim=b survivor=a ;;
  *)
    kill "$pid" 2>/dev/null || true
    REASON="first dispatch to unknown node '$first'"
    return 1
    ;;
  esac
  kill_pool "$victim"
  wait "$pid" || rc=$?
  local nodes second
  nodes=$(py_json event-field dispatched node_id <"$out")
  second=$(printf '%s\n' "$nodes" | tail -n 1)
  if [ "$rc" != 0 ]; then
    REASON="killed pool-$victim mid-job; job did not finish (submit exit $rc, dispatches: $(echo $nodes); error: $(py_json event-field error message <"$out" | head -n 1)$(tail -c 200 "$out.err"))"
    return 1
  fi
  if [ "$(printf '%s\n' "$nodes" | wc -l)" -lt 2 ] || [ "$second" = "$first" ]; then
    REASON="job finished but without a second dispatch to another node (dispatches: $(echo $nodes))"
    return 1
  fi
  local expect_id attempt
  [ "$survivor" = a ] && expect_id=$ID_A || expect_id=$ID_B
  if [ "$second" != "$expect_id" ]; then
    REASON="retry went to '$second', expected pool-$survivor ($expect_id)"
    return 1
  fi
  attempt=$(py_json event-field dispatched attempt <"$out" | tail -n 1)
  if [ "${attempt:-0}" -lt 2 ] 2>/dev/null; then
    REASON="the second dispatch reports attempt '$attempt', expected 2"
    return 1
  fi
  local job state
  job=$(py_json event-field done job_id <"$out" | head -n 1)
  state=$(cli jobs get "$job" --json 2>/dev/null | py_json field state)
  [ "$state" = done ] || { REASON="jobs get $job says state '$state'"; return 1; }
  REASON="killed pool-$victim mid-job; attempt 2 ran on pool-$survivor; job done"
}

scenario_partition() {
  ensure_pools || return 1
  local id_b=$ID_B st
  link_set "$NS_B" down
  if ! st=$(wait_not_healthy "$id_b"); then
    link_set "$NS_B" up
    REASON="pool-b still healthy ${WAIT_S}s after its link was cut"
    return 1
  fi
  # While B is cut off, work still gets done (on A).
  local out=$TMP/partition.json rc=0 node
  submit_job "$out" 3 || rc=$?
  node=$(py_json event-field dispatched node_id <"$out" | tail -n 1)
  link_set "$NS_B" up
  if [ "$rc" != 0 ] || [ "$node" != "$ID_A" ]; then
    REASON="during the partition a job ended with exit $rc on '$node' (expected done on pool-a $ID_A): $(tail -c 200 "$out.err")"
    return 1
  fi
  if ! wait_healthy b; then
    REASON="pool-b was $st while cut off, but not healthy again ${WAIT_S}s after the link came back"
    return 1
  fi
  REASON="pool-b went $st when cut off (job done on pool-a meanwhile), healthy again after restore (node ${POOL_ID[b]})"
}

scenario_revoke() {
  local rc=0
  revoke_inner || rc=$?
  # Put pool A back as it was (admin token, its own data dir) for any scenario that follows.
  stop_pool a
  POOL_TOKEN[a]=$ADMIN_TOKEN
  POOL_DIR[a]=$TMP/pool-a
  return "$rc"
}

revoke_inner() {
  ensure_pools || return 1
  # With enrollment available, pool A gets its own node credential, so revoking it must keep A
  # out for good. Without it, A presents the admin token and may register again under a new id:
  # then only the revoked id is checked.
  local enroll=$TMP/enroll-revoke.token enrolled=""
  rm -f "$enroll"
  if cli token create --enroll --ttl 1h --out "$enroll" >/dev/null 2>&1 && [ -s "$enroll" ]; then
    stop_pool a
    POOL_TOKEN[a]=$enroll
    POOL_DIR[a]=$TMP/pool-a-enrolled
    restart_pool a
    wait_healthy a || { REASON="pool-a did not enroll for the revoke scenario"; return 1; }
    ID_A=${POOL_ID[a]}
    enrolled=1
  fi
  local err
  if ! err=$(cli nodes revoke "$ID_A" 2>&1); then
    REASON="'skep nodes revoke $ID_A' failed: $err"
    return 1
  fi
  local st
  if ! st=$(wait_not_healthy "$ID_A" 10); then
    REASON="node $ID_A (pool-a) still healthy 10s after revoke"
    return 1
  fi
  local i out rc node name
  for i in 1 2 3; do
    out=$TMP/revoke-$i.json
    rc=0
    submit_job "$out" 3 || rc=$?
    node=$(py_json event-field dispatched node_id <"$out" | tail -n 1)
    [ "$rc" = 0 ] || { REASON="job $i after revoke exited $rc: $(tail -c 200 "$out.err")"; return 1; }
    name=$(name_of_id "$node")
    if [ "$node" = "$ID_A" ] || { [ -n "$enrolled" ] && [ "$name" != pool-b ]; }; then
      REASON="job $i after revoke ran on '$node' ($name), not pool-b"
      return 1
    fi
  done
  if [ -n "$enrolled" ]; then
    local back
    back=$(healthy_id_of pool-a)
    if [ -n "$back" ]; then
      REASON="revoked pool-a is healthy again as node $back (its credential still works)"
      return 1
    fi
    REASON="revoked enrolled pool-a went $st and stayed out; 3 following jobs ran on pool-b"
  else
    REASON="revoked node went $st; 3 following jobs avoided it (pool-a used the admin token: enrollment unavailable, re-registration not checked)"
  fi
}

# === driver ===

one_line() { printf '%s' "$1" | tr -s '\n\t ' '   ' | head -c 600; }

check() {
  local scenarios=("$@") s
  ((${#scenarios[@]})) || scenarios=("${ALL_SCENARIOS[@]}")
  for s in "${scenarios[@]}"; do
    declare -F "scenario_$s" >/dev/null || {
      echo "unknown scenario '$s' (known: ${ALL_SCENARIOS[*]})" >&2
      exit 2
    }
  done
  local why
  if ! why=$(can_run); then
    echo "$why" >&2
    exit 1
  fi
  BIN=$(cd "$BIN_DIR" 2>/dev/null && pwd) || { echo "binaries dir $BIN_DIR not found" >&2; exit 1; }
  local b
  for b in skep-queen skep-pool skep-worker skep; do
    [ -x "$BIN/$b" ] || { echo "missing $BIN/$b (cargo build --workspace --bins)" >&2; exit 1; }
  done

  mkdir -p "$(dirname "$LOCK_FILE")"
  exec 9>"$LOCK_FILE"
  flock -w "$WAIT_S" 9 || { echo "another netns-cluster run holds $LOCK_FILE" >&2; exit 1; }

  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  # Leftovers of a run that was SIGKILLed (we hold the lock, so no other run owns them).
  teardown_net
  rm -rf "${TMPDIR:-/tmp}"/skep-netns.??????
  TMP=$(mktemp -d "${TMPDIR:-/tmp}/skep-netns.XXXXXX")
  mkdir -p "$TMP/logs"

  log "network: $BRIDGE in $NS_NET; $NS_Q=$IP_Q $NS_A=$IP_A $NS_B=$IP_B"
  setup_net
  start_queen
  start_pool a "$NS_A" "$IP_A" "$POOL_PORT" "$ADMIN_TOKEN" "$TMP/pool-a"
  start_pool b "$NS_B" "$IP_B" "$POOL_PORT" "$ADMIN_TOKEN" "$TMP/pool-b"

  local failed=() t0
  for s in "${scenarios[@]}"; do
    REASON=""
    t0=$SECONDS
    if "scenario_$s"; then
      printf 'PASS  %-11s %s (%ss)\n' "$s" "$(one_line "$REASON")" $((SECONDS - t0))
    else
      printf 'FAIL  %-11s %s (%ss)\n' "$s" "$(one_line "$REASON")" $((SECONDS - t0))
      failed+=("$s")
    fi
  done

  if ((${#failed[@]})) || [ -n "${SKEP_NETNS_VERBOSE:-}" ]; then
    local f
    for f in "$TMP"/logs/*.log; do
      printf -- '--- last lines of %s ---\n' "$(basename "$f")" >&2
      tail -n 12 "$f" >&2 || true
    done
  fi
  if ((${#failed[@]})); then
    echo "netns-cluster: ${#failed[@]} of ${#scenarios[@]} scenarios failed: ${failed[*]}"
    return 1
  fi
  echo "netns-cluster: all ${#scenarios[@]} scenarios passed"
}

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
can-run) can_run ;;
check)
  shift
  check "$@"
  ;;
cleanup)
  [ "$(id -u)" -eq 0 ] || { echo "cleanup needs root" >&2; exit 1; }
  mkdir -p "$(dirname "$LOCK_FILE")"
  exec 9>"$LOCK_FILE"
  flock -w "$WAIT_S" 9 || { echo "a netns-cluster run holds $LOCK_FILE" >&2; exit 1; }
  teardown_net
  rm -rf "${TMPDIR:-/tmp}"/skep-netns.??????
  ;;
-h | --help | help) usage ;;
*)
  usage >&2
  exit 2
  ;;
esac
