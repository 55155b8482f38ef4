//! A zstd compression context with zstd 1.5.7's pre-block splitter off.
//!
//! From 1.5.7 zstd fingerprints every 128 KiB block at level 3 to decide
//! whether to split it (`ZSTD_splitBlock`, `ZSTD_recordFingerprint`); for
//! our chunks that was a third of zstd's time and bought nothing. Measured
//! with zstd-sys 2.1.3 on one core, splitter auto vs off, level 3:
//!
//! | input                                   | auto MB/s | off MB/s | size change |
//! |-----------------------------------------|----------:|---------:|------------:|
//! | pg_dump text in 2.6 MB chunks (292 MB)  |      1652 |     2059 |        0.00% |
//! | linux `drivers/net`, one chunk per file |       223 |      261 |      +0.004% |
//!
//! `ZSTD_c_blockSplitterLevel` is an experimental parameter that the `zstd`
//! crate does not expose, hence this small wrapper over `zstd-sys`.
//!
//! The frames are *bare*: no magic number (`ZSTD_f_zstd1_magicless`) and
//! no content size, since the blob header that carries every frame has its
//! own magic and the raw length. That is 5 bytes of a typical small chunk's
//! frame header of 7, 0.4 MB over the benchmark's 79,000 chunks.
//! [`Decompressor`] reads them; otherwise they are zstd's own frames, and
//! the frames of chunks smaller than one block are what zstd gives at that
//! level with the same two flags (the first block is never split).

// unsafe: zstd-sys calls (the context API the safe crate does not expose); each block has a SAFETY note.
#![allow(unsafe_code)]

use std::ptr::NonNull;

use zstd::zstd_safe::zstd_sys;

/// `ZSTD_c_blockSplitterLevel`: 1 = no splitting.
const BLOCK_SPLITTER_OFF: i32 = 1;
/// `ZSTD_format_e::ZSTD_f_zstd1_magicless`.
const MAGICLESS: i32 = 1;

pub struct Compressor(NonNull<zstd_sys::ZSTD_CCtx>);

// SAFETY: a ZSTD_CCtx is used by one thread at a time (all methods take
// `&mut self`) and holds no thread-affine state.
unsafe impl Send for Compressor {}

impl Compressor {
    pub fn new(level: i32) -> Result<Self, String> {
        // SAFETY: plain constructor; null means out of memory.
        let ctx = NonNull::new(unsafe { zstd_sys::ZSTD_createCCtx() }).ok_or("zstd context: out of memory")?;
        let c = Self(ctx);
        c.set(zstd_sys::ZSTD_cParameter::ZSTD_c_compressionLevel, level)?;
        c.set(zstd_sys::ZSTD_cParameter::ZSTD_c_experimentalParam20, BLOCK_SPLITTER_OFF)?;
        // `ZSTD_c_format`.
        c.set(zstd_sys::ZSTD_cParameter::ZSTD_c_experimentalParam2, MAGICLESS)?;
        c.set(zstd_sys::ZSTD_cParameter::ZSTD_c_contentSizeFlag, 0)?;
        Ok(c)
    }

    fn set(&self, p: zstd_sys::ZSTD_cParameter, v: i32) -> Result<(), String> {
        // SAFETY: the context is live; zstd checks the value's range.
        let r = unsafe { zstd_sys::ZSTD_CCtx_setParameter(self.0.as_ptr(), p, v) };
        check(r).map(drop)
    }

    /// Compresses `src` as one bare zstd frame, appended to `out`.
    pub fn compress_into(&mut self, src: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        // SAFETY: compressBound is a pure function of the length.
        let bound = unsafe { zstd_sys::ZSTD_compressBound(src.len()) };
        out.reserve(bound);
        // SAFETY: the spare room holds `bound` bytes, which zstd never
        // exceeds; the source is a live slice of `src.len()` bytes.
        append(out, |dst, cap| unsafe {
            zstd_sys::ZSTD_compress2(self.0.as_ptr(), dst, cap, src.as_ptr().cast(), src.len())
        })
    }

    /// Compresses `src` as one bare zstd frame.
    pub fn compress(&mut self, src: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        self.compress_into(src, &mut out)?;
        Ok(out)
    }
}

/// Reads the bare frames of [`Compressor`].
pub struct Decompressor(NonNull<zstd_sys::ZSTD_DCtx>);

// SAFETY: as for `Compressor`.
unsafe impl Send for Decompressor {}

impl Decompressor {
    pub fn new() -> Result<Self, String> {
        // SAFETY: plain constructor; null means out of memory.
        let ctx = NonNull::new(unsafe { zstd_sys::ZSTD_createDCtx() }).ok_or("zstd context: out of memory")?;
        let d = Self(ctx);
        // SAFETY: the context is live; `ZSTD_d_format` takes MAGICLESS.
        check(unsafe {
            zstd_sys::ZSTD_DCtx_setParameter(
                d.0.as_ptr(),
                zstd_sys::ZSTD_dParameter::ZSTD_d_experimentalParam1,
                MAGICLESS,
            )
        })?;
        Ok(d)
    }

