-- Sink deliveries, written in the same transaction as the verdict that caused
-- them and drained by the delivery loop (at least once, oldest first per user).
CREATE TABLE IF NOT EXISTS avatar_warden_outbox (
    id               BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    event_id         VARCHAR(64) NOT NULL,
    sink             VARCHAR(64) NOT NULL,
    kind             VARCHAR(32) NOT NULL,
    user_id          VARCHAR(191) NOT NULL,
    payload          TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    state            VARCHAR(16) NOT NULL DEFAULT 'pending',
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NOT NULL,
    lease_token      VARCHAR(64) NULL,
    lease_until      BIGINT NULL,
    last_error       TEXT NULL,
    UNIQUE KEY avatar_warden_outbox_event (event_id, sink),
    KEY avatar_warden_outbox_due (state, sink, next_attempt_at),
    KEY avatar_warden_outbox_user (sink, user_id, id)
);
