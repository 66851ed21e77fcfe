-- A profile column may hold an avatar "URL" longer than TEXT's 64 KiB (a
-- MEDIUMTEXT column and a hostile or broken row): the state row keeps the
-- exact value it was checked for, so it must fit whatever the profile holds.
-- Other text columns hold values bounded by the worker (README: bounds).
ALTER TABLE avatar_warden_avatars MODIFY source_url MEDIUMTEXT NOT NULL;
