# threadchat — the commands a user needs.
#
#   make run                    build in release mode and serve on :8000
#   make run ARGS="--port 9000" pass options through (see: make run ARGS=--help)
#   make test                   all tests; they start their own redis-server
#                               (installed first when missing, if it can be)
#   make lint                   formatting check, clippy (with and without the
#                               Cargo features) and rustdoc (every intra-doc
#                               link resolves), warnings are errors; and no
#                               async runtime in the server's tree
#                               (make no-async-runtime)
#   make recipes                the README's "Try it" (ws:// and wss://) and
#                               OPERATIONS' Tokens, Sentinel and Cluster recipes,
#                               run as written (each in namespaces of its own:
#                               needs root or user namespaces; installs websocat
#                               if missing)
#   make check-minimal          the server without its wings (tokens, redis-ha):
#                               builds, unit tests and a quick subset of the
#                               integration tests
#   make check-macos            every package type-checks for macOS (x86_64),
#                               without the tls wing (its C needs a Mac's compiler)
#   make interop                chat between threadchat and the Python original
#                               (installs FastAPI, uvicorn, redis in a venv)
#   make conformance            Autobahn|Testsuite cases 1-7 and 10 against /echo,
#                               over ws://, and over wss:// in TLS 1.3 and 1.2 (a
#                               certificate made with openssl; needs Python 2.7,
#                               e.g. pyenv's 2.7.18)
#   make browser-test           the web page in headless chromium (playwright-core),
#                               over http:// and over https:// (self-signed)
#   make chaos                  faults under chat (Redis subscribers or publishers cut, Redis
#                               stalled, restarted empty and from its AOF, an
#                               instance killed, clients dropped, an instance's
#                               link to Redis cut, slowed, lossy: as root) on
#                               per-client and shared instances; a checker counts
#                               per fault what went wrong (docs/PERFORMANCE.md);
#                               SEED=n repeats a run; CHAOS_ARGS="--duration 120"
#                               (see --help)
#   make chaos-short            its short form (about 45 s), run by CI
#   make chaos-ha               the chaos run on Redis Sentinel (failovers), then on
#                               a 3-master Redis Cluster (failovers, a room's slot
#                               migrated); about 3 minutes; CHAOS_ARGS as above
#   make bench                  load scenarios a, b, c against a release build, with
#                               each relay (starts its own redis-server); one relay:
#                               BROKER=redis|redis-shared|memory; SCENARIOS=a,b;
#                               the attacks: SCENARIOS=d,e,f,i,j; then many rooms on one
#                               Redis and on a 3-master Redis Cluster (scenarios g, h;
#                               CLUSTER_SCENARIOS= skips them, make bench-cluster runs
#                               only them) (docs/PERFORMANCE.md); TLS=1: a, b, c
#                               over wss:// (a certificate made for the run),
#                               TLS=both: each plain then over TLS; SVG charts
#                               of a, b, c into docs/bench (CHARTS=DIR elsewhere,
#                               CHARTS= none)
#   make versus                 threadchat (per-client, shared) against an async
#                               (tokio) server, bench/reference: a, b, c
#                               interleaved, ROUNDS=3 times, then their ratios;
#                               charts into docs/versus (VERSUS_CHARTS= none)
#   make bench-tls              what TLS costs: a, b, c and t (2,000 short
#                               connections: the handshake) plain and over TLS,
#                               alternating, twice, with each relay (BROKER= as
#                               above; about 10 minutes)

CARGO ?= cargo
ARGS ?=

.PHONY: no-async-runtime versus run build test chaos chaos-short chaos-ha recipes lint check-minimal check-macos fmt interop conformance browser-test bench bench-cluster bench-tls require-redis

run:
	$(CARGO) run --release --bin threadchat -- $(ARGS)

build:
	$(CARGO) build --release

# The tests mostly wait (on Redis, on the server, on sockets): four at a
# time keep two cores busy and the suite near three minutes.
TEST_THREADS ?= 4
test: require-redis
	$(CARGO) test --workspace -- --test-threads $(TEST_THREADS)

recipes: require-redis
	scripts/recipes.sh

# A debug build is enough: the clients send a few hundred messages a second.
CHAOS_ARGS ?=
chaos: require-redis
	$(CARGO) build --workspace --bins
	./target/debug/chaos $(CHAOS_ARGS)

# Blips the server survives without losing anything: no loss, silent or
# announced, no duplicate, nothing out of order, no sender misled.
chaos-short: require-redis
	$(CARGO) build --workspace --bins
	./target/debug/chaos --duration 30 --faults client-kill,kill-publishers,stall,drop-clients,link-cut \
	  --instances 2 --rooms 2 --clients 3 --no-announced-losses $(CHAOS_ARGS)

# The same on a replicated Redis; four rooms spread over the three masters
# of the cluster (two of the first three share one). The instances run
# with --wait-replicas 1: without it, a Sentinel master stalled past its
# down-after time answers writes it then loses, and their senders are
# misled (docs/OPERATIONS.md, "What a failover loses").
chaos-ha: require-redis
	$(CARGO) build --workspace --bins
	./target/debug/chaos --topology sentinel --wait-replicas 1 \
	  --faults sentinel-failover,stall,client-kill,kill-publishers,kill-instance,drop-clients $(CHAOS_ARGS)
	./target/debug/chaos --topology cluster --rooms 4 --wait-replicas 1 \
	  --faults cluster-failover,migrate,client-kill,stall,kill-instance,drop-clients $(CHAOS_ARGS)

lint: no-async-runtime
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --no-default-features --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --document-private-items
	$(CARGO) fmt --manifest-path $(REFERENCE)/Cargo.toml -- --check
	$(CARGO) clippy --manifest-path $(REFERENCE)/Cargo.toml -- -D warnings

