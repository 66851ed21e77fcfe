//! NetEase Yunxin (云信): `POST {base}/user/updateUinfo.action`, form fields
//! `accid` and `icon`, signed with `CheckSum = sha1(AppSecret + Nonce + CurTime)`.
//! Success is `code == 200` in the JSON reply.

use async_trait::async_trait;
use sha1::{Digest, Sha1};

use super::{Event, EventKind, Sink, SinkError, http_client, status_error};
use crate::config::{ConfigError, OnExpired, YunxinSettings};

/// Yunxin refuses an `icon` longer than this.
pub(super) const MAX_ICON_BYTES: usize = 1024;

pub struct YunxinSink {
    name: String,
    url: String,
    app_key: String,
    app_secret: crate::secret::Secret,
    on_expired: OnExpired,
    http: reqwest::Client,
}

/// `sha1(AppSecret + Nonce + CurTime)`, lowercase hex.
pub fn checksum(app_secret: &str, nonce: &str, cur_time: &str) -> String {
    let mut h = Sha1::new();
    h.update(app_secret.as_bytes());
    h.update(nonce.as_bytes());
    h.update(cur_time.as_bytes());
    hex::encode(h.finalize())
}

impl YunxinSink {
    pub fn new(name: String, c: &YunxinSettings) -> Result<Self, ConfigError> {
        Ok(YunxinSink {
            name,
            url: format!(
                "{}/user/updateUinfo.action",
                c.base_url.expose().trim_end_matches('/')
            ),
            app_key: c.app_key.clone(),
            app_secret: c.app_secret.clone(),
            on_expired: c.on_expired,
            http: http_client(c.timeout_secs)?,
        })
    }

    fn icon(&self, event: &Event) -> Option<String> {
        super::im_avatar(self.on_expired, event.kind, event.mirror_url.as_deref())
    }
}

#[async_trait]
impl Sink for YunxinSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn wants(&self, kind: EventKind) -> bool {
        super::im_wants(self.on_expired, kind)
    }

    async fn deliver(&self, event: &Event) -> Result<(), SinkError> {
        let Some(icon) = self.icon(event) else {
            return Ok(());
        };
        if icon.len() > MAX_ICON_BYTES {
            return Err(SinkError::Permanent(format!(
                "icon URL is {} bytes, Yunxin takes at most {MAX_ICON_BYTES}",
                icon.len()
            )));
        }
        let nonce = format!("{:032x}", rand::random::<u128>());
        let cur_time = crate::model::unix_now().to_string();
        let sum = checksum(self.app_secret.expose(), &nonce, &cur_time);
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("accid", &event.user_id)
            .append_pair("icon", &icon)
            .finish();
        let resp = self
            .http
            .post(&self.url)
            .header("AppKey", &self.app_key)
            .header("Nonce", &nonce)
            .header("CurTime", &cur_time)
            .header("CheckSum", sum)
            .header(
                "Content-Type",
                "application/x-www-form-urlencoded;charset=utf-8",
            )
            .body(form)
            .send()
            .await
            .map_err(SinkError::transport)?;
        let status = resp.status();
        let text = crate::fetch::capped_text(resp, super::MAX_REPLY_BYTES).await;
        if !status.is_success() {
            return Err(status_error(status, &text));
        }
        let reply: serde_json::Value = serde_json::from_str(&text).map_err(|_| {
            SinkError::Retryable(format!(
                "not a Yunxin reply: {}",
                text.chars().take(200).collect::<String>()
            ))
        })?;
        let code = reply["code"].as_i64().unwrap_or(-1);
        let desc = reply["desc"].as_str().unwrap_or("");
        match code {
            200 => Ok(()),
            // 416: frequency control — back off, the delivery waits.
            416 => Err(SinkError::RateLimited(format!("code 416 {desc}"))),
            500..=599 => Err(SinkError::Retryable(format!("code {code} {desc}"))),
            // 414 bad parameter, 403 forbidden...: the same every time.
            _ => Err(SinkError::Permanent(format!("code {code} {desc}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_lowercase_hex_sha1_of_secret_nonce_time() {
        // sha1("abc") — the three parts are simply concatenated.
        assert_eq!(
            checksum("a", "b", "c"),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
    }
}
