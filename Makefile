# threadchat — the commands a user needs.
#
#   make run                    build in release mode and serve on :8000
#   make run ARGS="--port 9000" pass options through (see: make run ARGS=--help)
#   make test                   all tests; they start their own redis-server
#   make lint                   formatting check and clippy, warnings are errors

CARGO ?= cargo
ARGS ?=

.PHONY: run build test lint fmt require-redis

run:
	$(CARGO) run --release --bin threadchat -- $(ARGS)

build:
	$(CARGO) build --release

test: require-redis
	$(CARGO) test

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

require-redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "make test needs the redis-server program: the tests start their own Redis"; \
	  echo "on a free port (nothing is started by hand, 6379 is never used)."; \
	  echo "Install it with:  sudo apt-get install redis-server   (Debian/Ubuntu)"; \
	  echo "             or:  brew install redis                 (macOS)"; \
	  exit 1; }
