//! Hub signing key, tokens, their verification and the credential file.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ring::rand::SystemRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use super::pin::CertPin;
use super::registry::{TokenRegistry, TokenStatus};

/// Largest user id or app name a token carries, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Largest encoded token, in bytes; anything longer is refused before parsing.
pub const MAX_TOKEN_BYTES: usize = HEADER_BYTES + 2 * (2 + MAX_NAME_BYTES) + SIGNATURE_BYTES;

const MAGIC: &[u8; 4] = b"FST1";
const SIGNING_CONTEXT: &[u8] = b"fieldsync token v1\0";
const HEADER_BYTES: usize = 4 + 16 + 16 + 8;
const SIGNATURE_BYTES: usize = 64;
const KEY_FILE_HEADER: &str = "fieldsync-hub-signing-key ed25519 pkcs8 v1";
const CREDENTIAL_VERSION: u32 = 1;

/// What a hub grants a device: who it is, for whom and which app, issued when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The enrolled device.
    pub device_id: Uuid,
    /// The user the device acts for.
    pub user_id: String,
    /// The app (and so the offline profile) the device is enrolled for.
    pub app: String,
    /// When the hub issued the token, in milliseconds since the Unix epoch.
    pub issued_at_ms: u64,
    /// The token's own id: what the hub records as issued and can revoke.
    pub token_id: Uuid,
}

impl Token {
    /// The token's fields without a signature, for the hub's own records: not a credential
    /// (a copy of the hub's store must not hand out working tokens).
    pub fn to_record(&self) -> Result<Vec<u8>, TokenError> {
        encode_payload(self)
    }

    /// The token [`Token::to_record`] wrote.
    pub fn from_record(bytes: &[u8]) -> Result<Token, TokenError> {
        if bytes.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge(bytes.len()));
        }
        decode_payload(bytes)
    }
}

/// A [`Token`] with the hub's signature, as the exact bytes that were signed.
#[derive(Clone, PartialEq, Eq)]
pub struct SignedToken {
    bytes: Vec<u8>,
    token: Token,
}

/// Why a token is refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenError {
    /// The encoded token is longer than [`MAX_TOKEN_BYTES`].
    #[error("token is {0} bytes, more than the {MAX_TOKEN_BYTES} allowed")]
    TooLarge(usize),
    /// The bytes are not a token (bad magic, truncated, bad lengths or not UTF-8).
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// A user id or app name is longer than [`MAX_NAME_BYTES`] (when signing).
    #[error("token field {0} is longer than {MAX_NAME_BYTES} bytes")]
    FieldTooLong(&'static str),
    /// The signature does not verify with this hub's key: a forged or altered token.
    #[error("token signature is invalid (forged, altered or from another hub)")]
    BadSignature,
    /// The signature is valid but this hub has no record of the token id.
    #[error("token {0} is unknown to this hub")]
    Unknown(Uuid),
    /// The token was revoked.
    #[error("token {0} was revoked")]
    Revoked(Uuid),
    /// The hub could not read its record of the token; try again later.
    #[error("the hub cannot check token {0} now")]
    Unavailable(Uuid),
    /// The hex string form is not hexadecimal.
    #[error("token text is not hexadecimal")]
    NotHex,
}

/// Why a key file could not be generated, saved or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading or writing the file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file does not hold a key in the expected format.
    #[error("key file {path} is not a valid key: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The system random generator or the key generation failed.
    #[error("key generation failed")]
    Generate,
}

/// Why a credential file could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialError {
    /// Reading or writing the file failed.
    #[error("credential file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid credential (TOML syntax, missing field, bad pin or token).
    #[error("credential is not valid: {0}")]
    Parse(#[from] toml::de::Error),
    /// The credential could not be written as TOML.
    #[error("credential could not be encoded: {0}")]
    Encode(#[from] toml::ser::Error),
    /// The file's format version is not one this build reads.
    #[error("credential format version {0} is not supported (expected {CREDENTIAL_VERSION})")]
    UnsupportedVersion(u32),
}

/// The hub's ed25519 token-signing key.
pub struct HubSigningKey {
    pkcs8: Vec<u8>,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for HubSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubSigningKey")
            .field("public_key", &hex::encode(self.public_key()))
            .finish_non_exhaustive()
    }
}

