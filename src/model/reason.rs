//! The verdict's vocabulary: `Status` (what was concluded) and `Reason`
//! (why: a stable snake_case code that knows its status, whether asking
//! again may help, and whether it is an expiry signal).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// What avatar-warden concluded about one avatar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Pending,
    Mirrored,
    Expired,
    Invalid,
    Failing,
    Blocked,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Pending,
        Status::Mirrored,
        Status::Expired,
        Status::Invalid,
        Status::Failing,
        Status::Blocked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Mirrored => "mirrored",
            Status::Expired => "expired",
            Status::Invalid => "invalid",
            Status::Failing => "failing",
            Status::Blocked => "blocked",
        }
    }

    /// The user must log in again: the provider will never serve this picture.
    pub fn requires_reauth(self) -> bool {
        matches!(self, Status::Expired | Status::Invalid)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status or reason code this version does not know (a newer worker
/// wrote it, or someone edited the state table).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {code:?}")]
pub struct UnknownCode {
    pub kind: &'static str,
    pub code: String,
}

impl FromStr for Status {
    type Err = UnknownCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownCode {
                kind: "status",
                code: s.to_owned(),
            })
    }
}

/// Why an avatar got its verdict: a stable snake_case code (the contract of
/// `export`, the metrics' `reason` label and the alerts) that knows its
/// status, whether asking again may help, and whether it is an expiry signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// claimed, not checked yet
    NotCheckedYet,
    /// first mirror of this URL
    ValidImage,
    /// re-verified: the same picture
    Unchanged,
    /// a new picture behind the same URL
    SourceChanged,
    /// X-ErrNo / X-Info: notexist
    ProviderNotexist,
    /// HTTP 404
    NotFound,
    /// HTTP 410
    Gone,
    /// the URL's signature has run out
    SignatureExpired,
    /// 403 on a signed URL
    SignatureRejected,
    /// 404/410 where the provider means a changed picture
    AvatarChanged,
    /// a known placeholder body
    PlaceholderImage,
    /// a host the provider retired
    DeprecatedHost,
    /// url_too_long
    UrlTooLong,
    /// unparsable_url
    UnparsableUrl,
    /// unsupported_scheme
    UnsupportedScheme,
    /// url_has_credentials
    UrlHasCredentials,
    /// the provider's default picture
    DefaultAvatar,
    /// unexpected_redirect
    UnexpectedRedirect,
    /// another 4xx
    HttpStatus,
    /// too_many_redirects
    TooManyRedirects,
    /// bad_redirect
    BadRedirect,
    /// too_large
    TooLarge,
    /// empty_body
    EmptyBody,
    /// not_an_image
    NotAnImage,
    /// truncated
    Truncated,
    /// malformed
    Malformed,
    /// dimensions_too_large
    DimensionsTooLarge,
    /// undecodable
    Undecodable,
    /// svg_not_allowed
    SvgNotAllowed,
    /// too_many_frames
    TooManyFrames,
    /// timeout
    Timeout,
    /// connect_error
    ConnectError,
    /// dns_error
    DnsError,
    /// body_error
    BodyError,
    /// request_error
    RequestError,
    /// HTTP 408
    RequestTimeout,
    /// HTTP 429
    RateLimited,
    /// 401/403: usually a WAF aimed at us
    AccessDenied,
    /// 5xx
    ServerError,
    /// storage_error
    StorageError,
    /// fewer expiry signals than expiry.confirmations
    ExpiryUnconfirmed,
    /// retry.max_attempts failing scans in a row
    GaveUp,
    /// the decoder's own resource limit
    DecodeLimit,
    /// the database refused the row
    RecordError,
    /// internal: 405/501 to a HEAD, never recorded
    HeadRejected,
    /// internal: a HEAD that cannot tell, never recorded
    HeadInconclusive,
    /// non_public_address
    NonPublicAddress,
    /// not_allowed
    NotAllowed,
}

