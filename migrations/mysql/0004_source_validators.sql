-- What the source said about the picture that was mirrored (#9): re-checks ask
-- with these (If-None-Match / If-Modified-Since, or HEAD) instead of downloading.
-- An ETag is at most a few dozen characters in practice: 512 leaves room.
ALTER TABLE avatar_warden_avatars
    ADD COLUMN source_etag VARCHAR(512),
    ADD COLUMN source_last_modified VARCHAR(64),
    ADD COLUMN source_length BIGINT;

-- `gc` asks which stored objects are still referenced.
CREATE INDEX avatar_warden_avatars_object_key ON avatar_warden_avatars (object_key);
