#!/bin/sh
# Makes sure redis-server and redis-cli (Redis 7 or newer) are installed: the tests and the
# benchmarks start their own Redis on a free port (nothing is started by
# hand, and 6379 is never used). Installs it when it can, and says so;
# otherwise prints the command to run.
set -eu

if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
  # Sharded pub/sub (the Redis Cluster tests) came with Redis 7.
  major=$(redis-server --version | sed -n 's/.*v=\([0-9]*\)\..*/\1/p')
  if [ "${major:-0}" -lt 7 ]; then
    echo "redis-server $(redis-server --version | sed -n 's/.*v=\([^ ]*\).*/\1/p') is too old: the tests need Redis 7 or newer."
    exit 1
  fi
  exit 0
fi

echo "redis-server is not installed; the tests start their own Redis on a free port."
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    sudo=""
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo"
  else
    echo "Install it with:  sudo apt-get install redis-server"
    exit 1
  fi
  echo "Installing it now: ${sudo:+sudo }apt-get install redis-server"
  export DEBIAN_FRONTEND=noninteractive
  # A fresh machine may have no package lists yet.
  $sudo apt-get install -y -qq redis-server >/dev/null 2>&1 || {
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq redis-server >/dev/null
  }
elif command -v brew >/dev/null 2>&1; then
  echo "Installing it now: brew install redis"
  brew install redis
else
  echo "Install Redis (https://redis.io/docs/latest/operate/oss_and_stack/install/),"
  echo "so that redis-server is on your PATH, then run this again."
  exit 1
fi
command -v redis-server >/dev/null 2>&1 || { echo "redis-server is still not on PATH"; exit 1; }
echo "redis-server installed: $(redis-server --version | cut -d' ' -f1-3)"
