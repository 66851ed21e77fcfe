//! Re-verification of a mirrored picture: `HEAD` or a conditional `GET`
//! per the provider rule, a download only when the picture may have changed.

use reqwest::header::{
    CONTENT_LENGTH, ETAG, HeaderMap, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH, LAST_MODIFIED,
};
use url::Url;

use super::*;

impl Checker {
    /// As `examine`; with `known` (the URL's mirrored picture) it re-verifies:
    /// headers only where the source allows it, a download only when the
    /// picture may have changed.
    pub(crate) async fn reexamine(
        &self,
        raw_url: &str,
        now: i64,
        hosts: &HostLimiter,
        known: Option<&Known>,
    ) -> Examination {
        let url = match classify::parse_avatar_url(raw_url) {
            Ok(u) => u,
            Err(v) => return Examination::decided(v, "URL rules"),
        };
        let mut deadline = None;
        let Some(rule) = self.providers.find(&url) else {
            return match known {
                Some(k) => self.reverify(&url, None, k, hosts, &mut deadline).await,
                None => {
                    self.fetch_with_retries(&url, None, hosts, Ask::Get, &mut deadline)
                        .await
                }
            };
        };
        let by = |what: &str| format!("provider {}: {what}", rule.name);
        let with_provider = |mut e: Examination| {
            e.provider = Some(rule.name.clone());
            e
        };
        if rule.is_default_avatar(&url) {
            let v = Verdict::new(Reason::DefaultAvatar);
            return with_provider(Examination::decided(v, by("default_avatar_paths")));
        }
        let expires_at = rule.signature_expiry(&url);
        if let Some(t) = expires_at
            && t <= now
        {
            let param = rule.expiry_param.as_deref().unwrap_or_default();
            let v = Verdict::new(Reason::SignatureExpired)
                .with_detail(format!("{param} passed at {}", format_time(t)));
            let mut e = with_provider(Examination::decided(
                v,
                by(&format!("expiry_param {param}")),
            ));
            e.expires_at = expires_at;
            return e;
        }
        let deprecated = |mut e: Examination| {
            if rule.deprecated && e.verdict.status == Status::Mirrored {
                // Keep the picture while the host still serves it, and ask the user to log in again.
                e.verdict = Verdict::new(Reason::DeprecatedHost)
                    .with_detail(url.host_str().unwrap_or_default());
                e.decided_by = by("deprecated");
            }
            e
        };
        // The largest size first: it may fail while the stored size works, and
        // the verdict is about the stored URL. A mirrored picture came from
        // the largest size too, so that is what is re-verified.
        let largest = rule.largest_size_url(&url);
        let mut earlier = None;
        if let Some(target) = largest.as_ref().or(known.map(|_| &url)) {
            let e = match known {
                Some(k) => {
                    self.reverify(target, Some(rule), k, hosts, &mut deadline)
                        .await
                }
                None => {
                    self.fetch_with_retries(target, Some(rule), hosts, Ask::Get, &mut deadline)
                        .await
                }
            };
            if e.verdict.status == Status::Mirrored || largest.is_none() {
                let mut e = with_provider(e);
                if largest.is_some() {
                    e.decided_by = by(&format!("size_segment (largest size /0), {}", e.decided_by));
                }
                e.expires_at = expires_at;
                return deprecated(e);
            }
            earlier = Some(e);
        }
        let mut e = with_provider(
            self.fetch_with_retries(&url, Some(rule), hosts, Ask::Get, &mut deadline)
                .await,
        );
        if let Some(earlier) = &earlier {
            e = e.absorb(earlier);
        }
        e.expires_at = expires_at;
        deprecated(e)
    }

