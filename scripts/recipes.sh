#!/usr/bin/env bash
# Runs the commands a newcomer copies from the docs, as written: the
# README's "Try it" (over ws:// and over wss://) and docs/OPERATIONS.md's
# Tokens, Sentinel and Cluster recipes, and checks that two users chat in
# each (and chat on after a Redis failover). tests/integration/docs.rs holds each recipe_* function
# below to its block in the docs: every line of the block, in order, and
# nothing else but `expect_*`/`given_*` checks and comments.
#
# The docs use the usual ports (8000, 6379, 6380, 7000…) and /tmp, so each
# recipe runs in namespaces of its own: its own network (nothing here can
# clash with, or reach, a Redis or server on this machine's ports), its own
# /tmp, and its own PIDs (whatever it started in the background is killed
# with it).
#
#   scripts/recipes.sh [try-it|wss|example|tokens|sentinel|cluster …]   (make recipes)
set -euo pipefail
cd "$(dirname "$0")/.."

RECIPES=(try-it wss example tokens sentinel cluster)
LOGS=target/recipes
PATIENCE=${PATIENCE:-60} # seconds any one expectation may take

if [ "${1:-}" != --inside ]; then
  scripts/need-redis.sh
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! command -v websocat >/dev/null 2>&1; then
    # A command-line client for the recipes, not part of the server (nor of
    # its dependency tree): installed from crates.io into ~/.cargo/bin.
    echo "--- installing websocat (cargo install websocat --locked)"
    cargo install websocat --locked
  fi
  command -v openssl >/dev/null 2>&1 || { echo "the tokens and wss recipes need openssl"; exit 1; }
  for tool in unshare ip curl; do
    command -v $tool >/dev/null 2>&1 || { echo "recipes.sh needs $tool (util-linux, iproute2, curl)"; exit 1; }
  done
  # Built out here: inside there is no network for cargo to use.
  make build
  cargo build --example minimal
  mkdir -p "$LOGS"
  # Not root: a user namespace maps us to root in it, for the mounts.
  as_root=()
  [ "$(id -u)" = 0 ] || as_root=(--map-root-user)
  unshare "${as_root[@]}" --net --mount --pid --fork true || {
    echo "recipes.sh runs each recipe in namespaces of its own: it needs root, or user namespaces"
    exit 1
  }
  failed=0
  for recipe in "${@:-${RECIPES[@]}}"; do
    start=$(date +%s)
    if unshare "${as_root[@]}" --net --mount --pid --fork --kill-child \
      "$0" --inside "$recipe" >"$LOGS/$recipe.log" 2>&1; then
      echo "--- recipe $recipe: ok ($(($(date +%s) - start)) s)"
    else
      echo "--- recipe $recipe: FAILED ($(($(date +%s) - start)) s); the end of $LOGS/$recipe.log:"
      tail -40 "$LOGS/$recipe.log"
      failed=1
    fi
  done
  exit $failed
fi

