//! The newcomer's first run: a simulated origin plus a SQLite profile table of
//! sample users covering every verdict.

pub mod origin;

use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

pub use origin::{LimitedStats, Origin, OriginOptions};

/// One sample user: id, nickname, and the avatar path on the origin (`None`:
/// no avatar; a full URL: used as is).
pub struct SampleUser {
    pub id: i64,
    pub nickname: &'static str,
    pub avatar: Option<&'static str>,
    /// What the demo expects avatar-warden to conclude.
    pub expect: &'static str,
}

pub const SAMPLE_USERS: &[SampleUser] = &[
    SampleUser {
        id: 1,
        nickname: "alice",
        avatar: Some("/avatar/jpeg/alice"),
        expect: "mirrored",
    },
    SampleUser {
        id: 2,
        nickname: "bo",
        avatar: Some("/avatar/png/bo"),
        expect: "mirrored",
    },
    SampleUser {
        id: 3,
        nickname: "chen",
        avatar: Some("/avatar/webp/chen"),
        expect: "mirrored",
    },
    SampleUser {
        id: 4,
        nickname: "dan",
        avatar: Some("/avatar/jpeg/team-logo"),
        expect: "mirrored",
    },
    SampleUser {
        id: 5,
        nickname: "erin",
        avatar: Some("/avatar/jpeg/team-logo"),
        expect: "mirrored",
    },
    SampleUser {
        id: 6,
        nickname: "fang",
        avatar: Some("/avatar/gif/fang"),
        expect: "mirrored",
    },
    SampleUser {
        id: 7,
        nickname: "gao",
        avatar: Some("/wechat/expired/gao"),
        expect: "expired",
    },
    SampleUser {
        id: 8,
        nickname: "hui",
        avatar: Some("/wechat/expired/hui"),
        expect: "expired",
    },
    SampleUser {
        id: 9,
        nickname: "ivan",
        avatar: Some("/status/404/ivan"),
        expect: "expired",
    },
    SampleUser {
        id: 10,
        nickname: "jun",
        avatar: Some("/status/500/jun"),
        expect: "failing",
    },
    SampleUser {
        id: 11,
        nickname: "kai",
        avatar: Some("/html/kai"),
        expect: "invalid",
    },
    SampleUser {
        id: 12,
        nickname: "lan",
        avatar: Some("/truncated/lan"),
        expect: "invalid",
    },
    SampleUser {
        id: 13,
        nickname: "mei",
        avatar: Some("ftp://files.example.com/mei.png"),
        expect: "invalid",
    },
    SampleUser {
        id: 14,
        nickname: "ning",
        avatar: None,
        expect: "skipped (no avatar)",
    },
];

impl SampleUser {
    pub fn avatar_url(&self, origin: &Origin) -> Option<String> {
        self.avatar.map(|a| {
            if a.starts_with('/') {
                origin.url(a)
            } else {
                a.to_string()
            }
        })
    }
}

/// Creates (or replaces) the sample `users` table in a SQLite database.
pub async fn seed_profiles(db_url: &str, origin: &Origin) -> Result<(), sqlx::Error> {
    let options = SqliteConnectOptions::from_str(db_url)?.create_if_missing(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    sqlx::query("DROP TABLE IF EXISTS users")
        .execute(&pool)
        .await?;
    sqlx::query(
        "CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            nickname TEXT NOT NULL,
            avatar_url TEXT,
            avatar_mirror_url TEXT,
            avatar_reauth_required INTEGER NOT NULL DEFAULT 0
        )",
    )
    .execute(&pool)
    .await?;
    for u in SAMPLE_USERS {
        sqlx::query("INSERT INTO users (id, nickname, avatar_url) VALUES (?, ?, ?)")
            .bind(u.id)
            .bind(u.nickname)
            .bind(u.avatar_url(origin))
            .execute(&pool)
            .await?;
    }
    pool.close().await;
    Ok(())
}
