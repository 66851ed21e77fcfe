//! Configured table and column names go into SQL text, so they are validated
//! and quoted here: a typo is a clear start-up error, never an injection.

use super::DbError;

/// How a backend quotes identifiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quote {
    /// `"name"`: SQLite and PostgreSQL.
    Double,
    /// `` `name` ``: MySQL/MariaDB.
    Backtick,
}

/// Validates `name` (optionally `schema.name` when `allow_schema`) and returns it quoted.
pub fn quote(what: &str, name: &str, allow_schema: bool, q: Quote) -> Result<String, DbError> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 || (parts.len() == 2 && !allow_schema) {
        return Err(DbError::Config(format!(
            "{what} {name:?}: expected {}",
            if allow_schema {
                "name or schema.name"
            } else {
                "a plain column name"
            }
        )));
    }
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
        let valid = !part.is_empty()
            && part.len() <= 63
            && part
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
        if !valid {
            return Err(DbError::Config(format!(
                "{what} {name:?} is not a valid SQL identifier (letters, digits, _ and $, starting with a letter or _, at most 63 characters)"
            )));
        }
        out.push(match q {
            Quote::Double => format!("\"{part}\""),
            Quote::Backtick => format!("`{part}`"),
        });
    }
    Ok(out.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_schema_qualified_names_are_quoted() {
        assert_eq!(
            quote("table", "users", true, Quote::Double).unwrap(),
            "\"users\""
        );
        assert_eq!(
            quote("table", "app.users", true, Quote::Double).unwrap(),
            "\"app\".\"users\""
        );
        assert_eq!(
            quote("table", "app.users", true, Quote::Backtick).unwrap(),
            "`app`.`users`"
        );
        assert_eq!(
            quote("column", "avatar_url", false, Quote::Double).unwrap(),
            "\"avatar_url\""
        );
    }

    #[test]
    fn anything_that_could_be_sql_is_refused_with_the_key_named() {
        for bad in [
            "users; DROP TABLE users",
            "a\"b",
            "",
            "1users",
            "a b",
            "a.b.c",
            "users--",
        ] {
            let err = quote("profile.table", bad, true, Quote::Double)
                .unwrap_err()
                .to_string();
            assert!(err.contains("profile.table"), "{bad}: {err}");
        }
        assert!(quote("profile.id_column", "app.id", false, Quote::Double).is_err());
    }
}
