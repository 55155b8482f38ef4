//! Full file metadata through a real server: extended attributes (user,
//! trusted, a file capability), access and default POSIX ACLs, chattr
//! flags with `--skip-nodump`, and a sparse file's holes; compared with
//! the tools an operator would use (getfattr, getfacl, lsattr, getcap, du,
//! stat). As root, on a file system with xattrs and flags (a loop-mounted
//! ext4 image when the temp directory's has none).

// unsafe: geteuid; each block has a SAFETY note.
#![allow(unsafe_code)]

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use bkp_common::protocol::Role;
use bkp_tests::{ok, random_bytes, TestServer};

fn tool(cmd: &str, args: &[&str], path: &Path) -> String {
    let out = Command::new(cmd).args(args).arg(path).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?} {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn run(cmd: &str, args: &[&str], path: &Path) {
    tool(cmd, args, path);
}

/// What `tool` says about `path`, with the path itself taken out so that
/// source and restore compare.
fn said(cmd: &str, args: &[&str], path: &Path) -> String {
    tool(cmd, args, path).replace(&path.display().to_string(), "PATH")
}

fn have_tools() -> bool {
    ["setfattr", "getfattr", "setfacl", "getfacl", "setcap", "getcap", "chattr", "lsattr", "du", "setpriv"]
        .iter()
        .all(|t| Command::new("sh").args(["-c", &format!("command -v {t}")]).output().is_ok_and(|o| o.status.success()))
}

/// A directory where user xattrs, ACLs and chattr flags work: a temp
/// directory, or else a loop-mounted ext4 image. Flags are lifted and the
/// image unmounted when dropped, so the temp directories can be deleted.
struct Place {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Place {
    fn new() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        if works(dir.path()) {
            return Some(Self { dir, mounted: false });
        }
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        fs::File::create(&img).unwrap().set_len(512 << 20).unwrap();
        let mkfs = Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img).status();
        let mount = || Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&mnt).status();
        if !mkfs.is_ok_and(|s| s.success()) || !mount().is_ok_and(|s| s.success()) {
            eprintln!("SKIPPED: no file system with xattrs and flags here, and no loop mount");
            return None;
        }
        let p = Self { dir, mounted: true };
        works(&p.path()).then_some(p)
    }

    fn path(&self) -> PathBuf {
        if self.mounted {
            self.dir.path().join("mnt")
        } else {
            self.dir.path().to_path_buf()
        }
    }
}

fn works(d: &Path) -> bool {
    let f = d.join("probe");
    fs::write(&f, b"").unwrap();
    let ok = Command::new("setfattr").args(["-n", "user.probe", "-v", "1"]).arg(&f).status().is_ok_and(|s| s.success())
        && Command::new("chattr").arg("+d").arg(&f).status().is_ok_and(|s| s.success());
    let _ = fs::remove_file(&f);
    ok
}

impl Drop for Place {
    fn drop(&mut self) {
        let _ = Command::new("chattr").args(["-R", "-f", "-i", "-a"]).arg(self.path()).status();
        if self.mounted {
            let _ = Command::new("umount").arg(self.path()).status();
        }
    }
}

const SPARSE: u64 = 64 << 20;

fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("shared")).unwrap();
    fs::create_dir_all(root.join("cache/deep")).unwrap();
    let w = |name: &str, data: &[u8]| fs::write(root.join(name), data).unwrap();
    w("plain", b"plain data");
    w("ping", b"\x7fELF pretend");
    w("acl", b"alice may write");
    w("locked", b"immutable");
    w("log", b"append only\n");
    w("skipme", b"nodump file");
    w("cache/deep/f", b"below a nodump directory");
    w("shared/inside", b"x");
    run("setfattr", &["-n", "user.color", "-v", "blue"], &root.join("plain"));
    run("setfattr", &["-n", "trusted.secret", "-v", "s3cr3t"], &root.join("plain"));
    run("setfattr", &["-n", "user.dir", "-v", "on a directory"], &root.join("shared"));
    run("setcap", &["cap_net_raw+ep"], &root.join("ping"));
    fs::set_permissions(root.join("acl"), fs::Permissions::from_mode(0o644)).unwrap();
    run("setfacl", &["-m", "u:1001:rw,g:1002:r"], &root.join("acl"));
    run("setfacl", &["-m", "u:1001:rwx"], &root.join("shared"));
    run("setfacl", &["-d", "-m", "u:1001:rx,g::r-x"], &root.join("shared"));
    // A 64 MiB file with 4 KiB of data at 20 MiB and 6 bytes at 40 MiB.
    let f = fs::File::create(root.join("sparse")).unwrap();
    f.set_len(SPARSE).unwrap();
    f.write_all_at(&random_bytes(4096, 7), 20 << 20).unwrap();
    f.write_all_at(b"middle", 40 << 20).unwrap();
    drop(f);
    run("chattr", &["+d"], &root.join("skipme"));
    run("chattr", &["+d"], &root.join("cache"));
    run("chattr", &["+i"], &root.join("locked"));
    run("chattr", &["+a"], &root.join("log"));
}

fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn xattrs_acls_capabilities_flags_and_holes_come_back() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !have_tools() {
        eprintln!("SKIPPED: needs root and acl, attr, e2fsprogs, libcap2-bin (scripts/install-deps.sh test)");
        return;
    }
    let Some(place) = Place::new() else { return };
    let root = place.path().join("data");
    make_tree(&root);
    let server = TestServer::start();
    let token = server.token("meta01", Role::Push);
    ok(server.bkp(&token).args(["push", "--skip-nodump"]).arg(&root));

    let target = place.path().join("restore");
    let out = ok(server.bkp(&token).args(["restore", "latest", "--target"]).arg(&target));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("warning"), "as root nothing is lost: {stderr}");
    let back = target.join(root.strip_prefix("/").unwrap());

    for name in ["plain", "ping", "acl", "locked", "log", "shared", "shared/inside", "sparse"] {
        let (a, b) = (root.join(name), back.join(name));
        for (cmd, args) in [
            ("getfattr", &["-d", "-m", "-", "--absolute-names"][..]),
            ("getfacl", &["-p"][..]),
            ("lsattr", &["-d"][..]),
            ("getcap", &[][..]),
            ("stat", &["-c", "%f %u %g %s %Y"][..]),
        ] {
            assert_eq!(said(cmd, args, &a), said(cmd, args, &b), "{cmd} of {name}");
        }
    }
    // The comparisons above can fail: they hold what was set.
    assert!(said("getfattr", &["-d", "-m", "-", "--absolute-names"], &back.join("plain")).contains("trusted.secret"));
    assert!(said("getcap", &[], &back.join("ping")).contains("cap_net_raw"));
    assert!(said("getfacl", &["-p"], &back.join("acl")).contains("user:1001:rw-"));
    assert!(said("getfacl", &["-p"], &back.join("shared")).contains("default:user:1001:r-x"));
    assert!(said("lsattr", &["-d"], &back.join("locked")).starts_with("----i"));
    assert!(said("lsattr", &["-d"], &back.join("log")).starts_with("-----a"));
    assert!(fs::write(back.join("locked"), b"changed").is_err(), "immutable after the restore");
    // --skip-nodump left the flagged file and directory out.
    assert!(!back.join("skipme").exists() && !back.join("cache").exists());
    assert!(back.join("plain").exists());

    // Holes: no more blocks than the source's (plus one block of slack).
    let (src_blocks, got_blocks) = (allocated(&root.join("sparse")), allocated(&back.join("sparse")));
    eprintln!("64 MiB sparse file: source {src_blocks} bytes allocated, restored {got_blocks}");
    assert!(got_blocks <= src_blocks + 64 * 1024, "restored {got_blocks} bytes allocated, source {src_blocks}");
    assert_eq!(fs::metadata(back.join("sparse")).unwrap().len(), SPARSE);
    assert!(fs::read(root.join("sparse")).unwrap() == fs::read(back.join("sparse")).unwrap());

    // Without the capabilities for them (as a non-root restore), each kind
    // of loss is one warning, and the rest still comes back.
    let lesser = place.path().join("lesser");
    let base = server.bkp(&token);
    let mut limited = Command::new("setpriv");
    limited.args(["--bounding-set", "-sys_admin,-setfcap,-linux_immutable", "--"]).arg(base.get_program());
    limited.env_clear().envs(base.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))));
    let out = ok(limited.args(["restore", "latest", "--target"]).arg(&lesser));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("bkp: warning:")).collect();
    assert_eq!(warnings.len(), 3, "trusted xattrs, capabilities, flags: {stderr}");
    for kind in ["trusted.*", "file capabilities", "file flags"] {
        assert_eq!(warnings.iter().filter(|w| w.contains(kind)).count(), 1, "{kind}: {stderr}");
    }
    let flags_line = warnings.iter().find(|w| w.contains("file flags")).unwrap();
    assert!(flags_line.contains("on 2 entries"), "locked and log, said once: {flags_line}");
    let l = lesser.join(root.strip_prefix("/").unwrap());
    assert_eq!(said("getfacl", &["-p"], &root.join("acl")), said("getfacl", &["-p"], &l.join("acl")));
    assert!(said("getfattr", &["-d", "-m", "-", "--absolute-names"], &l.join("plain")).contains("user.color"));
}
