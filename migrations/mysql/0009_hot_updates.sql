-- The heartbeat and the release find their rows by primary key, and the
-- oldest due avatar is read by the walk that counts the backlog: the lease
-- and next-check indexes only cost an entry moved per claim and settle.
ALTER TABLE avatar_warden_avatars DROP INDEX avatar_warden_avatars_lease, DROP INDEX avatar_warden_avatars_next_check;
