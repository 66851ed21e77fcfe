use super::*;
use reqwest::header::{
    CONTENT_LENGTH, ETAG, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED, RETRY_AFTER,
};

#[test]
fn retry_after_in_seconds_and_as_a_date() {
    let mut h = HeaderMap::new();
    h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
    assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(7)));
    let later = (chrono::Utc::now() + chrono::Duration::seconds(120)).to_rfc2822();
    h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
    let d = parse_retry_after(&h).unwrap();
    assert!(
        d > Duration::from_secs(100) && d <= Duration::from_secs(120),
        "{d:?}"
    );
    h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
    assert_eq!(parse_retry_after(&h), None);
}

fn v(etag: Option<&str>, lm: Option<&str>, len: Option<i64>) -> Validators {
    Validators {
        etag: etag.map(Into::into),
        last_modified: lm.map(Into::into),
        length: len,
    }
}

#[test]
fn head_validators_decide_only_when_they_can() {
    let lm = "Tue, 14 Nov 2023 22:13:20 GMT";
    let known = v(Some("\"a\""), Some(lm), Some(100));
    assert_eq!(
        same_picture(&known, &v(Some("\"a\""), None, Some(100))),
        Some(true)
    );
    assert_eq!(
        same_picture(&known, &v(Some("W/\"a\""), None, None)),
        Some(true),
        "weak comparison"
    );
    assert_eq!(
        same_picture(&known, &v(Some("\"b\""), Some(lm), Some(100))),
        Some(false)
    );
    assert_eq!(
        same_picture(&known, &v(Some("\"a\""), Some(lm), Some(101))),
        Some(false),
        "another length is another picture, whatever the ETag says"
    );
    assert_eq!(
        same_picture(&known, &v(None, Some(lm), Some(100))),
        None,
        "the ETag went missing"
    );
    let dated = v(None, Some(lm), Some(100));
    assert_eq!(
        same_picture(&dated, &v(None, Some(lm), Some(100))),
        Some(true)
    );
    assert_eq!(
        same_picture(
            &dated,
            &v(None, Some("Wed, 15 Nov 2023 22:13:20 GMT"), Some(100))
        ),
        Some(false)
    );
    assert_eq!(
        same_picture(&v(None, None, Some(100)), &v(None, None, Some(100))),
        None,
        "a length alone cannot tell"
    );
}

#[test]
fn validators_too_long_to_store_are_left_out_and_a_304_keeps_what_was_known() {
    let mut h = HeaderMap::new();
    h.insert(
        ETAG,
        HeaderValue::from_str(&format!("\"{}\"", "x".repeat(600))).unwrap(),
    );
    h.insert(
        LAST_MODIFIED,
        HeaderValue::from_static("Tue, 14 Nov 2023 22:13:20 GMT"),
    );
    h.insert(CONTENT_LENGTH, HeaderValue::from_static("4096"));
    let got = validators_of(&h);
    assert_eq!(got.etag, None);
    assert_eq!(got.length, Some(4096));
    let known = v(Some("\"a\""), None, Some(10));
    assert_eq!(
        merge(&known, &v(None, Some("d"), None)),
        v(Some("\"a\""), Some("d"), Some(10))
    );
    let sent = conditional_headers(&known);
    assert_eq!(sent.get(IF_NONE_MATCH).unwrap(), "\"a\"");
    assert!(sent.get(IF_MODIFIED_SINCE).is_none());
}