# The server's claim: no async runtime anywhere in its build, with every
# feature, for every target. (futures-util/-core are allowed on wasm32
# only, where jsonwebtoken's js-sys uses them: so those are checked for
# this machine's target, the runtimes for all.)
ASYNC_RUNTIMES = tokio|async-std|async-io|async-executor|smol|mio|futures|futures-executor
no-async-runtime:
	@tree=$$($(CARGO) tree -p threadchat --all-features -e normal,build --target all --prefix none --format '{p}') || exit 1; \
	found=$$(echo "$$tree" | grep -oE '^($(ASYNC_RUNTIMES)) v[^ ]+' | sort -u); \
	host=$$($(CARGO) tree -p threadchat --all-features -e normal,build --prefix none --format '{p}') || exit 1; \
	found="$$found$$(echo "$$host" | grep -oE '^futures-[a-z]+ v[^ ]+' | sort -u)"; \
	if [ -n "$$found" ]; then \
	  echo "ERROR: an async runtime is in the server's dependency tree:"; echo "$$found"; \
	  echo "(find who brings it: cargo tree -p threadchat --all-features --target all -i NAME)"; exit 1; \
	fi; echo "no async runtime in the server's tree"

# The server as a learner may build it, without the wings (README, "What a
# learner can leave out"): it builds, has no jsonwebtoken, and the chat works.
MINIMAL_TESTS ?= startup:: chat:: rooms::
check-minimal: require-redis
	$(CARGO) build --no-default-features
	! $(CARGO) tree -e normal --no-default-features | grep -q -E "jsonwebtoken|rustls"
	$(CARGO) test --no-default-features --lib
	$(CARGO) test --no-default-features --test integration -- $(MINIMAL_TESTS)

# Linux-only parts (SCHED_BATCH, the load generator's epoll) sit behind cfg;
# this keeps a learner's Mac building. Without the `tls` wing: its crypto
# (ring) compiles C, and this machine has no C compiler for macOS (a Mac
# builds it with its own).
check-macos:
	rustup target add x86_64-apple-darwin
	$(CARGO) check --target x86_64-apple-darwin --workspace --all-targets \
	  --no-default-features --features threadchat/tokens,threadchat/redis-ha

fmt:
	$(CARGO) fmt --all

INTEROP_VENV := target/interop-venv
interop: require-redis
	test -x $(INTEROP_VENV)/bin/python || python3 -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install -q -r tests/interop/requirements.txt
	ORIGINAL_APP_PYTHON=$(CURDIR)/$(INTEROP_VENV)/bin/python \
	  $(CARGO) test --test integration interop -- --ignored

conformance:
	scripts/conformance.sh

CHROMIUM ?= /usr/bin/chromium
browser-test:
	@test -x $(CHROMIUM) || { echo "browser-test needs chromium at $(CHROMIUM) (apt-get install chromium)"; exit 1; }
	$(CARGO) build --bin threadchat
	cd tests/browser && npm ci --no-audit --no-fund --silent
	@echo "--- the web page over http:// and ws://"
	cd tests/browser && CHROMIUM=$(CHROMIUM) node --experimental-websocket --test chat.test.mjs
	@echo "--- what a hostile sender or link can make the page show (forged payloads, markup, bidi)"
	cd tests/browser && CHROMIUM=$(CHROMIUM) node --experimental-websocket --test forged.test.mjs
	@echo "--- the web page over https:// and wss:// (a self-signed certificate)"
	cd tests/browser && CHROMIUM=$(CHROMIUM) HTTPS=1 node --experimental-websocket --test chat.test.mjs

BROKER ?= all
SCENARIOS ?= a,b,c
CLUSTER_SCENARIOS ?= g,h
CLUSTER_BROKERS = redis,redis-cluster,redis-shared,redis-cluster-shared
TLS ?=
TLS_ARGS = $(if $(TLS),--tls $(if $(filter both,$(TLS)),both,on))
CHARTS ?= docs/bench
bench: require-redis
	$(CARGO) build --release --workspace --bins
	./target/release/loadgen --broker $(BROKER) --scenario $(SCENARIOS) $(TLS_ARGS) \
	  $(if $(CHARTS),--charts $(CHARTS))
	if [ -n "$(CLUSTER_SCENARIOS)" ]; then \
	  ./target/release/loadgen --broker $(CLUSTER_BROKERS) --scenario $(CLUSTER_SCENARIOS); fi

bench-cluster: require-redis
	$(CARGO) build --release --workspace --bins
	./target/release/loadgen --broker $(CLUSTER_BROKERS) --scenario g,h

# docs/PERFORMANCE.md, "What TLS costs": plain and TLS runs alternate, so
# that a busy moment on the machine falls on both.
bench-tls: require-redis
	$(CARGO) build --release --workspace --bins
	./target/release/loadgen --broker $(BROKER) --scenario a,b,c,t --tls both --rounds 2

# docs/PERFORMANCE.md, "Against an async server": threadchat (per-client
# and shared subscriptions) beside the async reference (bench/reference, a
# workspace of its own), a, b and c in turn, ROUNDS times, then the ratios.
REFERENCE = bench/reference
ROUNDS ?= 3
VERSUS_CHARTS ?= docs/versus
versus: require-redis
	$(CARGO) build --release --workspace --bins
	$(CARGO) build --release --manifest-path $(REFERENCE)/Cargo.toml
	./target/release/loadgen --versus --rounds $(ROUNDS) \
	  --reference $(REFERENCE)/target/release/threadchat-async-reference \
	  $(if $(VERSUS_CHARTS),--charts $(VERSUS_CHARTS))

require-redis:
	@scripts/need-redis.sh
