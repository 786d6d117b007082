//! Secrets never reach a log line or a command's output. Two layers: every text that may hold a
//! connection string is redacted by reading it the way the drivers do ([`redact_text`]), and every
//! password cacheward knows of (from its URLs and DSNs, raw and percent-decoded, and as the drivers
//! parse them) is replaced wherever it appears in what is logged or printed ([`scrub`], and the
//! log writer [`ScrubbingStderr`]).

use std::borrow::Cow;
use std::io::Write;
use std::sync::RwLock;

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// Passwords shorter than this are not searched for in free text (every `a` in a log line would
/// go); they are still redacted wherever they stand in a URL or DSN.
const MIN_SCRUBBED_LEN: usize = 4;

/// The passwords known to this process.
static KNOWN: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Remembers the passwords in `texts` (connection URLs or DSNs, as configured) so that [`scrub`]
/// removes them from anything logged or printed.
pub fn register<'a>(texts: impl IntoIterator<Item = &'a str>) {
    let mut found = Vec::new();
    for text in texts {
        found.extend(passwords_in(text));
    }
    remember(found);
}

/// Remembers one password (read from a password file) so that [`scrub`] removes it.
pub fn register_password(password: &str) {
    remember(vec![password.to_owned()]);
}

/// The largest password file read.
const MAX_PASSWORD_FILE: u64 = 64 * 1024;

/// Reads a password file: its one line, a trailing newline ignored. The password is remembered
/// for [`scrub`]; an error names the file, never the content.
pub fn read_password_file(path: &std::path::Path) -> Result<String, String> {
    // Only a regular file (a symlink to one, as Kubernetes mounts secrets): reading a FIFO would
    // wait for a writer, and a device never ends.
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    if meta.len() > MAX_PASSWORD_FILE {
        return Err(format!(
            "{}: {} bytes, more than a password ({MAX_PASSWORD_FILE} at most)",
            path.display(),
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let password = text
        .strip_suffix('\n')
        .map(|p| p.strip_suffix('\r').unwrap_or(p))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(format!("{}: the file is empty", path.display()));
    }
    if password.contains('\n') {
        return Err(format!(
            "{}: more than one line (the password is the file's one line)",
            path.display()
        ));
    }
    register_password(password);
    Ok(password.to_owned())
}

/// A password file (`postgres.password_file`, `redis.password_file`), read afresh for every new
/// connection, so that a rotated secret needs no restart. While the file cannot be read (a
/// rotation in progress), the password read last from it stays in use, with a warning.
#[derive(Clone)]
pub struct PasswordFile {
    /// The configuration key that names it.
    key: &'static str,
    path: std::path::PathBuf,
    /// The password read last, and the warnings about the file: one per file in the process,
    /// whoever reads it.
    last: std::sync::Arc<std::sync::Mutex<LastRead>>,
}

/// What one password file's readers share.
#[derive(Default)]
struct LastRead {
    password: Option<String>,
    /// When `… unreadable; the last password read is used` was last said, and how many went
    /// unsaid since (said at most every [`WARN_EVERY`]: a connection is made every 250 ms while a
    /// backend is down).
    warned: Option<std::time::Instant>,
    unsaid: u64,
    /// Whether the password's trailing whitespace was said (once).
    trailing_said: bool,
}

/// How often an unreadable password file is said at most.
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl PasswordFile {
    pub fn new(key: &'static str, path: &std::path::Path) -> PasswordFile {
        type Last = std::sync::Arc<std::sync::Mutex<LastRead>>;
        static READ: std::sync::Mutex<Vec<(std::path::PathBuf, Last)>> =
            std::sync::Mutex::new(Vec::new());
        let mut read = READ.lock().expect("password files lock is never poisoned");
        let last = match read.iter().find(|(p, _)| p == path) {
            Some((_, last)) => last.clone(),
            None => {
                let last = Last::default();
                read.push((path.to_owned(), last.clone()));
                last
            }
        };
        PasswordFile {
            key,
            path: path.to_owned(),
            last,
        }
    }

    /// The password in the file now; while it cannot be read, the one read last (said in a
    /// warning); an error, naming the key and the file, when none was ever read.
    pub fn read(&self) -> Result<String, String> {
        let mut last = self.last.lock().expect("password lock is never poisoned");
        match read_password_file(&self.path) {
            Ok(password) => {
                if password.ends_with(char::is_whitespace) && !last.trailing_said {
                    last.trailing_said = true;
                    tracing::warn!(
                        key = self.key,
                        "password file's line ends with whitespace, which is part of the password"
                    );
                }
                last.password = Some(password.clone());
                last.warned = None;
                Ok(password)
            }
            Err(e) => match last.password.clone() {
                Some(password) => {
                    if last.warned.is_some_and(|at| at.elapsed() < WARN_EVERY) {
                        last.unsaid += 1;
                        return Ok(password);
                    }
                    let suppressed = std::mem::take(&mut last.unsaid);
                    last.warned = Some(std::time::Instant::now());
                    match self.key {
                        "redis.password_file" => tracing::warn!(
                            error = %e,
                            suppressed,
                            "redis.password_file unreadable; the last password read is used"
                        ),
                        "resp.password_file" => tracing::warn!(
                            error = %e,
                            suppressed,
                            "resp.password_file unreadable; the last password read is used"
                        ),
                        _ => tracing::warn!(
                            error = %e,
                            suppressed,
                            "postgres.password_file unreadable; the last password read is used"
                        ),
                    }
                    Ok(password)
                }
                None => Err(format!("{} {e}", self.key)),
            },
        }
    }
}

fn remember(mut found: Vec<String>) {
    // As JSON logs and Debug formatting escape them.
    let escaped: Vec<String> = found
        .iter()
        .flat_map(|s| {
            let json = serde_json::to_string(s).expect("a string serializes");
            let debug = format!("{s:?}");
            [
                json[1..json.len() - 1].to_owned(),
                debug[1..debug.len() - 1].to_owned(),
            ]
        })
        .collect();
    found.extend(escaped);
    let mut known = KNOWN.write().expect("secrets lock is never poisoned");
    for secret in found {
        if secret.len() >= MIN_SCRUBBED_LEN && !known.contains(&secret) {
            known.push(secret);
        }
    }
    // Longest first, so that a secret containing another is replaced whole.
    known.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `text` with every connection-string password redacted and every known password masked.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let mut out = redact_text(text);
    let known = KNOWN.read().expect("secrets lock is never poisoned");
    for secret in known.iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), MASK));
        }
    }
    out
}

