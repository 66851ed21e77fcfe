//! JPEG's segment layout, read as libjpeg reads it. One walker serves both the
//! validator and the metadata stripper, so whatever layout is accepted is
//! also understood when metadata is removed.

use std::ops::Range;

use super::{MediaError, Tolerated, be16};

/// One run of bytes of the file, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Piece {
    pub range: Range<usize>,
    /// EXIF/XMP (APP1), IPTC (APP13) or a comment (COM).
    pub metadata: bool,
}

/// What the walk found: the picture's size and the pieces it is made of.
/// Bytes outside every piece were skipped (junk, stuffing outside a scan,
/// anything after EOI).
#[derive(Debug, Clone)]
pub(super) struct Layout {
    pub width: u32,
    pub height: u32,
    pub pieces: Vec<Piece>,
    pub tolerated: Tolerated,
}

const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;
const COM: u8 = 0xFE;

fn is_sof(marker: u8) -> bool {
    matches!(marker, 0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF)
}

/// Baseline, extended and progressive Huffman: what browsers display.
/// Lossless, hierarchical and arithmetic coding are valid JPEG that common
/// browsers do not show, so they never make an avatar.
fn is_displayable_sof(marker: u8) -> bool {
    matches!(marker, 0xC0..=0xC2)
}

fn is_app_or_com(marker: u8) -> bool {
    matches!(marker, 0xE0..=0xEF | COM)
}

/// Finds the next marker from `i` like libjpeg's `next_marker`: bytes that
/// are not 0xFF are skipped (libjpeg: "Corrupt JPEG data: N extraneous bytes
/// before marker"), runs of 0xFF are fill, and 0xFF 0x00 outside a scan is
/// discarded. Returns the position of the marker's 0xFF and its code.
fn next_marker(b: &[u8], mut i: usize, skipped: &mut u64) -> Result<(usize, u8), MediaError> {
    loop {
        let Some(p) = memchr::memchr(0xFF, &b[i.min(b.len())..]) else {
            return Err(MediaError::Truncated);
        };
        *skipped += p as u64;
        i += p;
        let mut j = i;
        while b.get(j) == Some(&0xFF) {
            j += 1;
        }
        match b.get(j) {
            None => return Err(MediaError::Truncated),
            Some(0x00) => {
                *skipped += (j + 1 - i) as u64;
                i = j + 1;
            }
            Some(&code) => return Ok((j - 1, code)),
        }
    }
}

/// The end of entropy-coded data starting at `i`: the 0xFF of the next real
/// marker (0xFF00 is a stuffed byte, 0xFFD0..D7 restart markers, 0xFFFF fill).
fn end_of_scan_data(b: &[u8], mut i: usize) -> Result<usize, MediaError> {
    loop {
        let Some(p) = memchr::memchr(0xFF, &b[i..]) else {
            return Err(MediaError::Truncated);
        };
        i += p;
        match b.get(i + 1) {
            None => return Err(MediaError::Truncated),
            Some(0x00 | 0xD0..=0xD7 | 0xFF) => i += 1,
            Some(_) => return Ok(i),
        }
    }
}

/// Walks the file from SOI to EOI. Sound SOF and SOS headers and data that
/// reaches EOI make a valid JPEG, whatever junk had to be skipped on the way.
pub(super) fn walk(b: &[u8]) -> Result<Layout, MediaError> {
    let mut pieces = vec![Piece {
        range: 0..2,
        metadata: false,
    }];
    let mut skipped = 0u64;
    let mut frame: Option<(u32, u32)> = None;
    let mut scanned = false;
    let mut i = 2;
    loop {
        let (at, marker) = next_marker(b, i, &mut skipped)?;
        i = at + 2;
        match marker {
            EOI => {
                pieces.push(Piece {
                    range: at..i,
                    metadata: false,
                });
                let Some((width, height)) = frame else {
                    return Err(MediaError::Malformed("JPEG has no frame header".into()));
                };
                if !scanned {
                    return Err(MediaError::Malformed("JPEG has no scan".into()));
                }
                return Ok(Layout {
                    width,
                    height,
                    pieces,
                    tolerated: Tolerated {
                        skipped_bytes: skipped,
                        ..Tolerated::default()
                    },
                });
            }
            SOI => return Err(MediaError::Malformed(format!("second SOI at byte {at}"))),
            0x01 | 0xD0..=0xD7 => {
                pieces.push(Piece {
                    range: at..i,
                    metadata: false,
                });
                continue;
            }
            _ => {}
        }
        let len = be16(b, i).ok_or(MediaError::Truncated)?;
        if len < 2 {
            if is_app_or_com(marker) {
                // libjpeg skips `len - 2` bytes, i.e. none, and looks for
                // the next marker: tolerate it the same way, and leave the
                // broken segment out of any copy.
                skipped += 4;
                i += 2;
                continue;
            }
            return Err(MediaError::Malformed(format!(
                "JPEG segment 0xFF{marker:02X} has length {len}"
            )));
        }
        let end = i + len;
        if end > b.len() {
            return Err(MediaError::Truncated);
        }
        let body = &b[i + 2..end];
        if is_sof(marker) {
            frame = Some(read_sof(marker, body)?);
        }
        pieces.push(Piece {
            range: at..end,
            metadata: matches!(marker, 0xE1 | 0xED | COM),
        });
        i = end;
        if marker == SOS {
            check_sos(body, frame.is_some())?;
            let data_end = end_of_scan_data(b, i)?;
            pieces.push(Piece {
                range: i..data_end,
                metadata: false,
            });
            scanned = true;
            i = data_end;
        }
    }
}

/// SOFn: precision, height, width, components; its length must match them.
fn read_sof(marker: u8, body: &[u8]) -> Result<(u32, u32), MediaError> {
    let bad = |why: &str| MediaError::Malformed(format!("JPEG frame header: {why}"));
    if body.len() < 6 {
        return Err(bad("too short"));
    }
    let components = usize::from(body[5]);
    if components == 0 || body.len() != 6 + 3 * components {
        return Err(bad("length does not match its components"));
    }
    if !is_displayable_sof(marker) {
        return Err(MediaError::Undecodable(format!(
            "JPEG coding process SOF{} is not displayed by common browsers",
            marker - 0xC0
        )));
    }
    let height = u32::from(u16::from_be_bytes([body[1], body[2]]));
    let width = u32::from(u16::from_be_bytes([body[3], body[4]]));
    Ok((width, height))
}

/// SOS: the components of the scan; its length must match them.
fn check_sos(body: &[u8], after_frame: bool) -> Result<(), MediaError> {
    if !after_frame {
        return Err(MediaError::Malformed(
            "JPEG scan before its frame header".into(),
        ));
    }
    let components = usize::from(*body.first().unwrap_or(&0));
    if components == 0 || body.len() != 4 + 2 * components {
        return Err(MediaError::Malformed(
            "JPEG scan header length does not match its components".into(),
        ));
    }
    Ok(())
}

/// The file as the walk understood it, without its metadata segments; junk
/// and anything after EOI are left out too. `keep_metadata` keeps them (the
/// junk-free copy a decoder is given).
pub(super) fn rebuild(b: &[u8], layout: &Layout, keep_metadata: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    for piece in &layout.pieces {
        if keep_metadata || !piece.metadata {
            out.extend_from_slice(&b[piece.range.clone()]);
        }
    }
    out
}
