//! Restoring what [`Meta`] holds beyond mode, owner and mtime: extended
//! attributes (POSIX ACLs among them), `chattr` flags, and the holes of
//! sparse files. What cannot be restored (not root, a file system without
//! extended attributes or flags) is counted per kind of loss and warned
//! about once per kind, not per file.
//!
//! Mode bits never widen access: with an access ACL, the group bits of
//! the mode are the ACL's mask, so a file whose ACL cannot be set gets
//! the owning group's own ACL entry (within the mask) as its group bits.

// unsafe: the FS_IOC_GETFLAGS / SETFLAGS ioctls, which std does not wrap; each block has a SAFETY note.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use bkp_common::tree::{Meta, Xattr, FLAGS_KEPT};

const ACL_ACCESS: &[u8] = b"system.posix_acl_access";

/// Kinds of loss, each with how many entries it hit and the first one.
#[derive(Default)]
pub struct Losses(BTreeMap<&'static str, (u64, String)>);

impl Losses {
    fn note(&mut self, kind: &'static str, p: &Path) {
        let e = self.0.entry(kind).or_insert_with(|| (0, p.display().to_string()));
        e.0 += 1;
    }

    /// One line per kind of loss.
    pub fn warnings(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|(kind, (n, first))| format!("{kind}: not restored on {n} entries (first: {first})"))
            .collect()
    }
}

/// Why an extended attribute could not be set, as a kind of loss.
fn xattr_loss(name: &[u8], e: &std::io::Error) -> &'static str {
    let acl = name.starts_with(b"system.posix_acl_");
    match e.raw_os_error() {
        Some(libc::ENOTSUP) if acl => {
            "POSIX ACLs (the target file system has none; group bits were narrowed to what the ACL allowed)"
        }
        Some(libc::ENOTSUP) => "extended attributes (the target file system has none)",
        Some(libc::EPERM) if name.starts_with(b"trusted.") => "trusted.* extended attributes (they need root)",
        Some(libc::EPERM) if name == b"security.capability" => "file capabilities (they need root)",
        Some(libc::EPERM) if name.starts_with(b"security.") => {
            "security.* extended attributes (SELinux labels and the like need root)"
        }
        Some(libc::EPERM | libc::EACCES) if acl => "POSIX ACLs (permission denied; group bits were narrowed)",
        _ if acl => "POSIX ACLs (refused by the target; group bits were narrowed)",
        Some(libc::ENOSPC | libc::E2BIG | libc::ERANGE) => "extended attributes (too large for the target file system)",
        _ => "extended attributes (refused by the target file system)",
    }
}

/// Sets `xattrs` on `p` (never following a symlink). Returns whether an
/// access ACL was among them and could not be set.
pub fn set_xattrs(p: &Path, xattrs: &[Xattr], losses: &mut Losses) -> bool {
    let mut acl_lost = false;
    for x in xattrs {
        if let Err(e) = xattr::set(p, std::ffi::OsStr::from_bytes(&x.name), &x.value) {
            losses.note(xattr_loss(&x.name, &e), p);
            acl_lost |= x.name == ACL_ACCESS;
        }
    }
    acl_lost
}

/// The mode to give an entry whose access ACL is `acl`, if the ACL cannot
/// be set: group bits are the owning group's entry within the mask (the
/// mode's group bits were the mask). Named users and groups lose their
/// access; nobody gains any.
pub fn narrowed_mode(mode: u32, acl: &[u8]) -> u32 {
    // The kernel's blob: version 2, then (tag u16, perm u16, id u32) each.
    const GROUP_OBJ: u16 = 0x04;
    if acl.len() < 4 || u32::from_le_bytes(acl[..4].try_into().expect("4 bytes")) != 2 {
        return mode & !0o070; // unreadable: no group access at all
    }
    let group_obj = acl[4..]
        .chunks_exact(8)
        .find(|e| u16::from_le_bytes([e[0], e[1]]) == GROUP_OBJ)
        .map(|e| u32::from(u16::from_le_bytes([e[2], e[3]])) & 0o7);
    let group = group_obj.unwrap_or(0) & ((mode >> 3) & 0o7);
    (mode & !0o070) | (group << 3)
}

/// The mode an entry gets before its extended attributes are known to
/// have been set: narrowed when it has an access ACL.
pub fn safe_mode(m: &Meta) -> u32 {
    match m.xattrs.iter().find(|x| x.name == ACL_ACCESS) {
        Some(acl) => narrowed_mode(m.mode, &acl.value),
        None => m.mode,
    }
}

/// Sets the kept `chattr` flags on a regular file or directory at `p`,
/// keeping the flags the file system set itself (extents and the like).
pub fn set_flags(p: &Path, flags: u32, losses: &mut Losses) {
    let flags = flags & FLAGS_KEPT;
    if flags == 0 {
        return;
    }
    let kind = match apply_flags(p, flags) {
        Ok(()) => return,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => "file flags (immutable and append-only need root)",
        Err(_) => "file flags (the target file system has none)",
    };
    losses.note(kind, p);
}

