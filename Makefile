# Two commands do everything on a fresh Debian machine with Rust:
#   make demo   build, start a throwaway server, back up and restore, check
#   make test   the whole test suite (installs PostgreSQL for its tests)
#
# Builds go to a target directory outside the clone so that CI runs on the
# same machine reuse RocksDB's compiled C++ (15-25 minutes from nothing).
export CARGO_TARGET_DIR ?= $(HOME)/.cache/bkp/target
CARGO ?= cargo

.PHONY: build demo test bench fmt clean-cache

build:
	scripts/install-deps.sh build
	$(CARGO) build --release --workspace --bins

demo: build
	scripts/demo.sh

test: build
	scripts/install-deps.sh test
	$(CARGO) test --release --workspace

bench: build
	$(CARGO) bench -p bkp-benches

fmt:
	$(CARGO) fmt --all

clean-cache:
	rm -rf $(CARGO_TARGET_DIR)