impl HubSigningKey {
    /// A new random key.
    pub fn generate() -> Result<Self, KeyFileError> {
        let rng = SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyFileError::Generate)?;
        let pkcs8 = doc.as_ref().to_vec();
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| KeyFileError::Generate)?;
        Ok(Self { pkcs8, pair })
    }

    /// The key whose ed25519 seed is `seed`: the same seed gives the same key, for callers that
    /// must be reproducible (the simulator). A real hub uses [`HubSigningKey::generate`].
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, KeyFileError> {
        let unchecked =
            Ed25519KeyPair::from_seed_unchecked(seed).map_err(|_| KeyFileError::Generate)?;
        // The PKCS#8 v2 document ring itself writes: fixed framing around seed and public key.
        let mut pkcs8 = Vec::with_capacity(85);
        pkcs8.extend_from_slice(&[
            0x30, 0x53, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ]);
        pkcs8.extend_from_slice(seed);
        pkcs8.extend_from_slice(&[0xa1, 0x23, 0x03, 0x21, 0x00]);
        pkcs8.extend_from_slice(unchecked.public_key().as_ref());
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| KeyFileError::Generate)?;
        Ok(Self { pkcs8, pair })
    }

    /// Writes the key to `path` (created with mode 0600 on Unix; replaced if present).
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        let text = format!("{KEY_FILE_HEADER}\n{}\n", hex::encode(&self.pkcs8));
        write_private_file(path, text.as_bytes()).map_err(|source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads a key written by [`HubSigningKey::save`].
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let invalid = |reason: &str| KeyFileError::Invalid {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut lines = text.lines();
        if lines.next().map(str::trim) != Some(KEY_FILE_HEADER) {
            return Err(invalid("missing header line"));
        }
        let body = lines.next().map(str::trim).unwrap_or_default();
        let pkcs8 = hex::decode(body).map_err(|_| invalid("key is not hexadecimal"))?;
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| invalid(&format!("not an ed25519 PKCS#8 key: {e}")))?;
        Ok(Self { pkcs8, pair })
    }

    /// The 32-byte public key: all a [`TokenVerifier`] needs.
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.pair.public_key().as_ref());
        out
    }

    /// A verifier for tokens this key signs.
    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier::from_public_key(self.public_key())
    }

    /// Signs `token`.
    pub fn sign(&self, token: &Token) -> Result<SignedToken, TokenError> {
        let mut bytes = encode_payload(token)?;
        let signature = self.pair.sign(&signed_message(&bytes));
        bytes.extend_from_slice(signature.as_ref());
        Ok(SignedToken {
            bytes,
            token: token.clone(),
        })
    }
}

/// Checks tokens against a hub's public key and its [`TokenRegistry`].
#[derive(Clone, PartialEq, Eq)]
pub struct TokenVerifier {
    public_key: [u8; 32],
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenVerifier({})", hex::encode(self.public_key))
    }
}

impl TokenVerifier {
    /// A verifier for the hub whose public key is `public_key`.
    pub fn from_public_key(public_key: [u8; 32]) -> Self {
        Self { public_key }
    }

