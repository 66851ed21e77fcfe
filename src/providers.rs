//! Provider knowledge as data: `config/providers.toml` is compiled in, and
//! `providers.file` adds rules of the operator's own, matched first. Pure:
//! every rule is unit-tested without a network.

use std::path::Path;

use serde::Deserialize;
use url::Url;

use crate::config::ConfigError;

pub const BUILTIN_TOML: &str = include_str!("../config/providers.toml");

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpiryFormat {
    #[default]
    Unix,
    Hex,
}

/// How an already mirrored avatar is re-verified (#9).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reverify {
    /// `GET` with `If-None-Match` / `If-Modified-Since`, expecting `304`.
    #[default]
    Conditional,
    /// `HEAD`, compared with the stored validators; for hosts whose `HEAD`
    /// carries the same signals as `GET` (WeChat's `X-ErrNo`).
    Head,
    /// A full `GET` every time, compared by sha256 (hosts whose validators lie).
    Get,
}

impl Reverify {
    pub fn as_str(self) -> &'static str {
        match self {
            Reverify::Conditional => "conditional",
            Reverify::Head => "head",
            Reverify::Get => "get",
        }
    }
}

/// What avatar-warden knows about one avatar host. See `config/providers.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderRule {
    pub name: String,
    pub hosts: Vec<String>,
    #[serde(default)]
    pub size_segment: bool,
    #[serde(default)]
    pub default_avatar_paths: Vec<String>,
    #[serde(default)]
    pub placeholder_sha256: Vec<String>,
    #[serde(default)]
    pub deprecated: bool,
    #[serde(default)]
    pub expiry_param: Option<String>,
    #[serde(default)]
    pub expiry_format: ExpiryFormat,
    /// 404/410 mean the user changed their picture (reason `avatar_changed`).
    #[serde(default)]
    pub not_found_means_changed: bool,
    /// How a mirrored avatar is re-verified.
    #[serde(default)]
    pub reverify: Reverify,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    provider: Vec<ProviderRule>,
}

/// The rule set, in match order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Providers {
    rules: Vec<ProviderRule>,
}

impl Default for Providers {
    fn default() -> Self {
        Self::builtin()
    }
}

impl Providers {
    pub fn builtin() -> Self {
        let file: RuleFile =
            toml::from_str(BUILTIN_TOML).expect("config/providers.toml is valid (tested)");
        Providers {
            rules: file.provider,
        }
    }

    /// The built-in rules, preceded by those of `extra` when given.
    pub fn load(extra: Option<&Path>) -> Result<Self, ConfigError> {
        let mut providers = Self::builtin();
        if let Some(path) = extra {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let file: RuleFile =
                toml::from_str(&text).map_err(|e| ConfigError::parse(path, &text, &e))?;
            let mut rules = file.provider;
            rules.append(&mut providers.rules);
            providers.rules = rules;
        }
        Ok(providers)
    }

