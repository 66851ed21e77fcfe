-- The worker's own state: one row per user with an avatar URL.
-- Times are unix seconds (portable across SQLite, PostgreSQL and MySQL).
-- user_id is VARCHAR(191): the longest utf8mb4 key every InnoDB row format indexes.
CREATE TABLE IF NOT EXISTS avatar_warden_avatars (
    user_id          VARCHAR(191) NOT NULL PRIMARY KEY,
    source_url       TEXT NOT NULL,
    status           VARCHAR(16) NOT NULL,
    reason           VARCHAR(64) NOT NULL,
    reason_detail    TEXT,
    mirror_url       TEXT,
    object_key       VARCHAR(512),
    sha256           CHAR(64),
    size_bytes       BIGINT,
    width            BIGINT,
    height           BIGINT,
    format           VARCHAR(16),
    reauth_required  BOOLEAN NOT NULL DEFAULT FALSE,
    attempts         BIGINT NOT NULL DEFAULT 0,
    expiry_signals   BIGINT NOT NULL DEFAULT 0,
    checked_at       BIGINT NOT NULL,
    next_check_at    BIGINT,
    lease_token      CHAR(32),
    lease_expires_at BIGINT,
    KEY avatar_warden_avatars_status (status),
    KEY avatar_warden_avatars_next_check (next_check_at),
    KEY avatar_warden_avatars_lease (lease_token)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
