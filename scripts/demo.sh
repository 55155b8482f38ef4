#!/usr/bin/env bash
# The demo: a throwaway server on 127.0.0.1, a directory and a dump
# stream backed up, listed, restored and checked byte for byte.
set -euo pipefail
bin="${CARGO_TARGET_DIR:-$HOME/.cache/bkp/target}/release"
work=$(mktemp -d /tmp/bkp-demo.XXXXXX)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
mbps() { awk -v b="$1" -v s="$2" -v e="$3" 'BEGIN { printf "%.1f MB/s", b / 1e6 / (e - s) }'; }

echo "== server: init, token, serve (data in $work/server)"
fp=$("$bin/bkp-server" init --data "$work/server" | tail -n 1)
"$bin/bkp-server" token create --data "$work/server" --host demo --role push > "$work/token" 2>/dev/null
"$bin/bkp-server" serve --data "$work/server" --listen 127.0.0.1:0 2> "$work/server.log" &
server_pid=$!
for _ in $(seq 50); do grep -q "listening on" "$work/server.log" && break; sleep 0.1; done
addr=$(sed -n 's/.*listening on //p' "$work/server.log")
export BKP_SERVER="$addr" BKP_FINGERPRINT="$fp" BKP_TOKEN_FILE="$work/token"
echo "   listening on $addr, fingerprint $fp"

src=/usr/share/doc
[ -d "$src" ] || src=$(pwd)
tree_bytes=$(du -sb --apparent-size "$src" | cut -f1)
echo "== push the directory $src ($((tree_bytes / 1000000)) MB)"
t0=$(now); "$bin/bkp" push --verbose "$src"; t1=$(now)
echo "   $(mbps "$tree_bytes" "$t0" "$t1") wall"

echo "== push a 300 MB SQL-like dump from stdin"
awk 'BEGIN { srand(1); for (i = 0; i < 4200000; i++) printf "INSERT INTO t VALUES (%d, %d, '\''user%d@example.com'\'');\n", i, int(rand()*1e6), i % 977 }' > "$work/dump.sql"
dump_bytes=$(stat -c %s "$work/dump.sql")
t0=$(now); "$bin/bkp" push --verbose --name dump --stdin < "$work/dump.sql"; t1=$(now)
echo "   $(mbps "$dump_bytes" "$t0" "$t1") wall"

echo "== push the same dump again (deduplicated)"
"$bin/bkp" push --verbose --name dump --stdin < "$work/dump.sql"

echo "== snapshots"
"$bin/bkp" snapshots

echo "== restore both and compare"
t0=$(now); "$bin/bkp" restore latest --name files --target "$work/restore"; t1=$(now)
echo "   tree restored at $(mbps "$tree_bytes" "$t0" "$t1")"
# --no-dereference: symlinks are compared as links (relative ones may
# point outside the backed-up directory).
diff -r --no-dereference "$src" "$work/restore${src}"
echo "   tree: identical"
t0=$(now); "$bin/bkp" restore latest --name dump --stdout > "$work/dump.restored"; t1=$(now)
echo "   dump restored at $(mbps "$dump_bytes" "$t0" "$t1")"
cmp "$work/dump.sql" "$work/dump.restored"
echo "   dump: identical"
echo "== demo OK (store: $(du -sh "$work/server/db" | cut -f1))"
