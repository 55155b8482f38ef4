//! `bkp-server serve --config FILE`: the server's TOML configuration.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// QUIC listen address; `--listen` overrides it.
    pub listen: SocketAddr,
    /// RocksDB block cache, MiB: the main knob for server memory.
    pub cache_mb: usize,
    /// Simultaneous client connections; more are refused.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:7443".parse().expect("valid default address"), cache_mb: 128, max_connections: 256 }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("config file {path}: {msg}")]
pub struct ConfigError {
    pub path: String,
    pub msg: String,
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |msg: String| ConfigError { path: path.display().to_string(), msg };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_keys() {
        let c: ServerConfig = toml::from_str("listen = \"0.0.0.0:9000\"\ncache_mb = 64").unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.cache_mb, 64);
        assert!(toml::from_str::<ServerConfig>("lisen = \"x\"").is_err());
    }
}
