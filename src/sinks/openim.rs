//! OpenIM: `POST {api}/user/update_user_info_ex` with an admin token from
//! `POST {api}/auth/get_admin_token`. Success is `errCode == 0` in the body,
//! whatever the HTTP status says.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{Event, EventKind, Sink, SinkError, http_client, status_error};
use crate::config::{ConfigError, OnExpired, OpenImSettings};

/// OpenIM's token errors (TokenExpiredError … TokenNotExistError): get a new
/// admin token and try once more.
const TOKEN_ERRORS: std::ops::RangeInclusive<i64> = 1501..=1507;
/// ServerInternalError: may pass.
const SERVER_ERROR: i64 = 500;

pub struct OpenImSink {
    name: String,
    api: String,
    secret: crate::secret::Secret,
    admin_user_id: String,
    on_expired: OnExpired,
    http: reqwest::Client,
    token: Mutex<Option<Token>>,
}

struct Token {
    value: String,
    /// Refresh from here on: before it expires, not after.
    refresh_at: Instant,
}

/// When to refresh a token valid for `lifetime`: at 80 % of it, and at least
/// a minute early (OpenIM's default lifetime is 90 days).
pub(super) fn refresh_after(lifetime: Duration) -> Duration {
    let early = (lifetime / 5).max(Duration::from_secs(60).min(lifetime / 2));
    lifetime.saturating_sub(early)
}

impl OpenImSink {
    pub fn new(name: String, c: &OpenImSettings) -> Result<Self, ConfigError> {
        Ok(OpenImSink {
            name,
            api: c.api.expose().trim_end_matches('/').to_string(),
            secret: c.secret.clone(),
            admin_user_id: c.admin_user_id.clone(),
            on_expired: c.on_expired,
            http: http_client(c.timeout_secs)?,
            token: Mutex::new(None),
        })
    }

    /// A fresh `operationID` per request (OpenIM traces requests by it);
    /// the event id in it ties the request to the outbox row.
    fn operation_id(event: Option<&Event>) -> String {
        let id = event.map_or("token", |e| &e.id[..12.min(e.id.len())]);
        format!("aw-{id}-{:08x}", rand::random::<u32>())
    }

    async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        event: Option<&Event>,
        body: &Value,
    ) -> Result<Value, SinkError> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.api))
            .header("operationID", Self::operation_id(event))
            .header("Content-Type", "application/json")
            .body(body.to_string());
        if let Some(token) = token {
            req = req.header("token", token);
        }
        let resp = req.send().await.map_err(SinkError::transport)?;
        let status = resp.status();
        let text = crate::fetch::capped_text(resp, super::MAX_REPLY_BYTES).await;
        if !status.is_success() {
            return Err(status_error(status, &text));
        }
        serde_json::from_str(&text).map_err(|_| {
            SinkError::Retryable(format!(
                "not an OpenIM reply: {}",
                text.chars().take(200).collect::<String>()
            ))
        })
    }

    async fn token(&self, force: bool) -> Result<String, SinkError> {
        let mut cached = self.token.lock().await;
        if !force && let Some(t) = cached.as_ref().filter(|t| Instant::now() < t.refresh_at) {
            return Ok(t.value.clone());
        }
        let reply = self
            .post(
                "/auth/get_admin_token",
                None,
                None,
                &json!({"secret": self.secret.expose(), "userID": self.admin_user_id}),
            )
            .await?;
        let code = err_code(&reply);
        if code != 0 {
            // A wrong secret or admin id will not fix itself, but the
            // deliveries are not lost: they wait in the outbox, retried.
            return Err(SinkError::Retryable(format!(
                "get_admin_token: errCode {code} {}",
                err_msg(&reply)
            )));
        }
        let value = reply["data"]["token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| SinkError::Retryable("get_admin_token: no data.token".into()))?
            .to_string();
        // Documented as a number; some versions send a string.
        let lifetime = match &reply["data"]["expireTimeSeconds"] {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .unwrap_or(3600);
        *cached = Some(Token {
            value: value.clone(),
            refresh_at: Instant::now() + refresh_after(Duration::from_secs(lifetime)),
        });
        Ok(value)
    }

    /// The faceURL this event sets, or `None` when the policy says leave it.
    fn face_url(&self, event: &Event) -> Option<String> {
        super::im_avatar(self.on_expired, event.kind, event.mirror_url.as_deref())
    }
}

fn err_code(reply: &Value) -> i64 {
    reply["errCode"].as_i64().unwrap_or(-1)
}

fn err_msg(reply: &Value) -> String {
    format!(
        "{} {}",
        reply["errMsg"].as_str().unwrap_or(""),
        reply["errDlt"].as_str().unwrap_or("")
    )
    .trim()
    .to_string()
}

#[async_trait]
impl Sink for OpenImSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn wants(&self, kind: EventKind) -> bool {
        super::im_wants(self.on_expired, kind)
    }

    async fn deliver(&self, event: &Event) -> Result<(), SinkError> {
        let Some(face_url) = self.face_url(event) else {
            return Ok(());
        };
        let body = json!({"userInfo": {"userID": event.user_id, "faceURL": face_url}});
        let mut force = false;
        for _ in 0..2 {
            let token = self.token(force).await?;
            let reply = self
                .post(
                    "/user/update_user_info_ex",
                    Some(&token),
                    Some(event),
                    &body,
                )
                .await?;
            match err_code(&reply) {
                0 => return Ok(()),
                code if TOKEN_ERRORS.contains(&code) => force = true,
                SERVER_ERROR => {
                    return Err(SinkError::Retryable(format!(
                        "errCode 500 {}",
                        err_msg(&reply)
                    )));
                }
                code => {
                    // RecordNotFoundError (user unknown to OpenIM), ArgsError...: the same every time.
                    return Err(SinkError::Permanent(format!(
                        "errCode {code} {}",
                        err_msg(&reply)
                    )));
                }
            }
        }
        Err(SinkError::Retryable("admin token rejected twice".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_refreshed_before_they_expire() {
        let day90 = Duration::from_secs(7_776_000);
        assert_eq!(refresh_after(day90), day90 * 4 / 5);
        let short = Duration::from_secs(100);
        assert!(refresh_after(short) < short);
        assert!(refresh_after(Duration::from_secs(2)) < Duration::from_secs(2));
    }
}
