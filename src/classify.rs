//! Verdicts, and the pure rules that turn a URL or a response into one.
//! No I/O here: everything is unit-tested without a network.

use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use url::Url;

pub use crate::model::{MAX_DETAIL_BYTES, Reason, Status, Verdict, bounded};

/// URLs longer than this are junk, not avatars.
pub const MAX_URL_LEN: usize = 2048;

/// Parses an avatar URL as stored in the profile table. `Err` is the verdict
/// for a URL that can never make an avatar.
pub fn parse_avatar_url(raw: &str) -> Result<Url, Verdict> {
    let raw = raw.trim();
    if raw.len() > MAX_URL_LEN {
        return Err(Verdict::new(Reason::UrlTooLong).with_detail(format!("{} bytes", raw.len())));
    }
    let url = Url::parse(raw)
        .map_err(|e| Verdict::new(Reason::UnparsableUrl).with_detail(e.to_string()))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(Verdict::new(Reason::UnsupportedScheme).with_detail(other.to_string()));
        }
    }
    if url.host().is_none() {
        return Err(Verdict::new(Reason::UnparsableUrl).with_detail("no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Verdict::new(Reason::UrlHasCredentials));
    }
    Ok(url)
}

/// What the status line and headers alone decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadDecision {
    /// The verdict is final without reading the body.
    Final(Verdict),
    /// Read the body and validate it as an image.
    ReadBody,
}

/// Tencent's image servers (WeChat `thirdwx.qlogo.cn`, `wx.qlogo.cn`, `*.qpic.cn`...)
/// answer a dead avatar with `200 image/png` and a gray placeholder; only these
/// headers tell. No other server sends them, so the rule applies to every host.
pub fn provider_expiry_header(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("x-errno") {
        return Some(format!(
            "X-ErrNo: {}",
            String::from_utf8_lossy(v.as_bytes())
        ));
    }
    if let Some(v) = headers.get("x-info") {
        let v = String::from_utf8_lossy(v.as_bytes());
        if v.trim_start().to_ascii_lowercase().starts_with("notexist") {
            return Some(format!("X-Info: {v}"));
        }
    }
    None
}

/// Statuses that may pass on another attempt: 408, 429 and 5xx. (401/403
/// are `failing` too, but asking again at once does not change a WAF's mind.)
pub fn is_transient_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429) || status.is_server_error()
}

