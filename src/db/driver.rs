//! What the shared statements need of a sqlx database, said once: the few
//! value types the state tables bind and read, and running a statement.
//! Every backend gets it from one blanket impl, so the shared code carries
//! one bound (`Db: Driver`) instead of a dozen where-clauses per function.

use futures::future::BoxFuture;
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, IntoArguments, Type};

use super::DbError;

/// A result row of dialect `D`.
pub(super) type Row<D> = <<D as super::dialect::Dialect>::Db as Database>::Row;

/// A value bound to a statement, in the types the state tables use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Value {
    Text(Option<String>),
    Int(Option<i64>),
    Bool(bool),
}

impl Value {
    pub(super) fn into_text(self) -> Option<String> {
        match self {
            Value::Text(t) => t,
            Value::Int(i) => i.map(|i| i.to_string()),
            Value::Bool(b) => Some(b.to_string()),
        }
    }

    pub(super) fn into_int(self) -> Option<i64> {
        match self {
            Value::Int(i) => i,
            Value::Bool(b) => Some(i64::from(b)),
            Value::Text(t) => t.and_then(|t| t.parse().ok()),
        }
    }

    pub(super) fn into_bool(self) -> bool {
        match self {
            Value::Bool(b) => b,
            Value::Int(i) => i.is_some_and(|i| i != 0),
            Value::Text(t) => t.is_some_and(|t| t == "true"),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(Some(s.to_owned()))
    }
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(Some(s))
    }
}

impl From<Option<String>> for Value {
    fn from(s: Option<String>) -> Self {
        Value::Text(s)
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Int(Some(i))
    }
}

impl From<Option<i64>> for Value {
    fn from(i: Option<i64>) -> Self {
        Value::Int(i)
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

pub(super) trait Driver: Database {
    fn bind(args: &mut Self::Arguments<'_>, value: Value) -> Result<(), DbError>;

    /// Text, also when MySQL reports it as VARBINARY (binary collations) or
    /// SQLite holds bytes that are not UTF-8: one odd value must not stop a batch.
    fn text(row: &Self::Row, col: &str) -> Result<Option<String>, sqlx::Error>;

    fn int(row: &Self::Row, col: &str) -> Result<Option<i64>, sqlx::Error>;

    /// A boolean, also when the backend spells it as an integer.
    fn flag(row: &Self::Row, col: &str) -> Result<bool, sqlx::Error>;

    fn execute<'e, 'q: 'e>(
        conn: &'e mut Self::Connection,
        sql: &'q str,
        args: Self::Arguments<'q>,
    ) -> BoxFuture<'e, Result<Self::QueryResult, sqlx::Error>>;

    fn fetch_all<'e, 'q: 'e>(
        conn: &'e mut Self::Connection,
        sql: &'q str,
        args: Self::Arguments<'q>,
    ) -> BoxFuture<'e, Result<Vec<Self::Row>, sqlx::Error>>;

    /// Text that must be there.
    fn required_text(row: &Self::Row, col: &str) -> Result<String, sqlx::Error> {
        Self::text(row, col)?.ok_or_else(|| unexpected_null(col))
    }

    /// An integer that must be there.
    fn required_int(row: &Self::Row, col: &str) -> Result<i64, sqlx::Error> {
        Self::int(row, col)?.ok_or_else(|| unexpected_null(col))
    }
}

fn unexpected_null(col: &str) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: col.to_owned(),
        source: "unexpected NULL".into(),
    }
}

impl<DB> Driver for DB
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    for<'q> DB::Arguments<'q>: IntoArguments<'q, DB>,
    for<'q> Option<String>: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> Option<i64>: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> bool: Encode<'q, DB> + Decode<'q, DB> + Type<DB>,
    for<'q> i64: Decode<'q, DB> + Type<DB>,
    for<'q> Option<Vec<u8>>: Decode<'q, DB> + Type<DB>,
    for<'a> &'a str: ColumnIndex<DB::Row>,
{
    fn bind(args: &mut Self::Arguments<'_>, value: Value) -> Result<(), DbError> {
        use sqlx::Arguments;
        match value {
            Value::Text(v) => args.add(v),
            Value::Int(v) => args.add(v),
            Value::Bool(v) => args.add(v),
        }
        .map_err(|e| DbError::Query(sqlx::Error::Encode(e)))
    }

    fn text(row: &Self::Row, col: &str) -> Result<Option<String>, sqlx::Error> {
        use sqlx::Row as _;
        row.try_get::<Option<String>, _>(col).or_else(|_| {
            row.try_get::<Option<Vec<u8>>, _>(col)
                .map(|b| b.map(|b| String::from_utf8_lossy(&b).into_owned()))
        })
    }

    fn int(row: &Self::Row, col: &str) -> Result<Option<i64>, sqlx::Error> {
        use sqlx::Row as _;
        row.try_get(col)
    }

    fn flag(row: &Self::Row, col: &str) -> Result<bool, sqlx::Error> {
        use sqlx::Row as _;
        row.try_get::<bool, _>(col)
            .or_else(|_| row.try_get::<i64, _>(col).map(|i| i != 0))
    }

    fn execute<'e, 'q: 'e>(
        conn: &'e mut Self::Connection,
        sql: &'q str,
        args: Self::Arguments<'q>,
    ) -> BoxFuture<'e, Result<Self::QueryResult, sqlx::Error>> {
        conn.execute(sqlx::query_with(sql, args))
    }

    fn fetch_all<'e, 'q: 'e>(
        conn: &'e mut Self::Connection,
        sql: &'q str,
        args: Self::Arguments<'q>,
    ) -> BoxFuture<'e, Result<Vec<Self::Row>, sqlx::Error>> {
        conn.fetch_all(sqlx::query_with(sql, args))
    }
}

/// Numbers the parameters of one statement as its backend spells them.
pub(super) struct Params {
    next: usize,
    spell: fn(usize) -> String,
}

impl Params {
    pub(super) fn new(spell: fn(usize) -> String) -> Self {
        Params { next: 0, spell }
    }

    /// The next parameter.
    pub(super) fn one(&mut self) -> String {
        self.next += 1;
        (self.spell)(self.next)
    }

    /// `n` parameters, comma-separated.
    pub(super) fn list(&mut self, n: usize) -> String {
        (0..n).map(|_| self.one()).collect::<Vec<_>>().join(", ")
    }

    /// `(…), (…)`: `rows` rows of `cols` parameters.
    pub(super) fn rows(&mut self, rows: usize, cols: usize) -> String {
        (0..rows)
            .map(|_| format!("({})", self.list(cols)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `?` for every parameter (SQLite, MySQL).
pub(super) fn question(_: usize) -> String {
    "?".to_owned()
}

/// `$n` (PostgreSQL).
pub(super) fn dollar(n: usize) -> String {
    format!("${n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_spelled_and_numbered_per_backend() {
        let mut q = Params::new(question);
        assert_eq!(q.rows(2, 3), "(?, ?, ?), (?, ?, ?)");
        let mut d = Params::new(dollar);
        assert_eq!(d.one(), "$1");
        assert_eq!(d.rows(2, 2), "($2, $3), ($4, $5)");
        assert_eq!(d.list(2), "$6, $7");
    }
}
