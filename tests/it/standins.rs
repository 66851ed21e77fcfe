//! Stand-ins for what cannot run here: OpenIM's REST API, NetEase Yunxin's
//! server API and a webhook receiver, on one loopback server. They follow the
//! documented wire formats (paths, auth headers, field names, error
//! envelopes), enforce what the real ones enforce (operationID, admin token,
//! CheckSum), and record every request they get.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

pub const OPENIM_SECRET: &str = "openIM123";
pub const YUNXIN_APP_KEY: &str = "go9dnk49bkd9jd9vmel1kglw0803mgq3";
pub const YUNXIN_APP_SECRET: &str = "4f8b5b7c2e1a";
pub const WEBHOOK_SECRET: &str = "whsec-test";

#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Request {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }

    pub fn form(&self) -> HashMap<String, String> {
        url::form_urlencoded::parse(self.body.as_bytes())
            .into_owned()
            .collect()
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

#[derive(Default)]
pub struct Inner {
    pub requests: Mutex<Vec<Request>>,
    /// Admin tokens issued, in order, with when and for how long; expired
    /// and `revoked` ones answer TokenExpiredError.
    pub tokens: Mutex<Vec<(String, std::time::Instant, u64)>>,
    pub revoked: Mutex<HashSet<String>>,
    /// Users OpenIM knows (others: RecordNotFoundError).
    pub openim_users: Mutex<HashSet<String>>,
    /// `expireTimeSeconds` handed out with admin tokens.
    pub token_lifetime: AtomicUsize,
    /// Answer this many Yunxin calls with code 416 (frequency control).
    pub yunxin_rate_limited: AtomicUsize,
    /// The webhook receiver answers 503 while down.
    pub webhook_down: AtomicBool,
    /// Answer this many webhook calls with 500.
    pub webhook_failures: AtomicUsize,
}

#[derive(Clone)]
pub struct StandIns {
    pub addr: SocketAddr,
    pub inner: Arc<Inner>,
}

impl StandIns {
    pub async fn spawn() -> StandIns {
        let inner = Arc::new(Inner::default());
        inner.token_lifetime.store(7_776_000, Ordering::Relaxed);
        let app = Router::new()
            .route("/openim/auth/get_admin_token", post(openim_token))
            .route("/openim/user/update_user_info_ex", post(openim_update))
            .route("/yunxin/user/updateUinfo.action", post(yunxin_update))
            .route("/hook", post(webhook))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        StandIns { addr, inner }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests received on `path`, in order.
    pub fn requests(&self, path: &str) -> Vec<Request> {
        self.inner
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    pub fn openim_knows(&self, users: &[&str]) {
        let mut known = self.inner.openim_users.lock().unwrap();
        known.extend(users.iter().map(std::string::ToString::to_string));
    }
}

fn record(inner: &Inner, path: &str, headers: &HeaderMap, body: &Bytes) {
    inner.requests.lock().unwrap().push(Request {
        path: path.into(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: String::from_utf8_lossy(body).into_owned(),
    });
}

fn json_response(body: Value) -> Response {
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// OpenIM's envelope: HTTP 200, the outcome in `errCode`.
fn openim_reply(code: i64, msg: &str, data: Option<Value>) -> Response {
    let mut body = json!({"errCode": code, "errMsg": msg, "errDlt": if code == 0 { String::new() } else { format!(": [{code}]{msg}") }});
    if let Some(data) = data {
        body["data"] = data;
    }
    json_response(body)
}

async fn openim_token(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&inner, "/openim/auth/get_admin_token", &headers, &body);
    if headers.get("operationID").is_none() {
        return openim_reply(1001, "ArgsError", None);
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    if req["secret"] != OPENIM_SECRET || req["userID"] != "imAdmin" {
        return openim_reply(1004, "RecordNotFoundError", None);
    }
    let mut tokens = inner.tokens.lock().unwrap();
    let token = format!("admin-token-{}", tokens.len() + 1);
    let lifetime = inner.token_lifetime.load(Ordering::Relaxed);
    tokens.push((token.clone(), std::time::Instant::now(), lifetime as u64));
    openim_reply(
        0,
        "",
        Some(json!({"token": token, "expireTimeSeconds": lifetime})),
    )
}

async fn openim_update(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&inner, "/openim/user/update_user_info_ex", &headers, &body);
    if headers.get("operationID").is_none() {
        return openim_reply(1001, "ArgsError", None);
    }
    let token = headers
        .get("token")
        .and_then(|t| t.to_str().ok())
        .unwrap_or("");
    let issued = inner
        .tokens
        .lock()
        .unwrap()
        .iter()
        .find(|t| t.0 == token)
        .map(|t| (t.1, t.2));
    let Some((at, lifetime)) = issued else {
        return openim_reply(1507, "TokenNotExistError", None);
    };
    if at.elapsed().as_secs_f64() > lifetime as f64 || inner.revoked.lock().unwrap().contains(token)
    {
        return openim_reply(1501, "TokenExpiredError", None);
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let user = req["userInfo"]["userID"].as_str().unwrap_or("");
    if !inner.openim_users.lock().unwrap().contains(user) {
        return openim_reply(1004, "RecordNotFoundError", None);
    }
    openim_reply(0, "", None)
}

/// Yunxin's envelope: `{"code": 200}` or `{"code": N, "desc": "..."}`.
fn yunxin_reply(code: i64, desc: &str) -> Response {
    let body = if code == 200 {
        json!({"code": 200})
    } else {
        json!({"code": code, "desc": desc})
    };
    json_response(body)
}

async fn yunxin_update(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&inner, "/yunxin/user/updateUinfo.action", &headers, &body);
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    if h("AppKey") != YUNXIN_APP_KEY {
        return yunxin_reply(403, "appkey not found");
    }
    let (nonce, cur_time) = (h("Nonce"), h("CurTime"));
    let expected = {
        use sha1::Digest;
        hex::encode(sha1::Sha1::digest(format!(
            "{YUNXIN_APP_SECRET}{nonce}{cur_time}"
        )))
    };
    if nonce.is_empty() || nonce.len() > 128 || h("CheckSum") != expected {
        return yunxin_reply(403, "checksum error");
    }
    let now = chrono::Utc::now().timestamp();
    if cur_time
        .parse::<i64>()
        .map_or(true, |t| (now - t).abs() > 300)
    {
        return yunxin_reply(403, "curtime expired");
    }
    if !h("content-type").starts_with("application/x-www-form-urlencoded") {
        return yunxin_reply(414, "content-type");
    }
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    if form.get("accid").is_none_or(std::string::String::is_empty) {
        return yunxin_reply(414, "accid is empty");
    }
    if form.get("icon").is_some_and(|i| i.len() > 1024) {
        return yunxin_reply(414, "icon too long");
    }
    if inner
        .yunxin_rate_limited
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return yunxin_reply(416, "api freq out of limit");
    }
    yunxin_reply(200, "")
}

async fn webhook(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    if inner.webhook_down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    record(&inner, "/hook", &headers, &body);
    if inner
        .webhook_failures
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}
