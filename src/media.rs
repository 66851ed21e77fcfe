//! Image validation: the real format from magic bytes (never Content-Type),
//! header dimensions within limits before any pixel allocation, and the
//! container's own integrity, which catches truncated and malformed files at a
//! few percent of the cost of decoding pixels.

use std::io::Cursor;

use crate::classify::{Status, Verdict};
use crate::config::{MediaSettings, VerifyMode};

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
}

impl MediaError {
    pub fn code(&self) -> &'static str {
        match self {
            MediaError::Empty => "empty_body",
            MediaError::NotAnImage(_) => "not_an_image",
            MediaError::Truncated => "truncated",
            MediaError::Malformed(_) => "malformed",
            MediaError::DimensionsTooLarge { .. } => "dimensions_too_large",
            MediaError::Undecodable(_) => "undecodable",
            MediaError::Svg => "svg_not_allowed",
            MediaError::TooManyFrames(_) => "too_many_frames",
        }
    }

    /// Bad bytes never heal by asking again.
    pub fn is_retryable(&self) -> bool {
        false
    }

    pub fn verdict(&self) -> Verdict {
        let v = Verdict::new(Status::Invalid, self.code());
        match self {
            MediaError::NotAnImage(what) => v.with_detail(*what),
            MediaError::Malformed(d) | MediaError::Undecodable(d) => v.with_detail(d.clone()),
            MediaError::DimensionsTooLarge { width, height } => {
                v.with_detail(format!("{width}x{height}"))
            }
            MediaError::TooManyFrames(n) => v.with_detail(format!("{n} frames")),
            MediaError::Empty | MediaError::Truncated | MediaError::Svg => v,
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

/// Validates an avatar: sniff, header dimensions within limits, then either the
/// container walk (default) or a full pixel decode.
pub fn validate(bytes: &[u8], settings: &MediaSettings) -> Result<ImageInfo, MediaError> {
    let format = sniff(bytes)?;
    // Structure first: a truncated header must say "truncated", not "undecodable".
    let frames = match format {
        ImageFormat::Jpeg => walk_jpeg(bytes).map(|_| 1)?,
        ImageFormat::Png => walk_png(bytes).map(|_| 1)?,
        ImageFormat::Gif => walk_gif(bytes)?,
        ImageFormat::Webp => walk_webp(bytes)?,
    };
    // Every frame is decoded by whoever shows an animation: cap them.
    if frames > settings.max_frames {
        return Err(MediaError::TooManyFrames(frames));
    }
    let limits = image_limits(settings);
    // Reading the header allocates no pixels: read the real size first so the
    // reason can name it, then let our own limits decide.
    let mut header_limits = limits.clone();
    header_limits.max_image_width = None;
    header_limits.max_image_height = None;
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format.to_image());
    reader.limits(header_limits);
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| map_image_error(e, settings))?;
    check_dimensions(width, height, settings)?;
    if settings.verify == VerifyMode::Decode {
        let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format.to_image());
        reader.limits(limits);
        reader.decode().map_err(|e| map_image_error(e, settings))?;
    }
    Ok(ImageInfo {
        format,
        width,
        height,
    })
}

/// Removes metadata — EXIF (GPS!), XMP, IPTC, comments, text chunks — without
/// touching a pixel: segments and chunks are dropped, nothing is re-encoded.
/// `None` when there was nothing to remove (or the format has no such metadata).
pub fn strip_metadata(bytes: &[u8], format: ImageFormat) -> Option<Vec<u8>> {
    let out = match format {
        ImageFormat::Jpeg => strip_jpeg(bytes)?,
        ImageFormat::Png => strip_png(bytes)?,
        ImageFormat::Webp => strip_webp(bytes)?,
        ImageFormat::Gif => return None,
    };
    (out.len() != bytes.len()).then_some(out)
}

