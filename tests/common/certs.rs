//! A test CA made at test time, and the certificates it signs: a server certificate for
//! `localhost` / 127.0.0.1 and a client certificate, written as PEM files into a directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use cacheward::dev::ServerTls;

/// A CA and the files it wrote.
pub struct TestCa {
    cert: Certificate,
    key: KeyPair,
    /// The CA certificate (PEM).
    pub ca_file: PathBuf,
    dir: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `dir/name.ca.pem`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("cacheward test CA {name}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("self-signed ca");
        let ca_file = dir.join(format!("{name}.ca.pem"));
        std::fs::write(&ca_file, cert.pem()).expect("write ca");
        TestCa {
            cert,
            key,
            ca_file,
            dir: dir.to_owned(),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by this CA: (cert, key) files.
    pub fn issue(&self, file: &str, names: &[&str], client: bool) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match client {
            true => ExtendedKeyUsagePurpose::ClientAuth,
            false => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("signed");
        let (cert_file, key_file) = (
            self.dir.join(format!("{file}.pem")),
            self.dir.join(format!("{file}.key")),
        );
        std::fs::write(&cert_file, cert.pem()).expect("write cert");
        std::fs::write(&key_file, key.serialize_pem()).expect("write key");
        (cert_file, key_file)
    }

    /// A server certificate for localhost and 127.0.0.1; clients must chain to `client_ca` if
    /// one is given.
    pub fn server(&self, file: &str, client_ca: Option<&TestCa>) -> ServerTls {
        let (cert, key) = self.issue(file, &["localhost", "127.0.0.1"], false);
        ServerTls {
            cert,
            key,
            client_ca: client_ca.map(|ca| ca.ca_file.clone()),
        }
    }
}
