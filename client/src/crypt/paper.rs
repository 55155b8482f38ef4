//! The printable recovery form (`bkp key export --paper`) and reading it
//! back (`bkp key import`). Each master key is four lines of 8 bytes in
//! hex, every line with a check byte over its label and bytes, so a typo
//! is caught at the line it is in rather than as a key that opens nothing.
//!
//! ```text
//! group: db-hosts
//! k1.1: 3f2a 91bc 0d4e 7781  c4
//! k1.2: ...
//! ```

use super::Keys;

fn check_byte(label: &str, bytes: &[u8]) -> u8 {
    let mut h = blake3::Hasher::new();
    h.update(b"bkp paper key line");
    h.update(label.as_bytes());
    h.update(bytes);
    h.finalize().as_bytes()[0]
}

/// The form for `group`'s keys, oldest first.
pub fn form(group: &str, keys: &[[u8; 32]]) -> String {
    let mut s = String::new();
    s.push_str("bkp key recovery form\n");
    s.push_str("Losing this key loses the data it seals: keep this sheet safe, away from the backed-up hosts.\n");
    s.push_str("To use it: bkp key import --group NAME --file PATH, then type the group and k lines.\n\n");
    s.push_str(&format!("group: {group}\n"));
    for (n, k) in keys.iter().enumerate() {
        s.push_str(&format!("(key {} of {}, id {})\n", n + 1, keys.len(), Keys::derive(k).key_id()));
        for (i, part) in k.chunks(8).enumerate() {
            let label = format!("k{}.{}", n + 1, i + 1);
            let hex: Vec<String> = part.chunks(2).map(hex::encode).collect();
            s.push_str(&format!("{label}: {}  {:02x}\n", hex.join(" "), check_byte(&label, part)));
        }
    }
    s
}

/// Reads a form back: the group and the keys. Lines other than `group:`
/// and `kN.M:` are ignored, so the whole sheet may be pasted.
pub fn parse(text: &str) -> Result<(String, Vec<[u8; 32]>), String> {
    let mut group = None;
    let mut keys: Vec<[u8; 32]> = Vec::new();
    let mut lines = 0;
    for line in text.lines().map(str::trim) {
        if let Some(g) = line.strip_prefix("group:") {
            group = Some(g.trim().to_string());
            continue;
        }
        let Some((label, rest)) = line.split_once(':') else { continue };
        let Some((n, i)) = label.strip_prefix('k').and_then(|l| l.split_once('.')) else { continue };
        let (Ok(n), Ok(i)) = (n.parse::<usize>(), i.parse::<usize>()) else { continue };
        let digits: String = rest.chars().filter(|c| !c.is_whitespace()).collect();
        if digits.len() != 18 {
            return Err(format!("line {label}: expected 16 hex digits and a check byte"));
        }
        let bytes = hex::decode(&digits).map_err(|_| format!("line {label}: not hex"))?;
        let (part, check) = bytes.split_at(8);
        if check[0] != check_byte(label, part) {
            return Err(format!("line {label} has a typo (its check byte does not match)"));
        }
        if (n, i) != (lines / 4 + 1, lines % 4 + 1) {
            return Err(format!(
                "line {label} is out of order or a line before it is missing: type the lines as the sheet lists them"
            ));
        }
        if i == 1 {
            keys.push([0; 32]);
        }
        keys[n - 1][(i - 1) * 8..i * 8].copy_from_slice(part);
        lines += 1;
    }
    if lines % 4 != 0 {
        return Err(format!("key {} has {} of its 4 lines", lines / 4 + 1, lines % 4));
    }
    let group = group.ok_or("no `group:` line")?;
    if keys.is_empty() {
        return Err("no key lines (k1.1: ...)".into());
    }
    Ok((group, keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_round_trips_and_catches_typos() {
        let keys = vec![[0xab; 32], *blake3::hash(b"x").as_bytes()];
        let f = form("db-hosts", &keys);
        assert!(f.contains("Losing this key loses the data"));
        assert_eq!(parse(&f).unwrap(), ("db-hosts".to_string(), keys.clone()));
        // One wrong digit.
        let line = f.lines().find(|l| l.starts_with("k2.3:")).unwrap();
        let mut typo = line.to_string();
        let at = typo.find(": ").unwrap() + 2;
        let c = if &typo[at..at + 1] == "0" { "1" } else { "0" };
        typo.replace_range(at..at + 1, c);
        let err = parse(&f.replace(line, &typo)).unwrap_err();
        assert!(err.contains("k2.3") && err.contains("typo"), "{err}");
        // A missing line, in the middle or at the end.
        for gone in ["k1.2:", "k2.4:"] {
            let line = f.lines().find(|l| l.starts_with(gone)).unwrap();
            assert!(parse(&f.replace(line, "")).is_err(), "{gone}");
        }
    }

    #[test]
    fn golden_line() {
        let f = form("g", &[[0; 32]]);
        let line = f.lines().find(|l| l.starts_with("k1.1:")).unwrap();
        assert_eq!(&line[..26], "k1.1: 0000 0000 0000 0000 ");
        assert_eq!(line.len(), 29);
    }
}
