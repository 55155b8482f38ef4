#!/usr/bin/env bash
# `make deb`: bkp-server_VERSION_ARCH.deb and bkp_VERSION_ARCH.deb in
# $CARGO_TARGET_DIR/debian/, from the release build (`make build`). Man
# pages and completions come from the clap definitions (bkp-xtask gen);
# cargo-deb takes them, the units and the maintainer scripts from the
# assets in server/Cargo.toml and client/Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:?set CARGO_TARGET_DIR (the Makefile does)}"
command -v cargo-deb >/dev/null || { echo "cargo-deb is missing: scripts/install-deps.sh deb" >&2; exit 1; }

gen="$T/release/gen"
rm -rf "$gen"
"$T/release/bkp-xtask" gen "$gen"
# Compressed here: cargo-deb leaves globbed assets as they are.
gzip -9n "$gen"/man/*/*.1
# Only this build's packages, so that the install test cannot pick an old one.
rm -f "$T"/debian/bkp-server_*.deb "$T"/debian/bkp_*.deb
cargo deb -p bkp-server --no-build --quiet
cargo deb -p bkp-client --no-build --quiet
ls -l "$T"/debian/bkp-server_*.deb "$T"/debian/bkp_*.deb
