//! What a push keeps of an entry beyond `lstat`: its extended attributes
//! in every namespace the caller may read (`user.`, `trusted.` as root,
//! `security.` with file capabilities and SELinux labels, and POSIX ACLs
//! as the kernel's `system.posix_acl_access` / `_default` blobs), and its
//! `chattr` flags (immutable, append-only, nodump). Symlinks are never
//! followed.

// unsafe: statx for the chattr flags, which std does not expose; each block has a SAFETY note.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use bkp_common::tree::{Xattr, FLAGS_KEPT, MAX_XATTR_BYTES};

/// The entry's `chattr` flags ([`FLAGS_KEPT`] bits), from `statx`, which
/// reports them without opening the file (a device or FIFO cannot be
/// opened for `FS_IOC_GETFLAGS` without side effects, and an open per
/// cached file would double an incremental push's system calls). 0 when
/// the file system does not say.
pub fn flags(path: &Path) -> u32 {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return 0 };
    // SAFETY: statx only writes into `buf`, a plain C struct for which all
    // zeroes is a valid value; `c` is a valid NUL-terminated path.
    let (rc, buf) = unsafe {
        let mut buf: libc::statx = std::mem::zeroed();
        let rc =
            libc::statx(libc::AT_FDCWD, c.as_ptr(), libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_DONT_SYNC, 0, &mut buf);
        (rc, buf)
    };
    if rc != 0 {
        return 0;
    }
    // The STATX_ATTR_ bits of these three are the FS_*_FL bits.
    let attrs = buf.stx_attributes & buf.stx_attributes_mask;
    (attrs as u32) & FLAGS_KEPT
}

/// The entry's extended attributes, sorted by name. What cannot be read
/// is left out and said in the returned warning; a file system without
/// extended attributes has none.
pub fn xattrs(path: &Path) -> (Vec<Xattr>, Option<String>) {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if unsupported(&e) => return (Vec::new(), None),
        Err(e) => return (Vec::new(), Some(format!("{}: listing extended attributes: {e}", path.display()))),
    };
    let mut out: Vec<Xattr> = Vec::new();
    let mut warning = None;
    let mut total = 0;
    let mut names: Vec<_> = names.collect();
    names.sort();
    for name in names {
        match xattr::get(path, &name) {
            Ok(Some(value)) => {
                total += name.len() + value.len();
                if total > MAX_XATTR_BYTES {
                    warning = Some(format!(
                        "{}: extended attributes over {MAX_XATTR_BYTES} bytes; those from {} on are not kept",
                        path.display(),
                        name.to_string_lossy()
                    ));
                    break;
                }
                out.push(Xattr { name: name.as_bytes().to_vec(), value });
            }
            // Removed since the listing.
            Ok(None) => {}
            Err(e) => {
                warning.get_or_insert(format!("{}: reading {}: {e}", path.display(), name.to_string_lossy()));
            }
        }
    }
    (out, warning)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::ENOSYS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_user_xattrs_sorted_and_no_flags_on_a_plain_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        if xattr::set(&f, "user.b", b"2").is_err() {
            eprintln!("SKIPPED: no user xattrs on this file system");
            return;
        }
        xattr::set(&f, "user.a", b"1").unwrap();
        let (x, warning) = xattrs(&f);
        assert!(warning.is_none(), "{warning:?}");
        let names: Vec<&[u8]> = x.iter().map(|x| &x.name[..]).collect();
        assert!(names.ends_with(&[b"user.a", b"user.b"]), "{names:?}");
        assert_eq!(flags(&f), 0);
    }
}
