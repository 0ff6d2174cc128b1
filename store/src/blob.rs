//! Content-addressed blobs for file and image columns, written and read in chunks.
//!
//! Chunks are stored under the SHA-256 of their own bytes (`c` + hash), so equal chunks are
//! stored once; a blob header (`b` + SHA-256 of the whole content) lists its chunks and is
//! written last, after every chunk: a blob is either complete or absent.

use std::io::Read;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::debug_span;

use crate::codec::keys;
use crate::error::StoreError;
use crate::options::Durability;
use crate::schema::{SchemaError, Table};
use crate::store::{decode, encode, Store};
use crate::value::{BlobRef, Value};
use crate::wal::WriteBatch;

/// The size of a blob chunk.
pub const BLOB_CHUNK_BYTES: usize = 256 * 1024;

/// The largest content of an image column, as Dataverse allows (file columns go further).
pub const IMAGE_MAX_BYTES: u64 = 30 * 1024 * 1024;

/// The image formats an image column takes, as Dataverse's: GIF, JPEG, TIFF, BMP and PNG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// GIF87a / GIF89a.
    Gif,
    /// JPEG (any JFIF or Exif flavour: the SOI marker and the next marker's first byte).
    Jpeg,
    /// TIFF, little- or big-endian.
    Tiff,
    /// Windows bitmap.
    Bmp,
    /// PNG.
    Png,
}

impl ImageFormat {
    /// How many of the content's first bytes [`ImageFormat::sniff`] looks at.
    pub const SNIFF_BYTES: usize = 18;

    /// Whether content of `size` bytes that starts with `head` (its first
    /// [`ImageFormat::SNIFF_BYTES`] bytes, or all of a shorter content) may go in an image
    /// column: at most [`IMAGE_MAX_BYTES`], in one of the formats. The store checks every
    /// local write of an image column whose content it holds (and the size of any), the hub
    /// every upload for one.
    pub fn check(size: u64, head: &[u8]) -> Result<ImageFormat, NotAnImage> {
        if size > IMAGE_MAX_BYTES {
            return Err(NotAnImage::TooLarge { size });
        }
        ImageFormat::sniff(head).ok_or(NotAnImage::UnknownFormat)
    }

    /// The format whose signature `head` (the content's first [`ImageFormat::SNIFF_BYTES`]
    /// bytes, or all of a shorter content) starts with; `None` for anything else, which an
    /// image column does not take.
    pub fn sniff(head: &[u8]) -> Option<ImageFormat> {
        const SIGNATURES: [(&[u8], ImageFormat); 6] = [
            (b"GIF87a", ImageFormat::Gif),
            (b"GIF89a", ImageFormat::Gif),
            (&[0xFF, 0xD8, 0xFF], ImageFormat::Jpeg),
            (b"II*\0", ImageFormat::Tiff),
            (b"MM\0*", ImageFormat::Tiff),
            (
                &[0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1A, b'\n'],
                ImageFormat::Png,
            ),
        ];
        if let Some((_, f)) = SIGNATURES.iter().find(|(sig, _)| head.starts_with(sig)) {
            return Some(*f);
        }
        // "BM" alone starts too many texts: the reserved bytes 6..10 are zero, and the
        // header that follows at 14 has one of the sizes the BMP versions define.
        let bmp_header = head
            .get(14..18)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes);
        let is_bmp = head.starts_with(b"BM")
            && head.get(6..10) == Some(&[0, 0, 0, 0][..])
            && matches!(bmp_header, Some(12 | 40 | 52 | 56 | 64 | 108 | 124));
        is_bmp.then_some(ImageFormat::Bmp)
    }
}

/// Why a file or image reference may not be set in a column ([`Store::reference_problem`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ReferenceProblem {
    /// Over the column's maximum.
    #[error(transparent)]
    TooLarge(SchemaError),
    /// The reference gives another size than the content the store holds under its hash.
    #[error("the reference gives {declared} bytes for content held at {held}")]
    SizeMismatch {
        /// The size the reference gives.
        declared: u64,
        /// The size of the content held.
        held: u64,
    },
    /// An image column's content that is not an image.
    #[error(transparent)]
    NotAnImage(NotAnImage),
}

/// Why content cannot go in an image column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotAnImage {
    /// Over [`IMAGE_MAX_BYTES`].
    #[error("{size} bytes is over the {IMAGE_MAX_BYTES}-byte limit of an image column")]
    TooLarge {
        /// The content's size.
        size: u64,
    },
    /// Not one of the [`ImageFormat`]s.
    #[error("not a GIF, JPEG, TIFF, BMP or PNG image: an image column takes only those (a file column takes any content)")]
    UnknownFormat,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BlobHeader {
    pub size: u64,
    pub chunks: Vec<[u8; 32]>,
}

fn blob_key(sha: &[u8; 32]) -> Vec<u8> {
    let mut k = vec![keys::BLOB];
    k.extend_from_slice(sha);
    k
}

fn chunk_key(sha: &[u8; 32]) -> Vec<u8> {
    let mut k = vec![keys::CHUNK];
    k.extend_from_slice(sha);
    k
}

