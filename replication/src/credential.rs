//! Device credentials: hub-signed tokens, certificate pins and the credential file.
//!
//! The hub holds a [`HubSigningKey`] (ed25519, through `ring`). `hub enroll` issues a [`Token`]
//! for one device of one user and one app, signs it into a [`SignedToken`], records its id in the
//! hub's [`TokenRegistry`] and writes a [`Credential`] file: the hub's address, the pin of the
//! hub's TLS certificate ([`CertPin`]) and the signed token. The device reads that file, refuses
//! any hub whose certificate does not match the pin, and presents the token; the hub checks it
//! with [`TokenVerifier::verify`] (signature, then known and unrevoked id).
//!
//! Why ed25519 and not an HMAC: verifying needs only the public half, so a second hub (or a
//! shard, see ARCHITECTURE.md) can check tokens without being able to mint them; `ring` is
//! already in the tree through rustls; and there is no secret-dependent comparison to get wrong
//! (the HMAC route needs a constant-time tag compare; ring's ed25519 verification handles only
//! public data and runs in constant time with respect to the signature anyway).
//!
//! The token's signed bytes are a fixed binary layout (not serde), so the bytes the hub signed
//! are exactly the bytes it verifies, whatever the serializer version:
//!
//! ```text
//! "FST1" | device_id (16) | token_id (16) | issued_at_ms (u64 BE)
//!        | user_id len (u16 BE) | user_id | app len (u16 BE) | app | signature (64)
//! ```
//!
//! The signature covers `"fieldsync token v1\0"` followed by everything before it.

mod pin;
mod registry;
mod token;

pub use pin::{CertPin, PinParseError};
pub use registry::{MemoryTokenRegistry, TokenRegistry, TokenStatus};
#[cfg(feature = "quic")]
pub(crate) use token::write_private_file;
pub use token::{
    Credential, CredentialError, HubSigningKey, KeyFileError, SignedToken, Token, TokenError,
    TokenVerifier, MAX_NAME_BYTES, MAX_TOKEN_BYTES,
};
