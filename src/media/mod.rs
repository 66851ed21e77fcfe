//! Image validation: the real format from magic bytes (never Content-Type),
//! header dimensions within limits before any pixel allocation, and the
//! container's own integrity, which catches truncated and malformed files at a
//! few percent of the cost of decoding pixels.

mod jpeg;
mod png;

use std::io::Cursor;

use crate::config::{MediaSettings, VerifyMode};
#[cfg(test)]
use crate::model::Status;
use crate::model::{Reason, Verdict};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    Gif,
    Webp,
}

impl ImageFormat {
    pub fn ext(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Png => "png",
            ImageFormat::Gif => "gif",
            ImageFormat::Webp => "webp",
        }
    }

    /// The format an object key's extension names.
    pub fn from_ext(ext: &str) -> Option<Self> {
        [
            ImageFormat::Jpeg,
            ImageFormat::Png,
            ImageFormat::Gif,
            ImageFormat::Webp,
        ]
        .into_iter()
        .find(|f| f.ext() == ext)
    }

    pub fn mime(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Png => "image/png",
            ImageFormat::Gif => "image/gif",
            ImageFormat::Webp => "image/webp",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Png => "png",
            ImageFormat::Gif => "gif",
            ImageFormat::Webp => "webp",
        }
    }

    fn to_image(self) -> image::ImageFormat {
        match self {
            ImageFormat::Jpeg => image::ImageFormat::Jpeg,
            ImageFormat::Png => image::ImageFormat::Png,
            ImageFormat::Gif => image::ImageFormat::Gif,
            ImageFormat::Webp => image::ImageFormat::WebP,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    /// Damage that viewers tolerate and so do we (said in the reason detail).
    pub tolerated: Tolerated,
}

/// Flaws libjpeg, libpng and browsers skip with at most a warning: counted,
/// never a reason to refuse the picture (and flag its user).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tolerated {
    /// JPEG bytes skipped before a marker ("extraneous bytes"), stuffing
    /// outside a scan, broken zero-length APPn/COM segments.
    pub skipped_bytes: u64,
    /// PNG ancillary chunks whose CRC failed (ignored, as libpng does).
    pub bad_ancillary_crcs: u32,
}

impl Tolerated {
    /// Words for the reason detail; `None` for a flawless file.
    pub fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.skipped_bytes > 0 {
            parts.push(format!(
                "{} extraneous JPEG bytes skipped",
                self.skipped_bytes
            ));
        }
        if self.bad_ancillary_crcs > 0 {
            parts.push(format!(
                "{} ancillary PNG chunks with a bad CRC ignored",
                self.bad_ancillary_crcs
            ));
        }
        (!parts.is_empty()).then(|| format!("tolerated: {}", parts.join(", ")))
    }
}

/// Why bytes are not an acceptable avatar. Each becomes the `reason` users see.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    #[error("empty body")]
    Empty,
    #[error("not an image ({0})")]
    NotAnImage(&'static str),
    #[error("image is truncated")]
    Truncated,
    #[error("image is malformed: {0}")]
    Malformed(String),
    #[error("image is {width}x{height}, over the limit")]
    DimensionsTooLarge { width: u32, height: u32 },
    #[error("image cannot be decoded: {0}")]
    Undecodable(String),
    #[error("SVG is refused: it can carry scripts")]
    Svg,
    #[error("animation has {0} frames, over the limit")]
    TooManyFrames(u32),
    /// The decoder ran into its own resource limit on a picture within the
    /// configured limits: the operator's setting, never the user's fault.
    #[error("decoder resource limit: {0}")]
    DecodeLimit(String),
}

impl MediaError {
    pub fn code(&self) -> Reason {
        match self {
            MediaError::Empty => Reason::EmptyBody,
            MediaError::NotAnImage(_) => Reason::NotAnImage,
            MediaError::Truncated => Reason::Truncated,
            MediaError::Malformed(_) => Reason::Malformed,
            MediaError::DimensionsTooLarge { .. } => Reason::DimensionsTooLarge,
            MediaError::Undecodable(_) => Reason::Undecodable,
            MediaError::Svg => Reason::SvgNotAllowed,
            MediaError::TooManyFrames(_) => Reason::TooManyFrames,
            MediaError::DecodeLimit(_) => Reason::DecodeLimit,
        }
    }

    /// Bad bytes never heal by asking again.
    pub fn is_retryable(&self) -> bool {
        false
    }