    /// The first rule whose host patterns match the URL's host.
    pub fn find(&self, url: &Url) -> Option<&ProviderRule> {
        let host = url.host_str()?.trim_end_matches('.').to_ascii_lowercase();
        self.rules.iter().find(|r| {
            r.hosts
                .iter()
                .any(|p| host_matches(&p.to_ascii_lowercase(), &host))
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }
}

/// Glob match where `*` stands for any run of characters (dots included).
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == host;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !host.starts_with(first)
        || !host[first.len()..].ends_with(last)
        || host.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &host[first.len()..host.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

impl ProviderRule {
    /// When the URL's signature stops being valid (unix seconds), if the rule knows where to look.
    pub fn signature_expiry(&self, url: &Url) -> Option<i64> {
        let param = self.expiry_param.as_deref()?;
        let (_, value) = url
            .query_pairs()
            .find(|(k, _)| k.eq_ignore_ascii_case(param))?;
        match self.expiry_format {
            ExpiryFormat::Unix => value.trim().parse().ok(),
            ExpiryFormat::Hex => i64::from_str_radix(value.trim(), 16).ok(),
        }
    }

    pub fn is_default_avatar(&self, url: &Url) -> bool {
        self.default_avatar_paths.iter().any(|p| url.path() == p)
    }

    pub fn is_placeholder(&self, sha256: &str) -> bool {
        self.placeholder_sha256
            .iter()
            .any(|p| p.eq_ignore_ascii_case(sha256))
    }

    /// The largest size of a size-segment URL (`.../132` → `.../0`), when it differs.
    pub fn largest_size_url(&self, url: &Url) -> Option<Url> {
        if !self.size_segment {
            return None;
        }
        let last = url.path_segments()?.next_back()?;
        if last == "0" || last.is_empty() || !last.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut largest = url.clone();
        largest.path_segments_mut().ok()?.pop().push("0");
        Some(largest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    fn rule_for(s: &str) -> Option<String> {
        Providers::builtin().find(&url(s)).map(|r| r.name.clone())
    }

    #[test]
    fn hosts_map_to_their_provider() {
        let cases = [
            (
                "https://thirdwx.qlogo.cn/mmopen/vi_32/abc/132",
                Some("wechat"),
            ),
            ("https://wx.qlogo.cn/mmhead/abc/0", Some("wechat")),
            ("https://mmbiz.qpic.cn/mmbiz_png/abc/0", Some("wechat")),
            ("https://thirdqq.qlogo.cn/g?b=oidb&k=abc&s=100", Some("qq")),
            (
                "https://q1.qlogo.cn/g?b=qq&nk=10000&s=100",
                Some("qq_legacy"),
            ),
            (
                "https://q.qlogo.cn/headimg_dl?dst_uin=10000&spec=100",
                Some("qq_legacy"),
            ),
            (
                "https://p3-sign.douyinpic.com/aweme/100x100/abc.jpeg?x-expires=1700000000",
                Some("douyin"),
            ),
            ("https://p26-sign-va.douyinpic.com/x.jpeg", Some("douyin")),
            ("https://p16-sign-sg.tiktokcdn.com/x.jpeg", Some("douyin")),
            ("https://p16.tiktokcdn-us.com/x.jpeg", Some("douyin")),
            (
                "https://scontent.xx.fbcdn.net/v/t1.jpg?oe=65A1B2C3",
                Some("facebook"),
            ),
            (
                "https://platform-lookaside.fbsbx.com/platform/profilepic/?ext=1700000000",
                Some("facebook_platform"),
            ),
            (
                "https://tvax1.sinaimg.cn/crop.0.0.512.512.180/abc.jpg?Expires=1700000000",
                Some("weibo"),
            ),
            (
                "https://cdn.discordapp.com/avatars/1/abc.png",
                Some("discord"),
            ),
            ("https://p3.douyinpic.com/unsigned.jpeg", None),
            ("https://example.com/a.png", None),
            ("https://qlogo.cn.evil.example/a.png", None),
        ];
        for (u, want) in cases {
            assert_eq!(rule_for(u).as_deref(), want, "{u}");
        }
    }

    #[test]
    fn host_globs() {
        assert!(host_matches("*.qpic.cn", "a.b.qpic.cn"));
        assert!(!host_matches("*.qpic.cn", "qpic.cn"));
        assert!(host_matches(
            "*-sign*.douyinpic.com",
            "p3-sign.douyinpic.com"
        ));
        assert!(!host_matches("*-sign*.douyinpic.com", "p3.douyinpic.com"));
        assert!(host_matches("exact.host", "exact.host"));
        assert!(!host_matches("exact.host", "exact.host.evil"));
    }

    #[test]
    fn signature_expiry_is_read_from_the_url_in_each_format() {
        let p = Providers::builtin();
        let exp = |u: &str| p.find(&url(u)).and_then(|r| r.signature_expiry(&url(u)));
        assert_eq!(
            exp("https://p3-sign.douyinpic.com/a.jpeg?x-expires=1700000000&x-signature=abc"),
            Some(1_700_000_000)
        );
        assert_eq!(
            exp("https://scontent.xx.fbcdn.net/v/a.jpg?oh=1&oe=65A1B2C3"),
            Some(0x65A1_B2C3)
        );
        assert_eq!(
            exp("https://platform-lookaside.fbsbx.com/p/?asid=1&ext=1700000001"),
            Some(1_700_000_001)
        );
        assert_eq!(
            exp("https://tvax1.sinaimg.cn/a.jpg?KID=imgbed&Expires=1700000002"),
            Some(1_700_000_002)
        );
        assert_eq!(exp("https://p3-sign.douyinpic.com/a.jpeg"), None);
        assert_eq!(
            exp("https://thirdwx.qlogo.cn/mmopen/a/132?x-expires=1"),
            None,
            "wechat URLs carry no expiry"
        );
    }

    #[test]
    fn wechat_size_segment_points_at_the_largest_picture() {
        let p = Providers::builtin();
        let u = url("https://thirdwx.qlogo.cn/mmopen/vi_32/abc/132");
        let wechat = p.find(&u).unwrap();
        assert_eq!(
            wechat.largest_size_url(&u).unwrap().as_str(),
            "https://thirdwx.qlogo.cn/mmopen/vi_32/abc/0"
        );
        assert_eq!(
            wechat.largest_size_url(&url("https://thirdwx.qlogo.cn/mmopen/vi_32/abc/0")),
            None
        );
        assert_eq!(
            wechat.largest_size_url(&url("https://thirdwx.qlogo.cn/mmopen/vi_32/abc/x.png")),
            None
        );
    }

    #[test]
    fn the_wechat_default_avatar_is_recognised() {
        let p = Providers::builtin();
        let default = url(
            "https://thirdwx.qlogo.cn/mmopen/vi_32/POgEwh4mIHO4nibH0KlMECNjjGxQUq24ZEaGT4poC6icRiccVGKSyXwibcPq4BWmiaIGuG1icwxaQX6grC9VemZoJ8rg/132",
        );
        assert!(p.find(&default).unwrap().is_default_avatar(&default));
        let own = url("https://thirdwx.qlogo.cn/mmopen/vi_32/someoneelse/132");
        assert!(!p.find(&own).unwrap().is_default_avatar(&own));
    }

    #[test]
    fn tencent_hosts_are_reverified_with_head_others_conditionally() {
        let p = Providers::builtin();
        let how = |u: &str| p.find(&url(u)).map(|r| r.reverify);
        assert_eq!(
            how("https://thirdwx.qlogo.cn/mmopen/a/132"),
            Some(Reverify::Head)
        );
        assert_eq!(
            how("https://thirdqq.qlogo.cn/g?b=oidb&k=a"),
            Some(Reverify::Head)
        );
        assert_eq!(
            how("https://cdn.discordapp.com/avatars/1/a.png"),
            Some(Reverify::Conditional)
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        std::fs::write(
            &path,
            "[[provider]]\nname = \"x\"\nhosts = [\"a.example\"]\nreverify = \"sometimes\"\n",
        )
        .unwrap();
        let err = Providers::load(Some(&path)).unwrap_err().to_string();
        assert!(
            err.contains("sometimes") || err.contains("variant"),
            "{err}"
        );
    }

    #[test]
    fn operator_rules_come_first_and_typos_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        std::fs::write(
            &path,
            "[[provider]]\nname = \"corp-cdn\"\nhosts = [\"*.qlogo.cn\"]\nplaceholder_sha256 = [\"AB\"]\n",
        )
        .unwrap();
        let p = Providers::load(Some(&path)).unwrap();
        let rule = p.find(&url("https://thirdwx.qlogo.cn/x/132")).unwrap();
        assert_eq!(rule.name, "corp-cdn");
        assert!(rule.is_placeholder("ab"));
        std::fs::write(&path, "[[provider]]\nname = \"x\"\nhost = [\"a\"]\n").unwrap();
        let err = Providers::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("host"), "{err}");
    }
}