    /// Re-verifies a mirrored picture: `HEAD` or a conditional `GET` per the
    /// provider rule, falling back to a full `GET` (remembered per host for
    /// the scan) when the host rejects `HEAD` or ignores validators.
    async fn reverify(
        &self,
        url: &Url,
        rule: Option<&ProviderRule>,
        known: &Known,
        hosts: &HostLimiter,
        deadline: &mut Option<Instant>,
    ) -> Examination {
        let host = url.host_str().unwrap_or_default();
        let v = &known.validators;
        let comparable = v.etag.is_some() || v.last_modified.is_some();
        let mut mode = rule.map_or(Reverify::Conditional, |r| r.reverify);
        if mode == Reverify::Head && (hosts.rejects_head(host) || !comparable) {
            mode = Reverify::Conditional;
        }
        if mode == Reverify::Conditional && (hosts.ignores_validators(host) || !comparable) {
            mode = Reverify::Get;
        }
        let mut earlier: Option<Examination> = None;
        if mode == Reverify::Head {
            let mut e = self
                .fetch_with_retries(url, rule, hosts, Ask::Head(v), deadline)
                .await;
            match e.probe {
                Some(Probe::Unchanged) => {
                    e.reverified = Some(Reverified { method: "head" });
                    return e;
                }
                Some(Probe::HeadRejected) => {
                    hosts.mark_rejects_head(host);
                    mode = Reverify::Conditional;
                }
                // It changed, or the headers cannot tell: a validator would
                // only earn a 304 the HEAD already ruled out.
                Some(Probe::Download) => mode = Reverify::Get,
                None => return e,
            }
            earlier = Some(e);
        }
        let (ask, method) = match mode {
            Reverify::Conditional => (Ask::Conditional(v), "conditional"),
            _ => (Ask::Get, "get"),
        };
        let mut e = self
            .fetch_with_retries(url, rule, hosts, ask, deadline)
            .await;
        if let Some(earlier) = &earlier {
            e = e.absorb(earlier);
        }
        if e.probe == Some(Probe::Unchanged) {
            e.reverified = Some(Reverified { method });
            return e;
        }
        let Some((_, body)) = &e.image else {
            return e;
        };
        if body.sha256.eq_ignore_ascii_case(&known.sha256) {
            if matches!(ask, Ask::Conditional(_)) {
                // A 200 with the very same picture: this host does not honour
                // validators, so stop sending them for the rest of the scan.
                hosts.mark_ignores_validators(host);
            }
            e.verdict =
                Verdict::new(Reason::Unchanged).with_detail(format!("{method}: same sha256"));
            // The same object is already stored.
            e.image = None;
        } else {
            e.verdict = Verdict::new(Reason::SourceChanged)
                .with_detail(format!("sha256 was {}", known.sha256));
        }
        e.reverified = Some(Reverified { method });
        e
    }
}

/// `If-None-Match` / `If-Modified-Since` from what the source said last time.
pub(super) fn conditional_headers(v: &Validators) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        (IF_NONE_MATCH, &v.etag),
        (IF_MODIFIED_SINCE, &v.last_modified),
    ] {
        if let Some(value) = value.as_deref().and_then(|t| HeaderValue::from_str(t).ok()) {
            h.insert(name, value);
        }
    }
    h
}

/// The validators of a response; a value too long to store is left out
/// (never an error: one odd header must not fail the batch's write).
pub(super) fn validators_of(h: &HeaderMap) -> Validators {
    let text = |name, max: usize| {
        h.get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= max)
            .map(str::to_owned)
    };
    Validators {
        etag: text(ETAG, Validators::MAX_ETAG),
        last_modified: text(LAST_MODIFIED, Validators::MAX_LAST_MODIFIED),
        length: h
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok()),
    }
}

/// What a headers-only answer says, over what was known.
pub(super) fn merge(known: &Validators, got: &Validators) -> Validators {
    Validators {
        etag: got.etag.clone().or_else(|| known.etag.clone()),
        last_modified: got
            .last_modified
            .clone()
            .or_else(|| known.last_modified.clone()),
        length: got.length.or(known.length),
    }
}

/// Whether a HEAD's validators show the stored picture: `Some(false)` when
/// anything differs, `None` when they say too little to tell. Weak and strong
/// ETags compare by their opaque part (RFC 9110 weak comparison).
pub(super) fn same_picture(known: &Validators, got: &Validators) -> Option<bool> {
    if let (Some(a), Some(b)) = (known.length, got.length)
        && a != b
    {
        return Some(false);
    }
    match (&known.etag, &got.etag) {
        (Some(a), Some(b)) => {
            return Some(a.trim_start_matches("W/") == b.trim_start_matches("W/"));
        }
        (Some(_), None) => return None,
        _ => {}
    }
    match (&known.last_modified, &got.last_modified) {
        (Some(a), Some(b)) => Some(a == b),
        _ => None,
    }
}