fn strip_jpeg(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    out.extend_from_slice(&b[..2]);
    let mut i = 2;
    while i + 4 <= b.len() && b[i] == 0xFF {
        let marker = b[i + 1];
        if marker == 0xDA {
            break; // scan data and everything after it is copied as is
        }
        let len = be16(b, i + 2)?;
        let end = (i + 2 + len).min(b.len());
        // APP1 (Exif, XMP), APP13 (IPTC), COM: metadata. APP0/APP2 (ICC)/APP14 stay.
        if !matches!(marker, 0xE1 | 0xED | 0xFE) {
            out.extend_from_slice(&b[i..end]);
        }
        i = end;
    }
    out.extend_from_slice(&b[i.min(b.len())..]);
    Some(out)
}

fn strip_png(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    out.extend_from_slice(&b[..8]);
    let mut i = 8;
    while i + 12 <= b.len() {
        let len = be32(b, i)? as usize;
        let end = (i + 12 + len).min(b.len());
        let kind = &b[i + 4..i + 8];
        if !matches!(kind, b"eXIf" | b"tEXt" | b"zTXt" | b"iTXt" | b"tIME") {
            out.extend_from_slice(&b[i..end]);
        }
        i = end;
    }
    Some(out)
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
    let riff = (out.len() - 8) as u32;
    out[4..8].copy_from_slice(&riff.to_le_bytes());
    Some(out)
}

fn image_limits(settings: &MediaSettings) -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(settings.max_width);
    limits.max_image_height = Some(settings.max_height);
    // RGBA8 of the largest allowed picture, plus slack for decoder buffers.
    limits.max_alloc = Some(
        settings
            .max_pixels
            .saturating_mul(4)
            .saturating_add(16 << 20),
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

fn map_image_error(e: image::ImageError, settings: &MediaSettings) -> MediaError {
    match e {
        image::ImageError::Limits(_) => MediaError::DimensionsTooLarge {
            width: settings.max_width,
            height: settings.max_height,
        },
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            MediaError::Truncated
        }
        other => MediaError::Undecodable(other.to_string()),
    }
}