impl Reason {
    pub const ALL: [Reason; 48] = [
        Reason::NotCheckedYet,
        Reason::ValidImage,
        Reason::Unchanged,
        Reason::SourceChanged,
        Reason::ProviderNotexist,
        Reason::NotFound,
        Reason::Gone,
        Reason::SignatureExpired,
        Reason::SignatureRejected,
        Reason::AvatarChanged,
        Reason::PlaceholderImage,
        Reason::DeprecatedHost,
        Reason::UrlTooLong,
        Reason::UnparsableUrl,
        Reason::UnsupportedScheme,
        Reason::UrlHasCredentials,
        Reason::DefaultAvatar,
        Reason::UnexpectedRedirect,
        Reason::HttpStatus,
        Reason::TooManyRedirects,
        Reason::BadRedirect,
        Reason::TooLarge,
        Reason::EmptyBody,
        Reason::NotAnImage,
        Reason::Truncated,
        Reason::Malformed,
        Reason::DimensionsTooLarge,
        Reason::Undecodable,
        Reason::SvgNotAllowed,
        Reason::TooManyFrames,
        Reason::Timeout,
        Reason::ConnectError,
        Reason::DnsError,
        Reason::BodyError,
        Reason::RequestError,
        Reason::RequestTimeout,
        Reason::RateLimited,
        Reason::AccessDenied,
        Reason::ServerError,
        Reason::StorageError,
        Reason::ExpiryUnconfirmed,
        Reason::GaveUp,
        Reason::DecodeLimit,
        Reason::RecordError,
        Reason::HeadRejected,
        Reason::HeadInconclusive,
        Reason::NonPublicAddress,
        Reason::NotAllowed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotCheckedYet => "not_checked_yet",
            Reason::ValidImage => "valid_image",
            Reason::Unchanged => "unchanged",
            Reason::SourceChanged => "source_changed",
            Reason::ProviderNotexist => "provider_notexist",
            Reason::NotFound => "not_found",
            Reason::Gone => "gone",
            Reason::SignatureExpired => "signature_expired",
            Reason::SignatureRejected => "signature_rejected",
            Reason::AvatarChanged => "avatar_changed",
            Reason::PlaceholderImage => "placeholder_image",
            Reason::DeprecatedHost => "deprecated_host",
            Reason::UrlTooLong => "url_too_long",
            Reason::UnparsableUrl => "unparsable_url",
            Reason::UnsupportedScheme => "unsupported_scheme",
            Reason::UrlHasCredentials => "url_has_credentials",
            Reason::DefaultAvatar => "default_avatar",
            Reason::UnexpectedRedirect => "unexpected_redirect",
            Reason::HttpStatus => "http_status",
            Reason::TooManyRedirects => "too_many_redirects",
            Reason::BadRedirect => "bad_redirect",
            Reason::TooLarge => "too_large",
            Reason::EmptyBody => "empty_body",
            Reason::NotAnImage => "not_an_image",
            Reason::Truncated => "truncated",
            Reason::Malformed => "malformed",
            Reason::DimensionsTooLarge => "dimensions_too_large",
            Reason::Undecodable => "undecodable",
            Reason::SvgNotAllowed => "svg_not_allowed",
            Reason::TooManyFrames => "too_many_frames",
            Reason::Timeout => "timeout",
            Reason::ConnectError => "connect_error",
            Reason::DnsError => "dns_error",
            Reason::BodyError => "body_error",
            Reason::RequestError => "request_error",
            Reason::RequestTimeout => "request_timeout",
            Reason::RateLimited => "rate_limited",
            Reason::AccessDenied => "access_denied",
            Reason::ServerError => "server_error",
            Reason::StorageError => "storage_error",
            Reason::ExpiryUnconfirmed => "expiry_unconfirmed",
            Reason::GaveUp => "gave_up",
            Reason::DecodeLimit => "decode_limit",
            Reason::RecordError => "record_error",
            Reason::HeadRejected => "head_rejected",
            Reason::HeadInconclusive => "head_inconclusive",
            Reason::NonPublicAddress => "non_public_address",
            Reason::NotAllowed => "not_allowed",
        }
    }

    /// Whether a check can end with this reason: not the placeholder of an
    /// avatar never checked, nor the HEAD-only codes (a GET follows them).
    pub fn is_outcome(self) -> bool {
        !matches!(
            self,
            Reason::NotCheckedYet | Reason::HeadRejected | Reason::HeadInconclusive
        )
    }

    /// The status every verdict with this reason has.
    pub fn status(self) -> Status {
        match self {
            Reason::NotCheckedYet => Status::Pending,
            Reason::ValidImage | Reason::Unchanged | Reason::SourceChanged => Status::Mirrored,
            Reason::ProviderNotexist
            | Reason::NotFound
            | Reason::Gone
            | Reason::SignatureExpired
            | Reason::SignatureRejected
            | Reason::AvatarChanged
            | Reason::PlaceholderImage
            | Reason::DeprecatedHost => Status::Expired,
            Reason::UrlTooLong
            | Reason::UnparsableUrl
            | Reason::UnsupportedScheme
            | Reason::UrlHasCredentials
            | Reason::DefaultAvatar
            | Reason::UnexpectedRedirect
            | Reason::HttpStatus
            | Reason::TooManyRedirects
            | Reason::BadRedirect
            | Reason::TooLarge
            | Reason::EmptyBody
            | Reason::NotAnImage
            | Reason::Truncated
            | Reason::Malformed
            | Reason::DimensionsTooLarge
            | Reason::Undecodable
            | Reason::SvgNotAllowed
            | Reason::TooManyFrames => Status::Invalid,
            Reason::Timeout
            | Reason::ConnectError
            | Reason::DnsError
            | Reason::BodyError
            | Reason::RequestError
            | Reason::RequestTimeout
            | Reason::RateLimited
            | Reason::AccessDenied
            | Reason::ServerError
            | Reason::StorageError
            | Reason::ExpiryUnconfirmed
            | Reason::GaveUp
            | Reason::DecodeLimit
            | Reason::RecordError
            | Reason::HeadRejected
            | Reason::HeadInconclusive => Status::Failing,
            Reason::NonPublicAddress | Reason::NotAllowed => Status::Blocked,
        }
    }

    /// The provider says the picture is gone (counted towards `expiry.confirmations`).
    pub fn is_expiry_signal(self) -> bool {
        self.status() == Status::Expired && self != Reason::DeprecatedHost
    }

    /// Trouble that may pass by itself: never a reason to flag a user.
    pub fn is_transient(self) -> bool {
        self.status() == Status::Failing
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Reason {
    type Err = UnknownCode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownCode {
                kind: "reason",
                code: s.to_owned(),
            })
    }
}

/// Tests and callers compare with the code as text.
impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for Reason {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}
