#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzing client (cases 1-7 and 10) against
# threadchat's echo endpoint twice: over plain ws://, then over wss:// (TLS,
# with a certificate made here), and fails if any case of either run is not
# OK, NON-STRICT or INFORMATIONAL. The suite needs Python 2.7: $PYTHON27, or
# pyenv's 2.7.18.
#
#   scripts/conformance.sh [ws|wss …]   (make conformance; both by default)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

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
reports=target/autobahn-reports
rm -rf "$reports" && mkdir -p "$reports"

# The certificates for the wss:// run: a CA of our own, and a server
# certificate it signs for localhost and 127.0.0.1. Made afresh on every
# run, under target/ (never committed), valid for two days.
make_certificates() {
  local dir=$1
  mkdir -p "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=threadchat-conformance-ca -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj /CN=localhost -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf '%s\n' 'subjectAltName=DNS:localhost,IP:127.0.0.1' 'basicConstraints=critical,CA:FALSE' \
    'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' >"$dir/server.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 2 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
}

server=
trap '[ -z "$server" ] || kill "$server" 2>/dev/null || true' EXIT

# One run of the suite: SCHEME (ws or wss) against a server of its own,
# started with the extra FLAGS; prints a summary, fails on any bad case.
suite() {
  local scheme=$1 out=$reports/$1
  shift
  mkdir -p "$out"
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  ./target/debug/threadchat --host 127.0.0.1 --port "$port" --in-process --echo-endpoint \
    --log-level warn "$@" 2>"$out/server.log" &
  server=$!
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done

  # Over TLS, wstest checks the certificate only when the spec names a
  # "hostname" (it is also the name sent in the handshake, SNI): then it
  # trusts what OpenSSL's default paths hold, so SSL_CERT_FILE points them
  # at our CA. Without a "hostname" it would take any certificate at all.
  local verify=()
  local hostname=
  if [ "$scheme" = wss ]; then
    hostname='"hostname": "localhost",'
    verify=(env SSL_CERT_FILE="$root/$reports/certs/ca.pem")
  fi
  cat >"$out/spec.json" <<SPEC
{
  "outdir": "$root/$out",
  "servers": [{"agent": "threadchat", $hostname "url": "$scheme://127.0.0.1:$port/echo"}],
  "cases": ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "10.*"],
  "exclude-cases": [],
  "exclude-agent-cases": {}
}
SPEC
  echo "--- wstest -m fuzzingclient (cases 1-7, 10) against $scheme://127.0.0.1:$port/echo"
  (cd "$out" && "${verify[@]}" "$root/$venv/bin/wstest" -m fuzzingclient -s spec.json >wstest.log 2>&1)
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=

  python3 - "$out/index.json" "$scheme" <<'CHECK'
import collections, json, sys
cases = json.load(open(sys.argv[1]))["threadchat"]
scheme = sys.argv[2]
passing = {"OK", "NON-STRICT", "INFORMATIONAL"}
tally = collections.Counter(v["behavior"] for v in cases.values())
bad = {k: v for k, v in cases.items()
       if v["behavior"] not in passing or v["behaviorClose"] not in passing}
print("autobahn %s://: %d cases: %s" % (scheme, len(cases), ", ".join("%s %d" % kv for kv in sorted(tally.items()))))
for case, verdict in sorted(bad.items()):
    print("  FAILED %s: %s (close: %s)" % (case, verdict["behavior"], verdict["behaviorClose"]))
print("autobahn %s://: %d passed, %d failed" % (scheme, len(cases) - len(bad), len(bad)))
sys.exit(1 if bad or not cases else 0)
CHECK
}

schemes=("$@")
[ ${#schemes[@]} -gt 0 ] || schemes=(ws wss)
failed=0
for scheme in "${schemes[@]}"; do
  case $scheme in
  ws) suite ws || failed=1 ;;
  wss)
    make_certificates "$reports/certs"
    suite wss --tls-cert "$reports/certs/server.pem" --tls-key "$reports/certs/server.key" || failed=1
    ;;
  *)
    echo "conformance: unknown scheme $scheme (ws or wss)" >&2
    exit 2
    ;;
  esac
done
exit $failed