fn be16(b: &[u8], at: usize) -> Option<usize> {
    b.get(at..at + 2)
        .map(|s| usize::from(u16::from_be_bytes([s[0], s[1]])))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// JPEG: SOI, then marker segments; after each SOS the entropy-coded data runs
/// to the next real marker; the file must reach EOI.
pub fn walk_jpeg(b: &[u8]) -> Result<(), MediaError> {
    let mut i = 2; // after SOI
    let mut seen_frame = false;
    loop {
        // Markers may be preceded by fill bytes 0xFF.
        if i >= b.len() {
            return Err(MediaError::Truncated);
        }
        if b[i] != 0xFF {
            return Err(MediaError::Malformed(format!(
                "expected a JPEG marker at byte {i}"
            )));
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = b.get(i) else {
            return Err(MediaError::Truncated);
        };
        i += 1;
        match marker {
            0xD9 => {
                return if seen_frame {
                    Ok(())
                } else {
                    Err(MediaError::Malformed("JPEG has no frame header".into()))
                };
            }
            0x01 | 0xD0..=0xD7 => continue, // standalone markers
            0x00 => {
                return Err(MediaError::Malformed(
                    "stray 0xFF00 outside scan data".into(),
                ));
            }
            _ => {}
        }
        let len = be16(b, i).ok_or(MediaError::Truncated)?;
        if len < 2 {
            return Err(MediaError::Malformed(format!("JPEG segment length {len}")));
        }
        if i + len > b.len() {
            return Err(MediaError::Truncated);
        }
        if matches!(marker, 0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF) {
            seen_frame = true;
        }
        i += len;
        if marker == 0xDA {
            // Entropy-coded data: 0xFF00 is a stuffed byte, 0xFFD0..D7 restart markers.
            loop {
                let Some(pos) = memchr_ff(&b[i..]) else {
                    return Err(MediaError::Truncated);
                };
                i += pos;
                match b.get(i + 1) {
                    None => return Err(MediaError::Truncated),
                    Some(0x00) | Some(0xD0..=0xD7) | Some(0xFF) => i += 1,
                    Some(_) => break,
                }
            }
        }
    }
}

fn memchr_ff(b: &[u8]) -> Option<usize> {
    // SIMD search: the byte loop was the walk's whole cost (stages benchmark).
    memchr::memchr(0xFF, b)
}

/// PNG: chunks with CRCs, IHDR first, through IEND.
pub fn walk_png(b: &[u8]) -> Result<(), MediaError> {
    let mut i = 8;
    let mut first = true;
    loop {
        let len = be32(b, i).ok_or(MediaError::Truncated)? as usize;
        let kind = b.get(i + 4..i + 8).ok_or(MediaError::Truncated)?;
        let end = i
            .checked_add(12)
            .and_then(|x| x.checked_add(len))
            .ok_or_else(|| MediaError::Malformed("PNG chunk length overflows".into()))?;
        if end > b.len() {
            return Err(MediaError::Truncated);
        }
        if first && kind != b"IHDR" {
            return Err(MediaError::Malformed("PNG does not start with IHDR".into()));
        }
        first = false;
        let stored = be32(b, i + 8 + len).ok_or(MediaError::Truncated)?;
        let actual = crc32fast::hash(&b[i + 4..i + 8 + len]);
        if stored != actual {
            return Err(MediaError::Malformed(format!(
                "PNG chunk {} has a bad CRC",
                String::from_utf8_lossy(kind)
            )));
        }
        if kind == b"IEND" {
            return Ok(());
        }
        i = end;
    }
}

/// GIF: header, screen descriptor, then image/extension blocks through the trailer.
pub fn walk_gif(b: &[u8]) -> Result<u32, MediaError> {
    let flags = *b.get(10).ok_or(MediaError::Truncated)?;
    let mut i = 13;
    if flags & 0x80 != 0 {
        i += 3 * (1usize << ((flags & 0x07) + 1));
    }
    let mut frames = 0u32;
    loop {
        let Some(&block) = b.get(i) else {
            return Err(MediaError::Truncated);
        };
        match block {
            0x3B => {
                return if frames > 0 {
                    Ok(frames)
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
                i = skip_sub_blocks(b, i + 2)?;
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

/// WebP: the RIFF size must cover the chunks, each chunk inside it.
pub fn walk_webp(b: &[u8]) -> Result<u32, MediaError> {
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
        chunks += 1;
        i = next;
    }
    if chunks == 0 {
        return Err(MediaError::Malformed("WebP has no chunks".into()));
    }
    Ok(frames.max(1))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn settings() -> MediaSettings {
        MediaSettings {
            verify: VerifyMode::Structure,
            max_width: 4096,
            max_height: 4096,
            max_pixels: 16_777_216,
            max_frames: 100,
            strip_metadata: false,
        }
    }

    /// A JPEG carrying an EXIF segment with a GPS position, as phones write them.
    pub fn jpeg_with_gps() -> Vec<u8> {
        crate::demo::origin::with_gps_exif(&encode(image::ImageFormat::Jpeg, 32, 24))
    }

    fn encode(format: image::ImageFormat, w: u32, h: u32) -> Vec<u8> {
        let img =
            image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 3) as u8, 90]));
        let mut out = Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut out, format)
            .unwrap();
        out.into_inner()
    }

    #[test]
    fn valid_images_of_each_format_pass_with_their_dimensions() {
        for (fmt, ours) in [
            (image::ImageFormat::Jpeg, ImageFormat::Jpeg),
            (image::ImageFormat::Png, ImageFormat::Png),
            (image::ImageFormat::Gif, ImageFormat::Gif),
            (image::ImageFormat::WebP, ImageFormat::Webp),
        ] {
            let bytes = encode(fmt, 64, 48);
            let info = validate(&bytes, &settings()).unwrap_or_else(|e| panic!("{fmt:?}: {e}"));
            assert_eq!(
                info,
                ImageInfo {
                    format: ours,
                    width: 64,
                    height: 48
                }
            );
            let mut decode = settings();
            decode.verify = VerifyMode::Decode;
            assert_eq!(validate(&bytes, &decode).unwrap(), info);
        }
    }

    #[test]
    fn truncated_files_of_each_format_are_caught_without_decoding() {
        for fmt in [
            image::ImageFormat::Jpeg,
            image::ImageFormat::Png,
            image::ImageFormat::Gif,
            image::ImageFormat::WebP,
        ] {
            let bytes = encode(fmt, 64, 64);
            for cut in [bytes.len() - 1, bytes.len() / 2, 40] {
                let err = validate(&bytes[..cut], &settings()).unwrap_err();
                assert_eq!(
                    err,
                    MediaError::Truncated,
                    "{fmt:?} cut at {cut} of {}",
                    bytes.len()
                );
            }
        }
    }

    #[test]
    fn format_comes_from_magic_bytes_not_from_anything_else() {
        assert_eq!(
            sniff(b"<!DOCTYPE html><html><body>hi</body></html>"),
            Err(MediaError::NotAnImage("html"))
        );
        assert_eq!(
            sniff(b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
            Err(MediaError::Svg)
        );
        assert_eq!(MediaError::Svg.verdict().code, "svg_not_allowed");
        assert_eq!(
            sniff(b"{\"errcode\":40001}"),
            Err(MediaError::NotAnImage("json"))
        );
        assert_eq!(sniff(b""), Err(MediaError::Empty));
        assert_eq!(
            sniff(&encode(image::ImageFormat::Png, 2, 2)),
            Ok(ImageFormat::Png)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any bytes, with or without a real magic number in front: a verdict, never a panic.
        #[test]
        fn the_validator_never_panics(
            magic in 0usize..5,
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
        ) {
            let prefix: &[u8] = match magic {
                0 => b"\xFF\xD8\xFF",
                1 => b"\x89PNG\r\n\x1a\n",
                2 => b"GIF89a",
                3 => b"RIFF\x10\x00\x00\x00WEBP",
                _ => b"",
            };
            let bytes = [prefix, &tail].concat();
            let _ = validate(&bytes, &settings());
            let mut decode = settings();
            decode.verify = VerifyMode::Decode;
            let _ = validate(&bytes, &decode);
        }

        /// A real picture with one byte changed and/or cut short: still a verdict.
        #[test]
        fn damaged_pictures_never_panic(
            fmt in 0usize..4,
            at in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::prelude::any::<u8>(),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let format = [image::ImageFormat::Jpeg, image::ImageFormat::Png, image::ImageFormat::Gif, image::ImageFormat::WebP][fmt];
            let mut bytes = encode(format, 24, 16);
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let keep = cut.index(bytes.len() + 1);
            let _ = validate(&bytes[..keep], &settings());
        }
    }

    #[test]
    fn metadata_is_stripped_without_touching_the_picture() {
        let jpeg = jpeg_with_gps();
        assert!(validate(&jpeg, &settings()).is_ok());
        let stripped = strip_metadata(&jpeg, ImageFormat::Jpeg).expect("EXIF removed");
        assert!(!stripped.windows(11).any(|w| w == b"GPSLatitude"));
        assert_eq!(
            stripped.len(),
            encode(image::ImageFormat::Jpeg, 32, 24).len()
        );
        let a = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        let b = image::load_from_memory(&stripped).unwrap().to_rgb8();
        assert_eq!(a, b, "same pixels");

        // PNG text chunks.
        let png = encode(image::ImageFormat::Png, 8, 8);
        let mut text = b"tEXt".to_vec();
        text.extend_from_slice(b"Comment\0taken at home");
        let mut chunk = ((text.len() - 4) as u32).to_be_bytes().to_vec();
        chunk.extend_from_slice(&text);
        chunk.extend_from_slice(&crc32fast::hash(&text).to_be_bytes());
        let with_text = [&png[..33], &chunk, &png[33..]].concat(); // after IHDR
        assert!(validate(&with_text, &settings()).is_ok());
        let stripped = strip_metadata(&with_text, ImageFormat::Png).unwrap();
        assert_eq!(stripped, png);

        // Nothing to remove: None.
        assert_eq!(strip_metadata(&png, ImageFormat::Png), None);
        let webp = encode(image::ImageFormat::WebP, 8, 8);
        assert_eq!(strip_metadata(&webp, ImageFormat::Webp), None);
    }

    #[test]
    fn animations_over_the_frame_limit_are_refused() {
        use image::codecs::gif::GifEncoder;
        let mut out = Vec::new();
        {
            let mut enc = GifEncoder::new(&mut out);
            for i in 0..5u8 {
                let frame = image::RgbaImage::from_pixel(8, 8, image::Rgba([i * 40, 0, 0, 255]));
                enc.encode_frame(image::Frame::new(frame)).unwrap();
            }
        }
        assert_eq!(walk_gif(&out).unwrap(), 5);
        let mut few = settings();
        few.max_frames = 4;
        assert_eq!(
            validate(&out, &few).unwrap_err(),
            MediaError::TooManyFrames(5)
        );
        assert_eq!(
            validate(&out, &settings()).unwrap().format,
            ImageFormat::Gif
        );
    }

    #[test]
    fn a_corrupted_png_chunk_is_malformed() {
        let mut bytes = encode(image::ImageFormat::Png, 16, 16);
        let n = bytes.len();
        bytes[n - 20] ^= 0xFF; // inside IDAT, before IEND
        assert_eq!(
            validate(&bytes, &settings()).unwrap_err().code(),
            "malformed"
        );
    }

    #[test]
    fn absurd_header_dimensions_are_rejected_before_allocation() {
        // A PNG header claiming 100000 x 100000 with nothing behind it.
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc32fast::hash(&ihdr).to_be_bytes());
        let mut idat = b"IDAT".to_vec();
        idat.extend_from_slice(b"\x78\x9c\x03\x00\x00\x00\x00\x01");
        png.extend_from_slice(&8u32.to_be_bytes());
        png.extend_from_slice(&idat);
        png.extend_from_slice(&crc32fast::hash(&idat).to_be_bytes());
        let iend = b"IEND";
        png.extend_from_slice(&0u32.to_be_bytes());
        png.extend_from_slice(iend);
        png.extend_from_slice(&crc32fast::hash(iend).to_be_bytes());
        let err = validate(&png, &settings()).unwrap_err();
        assert_eq!(err.code(), "dimensions_too_large", "{err}");
    }

    #[test]
    fn pictures_over_the_configured_limits_are_rejected() {
        let bytes = encode(image::ImageFormat::Png, 300, 200);
        let mut small = settings();
        small.max_width = 256;
        assert_eq!(
            validate(&bytes, &small).unwrap_err(),
            MediaError::DimensionsTooLarge {
                width: 300,
                height: 200
            }
        );
        let mut few_pixels = settings();
        few_pixels.max_pixels = 300 * 200 - 1;
        assert_eq!(
            validate(&bytes, &few_pixels).unwrap_err().code(),
            "dimensions_too_large"
        );
    }

    #[test]
    fn every_media_error_is_an_invalid_verdict_with_its_code() {
        let v = MediaError::NotAnImage("html").verdict();
        assert_eq!(
            (v.status, v.code, v.detail.as_deref()),
            (Status::Invalid, "not_an_image", Some("html"))
        );
        assert_eq!(MediaError::Truncated.verdict().code, "truncated");
    }
}
