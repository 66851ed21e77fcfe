//! A simulated avatar origin on loopback: valid pictures, WeChat-style expired
//! answers with the real header set, errors and junk. The demo, the tests and
//! the benchmark all drive it, and it counts every request it serves.

use std::collections::HashMap;
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What WeChat's CDN sends for an avatar that no longer exists.
mod bench;

pub use bench::bench_picture;
use bench::{serve_bench, serve_limited};

pub const WECHAT_ERRNO: &str = "-6101";
pub const WECHAT_INFO: &str = "notexist:-6101";

#[derive(Debug, Clone)]
pub struct OriginOptions {
    /// Added before every answer, to model a distant CDN.
    pub latency: Duration,
    /// Side of the square test pictures, in pixels.
    pub image_side: u32,
    /// Address to bind; port 0 picks a free one.
    pub bind: SocketAddr,
    /// Approximate size of the JPEGs under `/bench/` (the benchmark's avatars).
    pub bench_image_bytes: usize,
    /// Serve `/bench/` avatars as 640x640 JPEGs of 20-120 KB (median ~45 KB),
    /// as WeChat's `/0` avatars are, instead of `bench_image_bytes` each.
    pub bench_realistic: bool,
    /// `/bench/` answers 429 when more than this many requests are in flight
    /// (a host that limits concurrency, for the slow-host benchmark).
    pub bench_limit: Option<u64>,
}

impl Default for OriginOptions {
    fn default() -> Self {
        OriginOptions {
            latency: Duration::ZERO,
            image_side: 132,
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            bench_image_bytes: 20_000,
            bench_realistic: false,
            bench_limit: None,
        }
    }
}

struct State {
    options: OriginOptions,
    total: AtomicU64,
    hits: Mutex<HashMap<String, u64>>,
    images: Mutex<HashMap<String, Bytes>>,
    placeholder: Bytes,
    /// Rendered on the first `/bench/` request.
    bench: OnceLock<Vec<Bytes>>,
    /// `/limited/` requests in flight now, the most seen, and those refused with 429.
    limited: LimitedCounts,
}

#[derive(Default)]
struct LimitedCounts {
    in_flight: AtomicU64,
    peak: AtomicU64,
    refused: AtomicU64,
    served: AtomicU64,
}

/// What a `/limited/` host saw: requests served, refused with 429, and the
/// most that were in flight at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitedStats {
    pub served: u64,
    pub refused: u64,
    pub peak_in_flight: u64,
}

