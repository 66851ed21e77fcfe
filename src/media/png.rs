//! PNG's chunk layout: IHDR first, chunks with CRCs, through IEND. One walker
//! for the validator and the metadata stripper.

use std::ops::Range;

use super::{MediaError, Tolerated, be32};

/// What the walk found. Everything after IEND is outside every chunk.
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub width: u32,
    pub height: u32,
    pub chunks: Vec<Chunk>,
    pub tolerated: Tolerated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Chunk {
    pub range: Range<usize>,
    pub kind: [u8; 4],
    /// An ancillary chunk whose CRC does not match: ignored, as libpng does.
    pub bad_crc: bool,
}

impl Chunk {
    fn is_metadata(&self) -> bool {
        matches!(&self.kind, b"eXIf" | b"tEXt" | b"zTXt" | b"iTXt" | b"tIME")
    }
}

/// Ancillary chunks have a lowercase first letter (bit 5 set).
fn is_ancillary(kind: &[u8]) -> bool {
    kind[0] & 0x20 != 0
}

pub(super) fn walk(b: &[u8]) -> Result<Layout, MediaError> {
    let mut i = 8;
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut tolerated = Tolerated::default();
    loop {
        let len = be32(b, i).ok_or(MediaError::Truncated)? as usize;
        let kind: [u8; 4] = b
            .get(i + 4..i + 8)
            .ok_or(MediaError::Truncated)?
            .try_into()
            .expect("four bytes");
        let end = i
            .checked_add(12)
            .and_then(|x| x.checked_add(len))
            .ok_or_else(|| MediaError::Malformed("PNG chunk length overflows".into()))?;
        if end > b.len() {
            return Err(MediaError::Truncated);
        }
        if chunks.is_empty() && &kind != b"IHDR" {
            return Err(MediaError::Malformed("PNG does not start with IHDR".into()));
        }
        let stored = be32(b, i + 8 + len).ok_or(MediaError::Truncated)?;
        let bad_crc = stored != crc32fast::hash(&b[i + 4..i + 8 + len]);
        if bad_crc {
            if !is_ancillary(&kind) {
                return Err(MediaError::Malformed(format!(
                    "PNG chunk {} has a bad CRC",
                    String::from_utf8_lossy(&kind)
                )));
            }
            tolerated.bad_ancillary_crcs += 1;
        }
        chunks.push(Chunk {
            range: i..end,
            kind,
            bad_crc,
        });
        if &kind == b"IEND" {
            let ihdr = &b[16..16 + 8.min(len_of(&chunks[0]))];
            let (width, height) = match ihdr {
                [w0, w1, w2, w3, h0, h1, h2, h3] => (
                    u32::from_be_bytes([*w0, *w1, *w2, *w3]),
                    u32::from_be_bytes([*h0, *h1, *h2, *h3]),
                ),
                _ => return Err(MediaError::Malformed("PNG IHDR is too short".into())),
            };
            return Ok(Layout {
                width,
                height,
                chunks,
                tolerated,
            });
        }
        i = end;
    }
}

fn len_of(chunk: &Chunk) -> usize {
    chunk.range.len() - 12
}

/// The file through IEND without metadata chunks and without ancillary
/// chunks whose CRC failed; `keep_metadata` keeps the metadata (the copy a
/// decoder is given, which would stop at a bad CRC).
pub(super) fn rebuild(b: &[u8], layout: &Layout, keep_metadata: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    out.extend_from_slice(&b[..8]);
    for chunk in &layout.chunks {
        if !chunk.bad_crc && (keep_metadata || !chunk.is_metadata()) {
            out.extend_from_slice(&b[chunk.range.clone()]);
        }
    }
    out
}
