-- Sink deliveries, written in the same transaction as the verdict that caused
-- them and drained by the delivery loop (at least once, oldest first per user).
CREATE TABLE IF NOT EXISTS avatar_warden_outbox (
    id               BIGSERIAL PRIMARY KEY,
    event_id         TEXT NOT NULL,
    sink             TEXT NOT NULL,
    kind             TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    payload          TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending',
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    lease_token      TEXT,
    lease_until      BIGINT,
    last_error       TEXT,
    UNIQUE (event_id, sink)
);

CREATE INDEX IF NOT EXISTS avatar_warden_outbox_due ON avatar_warden_outbox (state, sink, next_attempt_at);
CREATE INDEX IF NOT EXISTS avatar_warden_outbox_user ON avatar_warden_outbox (sink, user_id, id);
