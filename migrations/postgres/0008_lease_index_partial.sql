-- Only leased rows carry a lease token: index just those. The full index held
-- an entry for every row, and every claim and settle moved one, so its pages
-- were spread over the whole table and touched per avatar. The partial index
-- holds the avatars in flight and stays a few pages.
DROP INDEX IF EXISTS avatar_warden_avatars_lease;
CREATE INDEX IF NOT EXISTS avatar_warden_avatars_leased ON avatar_warden_avatars (lease_token) WHERE lease_token IS NOT NULL;
