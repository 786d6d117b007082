//! TLS to the backends, with rustls (ring): libpq's `sslmode` / `sslrootcert` / `sslcert` /
//! `sslkey` for PostgreSQL, read out of `postgres.url` (tokio-postgres knows only some of them), and
//! the rustls configuration each mode means. Certificates that fail say which file and which host.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// Why a TLS setting cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// The one crypto provider (ring), also installed as the process default for the drivers that
/// build their own rustls configuration.
pub fn provider() -> Arc<CryptoProvider> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let _ = CryptoProvider::install_default((*provider).clone());
    provider
}

/// libpq's `sslmode` (`allow` is not offered: it prefers plaintext).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// TLS if the server offers it, the certificate not checked; plaintext otherwise (libpq's
    /// default).
    #[default]
    Prefer,
    /// TLS or nothing; the certificate checked only when `sslrootcert` is given (as verify-ca).
    Require,
    /// TLS, the chain checked against the roots, any host name.
    VerifyCa,
    /// TLS, the chain and the host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, TlsError> {
        Ok(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => return Err(TlsError(
                "sslmode=allow is not supported (it tries plaintext first): use prefer or stronger"
                    .into(),
            )),
            other => {
                return Err(TlsError(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                )))
            }
        })
    }

    /// What tokio-postgres is told: whether TLS is tried, and whether it is required.
    pub fn driver_mode(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Driver;
        match self {
            SslMode::Disable => Driver::Disable,
            SslMode::Prefer => Driver::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Driver::Require,
        }
    }
}

/// Where the roots a certificate is checked against come from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Roots {
    /// The system's (`sslrootcert` unset, or `system`).
    #[default]
    System,
    /// A PEM bundle.
    File(PathBuf),
}

impl fmt::Display for Roots {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Roots::System => f.write_str("the system's roots"),
            Roots::File(path) => write!(f, "the roots in {}", path.display()),
        }
    }
}

/// The TLS parameters of a PostgreSQL URL.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PgTls {
    pub mode: SslMode,
    pub roots: Roots,
    /// Whether `sslrootcert` was given (it makes `require` check the chain, as libpq does).
    pub roots_given: bool,
    /// A client certificate chain and its key (`sslcert`, `sslkey`).
    pub client: Option<(PathBuf, PathBuf)>,
}

const TLS_KEYS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

impl PgTls {
    /// Takes the TLS parameters out of a PostgreSQL URL (`postgres://…?sslmode=…`) or key=value
    /// connection string; returns the rest, for tokio-postgres, and what they ask for.
    pub fn split(url: &str) -> Result<(String, PgTls), TlsError> {
        let (rest, pairs) = match url.starts_with("postgres://") || url.starts_with("postgresql://")
        {
            true => split_url(url),
            false => split_key_values(url),
        };
        let mut tls = PgTls::default();
        let (mut cert, mut key) = (None, None);
        for (name, value) in pairs {
            match name.as_str() {
                "sslmode" => tls.mode = SslMode::parse(&value)?,
                "sslrootcert" => {
                    tls.roots_given = true;
                    tls.roots = match value.as_str() {
                        "system" => Roots::System,
                        path => Roots::File(PathBuf::from(path)),
                    };
                }
                "sslcert" => cert = Some(PathBuf::from(value)),
                _ => key = Some(PathBuf::from(value)),
            }
        }
        tls.client = match (cert, key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(TlsError(
                    "sslcert and sslkey go together: give both or neither".into(),
                ))
            }
        };
        if tls.roots_given && tls.roots == Roots::System && tls.mode != SslMode::VerifyFull {
            return Err(TlsError(
                "sslrootcert=system needs sslmode=verify-full (as in libpq)".into(),
            ));
        }
        Ok((rest, tls))
    }

    /// The rustls configuration this asks for (also built for `disable`: never used then).
    pub fn client_config(&self) -> Result<ClientConfig, TlsError> {
        let provider = provider();
        let check = match self.mode {
            SslMode::Disable | SslMode::Prefer => Check::Nothing,
            SslMode::Require if !self.roots_given => Check::Nothing,
            SslMode::Require | SslMode::VerifyCa => Check::Chain,
            SslMode::VerifyFull => Check::ChainAndName,
        };
        let verifier = Verifier::new(check, &self.roots, provider.clone())?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("tls: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        match &self.client {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let (chain, key_der) = client_identity(cert, key)?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    TlsError(format!(
                        "client certificate {} with key {}: {e}",
                        cert.display(),
                        key.display()
                    ))
                })
            }
        }
    }
}

/// A client certificate chain and its private key, read from PEM files.
pub fn client_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError(format!("client certificate {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(TlsError(format!(
            "client certificate {}: no certificate in it",
            cert.display()
        )));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError(format!("client key {}: {e}", key.display())))?;
    Ok((chain, key_der))
}

