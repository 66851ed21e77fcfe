//! Criterion micro-benchmarks of the CPU-bound stages, on the benchmark's own
//! 20 KB JPEG (`cargo bench --bench stages`). They tell which stage the
//! end-to-end numbers of `benches/pipeline.rs` could be spent in.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};

use avatar_warden::classify::{classify_head, parse_avatar_url};
use avatar_warden::config::{MediaSettings, Settings, VerifyMode};
use avatar_warden::db::{AvatarRecord, Claim, Database, Selection, new_lease_token};
use avatar_warden::demo::origin::bench_picture;
use avatar_warden::media::{self, ImageFormat};
use avatar_warden::providers::Providers;
use avatar_warden::storage::object_key;

fn settings(verify: VerifyMode) -> MediaSettings {
    MediaSettings {
        verify,
        max_width: 4096,
        max_height: 4096,
        max_pixels: 16_777_216,
        max_frames: 100,
        strip_metadata: false,
    }
}

fn classify(c: &mut Criterion) {
    let providers = Providers::builtin();
    let url = "https://thirdwx.qlogo.cn/mmopen/vi_32/Q0j4TwGTfTLxSQ7rDjZrhdZ5nibLe5Z3hVfQib/132";
    let mut expired = HeaderMap::new();
    expired.insert("x-errno", HeaderValue::from_static("-6101"));
    expired.insert("x-info", HeaderValue::from_static("notexist:-6101"));
    let mut ok = HeaderMap::new();
    ok.insert("content-type", HeaderValue::from_static("image/jpeg"));
    // What the worker does before and after the request: parse, find the rule, read the head.
    c.bench_function("classify/url+rule+head (200)", |b| {
        b.iter(|| {
            let url = parse_avatar_url(black_box(url)).unwrap();
            let rule = providers.find(&url).map(|r| r.name.len());
            (rule, classify_head(StatusCode::OK, black_box(&ok)))
        });
    });
    c.bench_function("classify/head (WeChat -6101)", |b| {
        b.iter(|| classify_head(StatusCode::OK, black_box(&expired)));
    });
}

fn media_stages(c: &mut Criterion) {
    let jpeg = bench_picture(20_000, 42);
    let mut g = c.benchmark_group("media");
    g.throughput(Throughput::Bytes(jpeg.len() as u64));
    g.bench_function("sniff", |b| b.iter(|| media::sniff(black_box(&jpeg))));
    g.bench_function("sniff+dimensions", |b| {
        b.iter(|| {
            let format = media::sniff(black_box(&jpeg)).unwrap();
            image::ImageReader::with_format(std::io::Cursor::new(&jpeg[..]), to_image(format))
                .into_dimensions()
                .unwrap()
        });
    });
    let structure = settings(VerifyMode::Structure);
    g.bench_function("validate (structure, default)", |b| {
        b.iter(|| media::validate(black_box(&jpeg), &structure).unwrap());
    });
    let decode = settings(VerifyMode::Decode);
    g.bench_function("validate (full decode)", |b| {
        b.iter(|| media::validate(black_box(&jpeg), &decode).unwrap());
    });
    g.bench_function("sha256", |b| {
        b.iter(|| hex::encode(Sha256::digest(black_box(&jpeg))));
    });
    g.finish();
}

fn to_image(format: ImageFormat) -> image::ImageFormat {
    match format {
        ImageFormat::Jpeg => image::ImageFormat::Jpeg,
        ImageFormat::Png => image::ImageFormat::Png,
        ImageFormat::Gif => image::ImageFormat::Gif,
        ImageFormat::Webp => image::ImageFormat::WebP,
    }
}

fn key_naming(c: &mut Criterion) {
    let sha = hex::encode(Sha256::digest(b"avatar"));
    c.bench_function("key naming", |b| {
        b.iter(|| object_key(black_box("mirror/"), black_box(&sha), ImageFormat::Jpeg));
    });
}

const BATCH: usize = 500;

/// One batch write of 500 results (state upsert + write-back, one
/// transaction) on SQLite, each iteration on freshly leased rows.
fn batch_write(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}?mode=rwc", dir.path().join("b.db").display());
    let env = [
        ("AVATAR_WARDEN__PROFILE__URL", db_url.as_str()),
        (
            "AVATAR_WARDEN__PROFILE__MIRROR_URL_COLUMN",
            "avatar_mirror_url",
        ),
        ("AVATAR_WARDEN__PROFILE__REAUTH_COLUMN", "reauth"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let settings = Settings::from_layers(None, env).unwrap();
    let db: Database = rt.block_on(async {
        let pool = sqlx::SqlitePool::connect(&db_url).await.unwrap();
        sqlx::query(
            "CREATE TABLE users (id INTEGER PRIMARY KEY, avatar_url TEXT, avatar_mirror_url TEXT, reauth BOOLEAN)",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(&format!(
            "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < {BATCH}) \
             INSERT INTO users (id, avatar_url) SELECT i, 'https://thirdwx.qlogo.cn/mmopen/' || i || '/132' FROM seq"
        ))
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
        let db = settings.profile.connect().await.unwrap();
        db.migrate().await.unwrap();
        db
    });
    let selection = Selection {
        force: true,
        ..Selection::default()
    };
    let mut g = c.benchmark_group("db");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(20);
    let clock = std::cell::Cell::new(chrono::Utc::now().timestamp());
    g.bench_function("sqlite batch write of 500", |b| {
        b.iter_batched(
            || {
                // Not timed: lease the 500 rows to a new token, as a scan would.
                let token = new_lease_token();
                // Each round an hour later: the last round's leases have run out.
                clock.set(clock.get() + 3600);
                let now = clock.get();
                let page = rt.block_on(db.claim_page(&Claim {
                    after: None,
                    now,
                    limit: BATCH,
                    token: &token,
                    lease_until: now + 600,
                    shard: None,
                    selection: &selection,
                    keep_url: None,
                }));
                let records: Vec<AvatarRecord> = page
                    .unwrap()
                    .claimed
                    .into_iter()
                    .map(|due| record(due.user_id, due.avatar_url, now))
                    .collect();
                assert_eq!(records.len(), BATCH);
                (token, records)
            },
            |(token, records)| {
                let done = rt.block_on(db.record_batch(&records, &[], &token)).unwrap();
                assert_eq!(done.written, BATCH);
            },
            BatchSize::PerIteration,
        );
    });
    g.finish();
}

fn record(user_id: avatar_warden::db::UserId, source_url: String, now: i64) -> AvatarRecord {
    let sha = hex::encode(Sha256::digest(source_url.as_bytes()));
    let key = object_key("", &sha, ImageFormat::Jpeg);
    let mut r = AvatarRecord::new(
        user_id,
        source_url,
        avatar_warden::classify::Reason::ValidImage,
        now,
    )
    .with_mirror(format!("https://cdn.example.com/{key}"), key, sha)
    .with_next_check(Some(now + 86_400));
    (r.size_bytes, r.width, r.height) = (Some(20_000), Some(256), Some(256));
    r.format = Some("jpeg".into());
    r
}

fn config() -> Criterion {
    // Short runs: the point is the order of magnitude per stage, in seconds.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = stages;
    config = config();
    targets = classify, media_stages, key_naming, batch_write
}
criterion_main!(stages);
