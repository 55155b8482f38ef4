#!/usr/bin/env bash
# The packages as an operator installs them (`make test` runs this after
# the cargo tests; `make deb` first): apt-get installs both .deb files
# from `make deb` on this machine, the checks below run against the
# installed files, and the packages are purged again. It refuses to run
# where bkp is already installed, or user bkp or /var/lib/bkp exist, since
# the cleanup removes them (the packages themselves never delete
# backups). Needs root (or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."
T="${CARGO_TARGET_DIR:?set CARGO_TARGET_DIR (the Makefile does)}"
if [ "$(id -u)" -ne 0 ]; then
  exec sudo --preserve-env=CARGO_TARGET_DIR "$0" "$@"
fi
arch=$(dpkg --print-architecture)
server_deb=$(ls "$T"/debian/bkp-server_*_"$arch".deb)
client_deb=$(ls "$T"/debian/bkp_*_"$arch".deb)
start=$(date +%s)

# One run at a time on a machine (the test owns /var/lib/bkp meanwhile).
exec 9>/var/lock/bkp-test-deb.lock
flock 9

for p in bkp-server bkp; do
  if dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q installed; then
    echo "test-deb: package $p is installed here; not touching it" >&2; exit 1
  fi
done
if getent passwd bkp >/dev/null || [ -e /var/lib/bkp ] || [ -e /etc/bkp ]; then
  echo "test-deb: user bkp, /var/lib/bkp or /etc/bkp exists; not touching them" >&2; exit 1
fi

work=$(mktemp -d)
server_pid=""
cleanup() {
  set +e
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  apt-get purge -y -qq -o DPkg::Lock::Timeout=600 bkp-server bkp >/dev/null 2>&1 || true
  # What the packages keep on purge on purpose (the backups, their owner).
  rm -rf /var/lib/bkp /etc/bkp
  getent passwd bkp >/dev/null && userdel bkp
  getent group bkp >/dev/null && groupdel bkp
  rm -rf "$work"
}
trap cleanup EXIT

fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }
check() { local what="$1"; shift; "$@" || fail "$what"; echo "ok: $what"; }

export DEBIAN_FRONTEND=noninteractive
apt-get install -y -o DPkg::Lock::Timeout=600 "$server_deb" "$client_deb" >"$work/install.log" 2>&1 \
  || { cat "$work/install.log" >&2; fail "apt-get install"; }
installed=$(date +%s)

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
check "bkp-server --version from /usr/bin" test "$(/usr/bin/bkp-server --version)" = "bkp-server $version"
check "bkp --version from /usr/bin" test "$(/usr/bin/bkp --version)" = "bkp $version"
check "user bkp is a system user without a login shell" \
  test "$(getent passwd bkp | cut -d: -f6,7)" = "/var/lib/bkp:/usr/sbin/nologin"
check "/var/lib/bkp is bkp:bkp 0700" test "$(stat -c %U:%G:%a /var/lib/bkp)" = "bkp:bkp:700"
check "postinst initialised the data directory as bkp" test "$(stat -c %U /var/lib/bkp/server.crt)" = bkp
check "/etc/bkp/server.toml is a conffile, root:bkp 0640" \
  sh -c 'dpkg-query -W -f "\${Conffiles}" bkp-server | grep -q /etc/bkp/server.toml && test "$(stat -c %U:%G:%a /etc/bkp/server.toml)" = root:bkp:640'

units=/usr/lib/systemd/system
for u in bkp-server.service bkp-run@.service bkp-run@.timer; do
  check "$units/$u installed" test -f "$units/$u"
done
# Every program a unit starts, every path it names, exists.
for u in bkp-server.service bkp-run@.service; do
  exe=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$units/$u")
  check "$u: ExecStart $exe is executable" test -x "$exe"
done
check "bkp-server.service: ReadWritePaths exists" test -d "$(sed -n 's/^ReadWritePaths=//p' $units/bkp-server.service)"
check "bkp-server.service: --config file exists" test -f "$(sed -n 's/^ExecStart=.*--config \([^ ]*\).*/\1/p' $units/bkp-server.service)"
# verify exits 0 on an unknown key; any message at all is a failure here.
check "systemd-analyze verify accepts the units, silently" sh -c \
  "out=\$(systemd-analyze verify $units/bkp-server.service $units/bkp-run@.service $units/bkp-run@.timer 2>&1) && { [ -z \"\$out\" ] || { echo \"\$out\" >&2; false; }; }"
# Its exposure score is 0..10, the threshold 0..100: at most 2.0.
check "bkp-server.service: systemd-analyze security exposure <= 2.0" \
  systemd-analyze security --offline=true --threshold=20 --no-pager "$units/bkp-server.service" >/dev/null

for p in bkp-server bkp-server-serve bkp-server-token-create bkp bkp-push bkp-restore; do
  check "man page $p(1)" test -f "/usr/share/man/man1/$p.1.gz"
