//! HTTPS: the certificate and key of `serve --tls-cert --tls-key`, read from PEM files,
//! offered with ALPN `h2` and `http/1.1` so that a browser opens one connection and
//! multiplexes every stream of its tabs over it.
//!
//! The files are read at start (a bad file is a configuration error, exit 2) and again
//! on SIGHUP ([`Tls::reload`]): new handshakes use the new certificate, connections
//! already open keep theirs, and a reload that fails keeps the old one and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// The ALPN protocols offered, best first.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Where the certificate chain and its key are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// The chain, leaf first, PEM.
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1), PEM.
    pub key: PathBuf,
}

/// The server side of TLS, its certificate swappable while connections run.
pub struct Tls {
    files: Files,
    /// A std lock: nothing awaits while it is held, and it is held for an `Arc` clone.
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// Reads both files and builds the server configuration.
    pub fn load(files: Files) -> Result<Tls, crate::Error> {
        let config = server_config(&files)?;
        Ok(Tls {
            files,
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// Reads the files again; on success new handshakes use them. On failure the
    /// certificate in use stays and the error says what was wrong.
    pub fn reload(&self) -> Result<(), crate::Error> {
        let config = server_config(&self.files)?;
        *self.current.write().expect("tls lock poisoned") = Arc::new(config);
        Ok(())
    }

    /// An acceptor for one handshake, with the certificate in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("tls lock poisoned").clone())
    }

    pub fn files(&self) -> &Files {
        &self.files
    }
}

fn server_config(files: &Files) -> Result<ServerConfig, crate::Error> {
    let chain = read_chain(&files.cert)?;
    let key = read_key(&files.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::Error::config(format!("tls: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            crate::Error::config(format!(
                "tls: {} and {} do not make a usable certificate: {e}",
                files.cert.display(),
                files.key.display()
            ))
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, crate::Error> {
    let text = read(path, "--tls-cert")?;
    let chain = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| crate::Error::config(format!("--tls-cert {}: {e}", path.display())))?;
    if chain.is_empty() {
        return Err(crate::Error::config(format!(
            "--tls-cert {}: no CERTIFICATE block in the file",
            path.display()
        )));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, crate::Error> {
    let text = read(path, "--tls-key")?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        crate::Error::config(format!(
            "--tls-key {}: no usable private key ({e})",
            path.display()
        ))
    })
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, crate::Error> {
    std::fs::read(path).map_err(|e| crate::Error::config(format!("{flag} {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("eventgate-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn bad_files_are_config_errors_with_the_path() {
        let dir = scratch();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let files = Files {
            cert: cert.clone(),
            key: key.clone(),
        };
        let e = Tls::load(files.clone()).err().unwrap();
        assert!(e.is_config() && e.to_string().contains("--tls-cert"), "{e}");
        std::fs::write(&cert, "not a pem").unwrap();
        std::fs::write(&key, "not a pem").unwrap();
        let e = Tls::load(files.clone()).err().unwrap();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");

        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&cert, made.cert.pem()).unwrap();
        let e = Tls::load(files.clone()).err().unwrap();
        assert!(e.to_string().contains("--tls-key"), "{e}");
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        let tls = Tls::load(files).unwrap();
        // A reload that fails keeps the certificate in use.
        std::fs::write(&cert, "broken").unwrap();
        assert!(tls.reload().is_err());
        let _ = tls.acceptor();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
