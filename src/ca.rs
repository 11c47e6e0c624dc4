//! The certificate authorities trusted for `https://` upstreams (LLM
//! providers, the remote store): the system's bundle, which the device's
//! package manager keeps current (a distrusted CA goes away with an
//! `apt upgrade`, no new hivegate build needed), rather than a copy
//! compiled into the binary.
//!
//! The bundle is read once at start, and only when some upstream URL is
//! `https://`: a local-only gateway never touches it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::path::Path;
use std::sync::Arc;
use ureq::tls::{Certificate, RootCerts, TlsConfig};

/// The TLS settings every upstream agent uses: `roots`, verified with
/// ring (the crypto already in the binary for the server side).
pub fn tls_config(roots: Vec<Certificate<'static>>) -> TlsConfig {
    TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build()
}

/// No roots: for a gateway whose upstreams are all plain `http://` (an
/// `https://` redirect then fails verification, as it should).
pub fn no_roots() -> TlsConfig {
    tls_config(Vec::new())
}

/// The certificates of a PEM file, at least one; errors name `setting`.
pub fn pem_certificates(
    path: &Path,
    setting: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "{setting} {}: cannot read PEM certificates: {e}",
                path.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "{setting} {}: no CERTIFICATE block in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// Reads a PEM bundle of CA certificates.
pub fn load(path: &Path) -> Result<TlsConfig, String> {
    let certs = pem_certificates(path, "server.upstream_ca_file").map_err(|e| {
        format!(
            "{e} (the CA bundle for https:// upstreams: install the ca-certificates package, \
             or point server.upstream_ca_file at a PEM bundle)"
        )
    })?;
    Ok(tls_config(
        certs
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_bundle_and_names_the_setting_when_it_cannot() {
        let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls/ca.pem");
        let cfg = load(&ca).unwrap();
        assert!(matches!(cfg.root_certs(), RootCerts::Specific(c) if c.len() == 1));
        let err = load(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(err.contains("server.upstream_ca_file"), "{err}");
        let empty = std::env::temp_dir().join(format!("hivegate-ca-{}", std::process::id()));
        std::fs::write(&empty, "nothing here").unwrap();
        assert!(load(&empty).unwrap_err().contains("no CERTIFICATE"));
        let _ = std::fs::remove_file(&empty);
    }
}
