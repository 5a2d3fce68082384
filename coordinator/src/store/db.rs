//! One transaction handle for both backends. The store's table modules (`store/sqlite/*.rs`)
//! are written once against [`Tx`], whose methods mirror the part of rusqlite's API they use
//! (`execute`, `query_row`, `prepare` + `query`/`query_map`, `last_insert_rowid`), with
//! rusqlite's value model (`ToSql`/`FromSql`, [`rusqlite::Result`]). On SQLite every call goes
//! straight to rusqlite; on PostgreSQL the statement is translated to PostgreSQL's dialect
//! ([`crate::store::postgres::translate`]) and the values are converted by column type
//! ([`crate::store::postgres::PgParam`], [`crate::store::postgres::PgCell`]).

use rusqlite::types::{FromSql, ToSql, ToSqlOutput, Value, ValueRef};
use std::cell::RefCell;

use super::postgres::{self as pg};

/// An open transaction on either backend.
pub enum Tx<'a> {
    Lite(&'a rusqlite::Transaction<'a>),
    Pg(RefCell<postgres::Transaction<'a>>),
}

/// The parameters of one statement: `params![..]`, an array of values, or `[]`.
pub trait Params {
    fn values(&self) -> rusqlite::Result<Vec<Value>>;
}

fn owned(v: &dyn ToSql) -> rusqlite::Result<Value> {
    Ok(match v.to_sql()? {
        ToSqlOutput::Borrowed(r) => r.into(),
        ToSqlOutput::Owned(v) => v,
        other => {
            return Err(rusqlite::Error::ToSqlConversionFailure(
                format!("unsupported parameter kind {other:?}").into(),
            ))
        }
    })
}

impl Params for [&(dyn ToSql + Send + Sync); 0] {
    fn values(&self) -> rusqlite::Result<Vec<Value>> {
        Ok(Vec::new())
    }
}

impl Params for &[&dyn ToSql] {
    fn values(&self) -> rusqlite::Result<Vec<Value>> {
        self.iter().map(|v| owned(*v)).collect()
    }
}

macro_rules! array_params {
    ($($n:literal)*) => {$(
        impl Params for &[&dyn ToSql; $n] {
            fn values(&self) -> rusqlite::Result<Vec<Value>> {
                self.iter().map(|v| owned(*v)).collect()
            }
        }
        impl<T: ToSql> Params for [T; $n] {
            fn values(&self) -> rusqlite::Result<Vec<Value>> {
                self.iter().map(|v| owned(v)).collect()
            }
        }
    )*};
}
array_params!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32);

/// One result row.
pub enum Row<'r> {
    Lite(&'r rusqlite::Row<'r>),
    Pg(&'r [Value]),
}

/// A column index (a position, as the table modules use).
pub trait ColumnIndex {
    fn position(self) -> usize;
}

impl ColumnIndex for usize {
    fn position(self) -> usize {
        self
    }
}

impl Row<'_> {
    pub fn get<I: ColumnIndex, T: FromSql>(&self, idx: I) -> rusqlite::Result<T> {
        let idx = idx.position();
        match self {
            Row::Lite(r) => r.get(idx),
            Row::Pg(vals) => {
                let v = vals
                    .get(idx)
                    .ok_or(rusqlite::Error::InvalidColumnIndex(idx))?;
                T::column_result(ValueRef::from(v)).map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(idx, v.data_type(), Box::new(e))
                })
            }
        }
    }
}

/// A prepared statement.
pub enum Stmt<'t, 'a> {
    Lite(rusqlite::Statement<'a>),
    Pg(&'t Tx<'a>, String),
}

/// The rows of a query, read one by one.
pub enum Rows<'s> {
    Lite(rusqlite::Rows<'s>),
    Pg(std::vec::IntoIter<Vec<Value>>, Option<Vec<Value>>),
}

impl Rows<'_> {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> rusqlite::Result<Option<Row<'_>>> {
        match self {
            Rows::Lite(r) => Ok(r.next()?.map(Row::Lite)),
            Rows::Pg(it, cur) => {
                *cur = it.next();
                Ok(cur.as_deref().map(Row::Pg))
            }
        }
    }
}

