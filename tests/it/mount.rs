//! `bkp mount`: the host's snapshots as a read-only FUSE file system,
//! compared file by file with the source, then unmounted from outside
//! (`fusermount3 -u`) and by SIGTERM; the mount process exits 0 both times.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bkp_common::protocol::Role;
use bkp_tests::{json, ok, random_bytes, TestServer};

fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: bkp mount needs the fuse kernel module (modprobe fuse) and Debian's fuse3 \
         (scripts/install-deps.sh)"
    );
    assert!(
        Command::new("fusermount3").arg("-V").output().is_ok_and(|o| o.status.success()),
        "fusermount3 is missing: install Debian's fuse3 (scripts/install-deps.sh)"
    );
}

fn mounted(dir: &Path) -> bool {
    let m = fs::read_to_string("/proc/self/mounts").unwrap();
    let d = dir.to_str().unwrap();
    m.lines().any(|l| l.split(' ').nth(1) == Some(d))
}

/// A `bkp mount` process; a failing test still unmounts and ends it.
struct Mounted {
    child: Child,
    dir: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("fusermount3").arg("-uz").arg(&self.dir).status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `bkp mount` and waits (with a deadline) for the view to appear.
fn start_mount(server: &TestServer, token: &Path, dir: &Path) -> Mounted {
    let child = server.bkp(token).arg("mount").arg(dir).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let mut m = Mounted { child, dir: dir.to_path_buf() };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(mounted(dir) && dir.join("files/latest").exists()) {
        if let Some(st) = m.child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(m.child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("bkp mount exited ({st}) before the mount appeared: {err}");
        }
        assert!(Instant::now() < deadline, "the mount did not appear within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    m
}

fn wait_exit(m: &mut Mounted) -> std::process::ExitStatus {
    let child = &mut m.child;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(Instant::now() < deadline, "bkp mount did not exit within 20 s of the unmount");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every path below `root`, relative, walk order.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn go(base: &Path, d: &Path, out: &mut Vec<PathBuf>) {
        let mut names: Vec<_> = fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        for p in names {
            out.push(p.strip_prefix(base).unwrap().to_path_buf());
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                go(base, &p, out);
            }
        }
    }
    go(root, root, &mut out);
    out
}

#[test]
fn mount_shows_every_snapshot_and_reads_files_on_demand() {
    require_fuse();
    let server = TestServer::start();
    let push = server.token("web01", Role::Push);
    let token = server.token("web01", Role::Restore);
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("data");
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::write(root.join("dir/small.txt"), b"hello world\n").unwrap();
    fs::write(root.join("dir/empty"), b"").unwrap();
    fs::write(root.join("dir/sub/big.bin"), random_bytes(9 << 20, 3)).unwrap();
    fs::write(root.join("old.txt"), b"first version\n").unwrap();
    fs::hard_link(root.join("dir/small.txt"), root.join("dir/hardlink")).unwrap();
    std::os::unix::fs::symlink("small.txt", root.join("dir/link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    let xattrs = Command::new("setfattr")
        .args(["-n", "user.note", "-v", "kept"])
        .arg(root.join("dir/small.txt"))
        .status()
        .is_ok_and(|s| s.success());
    let first = json(&ok(server.bkp(&push).args(["push", "--json"]).arg(&root)));
    fs::write(root.join("old.txt"), b"second version, longer\n").unwrap();
    ok(server.bkp(&push).args(["push", "--json"]).arg(&root));

    let mnt = tempfile::tempdir().unwrap();
    let mut child = start_mount(&server, &token, mnt.path());
    let set = mnt.path().join("files");
    let mut times: Vec<String> =
        fs::read_dir(&set).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    times.sort();
    assert_eq!(times.len(), 3, "two snapshots and latest: {times:?}");
    assert!(times.contains(&"latest".to_string()));
    let newest = fs::read_link(set.join("latest")).unwrap();
    assert!(set.join(&newest).is_dir(), "latest -> {}", newest.display());

    let rel = root.strip_prefix("/").unwrap();
    let view = set.join("latest").join(rel);
    // -A: the temp directories' names start with a dot.
    let ls = Command::new("ls").arg("-AR").arg(mnt.path()).output().unwrap();
    assert!(ls.status.success(), "ls -AR: {}", String::from_utf8_lossy(&ls.stderr));
    let listing = String::from_utf8_lossy(&ls.stdout);
    for name in ["big.bin", "small.txt", "hardlink", "dangling", "latest"] {
        assert!(listing.contains(name), "{name} in ls -AR:\n{listing}");
    }
    // Every entry: the same names, types, modes, mtimes; files byte for byte.
    let (want, got) = (walk(&root), walk(&view));
    assert_eq!(want, got);
    for p in &want {
        let (a, b) = (root.join(p), view.join(p));
        let (ma, mb) = (fs::symlink_metadata(&a).unwrap(), fs::symlink_metadata(&b).unwrap());
        assert_eq!(ma.file_type(), mb.file_type(), "{}", p.display());
        assert_eq!((ma.mode(), ma.uid(), ma.gid()), (mb.mode(), mb.uid(), mb.gid()), "{}", p.display());
        if ma.file_type().is_symlink() {
            assert_eq!(fs::read_link(&a).unwrap(), fs::read_link(&b).unwrap(), "{}", p.display());
            continue;
        }
        if !ma.is_dir() {
            assert_eq!((ma.mtime(), ma.mtime_nsec()), (mb.mtime(), mb.mtime_nsec()), "{}", p.display());
        }
        if ma.is_file() {
            assert_eq!(ma.len(), mb.len());
            let cmp = Command::new("cmp").arg(&a).arg(&b).output().unwrap();
            assert!(cmp.status.success(), "cmp {}: {}", p.display(), String::from_utf8_lossy(&cmp.stdout));
        }
    }
    let (a, b) = (fs::metadata(view.join("dir/small.txt")).unwrap(), fs::metadata(view.join("dir/hardlink")).unwrap());
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "a hardlink is the same inode");
    if xattrs {
        let g = Command::new("getfattr")
            .args(["-n", "user.note", "--only-values"])
            .arg(view.join("dir/small.txt"))
            .output();
        assert_eq!(g.unwrap().stdout, b"kept");
    }
    // The older snapshot holds the older file.
    let older = times.iter().find(|t| **t != "latest" && Path::new(t) != newest).unwrap();
    assert_eq!(fs::read(set.join(older).join(rel).join("old.txt")).unwrap(), b"first version\n");
    assert!(first["snapshot"]["id"].is_string());
    // Read-only.
    assert!(fs::write(view.join("new"), b"x").is_err());
    assert!(fs::OpenOptions::new().write(true).open(view.join("dir/small.txt")).is_err());

    let um = Command::new("fusermount3").arg("-u").arg(mnt.path()).output().unwrap();
    assert!(um.status.success(), "fusermount3 -u: {}", String::from_utf8_lossy(&um.stderr));
    let st = wait_exit(&mut child);
    assert!(st.success(), "bkp mount exited {st}");
    assert!(!mounted(mnt.path()));

    // SIGTERM unmounts too, and exits 0.
    let mut child = start_mount(&server, &token, mnt.path());
    ok(Command::new("kill").arg("-TERM").arg(child.child.id().to_string()));
    let st = wait_exit(&mut child);
    assert!(st.success(), "bkp mount exited {st} on SIGTERM");
    assert!(!mounted(mnt.path()), "unmounted on SIGTERM");
}
