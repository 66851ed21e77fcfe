-- One row per finished scan, for `status` ("last run") and operators' queries.
CREATE TABLE IF NOT EXISTS avatar_warden_runs (
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT NOT NULL,
    result       TEXT NOT NULL,
    processed    BIGINT NOT NULL,
    failing      BIGINT NOT NULL,
    flagged      BIGINT NOT NULL,
    worker       TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS avatar_warden_runs_finished ON avatar_warden_runs (finished_at);
