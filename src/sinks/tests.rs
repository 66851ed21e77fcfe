use super::*;
use crate::db::UserId;

fn rec(status: Status, mirror: Option<&str>, reauth: bool) -> AvatarRecord {
    use crate::model::Reason;
    let reason = match status {
        Status::Mirrored => Reason::ValidImage,
        Status::Expired => Reason::NotFound,
        Status::Invalid => Reason::NotAnImage,
        Status::Failing => Reason::Timeout,
        Status::Blocked => Reason::NotAllowed,
        Status::Pending => Reason::NotCheckedYet,
    };
    let mut r = AvatarRecord::new(
        UserId::Int(7),
        "https://thirdwx.qlogo.cn/mmopen/x/132",
        reason,
        1_700_000_000,
    )
    .with_reauth(reauth);
    r.mirror_url = mirror.map(Into::into);
    r
}

fn prev(status: Status, mirror: Option<&str>, reauth: bool) -> Previous {
    Previous {
        source_url: "https://thirdwx.qlogo.cn/mmopen/x/132".into(),
        status,
        mirror_url: mirror.map(Into::into),
        object_key: None,
        sha256: None,
        meta: Default::default(),
        validators: Default::default(),
        attempts: 0,
        expiry_signals: 0,
        reauth_required: reauth,
    }
}

#[test]
fn only_changed_verdicts_make_events() {
    use EventKind::*;
    let m = Some("https://cdn/a.jpg");
    assert_eq!(
        events_for(None, &rec(Status::Mirrored, m, false)),
        vec![Mirrored]
    );
    // A weekly re-check of a live avatar is silent.
    let p = prev(Status::Mirrored, m, false);
    assert!(events_for(Some(&p), &rec(Status::Mirrored, m, false)).is_empty());
    // A new picture behind the same status is news.
    assert_eq!(
        events_for(
            Some(&p),
            &rec(Status::Mirrored, Some("https://cdn/b.jpg"), false)
        ),
        vec![Mirrored]
    );
    assert_eq!(
        events_for(Some(&p), &rec(Status::Expired, m, true)),
        vec![Expired, ReauthRequired]
    );
    let flagged = prev(Status::Expired, m, true);
    assert!(events_for(Some(&flagged), &rec(Status::Expired, m, true)).is_empty());
    assert_eq!(
        events_for(
            Some(&flagged),
            &rec(Status::Mirrored, Some("https://cdn/c.jpg"), false)
        ),
        vec![Mirrored, ReauthCleared]
    );
    // Failing is our trouble, not news for the app.
    assert!(events_for(Some(&p), &rec(Status::Failing, m, false)).is_empty());
    assert_eq!(
        events_for(None, &rec(Status::Invalid, None, true)),
        vec![Invalid, ReauthRequired]
    );
}

#[test]
fn event_ids_are_stable_for_a_replayed_verdict_and_differ_otherwise() {
    let r = rec(Status::Mirrored, Some("https://cdn/a.jpg"), false);
    let a = Event::new(EventKind::Mirrored, None, &r);
    assert_eq!(a.id, Event::new(EventKind::Mirrored, None, &r).id);
    let mut later = r.clone();
    later.checked_at += 1;
    assert_ne!(a.id, Event::new(EventKind::Mirrored, None, &later).id);
    let json = serde_json::to_value(&a).unwrap();
    assert_eq!(json["type"], "avatar.mirrored");
    assert_eq!(json["user_id"], "7");
}

#[test]
fn backoff_grows_and_is_capped() {
    let s = OutboxSettings {
        poll_interval_ms: 1000,
        batch_size: 10,
        concurrency: 1,
        max_attempts: 5,
        backoff_initial_secs: 5,
        backoff_max_secs: 60,
        drain_secs: 1,
        lease_secs: 60,
    };
    let mut rng = rand::rng();
    let first = backoff_secs(0, &s, &mut rng);
    assert!((4..=6).contains(&first), "{first}");
    let third = backoff_secs(2, &s, &mut rng);
    assert!((16..=24).contains(&third), "{third}");
    assert!(backoff_secs(20, &s, &mut rng) <= 72);
}
