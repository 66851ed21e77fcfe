//! The origin's benchmark and politeness routes: pictures of a chosen size,
//! unique per id, with validators; and a host that limits concurrency.

use super::*;

pub(super) async fn serve_limited(state: &State, rest: &str) -> Response<Body> {
    let parts: Vec<&str> = rest.split('/').collect();
    let [n, ms, name] = parts.as_slice() else {
        return respond(StatusCode::NOT_FOUND, "text/plain", Bytes::new());
    };
    let (n, ms) = (
        n.parse::<u64>().unwrap_or(1),
        ms.parse::<u64>().unwrap_or(0),
    );
    let l = &state.limited;
    let now = l.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    l.peak.fetch_max(now, Ordering::SeqCst);
    let response = if now > n {
        l.refused.fetch_add(1, Ordering::SeqCst);
        respond(
            StatusCode::TOO_MANY_REQUESTS,
            "text/plain",
            Bytes::from_static(b"too many requests"),
        )
    } else {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        l.served.fetch_add(1, Ordering::SeqCst);
        respond(
            StatusCode::OK,
            "image/jpeg",
            image_for(state, "jpeg", name).unwrap_or_default(),
        )
    };
    l.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

/// The benchmark's routes: `/bench/<kind>/<id>` with kind `valid` (a JPEG of
/// about `bench_image_bytes`, different bytes for every id, from a pool
/// rendered once so the origin stays cheap), `same` (one shared JPEG),
/// `expired` (WeChat's placeholder and headers) or `gone` (404). Not counted
/// per path: a million distinct paths would only measure the counter.
pub(super) async fn serve_bench(
    state: &State,
    rest: &str,
    if_none_match: Option<&str>,
) -> Response<Body> {
    let Some(limit) = state.options.bench_limit else {
        return serve_bench_answer(state, rest, if_none_match).await;
    };
    // The same accounting as `/limited/`: in flight, the peak, refusals.
    let l = &state.limited;
    let now = l.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    l.peak.fetch_max(now, Ordering::SeqCst);
    let response = if now > limit {
        l.refused.fetch_add(1, Ordering::SeqCst);
        respond(StatusCode::TOO_MANY_REQUESTS, "text/plain", Bytes::new())
    } else {
        let r = serve_bench_answer(state, rest, if_none_match).await;
        l.served.fetch_add(1, Ordering::SeqCst);
        r
    };
    l.in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

pub(super) async fn serve_bench_answer(
    state: &State,
    rest: &str,
    if_none_match: Option<&str>,
) -> Response<Body> {
    if !state.options.latency.is_zero() {
        tokio::time::sleep(state.options.latency).await;
    }
    let (kind, id) = rest.split_once('/').unwrap_or((rest, "0"));
    let id: u64 = id.parse().unwrap_or(0);
    let pool = state.bench.get_or_init(|| {
        if state.options.bench_realistic {
            realistic_pool()
        } else {
            bench_pool(state.options.bench_image_bytes)
        }
    });
    match kind {
        "valid" => {
            let etag = format!("\"v{id}\"");
            if matches_etag(if_none_match, &etag) {
                return not_modified(&etag);
            }
            let base = &pool[usize::try_from(id % pool.len() as u64).unwrap_or(0)];
            respond_image(None, &etag, "image/jpeg", unique_jpeg(base, id))
        }
        "same" => respond_image(if_none_match, "\"same\"", "image/jpeg", pool[0].clone()),
        "expired" => wechat_expired(state),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", Bytes::new()),
    }
}

/// A benchmark picture: a JPEG of at least `target` bytes, unique per `id`
/// (what the origin serves at `/bench/valid/<id>`).
pub fn bench_picture(target: usize, id: u64) -> Bytes {
    unique_jpeg(&bench_pool(target)[0], id)
}

/// 16 JPEGs of at least `target` bytes (the side grows until they are).
pub(super) fn bench_pool(target: usize) -> Vec<Bytes> {
    let mut side = 64;
    loop {
        let probe = render_avatar("bench-0", side, image::ImageFormat::Jpeg);
        if probe.len() >= target || side >= 1024 {
            break;
        }
        side += 16;
    }
    (0..16)
        .map(|i| {
            Bytes::from(render_avatar(
                &format!("bench-{i}"),
                side,
                image::ImageFormat::Jpeg,
            ))
        })
        .collect()
}

/// Sizes in bytes of the realistic pool: 20-120 KB, median ~45 KB, skewed
/// toward the small end as a population of phone-camera avatars is.
pub(super) const REALISTIC_SIZES: [usize; 16] = [
    20_000, 24_000, 28_000, 32_000, 36_000, 39_000, 42_000, 44_000, 46_000, 49_000, 53_000, 58_000,
    66_000, 78_000, 95_000, 120_000,
];

/// 16 JPEGs of 640x640 (WeChat's `/0` size), one per `REALISTIC_SIZES` entry.
pub(super) fn realistic_pool() -> Vec<Bytes> {
    REALISTIC_SIZES
        .iter()
        .enumerate()
        .map(|(i, &size)| Bytes::from(render_jpeg_of_size(&format!("real-{i}"), 640, size)))
        .collect()
}

/// The same JPEG with `id` written into its entropy-coded data: a valid file
/// whose sha256 differs per id. Only bytes that are not `0xFF` and do not
/// follow one are replaced, by values below `0x80`, so no marker appears.
pub(super) fn unique_jpeg(base: &Bytes, id: u64) -> Bytes {
    let mut bytes = base.to_vec();
    let Some(sos) = bytes.windows(2).position(|w| w == [0xFF, 0xDA]) else {
        return base.clone();
    };
    let header = usize::from(u16::from_be_bytes([bytes[sos + 2], bytes[sos + 3]]));
    let (start, end) = (sos + 2 + header + 1, bytes.len().saturating_sub(4));
    let step = (end.saturating_sub(start) / 10).max(1);
    let mut pos = start;
    for k in 0..9 {
        while pos < end && (bytes[pos] == 0xFF || bytes[pos - 1] == 0xFF) {
            pos += 1;
        }
        if pos >= end {
            break;
        }
        bytes[pos] = ((id >> (7 * k)) & 0x7F) as u8;
        pos += step;
    }
    Bytes::from(bytes)
}