    pub fn verdict(&self) -> Verdict {
        if let MediaError::DecodeLimit(d) = self {
            // Not the picture's fault: never a flagging verdict.
            return Verdict::new(self.code()).with_detail(d.clone());
        }
        let v = Verdict::new(self.code());
        match self {
            MediaError::NotAnImage(what) => v.with_detail(*what),
            MediaError::Malformed(d) | MediaError::Undecodable(d) => v.with_detail(d.clone()),
            MediaError::DimensionsTooLarge { width, height } => {
                v.with_detail(format!("{width}x{height}"))
            }
            MediaError::TooManyFrames(n) => v.with_detail(format!("{n} frames")),
            MediaError::Empty
            | MediaError::Truncated
            | MediaError::Svg
            | MediaError::DecodeLimit(_) => v,
        }
    }
}

/// The format the bytes really are.
pub fn sniff(bytes: &[u8]) -> Result<ImageFormat, MediaError> {
    if bytes.is_empty() {
        return Err(MediaError::Empty);
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(ImageFormat::Jpeg);
    }
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Ok(ImageFormat::Png);
    }
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        return Ok(ImageFormat::Gif);
    }
    if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return Ok(ImageFormat::Webp);
    }
    match describe_non_image(bytes) {
        "svg" => Err(MediaError::Svg),
        other => Err(MediaError::NotAnImage(other)),
    }
}

/// A short name for what came instead of an image, for the reason detail.
fn describe_non_image(bytes: &[u8]) -> &'static str {
    let head = &bytes[..bytes.len().min(512)];
    let text = String::from_utf8_lossy(head)
        .trim_start()
        .to_ascii_lowercase();
    if text.starts_with("<!doctype html") || text.starts_with("<html") || text.contains("<body") {
        "html"
    } else if text.contains("<svg") {
        "svg"
    } else if text.starts_with("<?xml") {
        "xml"
    } else if text.starts_with('{') || text.starts_with('[') {
        "json"
    } else if head.starts_with(b"BM") || head.starts_with(b"II*\0") || head.starts_with(b"MM\0*") {
        "unsupported image format"
    } else if head.len() >= 12 && &head[4..8] == b"ftyp" {
        "unsupported image format (ISO-BMFF: avif/heic/video)"
    } else {
        "unknown bytes"
    }
}

/// What a container walk found, before any pixel is decoded.
struct Walked {
    width: u32,
    height: u32,
    frames: u32,
    tolerated: Tolerated,
    /// The bytes a decoder is given when the walk had to skip something.
    cleaned: Option<Vec<u8>>,
}

impl Walked {
    /// A single-frame picture (JPEG, PNG).
    fn still(width: u32, height: u32, tolerated: Tolerated, cleaned: Option<Vec<u8>>) -> Self {
        Walked {
            width,
            height,
            frames: 1,
            tolerated,
            cleaned,
        }
    }
}

fn walk(bytes: &[u8], format: ImageFormat) -> Result<Walked, MediaError> {
    Ok(match format {
        ImageFormat::Jpeg => {
            let l = jpeg::walk(bytes)?;
            let cleaned = (l.tolerated.skipped_bytes > 0).then(|| jpeg::rebuild(bytes, &l, true));
            Walked::still(l.width, l.height, l.tolerated, cleaned)
        }
        ImageFormat::Png => {
            let l = png::walk(bytes)?;
            let cleaned =
                (l.tolerated.bad_ancillary_crcs > 0).then(|| png::rebuild(bytes, &l, true));
            Walked::still(l.width, l.height, l.tolerated, cleaned)
        }
        ImageFormat::Gif => {
            let g = gif_layout(bytes)?;
            let cleaned = (!g.unknown_extensions.is_empty()).then(|| {
                let mut out = Vec::with_capacity(bytes.len());
                let mut at = 0;
                for r in &g.unknown_extensions {
                    out.extend_from_slice(&bytes[at..r.start]);
                    at = r.end;
                }
                out.extend_from_slice(&bytes[at..]);
                out
            });
            Walked {
                width: g.width,
                height: g.height,
                frames: g.frames,
                tolerated: Tolerated::default(),
                cleaned,
            }
        }
        ImageFormat::Webp => {
            let (width, height, frames) = walk_webp(bytes)?;
            Walked {
                width,
                height,
                frames,
                tolerated: Tolerated::default(),
                cleaned: None,
            }
        }
    })
}

/// Validates an avatar: sniff, the container walk (structure and the header
/// dimensions, no pixels), our limits, then in `decode` mode a full decode.
pub fn validate(bytes: &[u8], settings: &MediaSettings) -> Result<ImageInfo, MediaError> {
    let format = sniff(bytes)?;
    let walked = walk(bytes, format)?;
    // Every frame is decoded by whoever shows an animation: cap them.
    if walked.frames > settings.max_frames {
        return Err(MediaError::TooManyFrames(walked.frames));
    }
    check_dimensions(walked.width, walked.height, settings)?;
    if settings.verify == VerifyMode::Decode {
        let input = walked.cleaned.as_deref().unwrap_or(bytes);
        let mut reader = image::ImageReader::with_format(Cursor::new(input), format.to_image());
        reader.limits(image_limits(settings));
        reader.decode().map_err(map_image_error)?;
    }
    Ok(ImageInfo {
        format,
        width: walked.width,
        height: walked.height,
        tolerated: walked.tolerated,
    })
}