    /// Decompresses one bare frame of at most `capacity` bytes: a frame
    /// that would decode to more is an error, whatever it claims.
    pub fn decompress(&mut self, src: &[u8], capacity: usize) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(capacity);
        // SAFETY: zstd writes at most `cap` bytes of the destination and
        // reads `src.len()` bytes of the live source slice.
        append(&mut out, |dst, cap| unsafe {
            zstd_sys::ZSTD_decompressDCtx(self.0.as_ptr(), dst, cap, src.as_ptr().cast(), src.len())
        })?;
        Ok(out)
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: created by ZSTD_createDCtx, freed once.
        unsafe { zstd_sys::ZSTD_freeDCtx(self.0.as_ptr()) };
    }
}

/// Lets `zstd` write into the spare room of `out` (given as pointer and
/// length) and keeps the bytes it reports written. `zstd` must write
/// only within that room and return how much it wrote, or an error code.
fn append(out: &mut Vec<u8>, zstd: impl FnOnce(*mut std::ffi::c_void, usize) -> usize) -> Result<(), String> {
    let spare = out.spare_capacity_mut();
    let n = check(zstd(spare.as_mut_ptr().cast(), spare.len()))?;
    // SAFETY: zstd initialised the first `n` bytes of the spare room, and
    // never reports more than the room it was given.
    unsafe { out.set_len(out.len() + n) };
    Ok(())
}

fn check(r: usize) -> Result<usize, String> {
    // SAFETY: both are pure functions of the code.
    if unsafe { zstd_sys::ZSTD_isError(r) } != 0 {
        let name = unsafe { std::ffi::CStr::from_ptr(zstd_sys::ZSTD_getErrorName(r)) };
        return Err(format!("zstd: {}", name.to_string_lossy()));
    }
    Ok(r)
}

impl Drop for Compressor {
    fn drop(&mut self) {
        // SAFETY: created by ZSTD_createCCtx, freed once.
        unsafe { zstd_sys::ZSTD_freeCCtx(self.0.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text() -> Vec<u8> {
        (0..3_000_000u32).flat_map(|i| format!("{} row {}\n", i % 977, i / 3).into_bytes()).collect()
    }

    #[test]
    fn bare_frames_round_trip() {
        let mut c = Compressor::new(3).unwrap();
        let mut d = Decompressor::new().unwrap();
        let text = text();
        for data in [&b""[..], b"x", &text[..1000], &text[..]] {
            let mut out = b"hdr".to_vec();
            c.compress_into(data, &mut out).unwrap();
            assert_eq!(&out[..3], b"hdr", "appends, keeps what was there");
            assert_eq!(d.decompress(&out[3..], data.len()).unwrap(), data);
            // Not for a plain zstd reader: the magic is not there.
            assert!(data.is_empty() || zstd::bulk::decompress(&out[3..], data.len()).is_err());
        }
        assert!(c.compress(&text).unwrap().len() < text.len() / 5);
    }

    #[test]
    fn small_frames_are_zstds_own_less_magic_and_size() {
        // One block: nothing to split, so this is zstd's frame at level 3
        // with the magic and the content size left out.
        let text = text();
        let bare = Compressor::new(3).unwrap().compress(&text[..1000]).unwrap();
        let mut plain = zstd::bulk::Compressor::new(3).unwrap();
        plain.include_contentsize(false).unwrap();
        let plain = plain.compress(&text[..1000]).unwrap();
        assert_eq!(&plain[..4], zstd::zstd_safe::MAGICNUMBER.to_le_bytes());
        assert_eq!(bare, plain[4..]);
    }

    #[test]
    fn decompressor_refuses_more_than_capacity_and_garbage() {
        let mut c = Compressor::new(3).unwrap();
        let mut d = Decompressor::new().unwrap();
        let zeros = c.compress(&vec![0u8; 1 << 20]).unwrap();
        assert!(zeros.len() < 1000);
        assert!(d.decompress(&zeros, (1 << 20) - 1).is_err(), "a bomb stops at the capacity");
        assert!(d.decompress(b"not zstd at all", 100).is_err());
        assert!(d.decompress(&zeros[..zeros.len() - 1], 1 << 20).is_err(), "truncated");
    }

    #[test]
    fn out_of_range_parameter_is_an_error() {
        // zstd refuses a value outside the parameter's range; no crash.
        let c = Compressor::new(3).unwrap();
        assert!(c.set(zstd_sys::ZSTD_cParameter::ZSTD_c_experimentalParam20, 99).is_err());
    }
}
