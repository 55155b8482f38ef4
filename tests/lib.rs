//! Test harness: a real `bkp-server` (in process, on 127.0.0.1:0, with a
//! real RocksDB in a temp dir) and the real `bkp` binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread::JoinHandle;

use bkp_common::protocol::Role;
use bkp_common::tree::{ChunkRef, Entry, Meta, TreeEncoder};
use bkp_common::{ChunkId, ContentHash};
use bkp_server::config::ServerConfig;
use bkp_server::tokens::Tokens;
use tokio::sync::oneshot;

pub mod seaweed;

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub fingerprint: String,
    pub config: ServerConfig,
    state: Option<Arc<bkp_server::ServerState>>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start() -> Self {
        Self::start_with(ServerConfig { cache_mb: 16, ..Default::default() })
    }

    pub fn start_with(config: ServerConfig) -> Self {
        Self::start_in(&std::env::temp_dir(), config)
    }

    /// A server whose data directory is made under `parent` (a small
    /// file system, for the disk-full tests).
    pub fn start_in(parent: &Path, config: ServerConfig) -> Self {
        let dir = tempfile::tempdir_in(parent).expect("tempdir");
        let fingerprint = bkp_server::tls::init(dir.path()).expect("tls init");
        let mut s = Self {
            dir,
            addr: "127.0.0.1:0".parse().unwrap(),
            fingerprint,
            config,
            state: None,
            stop: None,
            thread: None,
        };
        s.boot(None);
        s
    }

    /// A server on a data directory made elsewhere (`bkp-server rebuild`).
    pub fn start_on(dir: tempfile::TempDir, config: ServerConfig) -> Self {
        let cert = bkp_server::tls::load_cert(dir.path()).expect("the directory has a certificate");
        let fingerprint = bkp_server::tls::fingerprint(&cert);
        let mut s = Self {
            dir,
            addr: "127.0.0.1:0".parse().unwrap(),
            fingerprint,
            config,
            state: None,
            stop: None,
            thread: None,
        };
        s.boot(None);
        s
    }

    /// The running server's state, for jobs and hooks in process.
    pub fn state(&self) -> Arc<bkp_server::ServerState> {
        self.state.clone().expect("server running")
    }

    pub fn data(&self) -> &Path {
        self.dir.path()
    }

    fn boot(&mut self, port: Option<u16>) {
        let data = self.dir.path().to_path_buf();
        let listen: SocketAddr = format!("127.0.0.1:{}", port.unwrap_or(0)).parse().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let config = self.config.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let state = bkp_server::ServerState::open(&data, config).expect("open server state");
                let ep = bkp_server::bind(&data, listen).expect("bind");
                addr_tx.send((ep.local_addr().unwrap(), state.clone())).unwrap();
                bkp_server::serve(ep, state, async {
                    let _ = stop_rx.await;
                })
                .await
                .expect("serve");
            });
        });
        let (addr, state) = addr_rx.recv().expect("server started");
        self.addr = addr;
        self.state = Some(state);
        self.stop = Some(stop_tx);
        self.thread = Some(thread);
    }

    /// Stops the server and releases its database.
    pub fn stop(&mut self) {
        self.state = None;
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread");
        }
    }

    /// Stops and starts again on the same data directory and port.
    pub fn restart(&mut self) {
        let port = self.addr.port();
        self.stop();
        self.boot(Some(port));
    }

    /// Creates a token and writes it to a file; returns the file.
    pub fn token(&self, host: &str, role: Role) -> PathBuf {
        let (tok, rec) = Tokens::new(self.data()).create(host, role).expect("token");
        let p = self.data().join(format!("token-{}", rec.id));
        std::fs::write(&p, tok).unwrap();
        p
    }

    pub fn client_config(&self, token_file: &Path) -> bkp_client::config::ClientConfig {
        bkp_client::config::ClientConfig {
            server: self.addr.to_string(),
            trust: bkp_client::config::Trust::Fingerprint(self.fingerprint.clone()),
            token: std::fs::read_to_string(token_file).unwrap(),
            timeout: bkp_client::conn::DEFAULT_TIMEOUT,
        }
    }

    pub async fn client(&self, token_file: &Path) -> Arc<bkp_client::Client> {
        Arc::new(bkp_client::Client::connect(&self.client_config(token_file)).await.expect("connect"))
    }

    /// A `bkp` command wired to this server with `token_file`.
    pub fn bkp(&self, token_file: &Path) -> Command {
        let mut c = Command::new(bin("bkp"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.data())
            .env("BKP_SERVER", self.addr.to_string())
            .env("BKP_FINGERPRINT", &self.fingerprint)
            .env("BKP_TOKEN_FILE", token_file)
            // A host's /etc/bkp/client.toml (the .deb check installs one)
            // must not reach into a test.
            .env("BKP_CONFIG", "/dev/null");
        c
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

impl TestServer {
    /// `bkp push --stdin --json` of `data`; returns the JSON report.
    pub fn push_stdin(&self, token: &Path, name: &str, data: &[u8]) -> serde_json::Value {
        use std::io::Write;
        use std::process::Stdio;
        let mut child = self
            .bkp(token)
            .args(["push", "--json", "--stdin", "--name", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bkp");
        child.stdin.take().unwrap().write_all(data).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        json(&out)
    }

    /// `bkp-server ARGS --data DIR` for this server's data directory.
    pub fn admin(&self, args: &[&str]) -> Output {
        ok(Command::new(bin("bkp-server")).args(args).arg("--data").arg(self.data()))
    }
}

/// A binary of this workspace, next to the test executable's directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --release --bins` first (make test does)", p.display());
    p
}

/// Runs a command and panics with its stderr unless it succeeds.
pub fn ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(out.status.success(), "{:?} failed: {}\n{}", cmd, out.status, String::from_utf8_lossy(&out.stderr));
    out
}

/// Deterministic incompressible bytes.
pub fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// Deterministic text that compresses like a SQL dump.
pub fn dump_like(lines: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(lines * 60);
    for i in 0..lines {
        let v: u32 = r.gen_range(0..1_000_000);
        out.extend_from_slice(format!("{i}\t{v}\tuser{}@example.com\t2026-11-{:02}\n", v % 977, 1 + v % 28).as_bytes());
    }
    out
}

/// Tree entries for one file made of `chunks` (which concatenate to
/// `data`), for tests that craft snapshots by hand.
pub fn file_entries(path: &[u8], data: &[u8], chunks: &[&[u8]]) -> Vec<Entry> {
    let meta = Meta { mode: 0o644, ..Meta::default() };
    vec![
        Entry::File { path: path.to_vec(), meta, size: data.len() as u64 },
        Entry::Chunks(chunks.iter().map(|c| ChunkRef { id: ChunkId::of(c), len: c.len() as u32 }).collect()),
        Entry::FileEnd { hash: ContentHash::from(blake3::hash(data)) },
    ]
}

/// A tree stream of `entries`.
pub fn encode_tree(entries: &[Entry]) -> Vec<u8> {
    let mut enc = TreeEncoder::new();
    for e in entries {
        enc.push(e);
    }
    enc.take()
}

pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("json: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

impl TestServer {
    /// Damages stored chunk data as a failing disk would: with the server
    /// stopped, flips one byte at every place `needle` (a piece of a
    /// stored blob) occurs in RocksDB's blob files, then restarts it.
    /// Blobs reach blob files at a flush: run a GC first (its compaction
    /// flushes). Returns how many places were damaged (at least one).
    pub fn corrupt_stored_bytes(&mut self, needle: &[u8]) -> usize {
        self.stop();
        let mut hits = 0;
        for e in std::fs::read_dir(self.data().join("db")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "blob") {
                continue;
            }
            let mut bytes = std::fs::read(&p).unwrap();
            let found: Vec<usize> =
                bytes.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect();
            for i in &found {
                bytes[i + needle.len() / 2] ^= 0x55;
            }
            if !found.is_empty() {
                std::fs::write(&p, &bytes).unwrap();
                hits += found.len();
            }
        }
        assert!(hits > 0, "the bytes are in no blob file (run a GC first so they are flushed)");
        let port = self.addr.port();
        self.boot(Some(port));
        hits
    }
}

/// A `bkp-server serve` in a process of its own, for tests that kill it
/// (SIGKILL: no clean RocksDB shutdown, no flush at close).
pub struct ServerProcess {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub fingerprint: String,
    /// The port, held (bound, never read: silent) from `init` until the
    /// first `serve`, so no other test's server takes it meanwhile.
    reserved: std::sync::Mutex<Option<std::net::UdpSocket>>,
    child: Option<std::process::Child>,
}

impl ServerProcess {
    /// Initialises a data directory; `serve` starts the process. Until
    /// then the port is bound here and nothing answers on it.
    pub fn init() -> Self {
        let dir = tempfile::tempdir().unwrap();
        ok(Command::new(bin("bkp-server")).args(["init", "--data"]).arg(dir.path()));
        let fingerprint = bkp_server::tls::fingerprint(&bkp_server::tls::load_cert(dir.path()).unwrap());
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        Self { dir, port, fingerprint, reserved: std::sync::Mutex::new(Some(socket)), child: None }
    }

    /// The `--listen` value for a `serve` about to start: gives the held
    /// port up for it to bind.
    pub fn listen_arg(&self) -> String {
        self.reserved.lock().unwrap().take();
        format!("127.0.0.1:{}", self.port)
    }

    pub fn token(&self, host: &str, role: &str) -> PathBuf {
        let out = ok(Command::new(bin("bkp-server"))
            .args(["token", "create", "--host", host, "--role", role, "--data"])
            .arg(self.dir.path()));
        let p = self.dir.path().join(format!("{host}.{role}.token"));
        std::fs::write(&p, out.stdout).unwrap();
        p
    }

    /// Starts `serve` with extra environment and waits for its control socket.
    pub fn serve(&mut self, env: &[(&str, &str)]) {
        let mut c = Command::new(bin("bkp-server"));
        c.args(["serve", "--listen", &self.listen_arg(), "--data"])
            .arg(self.dir.path())
            // 0600 like everything the server writes there: the
            // hardening test finds any file others could read.
            .stderr({
                use std::os::unix::fs::OpenOptionsExt;
                let log = self.dir.path().join("serve.log");
                std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(log).unwrap()
            })
            .envs(env.iter().copied());
        self.child = Some(c.spawn().unwrap());
        for _ in 0..100 {
            if bkp_server::control::socket_path(self.dir.path()).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// What `serve` logged so far (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// The running `serve`'s process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `bkp-server ARGS --data DIR`, not checked.
    pub fn admin(&self, args: &[&str]) -> Output {
        Command::new(bin("bkp-server")).args(args).arg("--data").arg(self.dir.path()).output().unwrap()
    }

    /// SIGKILL, then wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn bkp(&self, token: &Path) -> Command {
        let mut c = Command::new(bin("bkp"));
        c.env("BKP_SERVER", format!("127.0.0.1:{}", self.port))
            .env("BKP_FINGERPRINT", &self.fingerprint)
            .env("BKP_TOKEN_FILE", token)
            .env("BKP_CONFIG", "/dev/null");
        c
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
