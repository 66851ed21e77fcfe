-- Every claim and settle changed an indexed column (the lease token, the
-- next check time), so no update could be HOT: PostgreSQL added an entry to
-- every index of the row twice per avatar, half its CPU in a re-verification
-- of 1M rows (#19). The heartbeat and the release now find their rows by
-- primary key, and the oldest due avatar is read by the walk that counts the
-- backlog: neither index is needed, and a re-verification that keeps status
-- and object key updates no index at all.
DROP INDEX IF EXISTS avatar_warden_avatars_leased;
DROP INDEX IF EXISTS avatar_warden_avatars_next_check;
-- Room on each page for the next version of its rows: a HOT update needs it
-- on the same page (new pages only; existing ones gain it as they are pruned).
ALTER TABLE avatar_warden_avatars SET (fillfactor = 80);
