use super::*;

pub(crate) fn settings() -> MediaSettings {
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
pub(crate) fn jpeg_with_gps() -> Vec<u8> {
    crate::demo::origin::with_gps_exif(&encode(image::ImageFormat::Jpeg, 32, 24))
}

fn encode(format: image::ImageFormat, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 3) as u8, 90]));
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
                height: 48,
                tolerated: Tolerated::default(),
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
    assert_eq!(walk_gif(&out).unwrap(), (8, 8, 5));
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
        (v.status, v.code.as_str(), v.detail.as_deref()),
        (Status::Invalid, "not_an_image", Some("html"))
    );
    assert_eq!(MediaError::Truncated.verdict().code, "truncated");
}

/// A baseline JPEG as encoders write it: SOI, APP0, DQT, SOF0, DHT, SOS, data, EOI.
fn jpeg() -> Vec<u8> {
    encode(image::ImageFormat::Jpeg, 40, 24)
}

/// Where the first segment after SOI ends (APP0 JFIF or DQT).
fn after_first_segment(j: &[u8]) -> usize {
    4 + usize::from(u16::from_be_bytes([j[4], j[5]]))
}

fn insert(j: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
    [&j[..at], bytes, &j[at..]].concat()
}

fn segment(marker: u8, payload: &[u8], declared: usize) -> Vec<u8> {
    let mut s = vec![0xFF, marker];
    s.extend_from_slice(&(declared as u16).to_be_bytes());
    s.extend_from_slice(payload);
    s
}

fn pixels(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
        .unwrap()
        .to_rgb8()
}

/// What libjpeg and browsers display is valid, whatever they had to skip.
#[test]
fn jpegs_that_libjpeg_displays_with_a_warning_are_valid() {
    let j = jpeg();
    let at = after_first_segment(&j);
    let comment = b"hello world";
    let cases: Vec<(&str, Vec<u8>, u64)> = vec![
        (
            "stray bytes between segments",
            insert(&j, at, b"\x00\x13\x37"),
            3,
        ),
        (
            "fill 0xFF run then 0x00",
            insert(&j, at, b"\xFF\xFF\x00"),
            3,
        ),
        (
            "junk after a segment declared 3 bytes short",
            insert(&j, at, &segment(0xFE, comment, comment.len() + 2 - 3)),
            3,
        ),
        ("COM of length 0", insert(&j, at, &segment(0xFE, b"", 0)), 4),
        ("COM of length 1", insert(&j, at, &segment(0xFE, b"", 1)), 4),
        (
            "APP5 of length 0",
            insert(&j, at, &segment(0xE5, b"", 0)),
            4,
        ),
        (
            "fill bytes before a marker",
            insert(&j, at, b"\xFF\xFF\xFF"),
            0,
        ),
        ("junk after EOI", [&j[..], b"trailing junk"].concat(), 0),
    ];
    for (what, bytes, skipped) in cases {
        let info = validate(&bytes, &settings()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!((info.width, info.height), (40, 24), "{what}");
        assert_eq!(info.tolerated.skipped_bytes, skipped, "{what}");
        if skipped > 0 {
            assert!(
                info.tolerated.describe().unwrap().contains("extraneous"),
                "{what}"
            );
        }
        let mut decode = settings();
        decode.verify = VerifyMode::Decode;
        validate(&bytes, &decode).unwrap_or_else(|e| panic!("{what} (decode): {e}"));
    }
}

/// The other side of tolerance: what no viewer can show stays invalid.
#[test]
fn broken_jpegs_stay_invalid() {
    let j = jpeg();
    let eoi = j.len() - 2;
    let sof = j.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    let sos = j.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    let mut bad_sof = j.clone();
    bad_sof[sof + 3] += 1; // declared length no longer matches the components
    let mut bad_sos = j.clone();
    bad_sos[sos + 3] += 1;
    let mut huge_dqt = j.clone();
    let dqt = j.windows(2).position(|w| w == [0xFF, 0xDB]).unwrap();
    huge_dqt[dqt + 2] = 0xFF; // runs past the end of the file
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("data ending before EOI", j[..eoi].to_vec(), "truncated"),
        ("cut inside the scan", j[..sos + 40].to_vec(), "truncated"),
        (
            "no frame header",
            [&j[..2], &j[eoi..]].concat(),
            "malformed",
        ),
        ("SOF length lies", bad_sof, "malformed"),
        ("SOS length lies", bad_sos, "malformed"),
        ("segment past the end", huge_dqt, "truncated"),
        ("second SOI", insert(&j, 2, b"\xFF\xD8"), "malformed"),
        (
            "DQT of length 1",
            insert(&j, after_first_segment(&j), &segment(0xDB, b"", 1)),
            "malformed",
        ),
    ];
    for (what, bytes, code) in cases {
        let err = validate(&bytes, &settings()).unwrap_err();
        assert_eq!(err.code(), code, "{what}: {err}");
        assert_eq!(err.verdict().status, Status::Invalid, "{what}");
    }
    let mut lossless = j.clone();
    lossless[sof + 1] = 0xC3;
    assert_eq!(
        validate(&lossless, &settings()).unwrap_err().code(),
        "undecodable"
    );
}