impl Store {
    /// Store the content read from `content` (in chunks of [`BLOB_CHUNK_BYTES`]) and return
    /// its reference, to put in a file or image column. Storing the same content twice stores
    /// it once. Durable per the store's durability when this returns.
    pub fn put_blob(&self, name: &str, content: &mut dyn Read) -> Result<BlobRef, StoreError> {
        let _span = debug_span!("put_blob", name).entered();
        let mut whole = Sha256::new();
        let mut chunks = Vec::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; BLOB_CHUNK_BYTES];
        loop {
            // Fill a whole chunk (short reads happen).
            let mut filled = 0;
            while filled < buf.len() {
                let n = content.read(&mut buf[filled..])?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            let data = &buf[..filled];
            whole.update(data);
            let sha: [u8; 32] = Sha256::digest(data).into();
            let mut batch = WriteBatch::default();
            batch.insert(chunk_key(&sha), data);
            self.write(batch, Durability::Group)?;
            chunks.push(sha);
            size += filled as u64;
            if filled < buf.len() {
                break;
            }
        }
        let sha256: [u8; 32] = whole.finalize().into();
        let header = BlobHeader { size, chunks };
        let mut batch = WriteBatch::default();
        batch.insert(blob_key(&sha256), encode(&header));
        self.write(batch, self.inner.options.durability)?;
        Ok(BlobRef {
            sha256,
            size,
            name: name.to_string(),
        })
    }

    fn blob_header(&self, sha256: &[u8; 32]) -> Result<Option<BlobHeader>, StoreError> {
        match self.db().get(blob_key(sha256))? {
            Some(b) => Ok(Some(decode(&b, "a blob header")?)),
            None => Ok(None),
        }
    }

    /// A stored chunk of the blob `blob_sha`, checked against its own hash.
    fn checked_chunk(
        &self,
        blob_sha: &[u8; 32],
        chunk_sha: &[u8; 32],
    ) -> Result<Vec<u8>, StoreError> {
        let data = self
            .db()
            .get(chunk_key(chunk_sha))?
            .ok_or_else(|| StoreError::BlobCorrupt(hex::encode(blob_sha)))?;
        let got: [u8; 32] = Sha256::digest(&data).into();
        if got != *chunk_sha {
            return Err(StoreError::BlobCorrupt(hex::encode(blob_sha)));
        }
        Ok(data.to_vec())
    }

    /// Why `blob` cannot go in an image column ([`ImageFormat::check`]), if it cannot: its
    /// size always, its format when its content is in this store (content not here yet is
    /// checked where it arrives: the hub checks every upload). Reads the header and the first
    /// chunk only, without checking the chunk's hash (reading the content does that).
    pub fn image_problem(&self, blob: &BlobRef) -> Result<Option<NotAnImage>, StoreError> {
        let header = self.blob_header(&blob.sha256)?;
        let size = header.as_ref().map_or(blob.size, |h| h.size.max(blob.size));
        let first = header.as_ref().and_then(|h| h.chunks.first());
        let head = match first {
            Some(chunk_sha) => {
                let chunk = self
                    .db()
                    .get(chunk_key(chunk_sha))?
                    .ok_or_else(|| StoreError::BlobCorrupt(blob.hash_hex()))?;
                Some(chunk[..chunk.len().min(ImageFormat::SNIFF_BYTES)].to_vec())
            }
            // Held and empty: no signature.
            None if header.is_some() => Some(Vec::new()),
            None => None,
        };
        Ok(match head {
            Some(head) => ImageFormat::check(size, &head).err(),
            None if size > IMAGE_MAX_BYTES => Some(NotAnImage::TooLarge { size }),
            None => None,
        })
    }

    /// Why a file or image reference may not be newly set in `column` of `table`, given the
    /// content this store holds, if it may not: over the column's maximum, a size other than
    /// that of the content held under its hash (one that said less would pass the maximum with
    /// more, and fail every download), or, in an image column, not an image
    /// ([`Store::image_problem`]). Other values pass. The one check for every writer: the
    /// store's transactions and the hub's judgement of pushed ops.
    pub fn reference_problem(
        &self,
        table: &Table,
        column: &str,
        value: &Value,
    ) -> Result<Option<ReferenceProblem>, StoreError> {
        let (Value::File(blob) | Value::Image(blob)) = value else {
            return Ok(None);
        };
        if let Err(e) = table.check_file_size(column, value) {
            return Ok(Some(ReferenceProblem::TooLarge(e)));
        }
        if let Some(held) = self.blob_size(&blob.sha256)? {
            if held != blob.size {
                return Ok(Some(ReferenceProblem::SizeMismatch {
                    declared: blob.size,
                    held,
                }));
            }
        }
        if let Value::Image(_) = value {
            if let Some(problem) = self.image_problem(blob)? {
                return Ok(Some(ReferenceProblem::NotAnImage(problem)));
            }
        }
        Ok(None)
    }

    /// Whether the blob's content is in the store.
    pub fn has_blob(&self, blob: &BlobRef) -> Result<bool, StoreError> {
        Ok(self.blob_size(&blob.sha256)?.is_some())
    }

