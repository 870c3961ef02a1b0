//! Certificates made by the test that uses them: a CA of its own, a server
//! certificate it signed (for `localhost` and `127.0.0.1`), a client
//! certificate, and the broken ones a start must refuse (expired, a key that
//! does not match). No key is committed: each `Certs` lives in a temporary
//! directory removed when it is dropped.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A directory of PEM files: `ca.pem`, `server.pem` + `server.key`,
/// `client.pem` + `client.key`, `expired.pem` + `expired.key`,
/// `self.pem` + `self.key` (self-signed), and `other.key` (a key that
/// matches no certificate here).
pub struct Certs {
    dir: PathBuf,
}

impl Certs {
    /// Makes a fresh CA and everything it signs.
    pub fn new() -> Certs {
        let dir = std::env::temp_dir().join(format!(
            "threadchat-certs-{}-{}",
            std::process::id(),
            super::free_port()
        ));
        fs::create_dir_all(&dir).unwrap();

        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "threadchat test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        fs::write(dir.join("ca.pem"), ca.pem()).unwrap();

        let leaf = |name: &str, purpose: ExtendedKeyUsagePurpose, expired: bool| {
            let mut params =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                    .unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![purpose];
            if expired {
                params.not_before = rcgen::date_time_ymd(2020, 1, 1);
                params.not_after = rcgen::date_time_ymd(2021, 1, 1);
            }
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &ca).unwrap();
            fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        };
        leaf("server", ExtendedKeyUsagePurpose::ServerAuth, false);
        leaf("client", ExtendedKeyUsagePurpose::ClientAuth, false);
        leaf("expired", ExtendedKeyUsagePurpose::ServerAuth, true);
        // One that signed itself, as `openssl req -x509` makes.
        let mut own = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        own.distinguished_name.push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().unwrap();
        fs::write(dir.join("self.pem"), own.self_signed(&key).unwrap().pem()).unwrap();
        fs::write(dir.join("self.key"), key.serialize_pem()).unwrap();
        fs::write(
            dir.join("other.key"),
            KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        Certs { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file in the directory, as a string for a command line.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    pub fn ca(&self) -> String {
        self.path("ca.pem")
    }

    /// The server's options for its certificate and key.
    pub fn server_args(&self) -> [String; 4] {
        [
            "--tls-cert".into(),
            self.path("server.pem"),
            "--tls-key".into(),
            self.path("server.key"),
        ]
    }

    /// The CA as PEM, for a rustls client's root store.
    pub fn ca_pem(&self) -> Vec<u8> {
        fs::read(self.dir.join("ca.pem")).unwrap()
    }

    /// Replaces the server's certificate and key with a new pair from a new
    /// CA of its own (written to `ca2.pem`), as an operator renewing it
    /// would; used to check a reload.
    pub fn renew_server(&self) {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "threadchat test CA 2");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        fs::write(self.dir.join("ca2.pem"), ca.pem()).unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "server");
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        fs::write(self.dir.join("server.pem"), cert.pem()).unwrap();
        fs::write(self.dir.join("server.key"), key.serialize_pem()).unwrap();
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