/// EXIF wherever the walk accepts it is EXIF the stripper removes.
#[test]
fn exif_is_stripped_wherever_the_validator_finds_a_segment() {
    let j = jpeg();
    let exif = &crate::demo::origin::with_gps_exif(&[0xFF, 0xD8])[2..];
    let eoi = j.len() - 2;
    let at = after_first_segment(&j);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("after SOI", insert(&j, 2, exif)),
        (
            "behind a fill byte",
            insert(&j, at, &[&[0xFF][..], exif].concat()),
        ),
        (
            "behind stray bytes",
            insert(&j, at, &[&b"junk"[..], exif].concat()),
        ),
        ("between the scan data and EOI", insert(&j, eoi, exif)),
        ("after EOI", [&j[..], exif].concat()),
    ];
    for (what, bytes) in cases {
        assert!(validate(&bytes, &settings()).is_ok(), "{what}");
        let clean = strip_metadata(&bytes, ImageFormat::Jpeg).expect(what);
        assert!(
            !clean.windows(11).any(|w| w == b"GPSLatitude"),
            "{what}: GPS left in"
        );
        assert!(validate(&clean, &settings()).is_ok(), "{what}: still valid");
        assert_eq!(pixels(&clean), pixels(&j), "{what}: same pixels");
    }
}

fn png_chunk(kind: &[u8; 4], data: &[u8], crc_ok: bool) -> Vec<u8> {
    let mut c = (data.len() as u32).to_be_bytes().to_vec();
    c.extend_from_slice(kind);
    c.extend_from_slice(data);
    let crc = crc32fast::hash(&c[4..]) ^ u32::from(!crc_ok);
    c.extend_from_slice(&crc.to_be_bytes());
    c
}

#[test]
fn png_ancillary_chunks_with_bad_crcs_are_ignored_and_critical_ones_are_not() {
    let png = encode(image::ImageFormat::Png, 8, 8);
    for kind in [b"iCCP", b"cLLI", b"mDCV", b"tEXt"] {
        let bytes = insert(&png, 33, &png_chunk(kind, b"junk data", false));
        let info = validate(&bytes, &settings())
            .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(kind)));
        assert_eq!(info.tolerated.bad_ancillary_crcs, 1);
        let mut decode = settings();
        decode.verify = VerifyMode::Decode;
        assert!(validate(&bytes, &decode).is_ok(), "decode mode too");
    }
    let bad_plte = insert(&png, 33, &png_chunk(b"PLTE", &[0; 6], false));
    assert_eq!(
        validate(&bad_plte, &settings()).unwrap_err().code(),
        "malformed"
    );
}

#[test]
fn png_metadata_after_iend_is_not_kept() {
    let png = encode(image::ImageFormat::Png, 8, 8);
    let exif = png_chunk(b"eXIf", b"MM\0*GPSLatitude 39.9", true);
    let bytes = [&png[..], &exif[..]].concat();
    assert!(validate(&bytes, &settings()).is_ok());
    assert_eq!(strip_metadata(&bytes, ImageFormat::Png).unwrap(), png);
}

#[test]
fn gif_extensions_of_unknown_kinds_are_skipped() {
    let mut out = Vec::new();
    {
        let mut enc = image::codecs::gif::GifEncoder::new(&mut out);
        let frame = image::RgbaImage::from_pixel(8, 8, image::Rgba([200, 0, 0, 255]));
        enc.encode_frame(image::Frame::new(frame)).unwrap();
    }
    // Past the header, screen descriptor and global colour table, and any
    // extensions the encoder wrote: the first image descriptor.
    let mut image_block = 13;
    if out[10] & 0x80 != 0 {
        image_block += 3 * (1 << ((out[10] & 7) + 1));
    }
    while out[image_block] == 0x21 {
        image_block = skip_sub_blocks(&out, image_block + 2).unwrap();
    }
    assert_eq!(out[image_block], 0x2C);
    // Extension label 0x99, two sub-blocks, terminator.
    let ext = b"\x21\x99\x03abc\x02de\x00";
    let bytes = insert(&out, image_block, ext);
    assert_eq!(validate(&bytes, &settings()).unwrap().width, 8);
    let mut decode = settings();
    decode.verify = VerifyMode::Decode;
    validate(&bytes, &decode).unwrap();
}

#[test]
fn the_reason_names_the_real_header_dimensions() {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = i32::MAX.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&i32::MAX.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&png_chunk(b"IHDR", &ihdr, true));
    png.extend_from_slice(&png_chunk(
        b"IDAT",
        b"\x78\x9c\x03\x00\x00\x00\x00\x01",
        true,
    ));
    png.extend_from_slice(&png_chunk(b"IEND", b"", true));
    let v = validate(&png, &settings()).unwrap_err().verdict();
    assert_eq!(
        (v.code.as_str(), v.detail.as_deref()),
        ("dimensions_too_large", Some("2147483647x2147483647"))
    );
}

/// Within our limits, the decoder's own allocation limit is not the
/// user's fault: a big 16-bit RGBA PNG decodes, and a decoder limit hit
/// anyway is `failing`, never a flag.
#[test]
fn decode_mode_sizes_the_decoder_from_our_limits() {
    let side = 4096;
    use image::ImageEncoder;
    // All-zero 16-bit RGBA: 128 MiB of pixels, a small file.
    let raw = vec![0u8; (side * side * 8) as usize];
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(
        &mut png,
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::NoFilter,
    )
    .write_image(&raw, side, side, image::ExtendedColorType::Rgba16)
    .unwrap();
    let mut decode = settings();
    decode.verify = VerifyMode::Decode;
    let info = validate(&png, &decode).unwrap();
    assert_eq!((info.width, info.height), (side, side));
    let limit = MediaError::DecodeLimit("x".into()).verdict();
    assert_eq!(limit.status, Status::Failing);
    assert!(!limit.status.requires_reauth());
}
