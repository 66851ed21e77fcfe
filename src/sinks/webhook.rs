//! Webhooks: the event as JSON, signed with HMAC-SHA256 over the exact body.

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Event, EventKind, Sink, SinkError, http_client, status_error};
use crate::config::{ConfigError, WebhookSettings};

pub struct WebhookSink {
    name: String,
    url: String,
    secret: crate::secret::Secret,
    events: Vec<EventKind>,
    signature_header: String,
    http: reqwest::Client,
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`, as the signature header carries it.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl WebhookSink {
    pub fn new(name: String, c: &WebhookSettings) -> Result<Self, ConfigError> {
        let events = c
            .events
            .iter()
            .map(|e| {
                EventKind::ALL
                    .into_iter()
                    .find(|k| k.as_str() == e)
                    .ok_or_else(|| {
                        ConfigError::Invalid(format!(
                            "sink {name}: unknown event {e:?} (avatar.mirrored, avatar.expired, avatar.invalid, reauth.required, reauth.cleared)"
                        ))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        url::Url::parse(c.url.expose())
            .map_err(|e| ConfigError::Invalid(format!("sink {name}: url: {e}")))?;
        Ok(WebhookSink {
            name,
            url: c.url.expose().to_string(),
            secret: c.secret.clone(),
            events,
            signature_header: c.signature_header.clone(),
            http: http_client(c.timeout_secs)?,
        })
    }
}

#[async_trait]
impl Sink for WebhookSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn wants(&self, kind: EventKind) -> bool {
        self.events.is_empty() || self.events.contains(&kind)
    }

    async fn deliver(&self, event: &Event) -> Result<(), SinkError> {
        let body = serde_json::to_vec(event).expect("an event serializes");
        let resp = self
            .http
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("X-Avatar-Warden-Event", event.kind.as_str())
            // The receiver's dedup key: retries of one event carry the same one.
            .header("Idempotency-Key", &event.id)
            .header(
                self.signature_header.as_str(),
                signature(self.secret.expose().as_bytes(), &body),
            )
            .body(body)
            .send()
            .await
            .map_err(SinkError::transport)?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = crate::fetch::capped_text(resp, super::MAX_REPLY_BYTES).await;
        Err(status_error(status, &text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_rfc4231_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
