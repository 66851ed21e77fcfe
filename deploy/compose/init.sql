-- A tiny profile table for the try-out; point profile.* at your own table instead.
CREATE TABLE users (
    id BIGSERIAL PRIMARY KEY,
    nickname TEXT NOT NULL,
    avatar_url TEXT,
    avatar_mirror_url TEXT,
    avatar_reauth_required BOOLEAN NOT NULL DEFAULT FALSE
);
INSERT INTO users (nickname, avatar_url) VALUES
    ('github', 'https://avatars.githubusercontent.com/u/9919?v=4'),
    ('gravatar', 'https://www.gravatar.com/avatar/205e460b479e2e5b48aec07710c08d50?s=200'),
    ('gone', 'https://thirdwx.qlogo.cn/mmopen/vi_32/this-one-expired-long-ago/132'),
    ('empty', NULL);
