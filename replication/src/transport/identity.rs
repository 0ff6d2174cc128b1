//! [`HubIdentity`]: the hub's self-signed TLS certificate and private key.

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::credential::write_private_file;
use crate::credential::CertPin;

use super::HUB_SERVER_NAME;

/// Why a hub identity could not be generated, saved or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// rcgen could not make the key or the certificate.
    #[error("could not generate the hub certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// Reading or writing a PEM file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file does not hold the expected PEM item.
    #[error("{path} is not a valid PEM {what}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the file should hold ("certificate" or "private key").
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The hub's TLS identity: a self-signed certificate (its pin is what devices trust) and its key.
pub struct HubIdentity {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: PrivateKeyDer<'static>,
}

impl fmt::Debug for HubIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubIdentity")
            .field("pin", &self.pin())
            .finish_non_exhaustive()
    }
}

impl HubIdentity {
    /// A new ECDSA P-256 key and a self-signed certificate naming `hub_name` (as its common name).
    ///
    /// The certificate's subject alternative name is [`HUB_SERVER_NAME`], the name devices send.
    pub fn generate(hub_name: &str) -> Result<Self, IdentityError> {
        let key_pair = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![HUB_SERVER_NAME.to_owned()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, hub_name);
        let cert = params.self_signed(&key_pair)?;
        let key_der = PrivateKeyDer::Pkcs8(key_pair.serialize_der().into());
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key_pair.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der,
        })
    }

    /// Writes the certificate to `cert_path` and the key to `key_path` (mode 0600 on Unix).
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), IdentityError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| IdentityError::Io { path, source }
        };
        write_private_file(key_path, self.key_pem.as_bytes()).map_err(io(key_path))?;
        std::fs::write(cert_path, self.cert_pem.as_bytes()).map_err(io(cert_path))?;
        Ok(())
    }

    /// Reads a certificate and key written by [`HubIdentity::save`] (any PEM certificate and
    /// PKCS#8, PKCS#1 or SEC1 key will do).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, IdentityError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
            IdentityError::Pem {
                path: cert_path.to_owned(),
                what: "certificate",
                reason: e.to_string(),
            }
        })?;
        let key_der =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| IdentityError::Pem {
                path: key_path.to_owned(),
                what: "private key",
                reason: e.to_string(),
            })?;
        Ok(Self {
            cert_pem,
            key_pem,
            cert_der,
            key_der,
        })
    }

    /// The pin devices use to recognise this hub.
    pub fn pin(&self) -> CertPin {
        CertPin::of_der(&self.cert_der)
    }

    /// The DER certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A copy of the DER private key, for building a TLS configuration.
    pub(crate) fn key_der(&self) -> PrivateKeyDer<'static> {
        self.key_der.clone_key()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_round_trips_through_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("hub.crt"), dir.path().join("hub.key"));
        let id = HubIdentity::generate("Contoso field hub").unwrap();
        id.save(&cert, &key).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let loaded = HubIdentity::load(&cert, &key).unwrap();
        assert_eq!(loaded.pin(), id.pin());
        assert_eq!(loaded.key_der().secret_der(), id.key_der().secret_der());

        // Two hubs never share a pin.
        assert_ne!(HubIdentity::generate("other").unwrap().pin(), id.pin());

        std::fs::write(&cert, "not pem").unwrap();
        assert!(matches!(
            HubIdentity::load(&cert, &key),
            Err(IdentityError::Pem {
                what: "certificate",
                ..
            })
        ));
        assert!(matches!(
            HubIdentity::load(&dir.path().join("missing"), &key),
            Err(IdentityError::Io { .. })
        ));
    }
}
