//! Asking again within the scan: which failures are worth another request,
//! how long to wait (`Retry-After`, backoff) and the avatar's time budget.

use reqwest::header::RETRY_AFTER;

use super::*;

impl Checker {
    /// One request and its retries. `deadline` is the avatar's budget
    /// (`retry.budget_secs`), set by its first request and shared by every
    /// request made for it (sizes, HEAD then GET).
    pub(super) async fn fetch_with_retries(
        &self,
        url: &Url,
        rule: Option<&ProviderRule>,
        hosts: &HostLimiter,
        ask: Ask<'_>,
        deadline: &mut Option<Instant>,
    ) -> Examination {
        let host = url.host_str().unwrap_or_default().to_string();
        let mut requests = 0;
        let mut attempt = 0;
        let mut timed_out = false;
        let (mut fetch_time, mut bytes_read) = (Duration::ZERO, 0);
        let mut previous: Option<Examination> = None;
        loop {
            let permit = hosts.acquire(&host).await;
            let started = Instant::now();
            // The most one avatar may spend in requests and the waits between
            // them (it holds a fetch slot all that time), from its first request.
            let deadline = *deadline.get_or_insert(started + self.retry.budget());
            let left = deadline.saturating_duration_since(started);
            if left.is_zero()
                && let Some(previous) = previous
            {
                // The budget ran out while waiting for the host: the last
                // answer stands (it says more than "timed out" would).
                permit.done(Signal::Nothing);
                return previous;
            }
            let mut e = match tokio::time::timeout(left, self.fetch_once(url, rule, ask)).await {
                Ok(e) => e,
                Err(_) => Examination::failed(FetchError::Timeout, "retry.budget_secs"),
            };
            permit.done(e.host_signal(started.elapsed()));
            requests += 1;
            fetch_time += started.elapsed();
            bytes_read += e.bytes_read;
            e.requests = requests;
            e.fetch_time = fetch_time;
            e.bytes_read = bytes_read;
            let again = match e.retry() {
                Retry::Never => false,
                Retry::Again => true,
                Retry::AfterTimeout => !std::mem::replace(&mut timed_out, true),
            };
            if !again || attempt >= self.retry.in_run {
                return e;
            }
            let backoff = Duration::from_millis(crate::model::exponential_backoff(
                self.retry.backoff_ms,
                u64::MAX,
                attempt.min(16),
            ));
            let cap = Duration::from_secs(self.retry.retry_after_cap_secs);
            let wait = e.retry_after.map_or(backoff, |ra| ra.min(cap).max(backoff));
            if Instant::now() + wait >= deadline {
                return e;
            }
            tracing::debug!(%url, code = %e.verdict.code, ?wait, "retrying within the run");
            tokio::time::sleep(wait).await;
            attempt += 1;
            previous = Some(e);
        }
    }
}

/// `Retry-After` in seconds or as an HTTP date.
pub(crate) fn parse_retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    (when.with_timezone(&chrono::Utc) - chrono::Utc::now())
        .to_std()
        .ok()
}
