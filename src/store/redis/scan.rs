//! Walking what is cached: a SCAN over every primary (never KEYS), and what a key holds as
//! `verify` and the consistency checker look at it.

use super::error::{decode, CacheError};
use super::keys::Primary;
use super::routing::Router;
use crate::model::key::{Key, TableId};

/// Which primaries a [`Scan`] walks.
type Keep<'a> = Box<dyn Fn(&Primary) -> bool + Send + Sync + 'a>;

/// A SCAN over every primary, page by page (see [`Router::scan`]), of one table's keys.
pub struct Scan<'a> {
    router: &'a Router,
    table: TableId,
    pattern: String,
    /// The primaries not walked yet (asked for at the first page).
    primaries: Option<std::vec::IntoIter<Primary>>,
    /// The primary being walked and the cursor to go on from.
    at: Option<(Primary, u64)>,
    /// Which primaries to walk (all when `None`).
    only: Option<Keep<'a>>,
}

impl<'a> Scan<'a> {
    /// Walks only the primaries `keep` names (a drop of some slots need not reach the others,
    /// one of which may be down).
    pub fn only(mut self, keep: impl Fn(&Primary) -> bool + Send + Sync + 'a) -> Scan<'a> {
        self.only = Some(Box::new(keep));
        self
    }
}

impl Scan<'_> {
    /// The entries' keys of the next page (perhaps none), or `None` once every primary was
    /// walked.
    pub async fn next_page(&mut self) -> Result<Option<Vec<Key>>, CacheError> {
        let router = self.router;
        if self.primaries.is_none() {
            self.primaries = Some(router.primaries().await?.into_iter());
        }
        let (primary, cursor) = loop {
            if let Some(at) = self.at.take() {
                break at;
            }
            match self.primaries.as_mut().and_then(Iterator::next) {
                Some(p)
                    if p.anchor(&router.keys).is_some()
                        && self.only.as_ref().is_none_or(|keep| keep(&p)) =>
                {
                    break (p, 0)
                }
                Some(_) => continue,
                None => return Ok(None),
            }
        };
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let value = router.on_one(&primary, &scan).await?;
        // As bytes: a key under the prefix that is not UTF-8 (another program's) is passed over,
        // not an error that stops the walk.
        let (next, keys): (u64, Vec<Vec<u8>>) = decode(value)?;
        if next != 0 {
            self.at = Some((primary, next));
        }
        Ok(Some(
            keys.iter()
                .filter_map(|k| router.keys.key_of(k))
                .filter(|key| key.table() == self.table)
                .collect(),
        ))
    }
}

/// What a key holds, as `verify` looks at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Missing,
    String(String),
    /// A hash, a list, a set…: not cacheward's.
    Other,
}

/// Keys asked for per SCAN step.
const SCAN_COUNT: usize = 1000;

/// Escapes Redis glob metacharacters so that a prefix matches only itself.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Router {
    /// A walk over every key under users' prefix with SCAN, on every primary.
    pub fn scan(&self) -> Scan<'_> {
        self.scan_table(TableId::USERS)
    }

    /// A walk over every key under `table`'s prefix.
    pub fn scan_table(&self, table: TableId) -> Scan<'_> {
        Scan {
            router: self,
            table,
            pattern: format!("{}*", glob_escape(self.keys.prefix_of(table))),
            primaries: None,
            at: None,
            only: None,
        }
    }

    /// Whether any key exists under the prefix.
    pub async fn any_entry(&self) -> Result<bool, CacheError> {
        let mut scan = self.scan();
        while let Some(names) = scan.next_page().await? {
            if !names.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// What is stored at the Redis keys of `entries`: strings as they are (live entries,
    /// tombstones, foreign strings), and whether a key holds another type.
    pub async fn get_raw(&self, entries: &[Key]) -> Result<Vec<Stored>, CacheError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = entries.iter().map(|k| self.keys.entry(k)).collect();
        let mut conn = self.conn.clone();
        // One MGET; a Cluster connection splits it by slot.
        let values: Vec<Option<String>> = self
            .bulk(redis::cmd("MGET").arg(&keys).query_async(&mut conn))
            .await?;
        // MGET answers nil for a key of another type: ask those keys their type.
        let absent: Vec<usize> = (0..keys.len()).filter(|&i| values[i].is_none()).collect();
        let types = futures::future::join_all(absent.iter().map(|&i| {
            let mut conn = self.conn.clone();
            let key = &keys[i];
            async move {
                self.bounded(redis::cmd("TYPE").arg(key).query_async::<String>(&mut conn))
                    .await
            }
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<String>, _>>()?;
        let mut types = absent.into_iter().zip(types).peekable();
        Ok(values
            .into_iter()
            .enumerate()
            .map(|(i, value)| match value {
                Some(text) => Stored::String(text),
                None => match types.next_if(|(at, _)| *at == i) {
                    Some((_, kind)) if kind != "none" && kind != "string" => Stored::Other,
                    _ => Stored::Missing,
                },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_metacharacters_are_escaped() {
        assert_eq!(glob_escape("user:"), "user:");
        assert_eq!(glob_escape("a*b?[c]"), "a\\*b\\?\\[c\\]");
    }
}