/// The roots `roots` names.
pub fn root_store(roots: &Roots) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                let why = found
                    .errors
                    .first()
                    .map_or("none found".to_owned(), |e| e.to_string());
                return Err(TlsError(format!(
                    "no system root certificates ({why}): give sslrootcert=FILE"
                )));
            }
        }
        Roots::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError(format!("sslrootcert {}: {e}", path.display())))?;
            for cert in certs {
                store
                    .add(cert)
                    .map_err(|e| TlsError(format!("sslrootcert {}: {e}", path.display())))?;
            }
            if store.is_empty() {
                return Err(TlsError(format!(
                    "sslrootcert {}: no certificate in it",
                    path.display()
                )));
            }
        }
    }
    Ok(store)
}

/// What a server certificate is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Nothing (libpq's prefer and require without roots): encryption without authentication.
    Nothing,
    /// Signed by the roots, whatever host name it carries (verify-ca).
    Chain,
    /// Signed by the roots and valid for the host connected to (verify-full).
    ChainAndName,
}

/// Checks a server certificate as `sslmode` says; a rejection names the roots and the host.
#[derive(Debug)]
struct Verifier {
    check: Check,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    roots: String,
    provider: Arc<CryptoProvider>,
}

impl Verifier {
    fn new(check: Check, roots: &Roots, provider: Arc<CryptoProvider>) -> Result<Self, TlsError> {
        let webpki = match check {
            Check::Nothing => None,
            Check::Chain | Check::ChainAndName => Some(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(root_store(roots)?),
                    provider.clone(),
                )
                .build()
                .map_err(|e| TlsError(format!("{roots}: {e}")))?,
            ),
        };
        Ok(Verifier {
            check,
            webpki,
            roots: roots.to_string(),
            provider,
        })
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Ok(verified) => Ok(verified),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.check == Check::Chain => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(rustls::Error::General(format!(
                "the certificate of {} was rejected against {}: {e}",
                server_name.to_str(),
                self.roots
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Splits `postgres://…?query`: the URL without the TLS parameters, and their decoded values.
fn split_url(url: &str) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), Vec::new());
    };
    let (mut kept, mut taken) = (Vec::new(), Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = crate::support::secrets::percent_decode(name);
        match TLS_KEYS.contains(&name.as_str()) {
            true => taken.push((name, crate::support::secrets::percent_decode(value))),
            false => kept.push(pair),
        }
    }
    let rest = match kept.is_empty() {
        true => base.to_owned(),
        false => format!("{base}?{}", kept.join("&")),
    };
    (rest, taken)
}

/// Splits a `key=value …` connection string (values may be 'quoted', with `\` escapes).
fn split_key_values(text: &str) -> (String, Vec<(String, String)>) {
    let (mut kept, mut taken) = (String::new(), Vec::new());
    let mut chars = text.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut name = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            name.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '=').is_some() {
            while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
            let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '\'' if quoted => break,
                    c if c.is_whitespace() && !quoted => break,
                    c => value.push(c),
                }
            }
        }
        let end = chars.peek().map_or(text.len(), |&(i, _)| i);
        match TLS_KEYS.contains(&name.as_str()) {
            true => taken.push((name, value)),
            false => {
                if !kept.is_empty() {
                    kept.push(' ');
                }
                kept.push_str(text[start..end].trim_end());
            }
        }
    }
    (kept, taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, tls) = PgTls::split(
            "postgres://u:p@db.example.com:5432/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20b.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://u:p@db.example.com:5432/app?application_name=x&connect_timeout=3"
        );
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.roots, Roots::File("/etc/ca b.pem".into()));
        let (rest, tls) = PgTls::split("postgresql://h/db?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), tls.mode),
            ("postgresql://h/db", SslMode::Require)
        );
        let (_, tls) = PgTls::split("postgres://h/db").unwrap();
        assert_eq!(
            tls,
            PgTls::default(),
            "libpq's default: prefer, system roots"
        );
    }

    #[test]
    fn key_value_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, tls) = PgTls::split(
            "host=db port=5432 sslmode = verify-ca sslrootcert='/a b/c\\'d.pem' password='x y' sslcert=/c.pem sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(rest, "host=db port=5432 password='x y'");
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.roots, Roots::File("/a b/c'd.pem".into()));
        assert_eq!(tls.client, Some(("/c.pem".into(), "/k.pem".into())));
        let parsed: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(parsed.get_password(), Some(&b"x y"[..]));
    }

    #[test]
    fn settings_libpq_refuses_are_refused_with_the_reason() {
        for (url, says) in [
            ("postgres://h/d?sslmode=allow", "sslmode=allow"),
            ("postgres://h/d?sslmode=verify_full", "sslmode=verify_full"),
            ("postgres://h/d?sslcert=/c.pem", "sslcert and sslkey"),
            (
                "postgres://h/d?sslmode=require&sslrootcert=system",
                "verify-full",
            ),
        ] {
            let e = PgTls::split(url).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
        let e = PgTls {
            mode: SslMode::VerifyFull,
            roots: Roots::File("/nonexistent/ca.pem".into()),
            roots_given: true,
            client: None,
        }
        .client_config()
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        for roots in [garbage.clone(), dir.path().join("missing.pem")] {
            let e = PgTls {
                mode: SslMode::VerifyCa,
                roots: Roots::File(roots.clone()),
                roots_given: true,
                client: None,
            }
            .client_config()
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("sslrootcert") && e.contains(&*roots.to_string_lossy()),
                "{e}"
            );
        }
    }
}