/// Removes metadata — EXIF (GPS!), XMP, IPTC, comments, text chunks — without
/// touching a pixel: segments and chunks are dropped, nothing is re-encoded.
/// The same walk as validation decides what is a segment, so metadata hidden
/// behind fill bytes or after the scan data goes too; so does anything after
/// the end marker. `None` when nothing was removed (or for GIF).
pub fn strip_metadata(bytes: &[u8], format: ImageFormat) -> Option<Vec<u8>> {
    let out = match format {
        ImageFormat::Jpeg => jpeg::rebuild(bytes, &jpeg::walk(bytes).ok()?, false),
        ImageFormat::Png => png::rebuild(bytes, &png::walk(bytes).ok()?, false),
        ImageFormat::Webp => strip_webp(bytes)?,
        ImageFormat::Gif => return None,
    };
    (out.len() != bytes.len()).then_some(out)
}

fn strip_webp(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = b[..12].to_vec();
    let mut i = 12;
    while i + 8 <= b.len() {
        let size = le32(b, i + 4)? as usize;
        let end = (i + 8 + size + (size & 1)).min(b.len());
        match &b[i..i + 4] {
            b"EXIF" | b"XMP " => {}
            b"VP8X" => {
                let start = out.len();
                out.extend_from_slice(&b[i..end]);
                // The header's flags must stop announcing what is gone.
                if let Some(flags) = out.get_mut(start + 8) {
                    *flags &= !(0x08 | 0x04);
                }
            }
            _ => out.extend_from_slice(&b[i..end]),
        }
        i = end;
    }
    let riff = u32::try_from(out.len() - 8).ok()?;
    out[4..8].copy_from_slice(&riff.to_le_bytes());
    Some(out)
}

/// The decoder's own limits, sized from ours: 16-bit RGBA (8 bytes a pixel)
/// of the largest picture we accept, plus room for the decoder's buffers.
/// Our limits were checked on the header already.
fn image_limits(settings: &MediaSettings) -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(settings.max_width);
    limits.max_image_height = Some(settings.max_height);
    limits.max_alloc = Some(
        settings
            .max_pixels
            .saturating_mul(8)
            .saturating_add(64 << 20),
    );
    limits
}

fn check_dimensions(width: u32, height: u32, settings: &MediaSettings) -> Result<(), MediaError> {
    if width == 0 || height == 0 {
        return Err(MediaError::Malformed(format!(
            "zero dimension {width}x{height}"
        )));
    }
    if width > settings.max_width
        || height > settings.max_height
        || u64::from(width) * u64::from(height) > settings.max_pixels
    {
        return Err(MediaError::DimensionsTooLarge { width, height });
    }
    Ok(())
}

fn map_image_error(e: image::ImageError) -> MediaError {
    match e {
        image::ImageError::Limits(l) => MediaError::DecodeLimit(format!(
            "{l} (the picture is within media.max_* limits; the decoder needs more memory than it may use)"
        )),
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            MediaError::Truncated
        }
        other => MediaError::Undecodable(other.to_string()),
    }
}

pub(crate) fn be16(b: &[u8], at: usize) -> Option<usize> {
    b.get(at..at + 2)
        .map(|s| usize::from(u16::from_be_bytes([s[0], s[1]])))
}

pub(crate) fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// GIF: header, screen descriptor, then image/extension blocks through the
/// trailer. Any extension block is skipped by its sub-blocks, known or not
/// (GIF89a §23: a decoder skips extensions it does not understand).
/// Returns the logical screen size and the number of frames.
pub fn walk_gif(b: &[u8]) -> Result<(u32, u32, u32), MediaError> {
    gif_layout(b).map(|g| (g.width, g.height, g.frames))
}

struct GifLayout {
    width: u32,
    height: u32,
    frames: u32,
    /// Extension blocks of labels the `gif` decoder refuses (it errors where
    /// the spec says skip): left out of the copy a decoder is given.
    unknown_extensions: Vec<std::ops::Range<usize>>,
}

