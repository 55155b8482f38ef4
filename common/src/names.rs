//! Names: host and backup-set names, and paths stored in trees, as both
//! sides accept them; and how any name is printed.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what} {value:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ - (not starting with . or -)")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
}

fn check(what: &'static str, value: &str) -> Result<(), NameError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && !value.starts_with(['.', '-'])
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NameError { what, value: value.to_string() })
    }
}

pub fn check_host(host: &str) -> Result<(), NameError> {
    check("host name", host)
}

pub fn check_set_name(name: &str) -> Result<(), NameError> {
    check("backup name", name)
}

/// Why a stored path is refused; see [`check_path`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unsafe path \"{}\": empty, absolute, or with an empty, `.`, `..` or NUL component", escape_bytes(.0))]
pub struct PathError(pub Vec<u8>);

/// The rule for a path stored in a tree (an entry's path, a hardlink's
/// target): relative, `/`-separated, every component non-empty, not `.`
/// or `..`, and without NUL. The server refuses at commit what the
/// client would refuse at restore, from this one function, so that a
/// crafted snapshot is never stored.
pub fn check_path(path: &[u8]) -> Result<(), PathError> {
    path_components(path).map(drop)
}

/// [`check_path`], returning the components.
pub fn path_components(path: &[u8]) -> Result<Vec<&[u8]>, PathError> {
    let comps: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    // An absolute path splits into an empty first component.
    if comps.iter().any(|c| c.is_empty() || *c == b"." || *c == b".." || c.contains(&0)) {
        return Err(PathError(path.to_vec()));
    }
    Ok(comps)
}

/// A name (a file path, a host or set name) made safe to print on a
/// terminal: control characters (C0, DEL, C1: escape sequences start
/// with them), backslashes and bytes that are not UTF-8 become `\xNN`,
/// `\u{…}` or `\\`, so that a crafted file name can neither drive the
/// terminal nor pass for another name. Everything else is unchanged.
pub fn escape_bytes(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        escape_into(chunk.valid(), &mut out);
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// [`escape_bytes`] for a `str`.
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    escape_into(name, &mut out);
    out
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary: for capping client-sent text without a panic.
pub fn prefix_within(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn escape_into(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x80 && c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            // C1 controls (U+0080..U+009F; U+009B is a CSI), and the
            // bidirectional overrides that make a name read as another.
            c if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') => {
                out.push_str(&format!("\\u{{{:x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web01", "db.example.com", "pg_dump-main", "a"] {
            assert!(check_host(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a/b", "a\0", "é", &"x".repeat(65)] {
            assert!(check_set_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths() {
        for bad in [&b""[..], b"/etc/passwd", b"a/../../x", b"..", b".", b"a//b", b"a/./b", b"a\0b", b"a/", b"/"] {
            assert!(check_path(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(path_components(b"a/b c/d").unwrap(), [&b"a"[..], b"b c", b"d"]);
        for ok in [&b"a"[..], b"...", b"..a", b"a..", b".hidden/x", b"\xff\x1b[2J"] {
            assert!(check_path(ok).is_ok(), "{:?}", String::from_utf8_lossy(ok));
        }
        assert!(check_path(b"../x").unwrap_err().to_string().contains("\"../x\""));
    }

    #[test]
    fn prefixes_end_on_a_char_boundary() {
        assert_eq!(prefix_within("abc", 10), "abc");
        assert_eq!(prefix_within("abc", 2), "ab");
        assert_eq!(prefix_within("aé", 2), "a", "é is two bytes");
        assert_eq!(prefix_within("é", 0), "");
    }

    #[test]
    fn escaping() {
        assert_eq!(escape("plain name.txt"), "plain name.txt");
        assert_eq!(escape("caf\u{e9} \u{1f600}"), "caf\u{e9} \u{1f600}");
        assert_eq!(escape("a\x1b[31mred\x07"), "a\\x1b[31mred\\x07");
        assert_eq!(escape("tab\tnl\ncr\r del\x7f"), "tab\\x09nl\\x0acr\\x0d del\\x7f");
        assert_eq!(escape("csi\u{9b}2J"), "csi\\u{9b}2J");
        assert_eq!(escape("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        // A literal backslash cannot be mistaken for an escape.
        assert_eq!(escape("a\\x1b"), "a\\\\x1b");
        assert_eq!(escape_bytes(b"bad\xff\xfe\x1b"), "bad\\xff\\xfe\\x1b");
        assert_eq!(escape_bytes(b"ok/\xc3\xa9"), "ok/\u{e9}");
    }
}
