//! What both backends' errors share: a cause kept behind an `Arc` (cloneable, so one failed read
//! can answer every request waiting on it), and questions asked of a cause chain — was it TLS,
//! was the connection refused — by the types in it, never by its wording.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// `future`'s output, or the message it panicked with: a task that starts its work over (the CDC
/// worker's sessions) says a bug's panic and goes on, rather than dying without a word while
/// everything around it goes on as if it ran.
pub async fn caught<F: std::future::Future>(future: F) -> Result<F::Output, String> {
    use futures::FutureExt;
    std::panic::AssertUnwindSafe(future)
        .catch_unwind()
        .await
        .map_err(|panic| match panic.downcast::<String>() {
            Ok(message) => *message,
            Err(panic) => match panic.downcast::<&'static str>() {
                Ok(message) => (*message).to_owned(),
                Err(_) => "a panic without a message".to_owned(),
            },
        })
}

/// A cause, shared.
pub type Cause = Arc<dyn Error + Send + Sync + 'static>;

/// The error after `e` in its chain: an `std::io::Error`'s wrapped error, else `source()`.
fn step<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a (dyn Error + 'static)> {
    match e.downcast_ref::<std::io::Error>() {
        Some(io) => io
            .get_ref()
            .map(|inner| inner as &(dyn Error + 'static))
            .or_else(|| e.source()),
        None => e.source(),
    }
}

/// Every error in the chain that starts at `e`, `e` first.
pub fn chain<'a>(e: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    let mut next = Some(unshare(e));
    std::iter::from_fn(move || {
        let current = next?;
        next = step(current).map(unshare);
        Some(current)
    })
}

/// A shared cause (the redis driver keeps its I/O errors behind an `Arc`) stands for the error
/// it shares: the `Arc` itself is no type anyone asks about.
fn unshare<'a>(e: &'a (dyn Error + 'static)) -> &'a (dyn Error + 'static) {
    match e.downcast_ref::<Cause>() {
        Some(shared) => unshare(&**shared),
        None => e,
    }
}

/// Whether a TLS failure (a handshake refused, a certificate not trusted) is behind `e`.
pub fn is_tls(e: &(dyn Error + 'static)) -> bool {
    chain(e).any(|e| e.is::<rustls::Error>())
}

/// The I/O error kind behind `e`, if an I/O error is in its chain.
pub fn io_kind(e: &(dyn Error + 'static)) -> Option<std::io::ErrorKind> {
    chain(e).find_map(|e| e.downcast_ref::<std::io::Error>().map(std::io::Error::kind))
}

/// `e` and its causes, as one line: "error connecting to server: Connection refused (os error
/// 111)". Drivers often say only the outermost part ("error connecting to server").
pub fn with_causes(e: &(dyn Error + 'static)) -> String {
    let mut text = String::new();
    for (i, e) in chain(e).enumerate() {
        let part = e.to_string();
        // A wrapper that repeats its cause (io::Error's Display shows the wrapped error).
        if i > 0 && text.ends_with(&part) {
            continue;
        }
        if i > 0 {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// A message that is its own cause (for failures of cacheward's own making).
#[derive(Debug)]
pub struct Message(pub String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Error for Message {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_caught_with_its_message() {
        assert_eq!(caught(async { 7 }).await, Ok(7));
        let index = 9;
        let formatted = caught(async move { panic!("column {index}") }).await;
        assert_eq!(formatted, Err::<(), _>("column 9".to_owned()));
        let literal = caught(async { panic!("plain") }).await;
        assert_eq!(literal, Err::<(), _>("plain".to_owned()));
    }

    #[test]
    fn tls_and_io_kinds_are_found_behind_wrappers() {
        let tls = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(is_tls(&tls));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!is_tls(&refused));
        assert_eq!(
            io_kind(&refused),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        // A TLS failure whose wording says nothing of TLS is still one.
        assert!(!tls.to_string().contains("TLS"));
        let said = with_causes(&tls);
        assert!(said.contains("UnknownIssuer"), "{said}");
        assert!(!is_tls(&Message(
            "received fatal alert: TLS handshake".into()
        )));
    }
}
