#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzing client (cases 1-7 and 10) against
# threadchat's echo endpoint, and fails if any case is not OK, NON-STRICT or
# INFORMATIONAL. The suite needs Python 2.7: $PYTHON27, or pyenv's 2.7.18.
set -euo pipefail
cd "$(dirname "$0")/.."

python27="${PYTHON27:-}"
if [ -z "$python27" ] && command -v pyenv >/dev/null 2>&1; then
  python27="$(pyenv root)/versions/2.7.18/bin/python"
fi
if [ -z "$python27" ] || [ ! -x "$python27" ]; then
  python27="$HOME/.pyenv/versions/2.7.18/bin/python"
fi
if [ ! -x "$python27" ]; then
  echo "conformance: needs Python 2.7 for autobahntestsuite (set PYTHON27, or install 2.7.18 with pyenv)" >&2
  exit 2
fi

venv=target/autobahn-venv
if [ ! -x "$venv/bin/wstest" ]; then
  echo "--- installing autobahntestsuite into $venv"
  "$python27" -m virtualenv --version >/dev/null 2>&1 ||
    "$python27" -m pip install -q --disable-pip-version-check "virtualenv<20.22"
  "$python27" -m virtualenv -q "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check autobahntestsuite==25.10.1
fi

cargo build --quiet --bin threadchat
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
reports=target/autobahn-reports
rm -rf "$reports" && mkdir -p "$reports"
./target/debug/threadchat --host 127.0.0.1 --port "$port" --in-process --echo-endpoint \
  --log-level warn 2>"$reports/server.log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

cat >"$reports/spec.json" <<SPEC
{
  "outdir": "$PWD/$reports",
  "servers": [{"agent": "threadchat", "url": "ws://127.0.0.1:$port/echo"}],
  "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*"],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
SPEC
echo "--- wstest -m fuzzingclient (cases 1-7, 10) against ws://127.0.0.1:$port/echo"
(cd "$reports" && "../../$venv/bin/wstest" -m fuzzingclient -s spec.json >wstest.log 2>&1)

python3 - "$reports/index.json" <<'CHECK'
import collections, json, sys
cases = json.load(open(sys.argv[1]))["threadchat"]
passing = {"OK", "NON-STRICT", "INFORMATIONAL"}
tally = collections.Counter(v["behavior"] for v in cases.values())
bad = {k: v for k, v in cases.items()
       if v["behavior"] not in passing or v["behaviorClose"] not in passing}
print("autobahn: %d cases: %s" % (len(cases), ", ".join("%s %d" % kv for kv in sorted(tally.items()))))
for case, verdict in sorted(bad.items()):
    print("  FAILED %s: %s (close: %s)" % (case, verdict["behavior"], verdict["behaviorClose"]))
print("%d passed, %d failed" % (len(cases) - len(bad), len(bad)))
sys.exit(1 if bad or not cases else 0)
CHECK
