//! `[tables.NAME]`: the tables cached besides `users`, each in a section of its own. What can be
//! checked without the database is checked here (names, prefixes, the projection's own
//! consistency); what needs the catalog (the table exists, the key is a unique key, the columns
//! are real, the capture is installed) is checked at start by `store::pg::tables`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::{at_least, invalid, ConfigError};

/// One declared table, as configured (`docs/reference.md`, "Declared tables").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// The table in PostgreSQL, optionally schema-qualified [the section's name, resolved by the
    /// search_path].
    #[serde(default)]
    pub source: Option<String>,
    /// The columns of its primary key or of a unique NOT NULL constraint.
    pub key: Vec<String>,
    /// More unique keys reads may use, by name.
    #[serde(default)]
    pub lookups: BTreeMap<String, Vec<String>>,
    /// The columns cached and served [every column]; exclusive with `exclude`.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Columns never cached nor served.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// [the section's name + ":"]
    #[serde(default)]
    pub key_prefix: Option<String>,
    /// [cache.ttl_secs]
    #[serde(default)]
    pub ttl_secs: Option<u64>,
    /// false: writes through the daemon answer `forbidden`.
    #[serde(default = "yes")]
    pub writable: bool,
}

fn yes() -> bool {
    true
}

/// The keys a `[tables.NAME]` section may have: what the loader's unknown-key check accepts.
pub const TABLE_KEYS: [&str; 8] = [
    "source",
    "key",
    "lookups",
    "columns",
    "exclude",
    "key_prefix",
    "ttl_secs",
    "writable",
];

/// The longest name a table or a lookup may have.
const NAME_MAX: usize = 32;

/// Whether `name` is a valid table or lookup name: `[a-z][a-z0-9_]{0,31}`.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && name.len() <= NAME_MAX
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl TableConfig {
    /// A section with `key` and every default (the section's name as source and prefix, every
    /// column, writable).
    pub fn keyed(key: &[&str]) -> TableConfig {
        TableConfig {
            source: None,
            key: key.iter().map(|c| c.to_string()).collect(),
            lookups: BTreeMap::new(),
            columns: None,
            exclude: Vec::new(),
            key_prefix: None,
            ttl_secs: None,
            writable: true,
        }
    }

    /// With the lookup `name` on `columns`.
    pub fn lookup(mut self, name: &str, columns: &[&str]) -> TableConfig {
        let columns = columns.iter().map(|c| c.to_string()).collect();
        self.lookups.insert(name.to_owned(), columns);
        self
    }

    /// The prefix of this table's keys in Redis.
    pub fn prefix(&self, name: &str) -> String {
        self.key_prefix
            .clone()
            .unwrap_or_else(|| format!("{name}:"))
    }

    /// The table in PostgreSQL as configured (`schema.table` or a name the search_path resolves).
    pub fn source(&self, name: &str) -> String {
        self.source.clone().unwrap_or_else(|| name.to_owned())
    }

    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let key = |field: &str| format!("tables.{name}.{field}");
        if !valid_name(name) {
            return Err(invalid(
                format!("tables.{name}"),
                "a table's name is a lowercase letter, then up to 31 lowercase letters, digits or _",
            ));
        }
        if name == "users" {
            return Err(invalid(
                "tables.users",
                "users is built in (configured by cache.*); give the section another name and \
                 source = \"users\" to cache a table of that name apart from it",
            ));
        }
        if let Some(source) = &self.source {
            let parts: Vec<&str> = source.split('.').collect();
            if parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
                return Err(invalid(
                    key("source"),
                    format!("{source:?} is not a table name or schema.table"),
                ));
            }
        }
        columns_list(&key("key"), &self.key)?;
        for (lookup, columns) in &self.lookups {
            if !valid_name(lookup) {
                return Err(invalid(
                    key("lookups"),
                    format!(
                        "{lookup:?}: a lookup's name is a lowercase letter, then up to 31 \
                         lowercase letters, digits or _"
                    ),
                ));
            }
            columns_list(&format!("tables.{name}.lookups.{lookup}"), columns)?;
            if columns == &self.key {
                return Err(invalid(
                    format!("tables.{name}.lookups.{lookup}"),
                    "is the table's key itself",
                ));
            }
        }
        let needed = self.key.iter().chain(self.lookups.values().flatten());
        match &self.columns {
            Some(_) if !self.exclude.is_empty() => {
                return Err(invalid(
                    key("exclude"),
                    "cannot be given with columns: name the columns to keep, or those to leave out",
                ))
            }
            Some(columns) => {
                columns_list(&key("columns"), columns)?;
                if let Some(missing) = needed.clone().find(|c| !columns.contains(c)) {
                    return Err(invalid(
                        key("columns"),
                        format!("must keep {missing:?}: a key or lookup column"),
                    ));
                }
            }
            None => {
                if !self.exclude.is_empty() {
                    columns_list(&key("exclude"), &self.exclude)?;
                }
                if let Some(kept) = needed.clone().find(|c| self.exclude.contains(c)) {
                    return Err(invalid(
                        key("exclude"),
                        format!("cannot leave out {kept:?}: a key or lookup column"),
                    ));
                }
            }
        }
        if let Some(prefix) = &self.key_prefix {
            if prefix.is_empty() || prefix.chars().any(char::is_control) {
                return Err(invalid(
                    key("key_prefix"),
                    "must not be empty nor hold control characters",
                ));
            }
        }
        if let Some(ttl) = self.ttl_secs {
            at_least(key("ttl_secs"), ttl, 1)?;
        }
        Ok(())
    }
}

