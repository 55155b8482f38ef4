//! Host and backup-set names: what both sides accept.

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
}