fn gif_layout(b: &[u8]) -> Result<GifLayout, MediaError> {
    let width = u32::from(u16::from_le_bytes([
        b.get(6).copied().ok_or(MediaError::Truncated)?,
        b.get(7).copied().ok_or(MediaError::Truncated)?,
    ]));
    let height = u32::from(u16::from_le_bytes([
        b.get(8).copied().ok_or(MediaError::Truncated)?,
        b.get(9).copied().ok_or(MediaError::Truncated)?,
    ]));
    let flags = *b.get(10).ok_or(MediaError::Truncated)?;
    let mut i = 13;
    if flags & 0x80 != 0 {
        i += 3 * (1usize << ((flags & 0x07) + 1));
    }
    let mut frames = 0u32;
    let mut unknown_extensions = Vec::new();
    loop {
        let Some(&block) = b.get(i) else {
            return Err(MediaError::Truncated);
        };
        match block {
            0x3B => {
                return if frames > 0 {
                    Ok(GifLayout {
                        width,
                        height,
                        frames,
                        unknown_extensions,
                    })
                } else {
                    Err(MediaError::Malformed("GIF has no image".into()))
                };
            }
            0x2C => {
                let local = *b.get(i + 9).ok_or(MediaError::Truncated)?;
                i += 10;
                if local & 0x80 != 0 {
                    i += 3 * (1usize << ((local & 0x07) + 1));
                }
                i += 1; // LZW minimum code size
                i = skip_sub_blocks(b, i)?;
                frames += 1;
            }
            0x21 => {
                let label = *b.get(i + 1).ok_or(MediaError::Truncated)?;
                let end = skip_sub_blocks(b, i + 2)?;
                // Graphic control, comment, plain text, application: GIF89a's own.
                if !matches!(label, 0xF9 | 0xFE | 0x01 | 0xFF) {
                    unknown_extensions.push(i..end);
                }
                i = end;
            }
            other => {
                return Err(MediaError::Malformed(format!(
                    "unknown GIF block 0x{other:02x}"
                )));
            }
        }
    }
}

fn skip_sub_blocks(b: &[u8], mut i: usize) -> Result<usize, MediaError> {
    loop {
        let size = *b.get(i).ok_or(MediaError::Truncated)? as usize;
        i += 1 + size;
        if size == 0 {
            return Ok(i);
        }
        if i > b.len() {
            return Err(MediaError::Truncated);
        }
    }
}

/// WebP: the RIFF size must cover the chunks, each chunk inside it; the
/// first chunk (VP8X, VP8 or VP8L) gives the canvas size.
/// Returns width, height and the number of frames.
pub fn walk_webp(b: &[u8]) -> Result<(u32, u32, u32), MediaError> {
    let riff = le32(b, 4).ok_or(MediaError::Truncated)? as usize;
    let end = riff
        .checked_add(8)
        .ok_or_else(|| MediaError::Malformed("RIFF size overflows".into()))?;
    if end > b.len() {
        return Err(MediaError::Truncated);
    }
    let mut i = 12;
    let mut chunks = 0;
    let mut frames = 0u32;
    let mut size_wh = None;
    while i < end {
        let size = le32(b, i + 4).ok_or(MediaError::Truncated)? as usize;
        let next = (i + 8)
            .checked_add(size + (size & 1))
            .ok_or_else(|| MediaError::Malformed("WebP chunk size overflows".into()))?;
        if next > end {
            return Err(MediaError::Truncated);
        }
        if b.get(i..i + 4) == Some(b"ANMF") {
            frames += 1;
        }
        if chunks == 0 {
            size_wh = webp_canvas(&b[i..i + 4], &b[i + 8..(i + 8 + size).min(end)]);
        }
        chunks += 1;
        i = next;
    }
    if chunks == 0 {
        return Err(MediaError::Malformed("WebP has no chunks".into()));
    }
    let (width, height) =
        size_wh.ok_or_else(|| MediaError::Malformed("WebP has no image header".into()))?;
    Ok((width, height, frames.max(1)))
}

/// The canvas size from the first chunk's header (WebP container spec, RFC 9649).
fn webp_canvas(kind: &[u8], data: &[u8]) -> Option<(u32, u32)> {
    let le24 = |at: usize| {
        data.get(at..at + 3)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], 0]) + 1)
    };
    match kind {
        b"VP8X" => Some((le24(4)?, le24(7)?)),
        b"VP8 " => {
            // Frame tag (3 bytes), start code 9d 01 2a, then 14-bit sizes.
            if data.get(3..6)? != [0x9d, 0x01, 0x2a] {
                return None;
            }
            let w = u16::from_le_bytes([data[6], *data.get(7)?]) & 0x3fff;
            let h = u16::from_le_bytes([*data.get(8)?, *data.get(9)?]) & 0x3fff;
            Some((u32::from(w), u32::from(h)))
        }
        b"VP8L" => {
            if *data.first()? != 0x2f {
                return None;
            }
            let bits = le32(data, 1)?;
            Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
        }
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod tests;