fn apply_flags(p: &Path, flags: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // O_NONBLOCK: the entry is a file or directory, but never wait if
    // something else took its place.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)?;
    let mut cur: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through the pointer, which
    // points at a live c_int; the descriptor is open for the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut cur as *mut libc::c_int) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let new = cur | flags as libc::c_int;
    // SAFETY: FS_IOC_SETFLAGS reads one int through the pointer, which
    // points at a live c_int.
    if new != cur && unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &new as *const libc::c_int) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The block size holes are made of on the file system of `p`.
pub fn hole_block(p: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p).map(|m| m.blksize()) {
        Ok(b) if b.is_power_of_two() && (512..=1 << 20).contains(&b) => b as usize,
        _ => 4096,
    }
}

fn is_zero(b: &[u8]) -> bool {
    let (words, rest) = b.split_at(b.len() / 16 * 16);
    // Most blocks of data fail on their first 16 bytes.
    words.chunks_exact(16).all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && rest.iter().all(|&x| x == 0)
}

/// Writes `data` at offset `at` of a new (all-hole) file, leaving every
/// block-aligned piece of zeros unwritten, so it stays a hole. Returns
/// where the last write ended, if anything was written: the file's
/// length must still be set (`set_len`) when it ends in a hole.
pub fn write_sparse(file: &File, data: &[u8], at: u64, block: usize) -> std::io::Result<Option<u64>> {
    let mut run: Option<usize> = None;
    let mut last_end = None;
    let mut i = 0;
    while i < data.len() {
        let to_boundary = block - ((at + i as u64) % block as u64) as usize;
        let end = (i + to_boundary).min(data.len());
        if is_zero(&data[i..end]) {
            if let Some(s) = run.take() {
                file.write_all_at(&data[s..i], at + s as u64)?;
                last_end = Some(at + i as u64);
            }
        } else if run.is_none() {
            run = Some(i);
        }
        i = end;
    }
    if let Some(s) = run {
        file.write_all_at(&data[s..], at + s as u64)?;
        last_end = Some(at + data.len() as u64);
    }
    Ok(last_end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut b = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            b.extend_from_slice(&tag.to_le_bytes());
            b.extend_from_slice(&perm.to_le_bytes());
            b.extend_from_slice(&id.to_le_bytes());
        }
        b
    }

    /// `setfacl -m u:alice:rw f` on a 0644 file: the group bits become the
    /// mask (rw); without the ACL the group must get its own r, not rw.
    #[test]
    fn a_lost_acl_never_widens_the_group_bits() {
        let blob = acl(&[(0x01, 6, u32::MAX), (0x02, 6, 1001), (0x04, 4, u32::MAX), (0x10, 6, u32::MAX), (0x20, 4, 0)]);
        assert_eq!(narrowed_mode(0o664, &blob), 0o644);
        // The mask limits the group entry too.
        let masked = acl(&[(0x01, 7, u32::MAX), (0x04, 7, u32::MAX), (0x10, 5, u32::MAX), (0x20, 0, 0)]);
        assert_eq!(narrowed_mode(0o4750, &masked), 0o4750);
        assert_eq!(narrowed_mode(0o770, b"junk"), 0o700);
    }

    #[test]
    fn zero_blocks_become_holes_and_the_rest_is_written_once() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let f = File::create(&p).unwrap();
        let block = hole_block(d.path());
        // data | 8 zero blocks | a few bytes | zeros to a block past the end
        let mut chunk = vec![7u8; block];
        chunk.extend(vec![0u8; 8 * block]);
        chunk.extend(b"middle");
        chunk.extend(vec![0u8; 2 * block]);
        let at = 64 * block as u64; // a hole before the chunk, too
        let end = write_sparse(&f, &chunk, at, block).unwrap();
        assert_eq!(end, Some(at + (9 * block + block) as u64), "the block holding `middle` is written whole");
        let len = at + chunk.len() as u64;
        f.set_len(len).unwrap();
        let back = std::fs::read(&p).unwrap();
        assert_eq!(back.len() as u64, len);
        assert!(back[..at as usize].iter().all(|&b| b == 0));
        assert_eq!(&back[at as usize..], &chunk[..]);
        let blocks_used = std::fs::metadata(&p).unwrap().blocks() * 512;
        assert!(
            blocks_used <= 2 * block as u64 + 4096,
            "{blocks_used} bytes allocated for 2 blocks of data in a {len}-byte file"
        );
        assert_eq!(write_sparse(&f, &[0u8; 100], 0, block).unwrap(), None, "all zeros: nothing written");
    }
}