    /// Checks the signature only; says nothing about revocation.
    pub fn verify_signature(&self, bytes: &[u8]) -> Result<Token, TokenError> {
        if bytes.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge(bytes.len()));
        }
        if bytes.len() < HEADER_BYTES + 4 + SIGNATURE_BYTES {
            return Err(TokenError::Malformed("too short"));
        }
        let (payload, sig) = bytes.split_at(bytes.len() - SIGNATURE_BYTES);
        // Parse first so a garbage token gets a precise error; parsing touches public bytes only.
        let token = decode_payload(payload)?;
        UnparsedPublicKey::new(&signature::ED25519, &self.public_key)
            .verify(&signed_message(payload), sig)
            .map_err(|_| TokenError::BadSignature)?;
        Ok(token)
    }

    /// Checks the signature, then that `registry` knows the token id and has not revoked it.
    pub fn verify<R: TokenRegistry + ?Sized>(
        &self,
        bytes: &[u8],
        registry: &R,
    ) -> Result<Token, TokenError> {
        let token = self.verify_signature(bytes)?;
        match registry.status(&token.token_id) {
            TokenStatus::Active => Ok(token),
            TokenStatus::Revoked => Err(TokenError::Revoked(token.token_id)),
            TokenStatus::Unknown => Err(TokenError::Unknown(token.token_id)),
            TokenStatus::Unavailable => Err(TokenError::Unavailable(token.token_id)),
        }
    }
}

impl SignedToken {
    /// The token as signed (not re-verified: use [`TokenVerifier`] on the hub).
    pub fn token(&self) -> &Token {
        &self.token
    }

    /// The exact signed bytes, as sent to the hub.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Parses signed bytes without checking the signature (a device cannot: it only carries them).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, TokenError> {
        if bytes.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge(bytes.len()));
        }
        if bytes.len() < HEADER_BYTES + 4 + SIGNATURE_BYTES {
            return Err(TokenError::Malformed("too short"));
        }
        let token = decode_payload(&bytes[..bytes.len() - SIGNATURE_BYTES])?;
        Ok(Self { bytes, token })
    }
}

impl fmt::Debug for SignedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The token is a bearer secret: log who it is for, never the bytes.
        f.debug_struct("SignedToken")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for SignedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.bytes))
    }
}

impl FromStr for SignedToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() > 2 * MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge(s.len() / 2));
        }
        let bytes = hex::decode(s).map_err(|_| TokenError::NotHex)?;
        Self::from_bytes(bytes)
    }
}

impl Serialize for SignedToken {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SignedToken {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a device needs to reach and prove itself to a hub; written by `hub enroll`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// Format version of the file (currently 1).
    pub version: u32,
    /// Where the hub listens: `host:port`.
    pub hub_address: String,
    /// The pin of the hub's TLS certificate.
    pub cert_pin: CertPin,
    /// The hub-signed token.
    pub token: SignedToken,
}

impl Credential {
    /// A credential in the current format.
    pub fn new(hub_address: impl Into<String>, cert_pin: CertPin, token: SignedToken) -> Self {
        Self {
            version: CREDENTIAL_VERSION,
            hub_address: hub_address.into(),
            cert_pin,
            token,
        }
    }

    /// The TOML text of the credential.
    pub fn to_toml(&self) -> Result<String, CredentialError> {
        let body = toml::to_string(self)?;
        Ok(format!(
            "# fieldsync device credential: keep it secret, it lets a device sync as this user.\n{body}"
        ))
    }

    /// Parses TOML text written by [`Credential::to_toml`].
    pub fn from_toml(text: &str) -> Result<Self, CredentialError> {
        let cred: Credential = toml::from_str(text)?;
        if cred.version != CREDENTIAL_VERSION {
            return Err(CredentialError::UnsupportedVersion(cred.version));
        }
        Ok(cred)
    }

    /// Writes the credential to `path` (mode 0600 on Unix: the token is a bearer secret).
    pub fn save(&self, path: &Path) -> Result<(), CredentialError> {
        let text = self.to_toml()?;
        write_private_file(path, text.as_bytes()).map_err(|source| CredentialError::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads a credential file.
    pub fn load(path: &Path) -> Result<Self, CredentialError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text)
    }
}

/// Writes `bytes` to `path`, readable only by its owner on Unix, replacing any previous file.
///
/// Written to a temporary sibling first and renamed, so a crash never leaves half a key.
pub(crate) fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    // `mode` applies only on creation: tighten a pre-existing temporary file too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

fn signed_message(payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + payload.len());
    msg.extend_from_slice(SIGNING_CONTEXT);
    msg.extend_from_slice(payload);
    msg
}