/// A running origin; it stops when dropped.
pub struct Origin {
    addr: SocketAddr,
    state: Arc<State>,
    stop: CancellationToken,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Origin {
    pub async fn spawn(options: OriginOptions) -> std::io::Result<Origin> {
        let listener = TcpListener::bind(options.bind).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            placeholder: Bytes::from(gray_placeholder_png()),
            options,
            total: AtomicU64::new(0),
            hits: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
            bench: OnceLock::new(),
            limited: LimitedCounts::default(),
        });
        let stop = CancellationToken::new();
        let app = axum::Router::new().fallback({
            let state = state.clone();
            move |req: Request<Body>| {
                let state = state.clone();
                async move { serve(&state, req).await }
            }
        });
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
        });
        Ok(Origin { addr, state, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` + path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Requests served so far.
    pub fn total_hits(&self) -> u64 {
        self.state.total.load(Ordering::Relaxed)
    }

    pub fn hits(&self, path: &str) -> u64 {
        self.state
            .hits
            .lock()
            .expect("hits lock")
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// What the `/limited/` routes saw so far.
    pub fn limited_stats(&self) -> LimitedStats {
        let l = &self.state.limited;
        LimitedStats {
            served: l.served.load(Ordering::Relaxed),
            refused: l.refused.load(Ordering::Relaxed),
            peak_in_flight: l.peak.load(Ordering::Relaxed),
        }
    }

    /// The bytes `/avatar/<kind>/<name>` serves, for comparing with a mirror.
    pub fn image_bytes(&self, kind: &str, name: &str) -> Option<Bytes> {
        image_for(&self.state, kind, name)
    }
}

async fn serve(state: &State, req: Request<Body>) -> Response<Body> {
    let path = req.uri().path().to_string();
    state.total.fetch_add(1, Ordering::Relaxed);
    let if_none_match = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let if_none_match = if_none_match.as_deref();
    if let Some(rest) = path.strip_prefix("/bench/") {
        return serve_bench(state, rest, if_none_match).await;
    }
    // A host that answers 429 whenever more than `n` requests are in flight,
    // each taking `ms`: `/limited/<n>/<ms>/<name>` (adaptive politeness tests).
    if let Some(rest) = path.strip_prefix("/limited/") {
        return serve_limited(state, rest).await;
    }
    if path == "/__stats" {
        let l = &state.limited;
        let body = format!(
            "{{\"requests\":{},\"refused\":{},\"bench_served\":{},\"peak_in_flight\":{}}}",
            state.total.load(Ordering::Relaxed) - 1,
            l.refused.load(Ordering::Relaxed),
            l.served.load(Ordering::Relaxed),
            l.peak.load(Ordering::Relaxed),
        );
        return respond(StatusCode::OK, "application/json", Bytes::from(body));
    }
    let hit = {
        let mut hits = state.hits.lock().expect("hits lock");
        let n = hits.entry(path.clone()).or_default();
        *n += 1;
        *n
    };
    if !state.options.latency.is_zero() {
        tokio::time::sleep(state.options.latency).await;
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["avatar", kind, name] => match image_for(state, kind, name) {
            Some(bytes) => {
                use sha2::Digest;
                let etag = format!("\"{}\"", &hex::encode(sha2::Sha256::digest(&bytes))[..16]);
                respond_image(if_none_match, &etag, mime_for(kind), bytes)
            }
            None => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                Bytes::from_static(b"unknown kind"),
            ),
        },
        // WeChat's CDN: 200, a gray PNG, and the only real signal in two headers.
        ["wechat", "expired", _] => wechat_expired(state),
        // A dying WeChat URL seen through different CDN nodes: the picture on
        // odd requests, the expired placeholder on even ones.
        ["flap", name] => {
            if hit % 2 == 1 {
                respond(
                    StatusCode::OK,
                    "image/jpeg",
                    image_for(state, "jpeg", name).unwrap_or_default(),
                )
            } else {
                wechat_expired(state)
            }
        }
        // A phone photo: JPEG with an EXIF segment holding a GPS position.
        ["exif", name] => {
            let clean = image_for(state, "jpeg", name).unwrap_or_default();
            respond(
                StatusCode::OK,
                "image/jpeg",
                Bytes::from(with_gps_exif(&clean)),
            )
        }
        // A slow-drip server: headers at once, then one byte a second.
        ["drip", _] => {
            let drip = futures::stream::unfold(0u8, |n| async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Some((
                    Ok::<_, std::io::Error>(Bytes::from(vec![n])),
                    n.wrapping_add(1),
                ))
            });
            let mut r = Response::new(Body::from_stream(drip));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
            r
        }
        // Declares a 64 MiB body, then sends it very slowly: must be refused unread.
        ["huge", _] => {
            let slow = futures::stream::unfold((), |()| async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Some((
                    Ok::<_, std::io::Error>(Bytes::from_static(&[0u8; 1024])),
                    (),
                ))
            });
            let mut r = Response::new(Body::from_stream(slow));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("67108864"));
            r
        }
        // The placeholder picture without the headers that would give it away.
        ["placeholder", _] => respond(StatusCode::OK, "image/png", state.placeholder.clone()),
        // `n` answers of 429 with Retry-After: 1, then the picture.
        ["ratelimit", n, name] => {
            if hit <= n.parse::<u64>().unwrap_or(0) {
                let mut r = respond(
                    StatusCode::TOO_MANY_REQUESTS,
                    "text/plain",
                    Bytes::from_static(b"slow down"),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            } else {
                respond(
                    StatusCode::OK,
                    "image/jpeg",
                    image_for(state, "jpeg", name).unwrap_or_default(),
                )
            }
        }
        // WeChat-style size segment: /0 is the largest (256 px here); names
        // starting with "nobig" have no /0.
        ["sized", name, size] => match (*size, name.starts_with("nobig")) {
            ("0", true) => respond(StatusCode::NOT_FOUND, "text/plain", Bytes::new()),
            (size, _) => {
                let side = if size == "0" {
                    256
                } else {
                    size.parse().unwrap_or(132).clamp(1, 1024)
                };
                let bytes = render_avatar(name, side, image::ImageFormat::Jpeg);
                respond(StatusCode::OK, "image/jpeg", Bytes::from(bytes))
            }
        },
        // A signed URL: 403 once `x-expires` (unix seconds) has passed.
        ["signed", name] => {
            let expires = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("x-expires=")))
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0);
            if expires <= chrono::Utc::now().timestamp() {
                respond(
                    StatusCode::FORBIDDEN,
                    "text/plain",
                    Bytes::from_static(b"signature expired"),
                )
            } else {
                respond(
                    StatusCode::OK,
                    "image/jpeg",
                    image_for(state, "jpeg", name).unwrap_or_default(),
                )
            }
        }
        ["status", code, _] => {
            let status = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            respond(
                status,
                "text/plain",
                Bytes::from(format!("status {status}")),
            )
        }
        // An HTML error page that claims to be a picture.
        ["html", _] => respond(
            StatusCode::OK,
            "image/jpeg",
            Bytes::from_static(b"<!DOCTYPE html><html><body><h1>Login required</h1></body></html>"),
        ),
        ["truncated", name] => {
            let full = image_for(state, "jpeg", name).unwrap_or_default();
            respond(StatusCode::OK, "image/jpeg", full.slice(..full.len() / 2))
        }
        // JPEGs every viewer shows despite their flaws: `/quirky/<kind>/<name>`.
        ["quirky", kind, name] => {
            let clean = image_for(state, "jpeg", name).unwrap_or_default();
            match quirky_jpeg(&clean, kind) {
                Some(bytes) => respond(StatusCode::OK, "image/jpeg", Bytes::from(bytes)),
                None => respond(StatusCode::NOT_FOUND, "text/plain", Bytes::new()),
            }
        }
        // Hostile headers: `/hostile/<what>/<name>` (see `hostile`).
        ["hostile", what, name] => hostile(state, what, name),
        // 302 to any URL given as `?to=...` (for redirect-hop tests).
        ["bounce"] => {
            let to = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("to="))
                .unwrap_or("/")
                .to_string();
            let mut r = respond(StatusCode::FOUND, "text/plain", Bytes::new());
            if let Ok(v) = HeaderValue::from_str(&to) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        ["redirect", rest @ ..] => {
            let mut r = respond(StatusCode::FOUND, "text/plain", Bytes::new());
            if let Ok(v) = HeaderValue::from_str(&format!("/{}", rest.join("/"))) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found"),
        ),
    }
}

/// Inserts an APP1 EXIF segment with a GPS position right after SOI.
/// Responses a hostile or broken server sends: header values of 70 KB
/// (`errno`, `info`, `validators`), a value the test database is told to
/// refuse (`poison`), terminal control characters (`escape`).
fn hostile(state: &State, what: &str, name: &str) -> Response<Body> {
    let huge = "x".repeat(70_000);
    let (mut r, headers): (Response<Body>, Vec<(&str, Vec<u8>)>) = match what {
        "errno" => (
            respond(StatusCode::OK, "image/png", state.placeholder.clone()),
            vec![("x-errno", format!("-6101 {huge}").into_bytes())],
        ),
        "info" => (
            respond(StatusCode::OK, "image/png", state.placeholder.clone()),
            vec![("x-info", format!("notexist:{huge}").into_bytes())],
        ),
        "poison" => (
            respond(StatusCode::OK, "image/png", state.placeholder.clone()),
            vec![("x-errno", b"-6101 poison".to_vec())],
        ),
        "validators" => (
            respond(
                StatusCode::OK,
                "image/jpeg",
                image_for(state, "jpeg", name).unwrap_or_default(),
            ),
            vec![
                ("etag", format!("\"{huge}\"").into_bytes()),
                ("last-modified", huge.clone().into_bytes()),
            ],
        ),
        // C1 CSI (U+009B) and an ANSI colour sequence spelled with it: an
        // 8-bit terminal would act on them if printed raw.
        "escape" => (
            respond(
                StatusCode::OK,
                "image/jpeg",
                image_for(state, "jpeg", name).unwrap_or_default(),
            ),
            vec![("x-info", "\u{9b}31mred\u{9b}0m\u{9b}2J".as_bytes().to_vec())],
        ),
        _ => (
            respond(StatusCode::NOT_FOUND, "text/plain", Bytes::new()),
            vec![],
        ),
    };
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_bytes(&value) {
            r.headers_mut().insert(name, v);
        }
    }
    r
}

/// A JPEG with a flaw libjpeg skips with a warning, or with EXIF where a
/// naive segment walk would not look: `stray` bytes between segments, a
/// `com0` (COM of length 0), EXIF behind a fill byte (`fill-exif`) or
/// between the scan data and EOI (`exif-after-scan`).
pub fn quirky_jpeg(jpeg: &[u8], kind: &str) -> Option<Vec<u8>> {
    let first = 4 + usize::from(u16::from_be_bytes([*jpeg.get(4)?, *jpeg.get(5)?]));
    let exif = with_gps_exif(&[0xFF, 0xD8]).split_off(2);
    let (at, insert): (usize, Vec<u8>) = match kind {
        "stray" => (first, b"\x00\x13\x37".to_vec()),
        "com0" => (first, vec![0xFF, 0xFE, 0x00, 0x00]),
        "fill-exif" => (first, [&[0xFF][..], &exif].concat()),
        "exif-after-scan" => (jpeg.len().checked_sub(2)?, exif),
        _ => return None,
    };
    Some([&jpeg[..at], &insert, &jpeg[at..]].concat())
}

pub fn with_gps_exif(jpeg: &[u8]) -> Vec<u8> {
    let payload = b"Exif\0\0MM\0*GPSLatitude 39.9042 N GPSLongitude 116.4074 E";
    let mut app1 = vec![0xFF, 0xE1];
    let len = u16::try_from(payload.len() + 2).expect("an APP1 segment holds at most 64 KiB");
    app1.extend_from_slice(&len.to_be_bytes());
    app1.extend_from_slice(payload);
    [
        &jpeg[..2.min(jpeg.len())],
        &app1,
        &jpeg[2.min(jpeg.len())..],
    ]
    .concat()
}

fn wechat_expired(state: &State) -> Response<Body> {
    let mut r = respond(StatusCode::OK, "image/png", state.placeholder.clone());
    r.headers_mut()
        .insert("X-ErrNo", HeaderValue::from_static(WECHAT_ERRNO));
    r.headers_mut()
        .insert("X-Info", HeaderValue::from_static(WECHAT_INFO));
    r
}

/// When every picture of the origin was last changed (they never change).
pub const LAST_MODIFIED: &str = "Tue, 14 Nov 2023 22:13:20 GMT";

fn matches_etag(if_none_match: Option<&str>, etag: &str) -> bool {
    if_none_match.is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag))
}

fn not_modified(etag: &str) -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::NOT_MODIFIED;
    add_validators(&mut r, etag);
    r
}

fn add_validators(r: &mut Response<Body>, etag: &str) {
    if let Ok(v) = HeaderValue::from_str(etag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r.headers_mut().insert(
        header::LAST_MODIFIED,
        HeaderValue::from_static(LAST_MODIFIED),
    );
}

/// A picture with the validators real CDNs send (`ETag`, `Last-Modified`),
/// and `304 Not Modified` to an `If-None-Match` naming its ETag.
fn respond_image(
    if_none_match: Option<&str>,
    etag: &str,
    content_type: &'static str,
    body: Bytes,
) -> Response<Body> {
    if matches_etag(if_none_match, etag) {
        return not_modified(etag);
    }
    let mut r = respond(StatusCode::OK, content_type, body);
    add_validators(&mut r, etag);
    r
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn mime_for(kind: &str) -> &'static str {
    match kind {
        "png" => "image/png",
        "webp" => "image/webp",
        "gif" => "image/gif",
        _ => "image/jpeg",
    }
}

/// A picture per (kind, name): the same name always gives the same bytes, so
/// two users with one URL name share one mirrored object.
fn image_for(state: &State, kind: &str, name: &str) -> Option<Bytes> {
    let format = match kind {
        "jpeg" => image::ImageFormat::Jpeg,
        "png" => image::ImageFormat::Png,
        "webp" => image::ImageFormat::WebP,
        "gif" => image::ImageFormat::Gif,
        _ => return None,
    };
    let key = format!("{kind}/{name}");
    if let Some(b) = state.images.lock().expect("images lock").get(&key) {
        return Some(b.clone());
    }
    let bytes = Bytes::from(render_avatar(name, state.options.image_side, format));
    let mut cache = state.images.lock().expect("images lock");
    if cache.len() > 4096 {
        cache.clear(); // bounded: the benchmark asks for many names
    }
    cache.insert(key, bytes.clone());
    Some(bytes)
}

/// A gradient whose colours come from the name: distinct names, distinct bytes.
#[allow(clippy::cast_possible_truncation)] // colour bytes: wrapping is the pattern
pub fn render_avatar(name: &str, side: u32, format: image::ImageFormat) -> Vec<u8> {
    let seed = name.bytes().fold(2_166_136_261_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    });
    let [r, g, b, _] = seed.to_le_bytes();
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([
            r.wrapping_add((x * 255 / side.max(1)) as u8),
            g.wrapping_add((y * 255 / side.max(1)) as u8),
            b ^ ((x ^ y) as u8 & 0x1F),
        ])
    });
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, format)
        .expect("encoding to memory cannot fail");
    out.into_inner()
}

/// A `side`x`side` JPEG of at least `target` bytes where one can be made:
/// the avatar pattern at a searched "detail level": up to 45 the JPEG
/// quality rises (30 to 75), above it deterministic noise covers more pixels. Real
/// photos carry detail flat renders lack; this is how a 640x640 picture
/// reaches the sizes real avatars have, small or large.
#[allow(clippy::cast_possible_truncation)] // channel values wrap on purpose
pub fn render_jpeg_of_size(name: &str, side: u32, target: usize) -> Vec<u8> {
    const QUALITY_STEPS: u32 = 45;
    let seed = name.bytes().fold(2_166_136_261_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16_777_619)
    });
    let render = |level: u32| {
        // Noise of a fixed amplitude on a growing share of the pixels: the
        // size grows in small steps (a growing amplitude jumps).
        let (quality, density) = if level <= QUALITY_STEPS {
            (30 + level, 0)
        } else {
            // Quadratic: the first noisy pixels cost the most bytes.
            (30 + QUALITY_STEPS, (level - QUALITY_STEPS).pow(2))
        };
        let [r, g, b, _] = seed.to_le_bytes();
        let img = image::RgbImage::from_fn(side, side, |x, y| {
            let h = (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ seed)
                .wrapping_mul(2_654_435_761);
            let noisy = (h >> 16) < density;
            let noise = |shift: u32| if noisy { ((h >> shift) % 48) as u8 } else { 0 };
            image::Rgb([
                r.wrapping_add((x * 255 / side.max(1)) as u8)
                    .wrapping_add(noise(0)),
                g.wrapping_add((y * 255 / side.max(1)) as u8)
                    .wrapping_add(noise(8)),
                (b ^ ((x ^ y) as u8 & 0x1F)).wrapping_add(noise(16)),
            ])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality as u8)
            .encode_image(&img)
            .expect("encoding to memory cannot fail");
        out
    };
    // The lowest level that reaches `target` (size grows with the level).
    let (mut lo, mut hi) = (0_u32, QUALITY_STEPS + 255);
    let mut best = render(hi);
    if best.len() < target {
        return best;
    }
    best = render(lo);
    if best.len() >= target {
        return best;
    }
    while lo + 1 < hi {
        let mid = u32::midpoint(lo, hi);
        let img = render(mid);
        if img.len() >= target {
            (hi, best) = (mid, img);
        } else {
            lo = mid;
        }
    }
    if best.len() < target {
        best = render(hi);
    }
    best
}

/// The gray "temporarily unavailable" picture WeChat serves for dead avatars.
pub fn gray_placeholder_png() -> Vec<u8> {
    let img = image::GrayImage::from_fn(132, 132, |x, y| {
        let ring = (x.abs_diff(66).pow(2) + y.abs_diff(50).pow(2)) < 24 * 24;
        image::Luma([if ring { 200 } else { 228 }])
    });
    let mut out = Cursor::new(Vec::new());
    image::DynamicImage::ImageLuma8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encoding to memory cannot fail");
    out.into_inner()
}

#[cfg(test)]
mod tests;