impl<'a> Stmt<'_, 'a> {
    pub fn execute<P: Params>(&mut self, p: P) -> rusqlite::Result<usize> {
        let vals = p.values()?;
        match self {
            Stmt::Lite(s) => s.execute(rusqlite::params_from_iter(vals)),
            Stmt::Pg(tx, sql) => tx.pg_execute(sql, &vals),
        }
    }

    pub fn query<P: Params>(&mut self, p: P) -> rusqlite::Result<Rows<'_>> {
        let vals = p.values()?;
        match self {
            Stmt::Lite(s) => Ok(Rows::Lite(s.query(rusqlite::params_from_iter(vals))?)),
            Stmt::Pg(tx, sql) => Ok(Rows::Pg(tx.pg_query(sql, &vals)?.into_iter(), None)),
        }
    }

    pub fn query_map<P: Params, T, F: FnMut(&Row<'_>) -> rusqlite::Result<T>>(
        &mut self,
        p: P,
        mut f: F,
    ) -> rusqlite::Result<std::vec::IntoIter<rusqlite::Result<T>>> {
        let mut rows = self.query(p)?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(f(&r));
        }
        Ok(out.into_iter())
    }
}

impl<'a> Tx<'a> {
    pub fn is_postgres(&self) -> bool {
        matches!(self, Tx::Pg(_))
    }

    pub fn execute<P: Params>(&self, sql: &str, p: P) -> rusqlite::Result<usize> {
        let vals = p.values()?;
        match self {
            Tx::Lite(t) => t.execute(sql, rusqlite::params_from_iter(vals)),
            Tx::Pg(_) => self.pg_execute(sql, &vals),
        }
    }

    fn pg_execute(&self, sql: &str, vals: &[Value]) -> rusqlite::Result<usize> {
        let Tx::Pg(t) = self else {
            return Err(rusqlite::Error::InvalidQuery);
        };
        let sql = pg::translate(sql);
        let params = pg::params(vals);
        let refs = pg::param_refs(&params);
        let n = t
            .borrow_mut()
            .execute(sql.as_str(), &refs)
            .map_err(pg::fault)?;
        Ok(n as usize)
    }

    pub fn execute_batch(&self, sql: &str) -> rusqlite::Result<()> {
        match self {
            Tx::Lite(t) => t.execute_batch(sql),
            Tx::Pg(t) => t.borrow_mut().batch_execute(sql).map_err(pg::fault),
        }
    }

    pub fn query_row<P: Params, T, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(
        &self,
        sql: &str,
        p: P,
        f: F,
    ) -> rusqlite::Result<T> {
        match self {
            Tx::Lite(t) => {
                let vals = p.values()?;
                t.query_row(sql, rusqlite::params_from_iter(vals), |r| f(&Row::Lite(r)))
            }
            Tx::Pg(_) => {
                let rows = self.pg_query(sql, &p.values()?)?;
                match rows.first() {
                    Some(r) => f(&Row::Pg(r)),
                    None => Err(rusqlite::Error::QueryReturnedNoRows),
                }
            }
        }
    }

    pub fn prepare<'t>(&'t self, sql: &str) -> rusqlite::Result<Stmt<'t, 'a>> {
        match self {
            Tx::Lite(t) => Ok(Stmt::Lite(t.prepare(sql)?)),
            Tx::Pg(_) => Ok(Stmt::Pg(self, sql.to_string())),
        }
    }

    /// The id the last `INSERT` generated (SQLite's rowid; PostgreSQL's `lastval()`, the
    /// identity column's sequence in this session).
    pub fn last_insert_rowid(&self) -> rusqlite::Result<i64> {
        match self {
            Tx::Lite(t) => Ok(t.last_insert_rowid()),
            Tx::Pg(t) => t
                .borrow_mut()
                .query_one("SELECT lastval()", &[])
                .and_then(|r| r.try_get::<_, i64>(0))
                .map_err(pg::fault),
        }
    }

    fn pg_query(&self, sql: &str, vals: &[Value]) -> rusqlite::Result<Vec<Vec<Value>>> {
        let Tx::Pg(t) = self else {
            return Err(rusqlite::Error::InvalidQuery);
        };
        let sql = pg::translate(sql);
        let params = pg::params(vals);
        let refs = pg::param_refs(&params);
        let rows = t
            .borrow_mut()
            .query(sql.as_str(), &refs)
            .map_err(pg::fault)?;
        rows.iter().map(pg::row_values).collect()
    }
}
