#!/usr/bin/env bash
# Runs the Autobahn|Testsuite fuzzing client (cases 1-7 and 10) against
# threadchat's echo endpoint three times: over plain ws://, then over wss://
# (with a certificate made here) in TLS 1.3 and in TLS 1.2, and fails if any
# case of any run is not OK, NON-STRICT or INFORMATIONAL. The suite needs
# Python 2.7: $PYTHON27, or pyenv's 2.7.18.
#
#   scripts/conformance.sh [ws|wss|wss-tls1.2 …]   (make conformance; all three by default)
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

# The certificates for the wss:// runs: a CA of our own, and a server
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

# Holds OpenSSL in wstest's Python (and the check below) to one TLS
# VERSION (TLSv1.2 or TLSv1.3), through a configuration file at FILE: the
# server offers both, and a client takes the newest it can.
pin_tls() {
  printf '%s\n' 'openssl_conf = conf' '[conf]' 'ssl_conf = ssl' '[ssl]' 'system_default = pinned' \
    '[pinned]' "MinProtocol = $1" "MaxProtocol = $1" >"$2"
}

# The TLS version a client with wstest's OpenSSL (and environment) agrees
# on with the server at PORT.
negotiated() {
  "$root/$venv/bin/python" - "$1" 2>/dev/null <<'PY'
import socket, sys
from OpenSSL import SSL
conn = SSL.Connection(SSL.Context(SSL.SSLv23_METHOD), socket.create_connection(("127.0.0.1", int(sys.argv[1]))))
conn.set_connect_state()
conn.do_handshake()
print(conn.get_protocol_version_name())
PY
}

# One run of the suite, RUN being ws, wss (TLS 1.3) or wss-tls1.2, against
# a server of its own; prints a summary, fails on any bad case.
suite() {
  local run=$1 out=$reports/$1 scheme=${1%%-*}
  mkdir -p "$out"
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

  # Over TLS, wstest checks the certificate only when the spec names a
  # "hostname" (it is also the name sent in the handshake, SNI): then it
  # trusts what OpenSSL's default paths hold, so SSL_CERT_FILE points them
  # at our CA. Without a "hostname" it would take any certificate at all.
  local flags=() client=() hostname= version=
  if [ "$scheme" = wss ]; then
    flags=(--tls-cert "$reports/certs/server.pem" --tls-key "$reports/certs/server.key")
    hostname='"hostname": "localhost",'
    version=TLSv1.3
    [ "$run" = wss-tls1.2 ] && version=TLSv1.2
    pin_tls "$version" "$out/openssl.cnf"
    client=(SSL_CERT_FILE="$root/$reports/certs/ca.pem" OPENSSL_CONF="$root/$out/openssl.cnf")
  fi

  ./target/debug/threadchat --host 127.0.0.1 --port "$port" --in-process --echo-endpoint \
    --log-level warn "${flags[@]}" 2>"$out/server.log" &
  server=$!
  for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
  done
  local label="$scheme://"
  if [ -n "$version" ]; then
    local got
    got=$(export "${client[@]}" && negotiated "$port" || true)
    if [ "$got" != "$version" ]; then
      echo "autobahn $run: the client would speak ${got:-nothing}, not $version" >&2
      kill "$server" 2>/dev/null || true
      server=
      return 1
    fi
    label="$scheme:// ($version)"
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
  echo "--- wstest -m fuzzingclient (cases 1-7, 10) against $scheme://127.0.0.1:$port/echo${version:+ ($version)}"
  (cd "$out" && env "${client[@]}" "$root/$venv/bin/wstest" -m fuzzingclient -s spec.json >wstest.log 2>&1)
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=

  python3 - "$out/index.json" "$label" <<'CHECK'
import collections, json, sys
cases = json.load(open(sys.argv[1]))["threadchat"]
label = sys.argv[2]
passing = {"OK", "NON-STRICT", "INFORMATIONAL"}
tally = collections.Counter(v["behavior"] for v in cases.values())
bad = {k: v for k, v in cases.items()
       if v["behavior"] not in passing or v["behaviorClose"] not in passing}
print("autobahn %s: %d cases: %s" % (label, len(cases), ", ".join("%s %d" % kv for kv in sorted(tally.items()))))
for case, verdict in sorted(bad.items()):
    print("  FAILED %s: %s (close: %s)" % (case, verdict["behavior"], verdict["behaviorClose"]))
print("autobahn %s: %d passed, %d failed" % (label, len(cases) - len(bad), len(bad)))
sys.exit(1 if bad or not cases else 0)
CHECK
}

runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(ws wss wss-tls1.2)
for run in "${runs[@]}"; do
  case $run in
  ws | wss | wss-tls1.2) ;;
  *)
    echo "conformance: unknown run $run (ws, wss or wss-tls1.2)" >&2
    exit 2
    ;;
  esac
done
[[ " ${runs[*]} " != *" wss"* ]] || make_certificates "$reports/certs"
failed=0
for run in "${runs[@]}"; do
  suite "$run" || failed=1
done
exit $failed
