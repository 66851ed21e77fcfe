-- The worker's own state: one row per user with an avatar URL.
-- Times are unix seconds (portable across SQLite, PostgreSQL and MySQL).
CREATE TABLE IF NOT EXISTS avatar_warden_avatars (
    user_id         TEXT PRIMARY KEY NOT NULL,
    source_url      TEXT NOT NULL,
    status          TEXT NOT NULL,
    reason          TEXT NOT NULL,
    reason_detail   TEXT,
    mirror_url      TEXT,
    object_key      TEXT,
    sha256          TEXT,
    size_bytes      INTEGER,
    width           INTEGER,
    height          INTEGER,
    format          TEXT,
    reauth_required INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- Provider expiry signals seen for this URL (see expiry.confirmations).
    expiry_signals  INTEGER NOT NULL DEFAULT 0,
    checked_at      INTEGER NOT NULL,
    next_check_at   INTEGER,
    -- Held by the worker checking this avatar right now (see `claim`).
    lease_token      TEXT,
    lease_expires_at INTEGER
);

CREATE INDEX IF NOT EXISTS avatar_warden_avatars_status ON avatar_warden_avatars (status);
CREATE INDEX IF NOT EXISTS avatar_warden_avatars_next_check ON avatar_warden_avatars (next_check_at);
CREATE INDEX IF NOT EXISTS avatar_warden_avatars_lease ON avatar_warden_avatars (lease_token);
