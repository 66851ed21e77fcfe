-- Small facts the worker keeps between runs, e.g. the write-back settings the
-- profile table's columns were last made consistent with (a new CDN domain or
-- a newly enabled column makes the next scan rewrite them).
CREATE TABLE IF NOT EXISTS avatar_warden_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