# ---- inside the namespaces: one recipe ----
recipe=$2
ip link set lo up
# A /tmp of its own. A checkout that lives under /tmp would vanish under
# it: held aside first, and put back in place on the new /tmp.
repo=$PWD
case $repo in
/tmp | /tmp/*)
  held=$(mktemp -d /run/recipes-repo.XXXXXX)
  mount --bind "$repo" "$held"
  mount -t tmpfs tmpfs /tmp
  mkdir -p "$repo"
  mount --bind "$held" "$repo"
  cd "$repo"
  ;;
*) mount -t tmpfs tmpfs /tmp ;;
esac
export CARGO_NET_OFFLINE=true
work=$(mktemp -d)
declare -A terminals

# A terminal of its own: COMMAND runs in the background, reading what
# `expect_chat` types and writing to $work/NAME.out.
terminal() {
  local -
  set +x # the trace shows the recipes' lines, not the checks'
  local name=$1 fd
  shift
  mkfifo "$work/$name.in"
  # Appending, so that emptying the file between checks works.
  "$@" <"$work/$name.in" >>"$work/$name.out" 2>&1 &
  exec {fd}>"$work/$name.in"
  terminals[$name]=$fd
}

# A command left running, as in a terminal of its own.
background() {
  "$@" &
}

fail() {
  local -
  set +x
  echo "FAILED: $*"
  for out in "$work"/*.out; do
    [ -e "$out" ] && { echo "--- $(basename "$out" .out) saw:"; tail -20 "$out"; }
  done
  exit 1
}

# Waits until something listens on PORT.
expect_listening() {
  local -
  set +x
  local deadline=$((SECONDS + PATIENCE))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || fail "nothing listens on port $1"
    sleep 0.2
  done
}

# Waits until terminal NAME has shown TEXT.
expect_seen() {
  local -
  set +x
  local deadline=$((SECONDS + PATIENCE))
  until grep -qF -- "$2" "$work/$1.out" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || fail "$1 never saw: $2"
    sleep 0.2
  done
}

# A types lines until B sees one of them, then the other way round. Typing
# again covers a line typed while the relay was being restored (it may be
# refused with a notice, as the docs say).
expect_chat() {
  local -
  set +x
  local from to round deadline
  for pair in "$1 $2" "$2 $1"; do
    read -r from to <<<"$pair"
    round=0
    deadline=$((SECONDS + PATIENCE))
    until grep -qF "hello from $from" "$work/$to.out" 2>/dev/null; do
      [ $SECONDS -lt $deadline ] || fail "$to never saw what $from typed"
      round=$((round + 1))
      printf 'hello from %s (%s)\n' "$from" "$round" >&"${terminals[$from]}"
      sleep 1
    done
    echo "$to saw: $(grep -F "hello from $from" "$work/$to.out" | tail -1)"
  done
  # The next expect_chat looks for lines typed after this one.
  : >"$work/$1.out"
  : >"$work/$2.out"
}

recipe_try_it() {
  # README, "Try it": without a Redis, make run relays in-process.
  background make run          # release build, serves on port 8000 (Ctrl-C stops it)
  expect_listening 8000
  terminal alice websocat -E ws://127.0.0.1:8000/chat/alice
  terminal bob websocat -E ws://127.0.0.1:8000/chat/bob
  expect_seen alice '"bob"'
  expect_chat alice bob
  terminal carol websocat -E 'ws://127.0.0.1:8000/chat/alice?room=lobby&format=text'
  expect_seen carol '* in lobby: alice'
}

recipe_wss() {
  # README, "Try it", over TLS: a self-signed certificate, which websocat
  # takes with -k. The server's log is watched for the wss:// address it
  # says it serves.
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=localhost -keyout /tmp/threadchat-key.pem -out /tmp/threadchat-cert.pem
  terminal server make run ARGS="--port 8443 --tls-cert /tmp/threadchat-cert.pem --tls-key /tmp/threadchat-key.pem"
  expect_seen server 'listening on wss://'
  expect_listening 8443
  terminal alice websocat -E -k wss://127.0.0.1:8443/chat/alice
  terminal bob websocat -E -k wss://127.0.0.1:8443/chat/bob
  expect_seen alice '"bob"'
  expect_chat alice bob
  expect_tls_only 8443
}

# A client that does not speak TLS to PORT is told so, not left hanging;
# without -k, websocat refuses the self-signed certificate.
expect_tls_only() {
  local -
  set +x
  curl -s --max-time 10 "http://127.0.0.1:$1/" | grep -qF 'this port speaks TLS' ||
    fail "plain HTTP to port $1 was not told to use TLS"
  websocat -E "wss://127.0.0.1:$1/chat/mallory" </dev/null >"$work/strict.out" 2>&1 &&
    fail "websocat without -k took the self-signed certificate"
  grep -qi 'certificate' "$work/strict.out" ||
    fail "websocat without -k failed, but not over the certificate: $(cat "$work/strict.out")"
  echo "plain HTTP on port $1 is told to use TLS; without -k, websocat refuses the certificate"
}

recipe_example() {
  # README, "Try it": the example needs a Redis on localhost:6379 (here,
  # this network namespace's own).
  redis-server --port 6379 --save "" &
  expect_listening 6379
  background cargo run --example minimal        # then websocat ws://127.0.0.1:8000/chat/alice
  expect_listening 8000
  terminal alice websocat -E ws://127.0.0.1:8000/chat/alice
  terminal bob websocat -E ws://127.0.0.1:8000/chat/bob
  expect_chat alice bob
}

recipe_tokens() {
  make build
  openssl rand -hex 32 > /tmp/threadchat-secret        # any 32 or more secret bytes
  ./target/release/threadchat --auth-secret-file /tmp/threadchat-secret &
  expect_listening 8000
  TOKEN=$(./target/release/threadchat --auth-secret-file /tmp/threadchat-secret token alice)
  terminal alice websocat -E -H="Authorization: Bearer $TOKEN" 'ws://127.0.0.1:8000/chat/alice?room=lobby'
  TOKEN=$(./target/release/threadchat --auth-secret-file /tmp/threadchat-secret token bob --room lobby)
  terminal bob websocat -E "ws://127.0.0.1:8000/chat/bob?room=lobby&token=$TOKEN"
  terminal mallory websocat -E ws://127.0.0.1:8000/chat/mallory
  expect_seen alice '"bob"'
  expect_chat alice bob
  expect_seen mallory 'a token is required'
}

recipe_sentinel() {
  make build
  mkdir -p /tmp/redis-6380 /tmp/redis-6381    # a replica writes what it receives to disk
  redis-server --port 6380 --save "" --dir /tmp/redis-6380 &
  redis-server --port 6381 --save "" --dir /tmp/redis-6381 --replicaof 127.0.0.1 6380 &
  for port in 26380 26381 26382; do
    printf 'port %s\nsentinel monitor chat 127.0.0.1 6380 2\nsentinel down-after-milliseconds chat 1000\n' \
      $port > /tmp/sentinel-$port.conf
    redis-server /tmp/sentinel-$port.conf --sentinel &
  done
  until redis-cli -p 6381 info replication | grep -q master_link_status:up; do sleep 1; done
  for port in 26380 26381 26382; do
    until redis-cli -p $port sentinel replicas chat | grep -q 6381 &&
      redis-cli -p $port sentinel ckquorum chat | grep -q 'OK 3'; do sleep 1; done
  done
  ./target/release/threadchat --redis redis+sentinel://127.0.0.1:26380,127.0.0.1:26381,127.0.0.1:26382/chat &
  expect_listening 8000
  terminal alice websocat -E 'ws://127.0.0.1:8000/chat/alice?room=lobby'    # a terminal of its own
  terminal bob websocat -E 'ws://127.0.0.1:8000/chat/bob?room=lobby'      # another
  expect_seen alice '"bob"'
  expect_chat alice bob
  redis-cli -p 6380 shutdown nosave
  expect_seen alice 'reconnected to the chat relay'
  expect_chat alice bob
}

recipe_cluster() {
  make build
  for port in 7000 7001 7002 7003 7004 7005; do
    mkdir -p /tmp/redis-$port && rm -f /tmp/redis-$port/nodes.conf
    redis-server --port $port --save "" --dir /tmp/redis-$port \
      --cluster-enabled yes --cluster-node-timeout 2000 &
  done
  until redis-cli -p 7005 ping >/dev/null 2>&1; do sleep 1; done
  redis-cli --cluster create 127.0.0.1:7000 127.0.0.1:7001 127.0.0.1:7002 \
    127.0.0.1:7003 127.0.0.1:7004 127.0.0.1:7005 --cluster-replicas 1 --cluster-yes
  until redis-cli -p 7000 cluster info | grep -q cluster_state:ok; do sleep 1; done
  ./target/release/threadchat --redis redis+cluster://127.0.0.1:7000,127.0.0.1:7001 &
  expect_listening 8000
  terminal alice websocat -E 'ws://127.0.0.1:8000/chat/alice?room=lobby'    # a terminal of its own
  terminal bob websocat -E 'ws://127.0.0.1:8000/chat/bob?room=lobby'      # another
  expect_seen alice '"bob"'
  expect_chat alice bob
  slot=$(redis-cli -p 7000 cluster keyslot 'threadchat:room:{lobby}')
  master=$(redis-cli -p 7000 cluster nodes | awk -v slot=$slot '/master/ { for (i = 9; i <= NF; i++) {
    split($i, r, "-"); if (slot >= r[1] && slot <= (r[2] == "" ? r[1] : r[2])) { split($2, a, "[:@]"); print a[2] } } }')
  redis-cli -p $master pubsub shardnumsub 'threadchat:room:{lobby}'    # alice's and bob's subscriptions
  expect_master_holds_lobby "$master"
  redis-cli -p $master shutdown nosave
  expect_seen alice 'reconnected to the chat relay'
  expect_chat alice bob
}

# The master the cluster recipe found serves lobby: the room's keys are there.
expect_master_holds_lobby() {
  local -
  set +x
  [ -n "$1" ] || fail "the recipe found no master for lobby"
  redis-cli -p "$1" exists 'threadchat:{lobby}:log' | grep -qx 1 ||
    fail "port $1 does not hold lobby's log: $(redis-cli -p "$1" exists 'threadchat:{lobby}:log')"
  echo "lobby lives on the master at port $1"
}

set -x
"recipe_${recipe//-/_}"
set +x
echo "recipe $recipe: every user saw the others"