/// Every form a password in `text` may take in an error or a log line: as written, percent-decoded,
/// and as the PostgreSQL and Redis drivers parse it.
fn passwords_in(text: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    for (start, end) in password_spans(text) {
        let raw = &text[start..end];
        let raw = raw.trim_matches('\'');
        found.push(raw.to_owned());
        found.push(percent_decode(raw));
    }
    if let Ok(pg) = text.parse::<tokio_postgres::Config>() {
        if let Some(password) = pg.get_password() {
            found.push(String::from_utf8_lossy(password).into_owned());
        }
    }
    if let Ok(info) = redis::IntoConnectionInfo::into_connection_info(text) {
        if let Some(password) = info.redis_settings().password() {
            found.push(password.to_owned());
        }
    }
    found.retain(|s| !s.is_empty());
    found
}

/// Replaces the passwords of every connection string in `text` by [`MASK`].
pub fn redact_text(text: &str) -> Cow<'_, str> {
    let spans = password_spans(text);
    if spans.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end) in spans {
        if start < at {
            continue;
        }
        out.push_str(&text[at..start]);
        out.push_str(MASK);
        at = end;
    }
    out.push_str(&text[at..]);
    Cow::Owned(out)
}

/// Byte ranges of the passwords in `text`, in order, not overlapping:
/// - `scheme://user:PASSWORD@host`, where the userinfo ends at the first `@` (as tokio-postgres
///   reads it: the password may hold `/`, `?`, `#`) or at the last `@` before the path (as the
///   `url` crate behind redis-rs reads it: it may hold `@`), whichever reaches further;
/// - `password=VALUE` / `pass=VALUE` in a URL query or a libpq key=value DSN, `VALUE` quoted
///   (`'...'` with `\'` escapes) or up to the next `&`, space or end.
fn password_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let bytes = text.as_bytes();
    let mut search = 0;
    while let Some(found) = text[search..].find("://") {
        let rest = search + found + 3;
        // The URL ends where free text would end it: white space, a quote, a backslash (an
        // escaped quote in a JSON log line), or the next URL.
        let token = &text[rest..];
        let token_end = token
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | '<' | '>' | '`'))
            .unwrap_or(token.len());
        let token_end = token[..token_end].find("://").unwrap_or(token_end);
        let tail = &token[..token_end];
        // The authority as the url crate sees it: up to the first '/', '?' or '#'.
        let authority_end = tail.find(['/', '?', '#']).unwrap_or(tail.len());
        let last_at_in_authority = tail[..authority_end].rfind('@');
        // The userinfo as tokio-postgres sees it: up to the first '@'.
        let first_at = tail.find('@');
        let userinfo_end = match (first_at, last_at_in_authority) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if let Some(end) = userinfo_end {
            if let Some(colon) = tail[..end].find(':') {
                spans.push((rest + colon + 1, rest + end));
            }
        }
        search = rest;
    }
    // key=value pairs.
    let lower = text.to_ascii_lowercase();
    for key in ["password", "pass"] {
        let mut from = 0;
        while let Some(found) = lower[from..].find(key) {
            let key_start = from + found;
            let mut i = key_start + key.len();
            from = i;
            let boundary = key_start == 0
                || matches!(
                    bytes[key_start - 1],
                    b'?' | b'&' | b' ' | b'\t' | b'\n' | b'"'
                );
            if !boundary {
                continue;
            }
            while i < bytes.len() && bytes[i] == b' ' {
                i += 1;
            }
            if i >= bytes.len() || bytes[i] != b'=' {
                continue;
            }
            i += 1;
            while i < bytes.len() && bytes[i] == b' ' {
                i += 1;
            }
            let start = i;
            if i < bytes.len() && bytes[i] == b'\'' {
                i += 1;
                while i < bytes.len() && bytes[i] != b'\'' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i = (i + 1).min(bytes.len());
            } else {
                while i < bytes.len() && !matches!(bytes[i], b'&' | b' ' | b'\t' | b'\n' | b'"') {
                    i += 1;
                }
            }
            if i > start {
                spans.push((start, i));
            }
        }
    }
    spans.sort_unstable();
    // Merge overlaps.
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// `text` with its `%XX` escapes decoded (as URLs carry passwords and paths).
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Standard error with every line scrubbed: the writer of the logger. tracing-subscriber writes an
/// event in one call, so a secret is never split between two writes.
pub struct ScrubbingStderr;