/// A list of column names: not empty, no name twice, no empty name.
fn columns_list(key: &str, columns: &[String]) -> Result<(), ConfigError> {
    if columns.is_empty() {
        return Err(invalid(key.to_owned(), "must name at least one column"));
    }
    for (i, column) in columns.iter().enumerate() {
        if column.is_empty() || column.contains('\0') {
            return Err(invalid(
                key.to_owned(),
                format!("{column:?} is no column name"),
            ));
        }
        if columns[..i].contains(column) {
            return Err(invalid(key.to_owned(), format!("names {column:?} twice")));
        }
    }
    Ok(())
}

/// Checks every declared table, and that no two prefixes (the tables' and `users_prefix`)
/// overlap: one a prefix of another would make a key name two tables, and a TRUNCATE of one drop
/// the other's entries.
pub fn validate(
    tables: &BTreeMap<String, TableConfig>,
    users_prefix: &str,
) -> Result<(), ConfigError> {
    let mut prefixes: Vec<(String, String)> =
        vec![("cache.key_prefix".into(), users_prefix.into())];
    for (name, table) in tables {
        table.validate(name)?;
        let prefix = table.prefix(name);
        for (other, theirs) in &prefixes {
            if prefix.starts_with(theirs.as_str()) || theirs.starts_with(prefix.as_str()) {
                return Err(invalid(
                    format!("tables.{name}.key_prefix"),
                    format!("{prefix:?} overlaps {other}'s {theirs:?}: a key would name both"),
                ));
            }
        }
        prefixes.push((format!("tables.{name}"), prefix));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> TableConfig {
        config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("a table section")
    }

    fn check(tables: &[(&str, &str)]) -> Result<(), String> {
        let tables = tables
            .iter()
            .map(|(name, text)| (name.to_string(), table(text)))
            .collect();
        validate(&tables, "user:").map_err(|e| e.to_string())
    }

    #[test]
    fn a_full_section_is_accepted_with_its_defaults() {
        let t = table(r#"key = ["id"]"#);
        assert_eq!(t.prefix("accounts"), "accounts:");
        assert_eq!(t.source("accounts"), "accounts");
        assert!(t.writable);
        check(&[(
            "accounts",
            r#"source = "public.accounts"
               key = ["id"]
               lookups = { by_email = ["email"] }
               columns = ["id", "email", "plan"]
               key_prefix = "acct:"
               ttl_secs = 60
               writable = false"#,
        )])
        .unwrap();
    }

    #[test]
    fn every_failure_names_the_table_and_the_key() {
        let cases = [
            ("Accounts", r#"key = ["id"]"#, "tables.Accounts"),
            ("users", r#"key = ["id"]"#, "tables.users"),
            ("a", r#"key = []"#, "tables.a.key"),
            ("a", r#"key = ["id", "id"]"#, "tables.a.key"),
            (
                "a",
                r#"key = ["id"]
                     source = "x.y.z""#,
                "tables.a.source",
            ),
            (
                "a",
                r#"key = ["id"]
                     lookups = { "By" = ["e"] }"#,
                "tables.a.lookups",
            ),
            (
                "a",
                r#"key = ["id"]
                     lookups = { by_id = ["id"] }"#,
                "tables.a.lookups.by_id",
            ),
            (
                "a",
                r#"key = ["id"]
                     columns = ["e"]"#,
                "tables.a.columns",
            ),
            (
                "a",
                r#"key = ["id"]
                     lookups = { by_e = ["e"] }
                     columns = ["id"]"#,
                "tables.a.columns",
            ),
            (
                "a",
                r#"key = ["id"]
                     exclude = ["id"]"#,
                "tables.a.exclude",
            ),
            (
                "a",
                r#"key = ["id"]
                     columns = ["id"]
                     exclude = ["x"]"#,
                "tables.a.exclude",
            ),
            (
                "a",
                r#"key = ["id"]
                     key_prefix = """#,
                "tables.a.key_prefix",
            ),
            (
                "a",
                r#"key = ["id"]
                     ttl_secs = 0"#,
                "tables.a.ttl_secs",
            ),
            (
                "a",
                r#"key = ["id"]
                     key_prefix = "user:x""#,
                "tables.a.key_prefix",
            ),
            (
                "a",
                r#"key = ["id"]
                     key_prefix = "us""#,
                "tables.a.key_prefix",
            ),
        ];
        for (name, text, key) in cases {
            let error = check(&[(name, text)]).expect_err(text);
            assert!(error.contains(&format!("`{key}`")), "{text}: {error}");
        }
    }

    #[test]
    fn prefixes_of_two_tables_may_not_overlap() {
        let error = check(&[
            (
                "a",
                r#"key = ["id"]
                     key_prefix = "acc:""#,
            ),
            (
                "b",
                r#"key = ["id"]
                     key_prefix = "acc:x""#,
            ),
        ])
        .unwrap_err();
        assert!(
            error.contains("`tables.b.key_prefix`") && error.contains("tables.a"),
            "{error}"
        );
        check(&[("a", r#"key = ["id"]"#), ("ab", r#"key = ["id"]"#)]).unwrap();
    }
}
