-- What the source said about the picture that was mirrored (#9): re-checks ask
-- with these (If-None-Match / If-Modified-Since, or HEAD) instead of downloading.
ALTER TABLE avatar_warden_avatars ADD COLUMN source_etag TEXT;
ALTER TABLE avatar_warden_avatars ADD COLUMN source_last_modified TEXT;
ALTER TABLE avatar_warden_avatars ADD COLUMN source_length BIGINT;

-- `gc` asks which stored objects are still referenced.
CREATE INDEX IF NOT EXISTS avatar_warden_avatars_object_key ON avatar_warden_avatars (object_key);