impl Write for ScrubbingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_that_is_no_regular_file_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let e = read_password_file(&fifo).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let big = dir.path().join("big");
        std::fs::write(&big, "x".repeat(100_000)).unwrap();
        assert!(read_password_file(&big)
            .unwrap_err()
            .contains("more than a password"));
    }

    #[test]
    fn an_unreadable_password_file_is_said_at_most_every_ten_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "rotating-secret \n").unwrap();
        let file = PasswordFile::new("redis.password_file", &path);
        let said = crate::support::captured::logs(|| {
            assert_eq!(file.read().unwrap(), "rotating-secret ");
            std::fs::remove_file(&path).unwrap();
            for _ in 0..40 {
                assert_eq!(file.read().unwrap(), "rotating-secret ");
            }
        });
        assert_eq!(
            said.matches("unreadable; the last password read is used")
                .count(),
            1,
            "{said}"
        );
        assert_eq!(said.matches("ends with whitespace").count(), 1, "{said}");
    }

    #[test]
    fn a_password_file_is_its_one_line_and_is_scrubbed_from_then_on() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "rotated-Secret-1\r\n").unwrap();
        assert_eq!(read_password_file(&file).unwrap(), "rotated-Secret-1");
        assert_eq!(
            scrub("auth with rotated-Secret-1 failed"),
            "auth with *** failed"
        );
        std::fs::write(&file, "").unwrap();
        assert!(read_password_file(&file).unwrap_err().contains("empty"));
        std::fs::write(&file, "a\nb\n").unwrap();
        assert!(read_password_file(&file).unwrap_err().contains("one line"));
        let missing = dir.path().join("nope");
        let e = read_password_file(&missing).unwrap_err();
        assert!(e.contains("nope"), "{e}");
    }

    /// Every form a password may take in a connection string, with the password each hides (raw,
    /// and what a driver decodes it to).
    const FORMS: &[(&str, &[&str])] = &[
        ("postgresql://app:S3cr/t?x#y@db:5432/app", &["S3cr/t?x#y"]),
        (
            "postgresql://app:p%40ss%2Fw0rd@db/app",
            &["p%40ss%2Fw0rd", "p@ss/w0rd"],
        ),
        (
            "postgres://app:plain-secret@db/app?sslmode=require",
            &["plain-secret"],
        ),
        (
            "postgresql://app@db/app?password=QuerySecret&sslmode=require",
            &["QuerySecret"],
        ),
        (
            "host=db user=app password=DsnSecret dbname=app",
            &["DsnSecret"],
        ),
        (
            r"host=db password='Quoted Secret\' x' user=app",
            &[r"Quoted Secret\' x", "Quoted Secret' x"],
        ),
        ("redis://:RedisSecret@cache:6379/0", &["RedisSecret"]),
        ("rediss://svc:AclSecret@cache:6380/2", &["AclSecret"]),
        ("redis://svc:At@Sign@cache:6379", &["At@Sign"]),
        (
            "redis+unix:///run/redis.sock?db=1&pass=UnixSecret",
            &["UnixSecret"],
        ),
    ];

    #[test]
    fn every_form_is_redacted_and_scrubbed() {
        for (form, secrets) in FORMS {
            let redacted = redact_text(form);
            let embedded = format!("error connecting with {form}: refused");
            register([*form]);
            let scrubbed = scrub(&embedded);
            for secret in *secrets {
                assert!(!redacted.contains(secret), "{form} -> {redacted}");
                assert!(!scrubbed.contains(secret), "{form} -> {scrubbed}");
            }
            assert!(redacted.contains(MASK), "{form} -> {redacted}");
        }
        // A password that appears on its own (a driver echoing it) is masked once known.
        register(["postgresql://app:Echoed%21Secret@db/app"]);
        assert_eq!(
            scrub("auth failed for Echoed!Secret"),
            "auth failed for ***"
        );
    }

    #[test]
    fn hosts_users_and_other_parameters_stay_readable() {
        assert_eq!(
            redact_text("postgresql://app:pw@db:5432/users?sslmode=require"),
            "postgresql://app:***@db:5432/users?sslmode=require"
        );
        assert_eq!(redact_text("redis://cache:6379/2"), "redis://cache:6379/2");
        assert_eq!(
            redact_text("host=db password=x user=app"),
            "host=db password=*** user=app"
        );
        assert_eq!(redact_text("passwords are fine"), "passwords are fine");
        assert_eq!(redact_text("compass=north"), "compass=north");
        // A URL without a password, then other text with an '@' further on: nothing to redact.
        let line = r#"{"redis":"redis+unix:///run/r.sock?db=3","key_prefix":"user:","url":"postgresql://postgres@localhost/cw"}"#;
        assert_eq!(redact_text(line), line);
        let json = r#"{"url":"postgresql://app:pw@db/app","next":"a:b@c"}"#;
        assert_eq!(
            redact_text(json),
            r#"{"url":"postgresql://app:***@db/app","next":"a:b@c"}"#
        );
    }
}
