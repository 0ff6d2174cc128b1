//! [`PinnedServerVerifier`]: accept exactly the pinned hub certificate.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

use crate::credential::CertPin;

/// The hub presented a certificate other than the pinned one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hub certificate {presented} does not match the pinned {expected}")]
pub struct PinMismatch {
    /// The pin from the device's credential.
    pub expected: CertPin,
    /// The pin of the certificate the server presented.
    pub presented: CertPin,
}

/// A rustls [`ServerCertVerifier`] that trusts exactly one certificate, by its SHA-256 pin.
///
/// Names, issuers and validity dates are ignored: the pin is the hub's identity, delivered to
/// the device out of band in its credential. The handshake signatures are still verified with the
/// crypto provider's algorithms, so a server that merely replays the certificate without its key
/// fails the handshake.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    pin: CertPin,
    algorithms: WebPkiSupportedAlgorithms,
    last_mismatch: Mutex<Option<PinMismatch>>,
}

impl PinnedServerVerifier {
    /// A verifier for `pin`, checking handshake signatures with `algorithms`
    /// (a provider's `signature_verification_algorithms`).
    pub fn new(pin: CertPin, algorithms: WebPkiSupportedAlgorithms) -> Arc<Self> {
        Arc::new(Self {
            pin,
            algorithms,
            last_mismatch: Mutex::new(None),
        })
    }

    /// The pinned certificate digest.
    pub fn pin(&self) -> CertPin {
        self.pin
    }

    /// Takes the most recent mismatch, so a failed connect can say which certificate was offered.
    pub fn take_mismatch(&self) -> Option<PinMismatch> {
        self.last_mismatch.lock().ok().and_then(|mut m| m.take())
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = CertPin::of_der(end_entity);
        if presented == self.pin {
            return Ok(ServerCertVerified::assertion());
        }
        let mismatch = PinMismatch {
            expected: self.pin,
            presented,
        };
        tracing::warn!(%mismatch, "refusing hub certificate");
        if let Ok(mut slot) = self.last_mismatch.lock() {
            *slot = Some(mismatch.clone());
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(mismatch)),
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered (QUIC requires it), but answer correctly anyway.
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