/// Classifies a response by status and headers.
pub fn classify_head(status: StatusCode, headers: &HeaderMap) -> HeadDecision {
    // The provider's own signal wins over everything, including a 200.
    if let Some(header) = provider_expiry_header(headers) {
        return HeadDecision::Final(Verdict::new(Reason::ProviderNotexist).with_detail(header));
    }
    let code = status.as_u16();
    let verdict = match code {
        200..=299 => return HeadDecision::ReadBody,
        404 => Verdict::new(Reason::NotFound),
        410 => Verdict::new(Reason::Gone),
        408 => Verdict::new(Reason::RequestTimeout),
        429 => Verdict::new(Reason::RateLimited),
        // Often a WAF or hotlink rule aimed at us, not the user's fault: never flag on it.
        401 | 403 => Verdict::new(Reason::AccessDenied),
        500..=599 => Verdict::new(Reason::ServerError),
        300..=399 => Verdict::new(Reason::UnexpectedRedirect),
        _ => Verdict::new(Reason::HttpStatus),
    };
    HeadDecision::Final(verdict.with_detail(code.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn head(status: u16, pairs: &[(&str, &str)]) -> HeadDecision {
        classify_head(StatusCode::from_u16(status).unwrap(), &headers(pairs))
    }

    #[test]
    fn wechat_placeholder_with_200_is_expired_and_names_the_header() {
        let d = head(
            200,
            &[
                ("content-type", "image/png"),
                ("x-errno", "-6101"),
                ("x-info", "notexist:-6101"),
            ],
        );
        let HeadDecision::Final(v) = d else {
            panic!("{d:?}")
        };
        assert_eq!(v.status, Status::Expired);
        assert_eq!(v.code, "provider_notexist");
        assert_eq!(v.detail.as_deref(), Some("X-ErrNo: -6101"));
    }

    #[test]
    fn x_info_notexist_alone_is_expired_but_other_x_info_is_not() {
        let HeadDecision::Final(v) = head(200, &[("x-info", "notexist:-6101")]) else {
            panic!()
        };
        assert_eq!(v.detail.as_deref(), Some("X-Info: notexist:-6101"));
        assert_eq!(
            head(200, &[("x-info", "real data")]),
            HeadDecision::ReadBody
        );
    }

    #[test]
    fn provider_header_wins_over_any_status() {
        for status in [200, 304, 404, 500] {
            let HeadDecision::Final(v) = head(status, &[("x-errno", "-6101")]) else {
                panic!()
            };
            assert_eq!(v.status, Status::Expired, "status {status}");
        }
    }

    #[test]
    fn statuses_map_to_the_documented_verdicts() {
        let cases = [
            (404, Status::Expired, "not_found"),
            (410, Status::Expired, "gone"),
            (500, Status::Failing, "server_error"),
            (503, Status::Failing, "server_error"),
            (408, Status::Failing, "request_timeout"),
            (429, Status::Failing, "rate_limited"),
            (403, Status::Failing, "access_denied"),
            (400, Status::Invalid, "http_status"),
        ];
        for (code, status, reason) in cases {
            let HeadDecision::Final(v) = head(code, &[]) else {
                panic!("{code}")
            };
            assert_eq!(
                (v.status, v.code.as_str()),
                (status, reason),
                "status {code}"
            );
            assert_eq!(v.detail.as_deref(), Some(code.to_string().as_str()));
        }
        assert_eq!(head(200, &[]), HeadDecision::ReadBody);
    }

    #[test]
    fn transient_statuses_never_flag_the_user() {
        for code in [408, 429, 500, 502, 503, 504, 401, 403] {
            let HeadDecision::Final(v) = head(code, &[]) else {
                panic!()
            };
            assert!(!v.status.requires_reauth(), "{code} must not flag");
        }
    }

    #[test]
    fn url_rules() {
        assert!(parse_avatar_url("https://thirdwx.qlogo.cn/mmopen/vi_32/abc/132").is_ok());
        assert!(parse_avatar_url("  http://example.com/a.png  ").is_ok());
        let code = |u: &str| parse_avatar_url(u).unwrap_err().code;
        assert_eq!(code("ftp://example.com/a.png"), "unsupported_scheme");
        assert_eq!(code("javascript:alert(1)"), "unsupported_scheme");
        assert_eq!(code("data:image/png;base64,AAAA"), "unsupported_scheme");
        assert_eq!(code("file:///etc/passwd"), "unsupported_scheme");
        assert_eq!(code("/relative/avatar.png"), "unparsable_url");
        assert_eq!(code("not a url"), "unparsable_url");
        assert_eq!(
            code("https://user:pw@example.com/a.png"),
            "url_has_credentials"
        );
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert_eq!(code(&long), "url_too_long");
        // IDN hosts are punycoded, percent-encoding is kept as sent.
        let idn = parse_avatar_url("https://例え.jp/a%2Fb.png").unwrap();
        assert_eq!(idn.host_str(), Some("xn--r8jz45g.jp"));
        assert_eq!(idn.path(), "/a%2Fb.png");
        assert_eq!(code("https://exa mple.com/a.png"), "unparsable_url");
        for bad in ["ftp://x/y", "/rel"] {
            assert_eq!(parse_avatar_url(bad).unwrap_err().status, Status::Invalid);
        }
    }

    #[test]
    fn remote_text_is_bounded_on_a_character_boundary_with_a_marker() {
        assert_eq!(bounded("short".into(), 10), "short");
        let long = "é".repeat(40_000); // 80,000 bytes of two-byte characters
        let cut = bounded(long, MAX_DETAIL_BYTES);
        assert!(cut.len() <= MAX_DETAIL_BYTES, "{}", cut.len());
        assert!(cut.ends_with("… [cut from 80000 bytes]"), "{cut}");
        let HeadDecision::Final(v) = head(200, &[("x-errno", &"9".repeat(70_000))]) else {
            panic!()
        };
        assert!(v.detail.unwrap().len() <= MAX_DETAIL_BYTES);
    }

    #[test]
    fn status_round_trips_through_text() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>().unwrap(), s);
        }
        assert!("dead".parse::<Status>().is_err());
        assert!(Status::Expired.requires_reauth() && Status::Invalid.requires_reauth());
        assert!(!Status::Failing.requires_reauth() && !Status::Blocked.requires_reauth());
    }
}
