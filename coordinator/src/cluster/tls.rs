//! The coordinator's certificate: self-signed, generated at start or kept in `--tls-dir` so
//! that its fingerprint (what workers pin) survives restarts.

use anyhow::{Context, Result};
use lorafleet_common::protocol::sha256_hex;
use lorafleet_worker::link::SERVER_NAME;
use std::path::Path;

/// A DER certificate, its PKCS#8 key and the certificate's SHA-256 fingerprint.
pub struct Identity {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub fingerprint: String,
}

/// A fresh self-signed certificate.
pub fn generate() -> Result<Identity> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])
        .context("generating the coordinator's certificate")?;
    let cert = certified.cert.der().to_vec();
    Ok(Identity { fingerprint: sha256_hex(&cert), cert, key: certified.key_pair.serialize_der() })
}

/// `DIR/cert.der` and `DIR/key.der`, created on first use.
pub fn load_or_create(dir: &Path) -> Result<Identity> {
    let (cert_path, key_path) = (dir.join("cert.der"), dir.join("key.der"));
    if cert_path.is_file() && key_path.is_file() {
        let cert = std::fs::read(&cert_path).with_context(|| format!("{}", cert_path.display()))?;
        let key = std::fs::read(&key_path).with_context(|| format!("{}", key_path.display()))?;
        return Ok(Identity { fingerprint: sha256_hex(&cert), cert, key });
    }
    let id = generate()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    lorafleet_common::atomic::write_file(&key_path, &id.key)?;
    lorafleet_common::atomic::write_file(&cert_path, &id.cert)?;
    Ok(id)
}