    /// The size of the blob with this hash, if its content is in the store.
    pub fn blob_size(&self, sha256: &[u8; 32]) -> Result<Option<u64>, StoreError> {
        Ok(self.blob_header(sha256)?.map(|h| h.size))
    }

    /// Up to `max_len` bytes of the blob with this hash from `offset` — fewer where a stored
    /// chunk ends, none at or past the end — and the blob's size; `None` if its content is
    /// not here. For sending a blob in pieces that resume anywhere.
    pub fn read_blob_range(
        &self,
        sha256: &[u8; 32],
        offset: u64,
        max_len: usize,
    ) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let Some(header) = self.blob_header(sha256)? else {
            return Ok(None);
        };
        let index = usize::try_from(offset / BLOB_CHUNK_BYTES as u64).unwrap_or(usize::MAX);
        let Some(chunk_sha) = header.chunks.get(index) else {
            return Ok(Some((header.size, Vec::new())));
        };
        let data = self.checked_chunk(sha256, chunk_sha)?;
        let start = ((offset % BLOB_CHUNK_BYTES as u64) as usize).min(data.len());
        let stop = start.saturating_add(max_len).min(data.len());
        Ok(Some((header.size, data[start..stop].to_vec())))
    }

    /// Chunk `index` of a blob (`None` past the end). Errors if the blob is not here.
    pub fn read_blob_chunk(
        &self,
        blob: &BlobRef,
        index: u32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let header = self
            .blob_header(&blob.sha256)?
            .ok_or_else(|| StoreError::BlobNotFound(blob.hash_hex()))?;
        header
            .chunks
            .get(index as usize)
            .map(|sha| self.checked_chunk(&blob.sha256, sha))
            .transpose()
    }

    /// The whole content of a blob, checked against its hash.
    pub fn read_blob(&self, blob: &BlobRef) -> Result<Vec<u8>, StoreError> {
        let header = self
            .blob_header(&blob.sha256)?
            .ok_or_else(|| StoreError::BlobNotFound(blob.hash_hex()))?;
        // The stored size may be damaged: reserve no more than the chunks can hold.
        let most = (header.chunks.len() as u64).saturating_mul(BLOB_CHUNK_BYTES as u64);
        let mut out = Vec::with_capacity(usize::try_from(header.size.min(most)).unwrap_or(0));
        let mut whole = Sha256::new();
        for chunk_sha in &header.chunks {
            let chunk = self.checked_chunk(&blob.sha256, chunk_sha)?;
            whole.update(&chunk);
            out.extend_from_slice(&chunk);
        }
        let sha: [u8; 32] = whole.finalize().into();
        if sha != blob.sha256 || out.len() as u64 != header.size {
            return Err(StoreError::BlobCorrupt(blob.hash_hex()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::{chunk_key, ImageFormat, NotAnImage};
    use crate::wal::WriteBatch;
    use crate::{Schema, Store, StoreError, StoreOptions};

    /// The image check reads the first chunk: a damaged store (the chunk gone) is an error,
    /// not content that passes unchecked.
    #[test]
    fn the_image_check_reports_a_missing_first_chunk() {
        let schema = Schema::from_toml("[tables.a]\n[tables.a.columns]\nlogo = \"image\"\n")
            .expect("schema");
        let store = Store::temporary(schema, StoreOptions::default()).expect("store");
        let text = store
            .put_blob("a.png", &mut &b"not an image"[..])
            .expect("put");
        assert_eq!(
            store.image_problem(&text).expect("check"),
            Some(NotAnImage::UnknownFormat)
        );
        let header = store
            .blob_header(&text.sha256)
            .expect("read")
            .expect("held");
        let mut batch = WriteBatch::default();
        batch.remove(chunk_key(&header.chunks[0]));
        store.db().apply_batch(&batch).expect("remove");
        assert!(matches!(
            store.image_problem(&text),
            Err(StoreError::BlobCorrupt(_))
        ));
    }

    #[test]
    fn image_formats_are_told_by_their_signature() {
        for (head, format) in [
            (&b"GIF89a\x01\x00"[..], Some(ImageFormat::Gif)),
            (b"\xFF\xD8\xFF\xE0\x00\x10JFIF", Some(ImageFormat::Jpeg)),
            (b"II*\x00\x08\x00", Some(ImageFormat::Tiff)),
            (b"MM\x00*\x00\x00", Some(ImageFormat::Tiff)),
            (
                b"BM\x36\x00\x0c\x00\x00\x00\x00\x00\x36\x00\x00\x00\x28\x00\x00\x00",
                Some(ImageFormat::Bmp),
            ),
            (b"BM: the first line of a text", None),
            (b"BM\x36\x00", None),
            (b"\x89PNG\r\n\x1a\n\x00", Some(ImageFormat::Png)),
            (b"\x89PNG\r\n", None),
            (b"%PDF-1.7", None),
            (b"", None),
        ] {
            assert_eq!(ImageFormat::sniff(head), format, "{head:?}");
        }
    }
}
