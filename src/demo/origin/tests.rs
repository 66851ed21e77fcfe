use super::bench::{bench_pool, unique_jpeg};
use crate::config::{Settings, VerifyMode};

#[test]
fn bench_pictures_are_valid_sized_and_unique_per_id() {
    let pool = bench_pool(20_000);
    assert!(pool[0].len() >= 20_000, "{}", pool[0].len());
    let (a, b) = (unique_jpeg(&pool[0], 1), unique_jpeg(&pool[0], 1 << 20));
    assert_ne!(a, b);
    assert_ne!(a, pool[0]);
    assert_eq!(a.len(), pool[0].len());
    let mut media = Settings::from_layers(None, Vec::<(String, String)>::new())
        .unwrap()
        .media;
    for mode in [VerifyMode::Structure, VerifyMode::Decode] {
        media.verify = mode;
        for jpeg in [&a, &b] {
            crate::media::validate(jpeg, &media).unwrap();
        }
    }
}
