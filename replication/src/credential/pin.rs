//! [`CertPin`]: the SHA-256 of a DER certificate.

use std::fmt;
use std::str::FromStr;

use ring::digest;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Prefix of a pin's string form: `sha256:` followed by 64 lowercase hex digits.
const PIN_PREFIX: &str = "sha256:";

/// The SHA-256 digest of a hub's DER-encoded TLS certificate.
///
/// A device accepts exactly the certificate whose digest matches, whatever its name or issuer.
/// The string form is `sha256:<64 hex digits>`; parsing also accepts the bare hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertPin([u8; 32]);

/// Why a string is not a [`CertPin`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PinParseError {
    /// The text is not hexadecimal.
    #[error("certificate pin is not hexadecimal: {0}")]
    NotHex(#[from] hex::FromHexError),
    /// The digest does not have 32 bytes.
    #[error("certificate pin has {0} bytes, a SHA-256 digest has 32")]
    WrongLength(usize),
}

impl CertPin {
    /// The pin of a DER-encoded certificate.
    pub fn of_der(cert_der: &[u8]) -> Self {
        let d = digest::digest(&digest::SHA256, cert_der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(d.as_ref());
        CertPin(bytes)
    }

    /// A pin from its 32 digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        CertPin(bytes)
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `cert_der` is the pinned certificate.
    pub fn matches(&self, cert_der: &[u8]) -> bool {
        // Both sides are public (a digest of a certificate the peer sent), so a plain compare is fine.
        Self::of_der(cert_der) == *self
    }
}

impl fmt::Display for CertPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PIN_PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for CertPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertPin({self})")
    }
}

impl FromStr for CertPin {
    type Err = PinParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let hex_part = s.strip_prefix(PIN_PREFIX).unwrap_or(s);
        let bytes = hex::decode(hex_part)?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| PinParseError::WrongLength(bytes.len()))?;
        Ok(CertPin(arr))
    }
}

impl Serialize for CertPin {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CertPin {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_form_round_trips() {
        let pin = CertPin::of_der(b"not really a certificate");
        let s = pin.to_string();
        assert!(s.starts_with("sha256:"));
        assert_eq!(s.len(), 7 + 64);
        assert_eq!(s.parse::<CertPin>().unwrap(), pin);
        // Bare hex is accepted too.
        assert_eq!(s[7..].parse::<CertPin>().unwrap(), pin);
    }

    #[test]
    fn matches_only_the_same_bytes() {
        let pin = CertPin::of_der(b"cert A");
        assert!(pin.matches(b"cert A"));
        assert!(!pin.matches(b"cert B"));
    }

    #[test]
    fn bad_strings_are_refused() {
        assert!(matches!(
            "sha256:zz".parse::<CertPin>(),
            Err(PinParseError::NotHex(_))
        ));
        assert!(matches!(
            "sha256:abcd".parse::<CertPin>(),
            Err(PinParseError::WrongLength(2))
        ));
    }
}