fn encode_payload(token: &Token) -> Result<Vec<u8>, TokenError> {
    if token.user_id.len() > MAX_NAME_BYTES {
        return Err(TokenError::FieldTooLong("user_id"));
    }
    if token.app.len() > MAX_NAME_BYTES {
        return Err(TokenError::FieldTooLong("app"));
    }
    let mut out = Vec::with_capacity(MAX_TOKEN_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(token.device_id.as_bytes());
    out.extend_from_slice(token.token_id.as_bytes());
    out.extend_from_slice(&token.issued_at_ms.to_be_bytes());
    for field in [&token.user_id, &token.app] {
        // Checked above: both fit in a u16.
        let len = u16::try_from(field.len()).map_err(|_| TokenError::FieldTooLong("name"))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    Ok(out)
}

fn decode_payload(payload: &[u8]) -> Result<Token, TokenError> {
    let mut r = Reader(payload);
    if r.take(4)? != MAGIC {
        return Err(TokenError::Malformed("bad magic"));
    }
    let device_id = Uuid::from_slice(r.take(16)?).map_err(|_| TokenError::Malformed("uuid"))?;
    let token_id = Uuid::from_slice(r.take(16)?).map_err(|_| TokenError::Malformed("uuid"))?;
    let mut ts = [0u8; 8];
    ts.copy_from_slice(r.take(8)?);
    let issued_at_ms = u64::from_be_bytes(ts);
    let user_id = r.string()?;
    let app = r.string()?;
    if !r.0.is_empty() {
        return Err(TokenError::Malformed("trailing bytes"));
    }
    Ok(Token {
        device_id,
        user_id,
        app,
        issued_at_ms,
        token_id,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TokenError> {
        if self.0.len() < n {
            return Err(TokenError::Malformed("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn string(&mut self) -> Result<String, TokenError> {
        let len_bytes = self.take(2)?;
        let len = usize::from(u16::from_be_bytes([len_bytes[0], len_bytes[1]]));
        if len > MAX_NAME_BYTES {
            return Err(TokenError::Malformed("field too long"));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| TokenError::Malformed("not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::MemoryTokenRegistry;

    fn token() -> Token {
        Token {
            device_id: Uuid::from_u128(1),
            user_id: "maria.lopez".into(),
            app: "field-service".into(),
            issued_at_ms: 1_764_000_000_000,
            token_id: Uuid::from_u128(42),
        }
    }

    fn issued(key: &HubSigningKey) -> (SignedToken, MemoryTokenRegistry) {
        let signed = key.sign(&token()).unwrap();
        let mut reg = MemoryTokenRegistry::new();
        reg.insert_issued(signed.token().token_id);
        (signed, reg)
    }

    #[test]
    fn a_signed_issued_token_verifies() {
        let key = HubSigningKey::generate().unwrap();
        let (signed, reg) = issued(&key);
        let got = key.verifier().verify(signed.as_bytes(), &reg).unwrap();
        assert_eq!(got, token());
    }

    #[test]
    fn an_unknown_token_is_refused() {
        let key = HubSigningKey::generate().unwrap();
        let signed = key.sign(&token()).unwrap();
        let reg = MemoryTokenRegistry::new();
        assert_eq!(
            key.verifier().verify(signed.as_bytes(), &reg),
            Err(TokenError::Unknown(Uuid::from_u128(42)))
        );
    }

    #[test]
    fn a_revoked_token_is_refused() {
        let key = HubSigningKey::generate().unwrap();
        let (signed, mut reg) = issued(&key);
        assert!(reg.revoke(signed.token().token_id));
        assert_eq!(
            key.verifier().verify(signed.as_bytes(), &reg),
            Err(TokenError::Revoked(Uuid::from_u128(42)))
        );
    }

    #[test]
    fn a_token_from_another_hub_is_forged() {
        let key = HubSigningKey::generate().unwrap();
        let other = HubSigningKey::generate().unwrap();
        let (_, reg) = issued(&key);
        let forged = other.sign(&token()).unwrap();
        assert_eq!(
            key.verifier().verify(forged.as_bytes(), &reg),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn an_altered_token_is_forged() {
        let key = HubSigningKey::generate().unwrap();
        let (signed, reg) = issued(&key);
        // Change one byte of the user id ("maria" -> "marib"): same length, still UTF-8.
        let mut bytes = signed.as_bytes().to_vec();
        let pos = HEADER_BYTES + 2 + 4;
        bytes[pos] ^= 0x03;
        assert_eq!(
            key.verifier().verify(&bytes, &reg),
            Err(TokenError::BadSignature)
        );
        // And a flipped signature bit.
        let mut bytes = signed.as_bytes().to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(
            key.verifier().verify(&bytes, &reg),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn garbage_is_malformed_or_too_large() {
        let key = HubSigningKey::generate().unwrap();
        let reg = MemoryTokenRegistry::new();
        let v = key.verifier();
        assert!(matches!(
            v.verify(b"hello", &reg),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            v.verify(&[0u8; 200], &reg),
            Err(TokenError::Malformed("bad magic"))
        ));
        assert!(matches!(
            v.verify(&vec![0u8; MAX_TOKEN_BYTES + 1], &reg),
            Err(TokenError::TooLarge(_))
        ));
        let (signed, _) = issued(&key);
        let truncated = &signed.as_bytes()[..signed.as_bytes().len() - 70];
        assert!(matches!(
            v.verify(truncated, &reg),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn overlong_fields_are_not_signed() {
        let key = HubSigningKey::generate().unwrap();
        let mut t = token();
        t.app = "x".repeat(MAX_NAME_BYTES + 1);
        assert_eq!(key.sign(&t), Err(TokenError::FieldTooLong("app")));
    }

    #[test]
    fn a_seeded_key_is_reproducible_and_round_trips() {
        let a = HubSigningKey::from_seed(&[7; 32]).unwrap();
        let b = HubSigningKey::from_seed(&[7; 32]).unwrap();
        let c = HubSigningKey::from_seed(&[8; 32]).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert_ne!(a.public_key(), c.public_key());
        let t = token();
        assert_eq!(
            a.sign(&t).unwrap().as_bytes(),
            b.sign(&t).unwrap().as_bytes()
        );
        assert!(c
            .verifier()
            .verify_signature(a.sign(&t).unwrap().as_bytes())
            .is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seeded.key");
        a.save(&path).unwrap();
        assert_eq!(
            HubSigningKey::load(&path).unwrap().public_key(),
            a.public_key()
        );
    }

    #[test]
    fn signing_key_round_trips_through_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub-signing.key");
        let key = HubSigningKey::generate().unwrap();
        key.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let loaded = HubSigningKey::load(&path).unwrap();
        assert_eq!(loaded.public_key(), key.public_key());
        let (signed, reg) = issued(&loaded);
        key.verifier().verify(signed.as_bytes(), &reg).unwrap();

        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            HubSigningKey::load(&path),
            Err(KeyFileError::Invalid { .. })
        ));
        assert!(matches!(
            HubSigningKey::load(&dir.path().join("missing")),
            Err(KeyFileError::Io { .. })
        ));
    }

    #[test]
    fn credential_round_trips_through_toml() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device.cred");
        let key = HubSigningKey::generate().unwrap();
        let (signed, reg) = issued(&key);
        let cred = Credential::new(
            "hub.example.org:4433",
            CertPin::of_der(b"cert"),
            signed.clone(),
        );
        cred.save(&path).unwrap();
        let loaded = Credential::load(&path).unwrap();
        assert_eq!(loaded, cred);
        key.verifier()
            .verify(loaded.token.as_bytes(), &reg)
            .unwrap();

        let text = cred
            .to_toml()
            .unwrap()
            .replace("version = 1", "version = 9");
        assert!(matches!(
            Credential::from_toml(&text),
            Err(CredentialError::UnsupportedVersion(9))
        ));
        let text = cred.to_toml().unwrap().replace("sha256:", "sha256:zz");
        assert!(matches!(
            Credential::from_toml(&text),
            Err(CredentialError::Parse(_))
        ));
    }
}
