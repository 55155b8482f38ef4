//! A real PostgreSQL (Debian's package): dump with `bkp push -- pg_dump`,
//! restore with `bkp restore --stdout | psql`, compare table by table.

// unsafe: geteuid; each block has a SAFETY note.
#![allow(unsafe_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};

use bkp_common::protocol::Role;
use bkp_tests::{ok, TestServer};

struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
}

fn pg_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run `make test`, which installs it")
        .map(|e| e.unwrap().path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("no PostgreSQL server binaries under /usr/lib/postgresql")
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

impl Postgres {
    /// Runs a server tool as the `postgres` user when we are root
    /// (PostgreSQL refuses to run as root).
    fn server_cmd(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn start() -> Self {
        let bin = pg_bin();
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            ok(Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()));
            ok(Command::new("chmod").arg("755").arg(dir.path()));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pg = Self { bin, dir, port };
        let data = pg.dir.path().join("data");
        ok(pg
            .server_cmd("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .stdout(Stdio::null()));
        ok(pg
            .server_cmd("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(pg.dir.path().join("log"))
            .arg("-o")
            .arg(format!("-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off", port, pg.dir.path().display()))
            .args(["-w", "start"])
            .stdout(Stdio::null()));
        pg
    }

    fn client(&self, tool: &str) -> Command {
        let mut c = Command::new(self.bin.join(tool));
        c.env("PGHOST", "127.0.0.1").env("PGPORT", self.port.to_string()).env("PGUSER", "postgres");
        c
    }

    fn sql(&self, db: &str, q: &str) -> String {
        let out = ok(self.client("psql").args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", q]));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.server_cmd("pg_ctl").arg("-D").arg(self.data()).args(["-m", "immediate", "stop"]).output();
    }
}

fn tables(pg: &Postgres, db: &str) -> Vec<String> {
    pg.sql(db, "select tablename from pg_tables where schemaname = 'public' order by 1")
        .lines()
        .map(str::to_string)
        .collect()
}

fn table_digest(pg: &Postgres, db: &str, t: &str) -> String {
    pg.sql(
        db,
        &format!(
            "select count(*) || ':' || coalesce(md5(string_agg(x::text, E'\\n' order by x::text)), '') from {t} x"
        ),
    )
}

#[test]
fn pg_dump_round_trip_through_psql() {
    let pg = Postgres::start();
    ok(pg.client("createdb").arg("shop"));
    ok(pg.client("pgbench").args(["-i", "-s", "2", "-q", "shop"]).stderr(Stdio::null()));
    pg.sql(
        "shop",
        "create table notes (id serial primary key, body text, tags text[], doc jsonb, at timestamptz, raw bytea);
         insert into notes (body, tags, doc, at, raw)
           select 'note ' || g || E'\\twith tab and ''quote''', array['a', 'b' || g], jsonb_build_object('n', g),
                  '2026-01-01'::timestamptz + g * interval '1 minute', decode(md5(g::text), 'hex')
           from generate_series(1, 20000) g;",
    );

    let server = TestServer::start();
    let token = server.token("db01", Role::Push);
    let dump_cmd = pg.bin.join("pg_dump");
    ok(server
        .bkp(&token)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port.to_string())
        .env("PGUSER", "postgres")
        .args(["push", "--name", "pgdump", "--"])
        .arg(&dump_cmd)
        .arg("shop"));

    ok(pg.client("createdb").arg("restored"));
    let mut restore = server
        .bkp(&token)
        .args(["restore", "latest", "--name", "pgdump", "--stdout"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let psql = pg
        .client("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "restored"])
        .stdin(restore.stdout.take().unwrap())
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(psql.status.success(), "psql: {}", String::from_utf8_lossy(&psql.stderr));
    assert!(restore.wait().unwrap().success(), "bkp restore --stdout failed");

    let want = tables(&pg, "shop");
    assert_eq!(want, ["notes", "pgbench_accounts", "pgbench_branches", "pgbench_history", "pgbench_tellers"]);
    assert_eq!(tables(&pg, "restored"), want);
    for t in &want {
        let a = table_digest(&pg, "shop", t);
        assert!(!a.starts_with("0:") || t == "pgbench_history", "{t} is empty: {a}");
        assert_eq!(a, table_digest(&pg, "restored", t), "table {t} differs");
    }
}
