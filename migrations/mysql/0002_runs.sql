-- One row per finished scan, for `status` ("last run") and operators' queries.
CREATE TABLE IF NOT EXISTS avatar_warden_runs (
    id           BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT NOT NULL,
    result       VARCHAR(16) NOT NULL,
    processed    BIGINT NOT NULL,
    failing      BIGINT NOT NULL,
    flagged      BIGINT NOT NULL,
    worker       VARCHAR(255) NOT NULL,
    KEY avatar_warden_runs_finished (finished_at)
);
