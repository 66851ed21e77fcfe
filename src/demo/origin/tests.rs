use super::bench::{REALISTIC_SIZES, bench_pool, realistic_pool, unique_jpeg};
use crate::config::{Settings, VerifyMode};
use bytes::Bytes;

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

#[test]
fn the_realistic_pool_has_the_sizes_it_names_and_valid_640px_jpegs() {
    let pool = realistic_pool();
    let media = Settings::from_layers(None, Vec::<(String, String)>::new())
        .unwrap()
        .media;
    for (jpeg, &want) in pool.iter().zip(&REALISTIC_SIZES) {
        // At least the size asked for, and not far over it.
        assert!(
            jpeg.len() >= want && jpeg.len() < want + want / 10,
            "{} bytes for {want}",
            jpeg.len()
        );
        let unique = unique_jpeg(jpeg, 7);
        let info = crate::media::validate(&unique, &media).unwrap();
        assert_eq!((info.width, info.height), (640, 640));
    }
    let mut sizes: Vec<usize> = pool.iter().map(Bytes::len).collect();
    sizes.sort_unstable();
    let median = usize::midpoint(sizes[7], sizes[8]);
    assert!((43_000..48_000).contains(&median), "median {median}");
}
