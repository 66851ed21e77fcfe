-- A scan that fails is recorded too (result 'failed'), with the error that
-- ended it, so `status` never shows the previous good run as the last one.
ALTER TABLE avatar_warden_runs ADD COLUMN error TEXT;