done
check "man -l renders bkp-server(1)" sh -c 'MANPAGER=cat man -l /usr/share/man/man1/bkp-server.1.gz 2>/dev/null | grep -q "bkp-server-serve(1)"'
check "man bkp-push finds the installed page" sh -c 'MANPAGER=cat man bkp-push 2>/dev/null | grep -q -- "--exclude"'
for c in bkp-server bkp; do
  check "$c: bash completion" bash -c ". /usr/share/bash-completion/completions/$c && complete -p $c >/dev/null"
  check "$c: zsh completion" test -s "/usr/share/zsh/vendor-completions/_$c"
  check "$c: fish completion" test -s "/usr/share/fish/vendor_completions.d/$c.fish"
done
for e in client.toml bkp-run.env bkp.cron; do
  check "example $e" test -f "/usr/share/doc/bkp/examples/$e"
done

# The installed server, started as the unit starts it (as bkp, with its
# config; on a free port), takes a push from the installed client
# started as bkp-run@smoke.service starts it, with the fingerprint the
# package's postinst printed.
serve=$(sed -n 's/^ExecStart=//p' $units/bkp-server.service)
runuser -u bkp -- $serve --listen 127.0.0.1:0 2>"$work/serve.log" &
server_pid=$!
for _ in $(seq 600); do grep -q serving "$work/serve.log" && break; kill -0 $server_pid || break; sleep 0.1; done
check "the unit's ExecStart serves as bkp" grep -q serving "$work/serve.log"
port=$(sed -n 's/^bkp-server listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$work/serve.log")
check "its log has no escape codes" sh -c "! grep -q \$(printf '\\033') '$work/serve.log'"
runuser -u bkp -- /usr/bin/bkp-server token create --data /var/lib/bkp --host smoke --role push >/etc/bkp/token 2>>"$work/serve.log"
fp=$(grep -A1 "certificate fingerprint" "$work/install.log" | tail -1 | tr -d "\r")
check "postinst printed the fingerprint" grep -Eqx '[0-9a-f]{64}' <<<"$fp"
# The definition smoke, in the client config the unit's `bkp run` reads;
# the server's address in /etc/bkp/smoke.env, which the unit also reads.
cat >/etc/bkp/client.toml <<TOML
token_file = "/etc/bkp/token"

[[backup]]
name = "smoke"
paths = ["/usr/share/doc/bkp"]
excludes = ["*.cron"]
one_file_system = true
after = "echo \$BKP_RESULT \$BKP_SNAPSHOT > $work/after"
TOML
cat >/etc/bkp/smoke.env <<ENV
BKP_SERVER=127.0.0.1:$port
BKP_FINGERPRINT=$fp
ENV
push=$(sed -n 's/^ExecStart=//p' $units/bkp-run@.service | sed 's/%i/smoke/g')
check "bkp-run@smoke's ExecStart runs [[backup]] smoke of /etc/bkp/client.toml" \
  env -i PATH=/usr/bin:/bin HOME="$work" BKP_CACHE_DIR="$work/cache" bash -c "set -a; . /etc/bkp/smoke.env; $push"
check "its after hook was told the result" grep -q "^ok [0-9a-f]\{64\}$" "$work/after"
check "the snapshot is there, without the excluded file" sh -c \
  "set -a; . /etc/bkp/smoke.env; HOME=$work; bkp ls latest --name smoke | grep -q client.toml && ! bkp ls latest --name smoke | grep -q bkp.cron"

kill $server_pid; wait $server_pid || true; server_pid=""

# An upgrade (here: the same version again) keeps the data directory and
# its certificate, and the config's modes.
crt=$(sha256sum /var/lib/bkp/server.crt)
apt-get install -y -qq --reinstall -o DPkg::Lock::Timeout=600 "$server_deb" "$client_deb" >"$work/upgrade.log" 2>&1 \
  || { cat "$work/upgrade.log" >&2; fail "apt-get install --reinstall"; }
check "reinstall kept the certificate" test "$(sha256sum /var/lib/bkp/server.crt)" = "$crt"
check "reinstall kept /var/lib/bkp bkp:bkp 0700 and server.toml root:bkp 0640" \
  test "$(stat -c %U:%G:%a /var/lib/bkp /etc/bkp/server.toml | tr '\n' ' ')" = "bkp:bkp:700 root:bkp:640 "
apt-get purge -y -qq -o DPkg::Lock::Timeout=600 bkp-server bkp >/dev/null
check "purge removed the binaries" test ! -e /usr/bin/bkp-server -a ! -e /usr/bin/bkp
check "purge kept the backups" test -e /var/lib/bkp/server.crt
echo "test-deb: all checks passed (install $((installed - start)) s, total $(($(date +%s) - start)) s)"
