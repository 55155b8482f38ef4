//! The server's TLS identity: a key and self-signed certificate made by
//! `bkp-server init`, and the QUIC endpoint configuration built from it.

use std::fs;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bkp_common::protocol::ALPN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

pub const CERT_FILE: &str = "server.crt";
pub const KEY_FILE: &str = "server.key";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0} already exists; this data directory is initialised")]
    Exists(PathBuf),
    #[error("reading {0}: {1}; run `bkp-server init` first")]
    Pem(PathBuf, String),
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// SHA-256 of a certificate's DER bytes, lowercase hex: what clients pin.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Creates the key pair and certificate; returns the fingerprint.
pub fn init(data_dir: &Path) -> Result<String, TlsError> {
    let cert_path = data_dir.join(CERT_FILE);
    let key_path = data_dir.join(KEY_FILE);
    if cert_path.exists() {
        return Err(TlsError::Exists(cert_path));
    }
    let mut names = vec!["localhost".to_string(), "bkp-server".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if !h.is_empty() && !names.iter().any(|n| n == h) {
            names.push(h.to_string());
        }
    }
    let ck = rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Setup(e.to_string()))?;
    let write = |p: &Path, body: &[u8], mode: u32| -> Result<(), TlsError> {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(mode)
            .open(p)
            .map_err(|e| TlsError::Io(p.to_path_buf(), e))?;
        f.write_all(body).and_then(|_| f.sync_all()).map_err(|e| TlsError::Io(p.to_path_buf(), e))
    };
    write(&key_path, ck.key_pair.serialize_pem().as_bytes(), 0o600)?;
    // Public, but nothing in the data directory is for other users.
    write(&cert_path, ck.cert.pem().as_bytes(), 0o600)?;
    Ok(fingerprint(ck.cert.der()))
}

pub fn load_cert(data_dir: &Path) -> Result<CertificateDer<'static>, TlsError> {
    let p = data_dir.join(CERT_FILE);
    CertificateDer::from_pem_file(&p).map_err(|e| TlsError::Pem(p, e.to_string()))
}

pub fn server_config(data_dir: &Path) -> Result<quinn::ServerConfig, TlsError> {
    let cert = load_cert(data_dir)?;
    let kp = data_dir.join(KEY_FILE);
    let key = PrivateKeyDer::from_pem_file(&kp).map_err(|e| TlsError::Pem(kp, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| TlsError::Setup(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(bkp_common::quic::transport()));
    Ok(cfg)
}
