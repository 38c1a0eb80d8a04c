//! Certificates of the test environment (rcgen): a CA, the API server's serving certificate, an
//! admin client certificate in group system:masters, and the service-account signing key.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::error::{TestEnvError, io};

/// Paths of the written PKI files.
#[derive(Clone, Debug)]
pub(crate) struct Pki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    /// A kubelet's client certificate (`system:node:<name>` in `system:nodes`), when asked for.
    pub kubelet: Option<(PathBuf, PathBuf)>,
}

/// A self-signed CA named `cn`: its certificate and the issuer that signs with it.
fn new_ca(cn: &str) -> Result<(rcgen::Certificate, Issuer<'static, KeyPair>), TestEnvError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, cn);
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    Ok((ca_cert, Issuer::new(ca_params, ca_key)))
}

/// The PKI; the API server's certificate is also valid for `extra_sans` (a node IP, the `kubernetes`
/// Service's address and names), and `node` gets a kubelet client certificate.
pub(crate) fn write_pki(dir: &Path, extra_sans: &[String], node: Option<&str>) -> Result<Pki, TestEnvError> {
    std::fs::create_dir_all(dir).map_err(io("creating pki/"))?;
    let (ca_cert, issuer) = new_ca("peat-testenv-ca")?;

    let serving_key = KeyPair::generate()?;
    let mut sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    sans.extend(extra_sans.iter().cloned());
    let mut serving = CertificateParams::new(sans)?;
    serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    let serving_cert = serving.signed_by(&serving_key, &issuer)?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name.push(DnType::CommonName, "peat-testenv-admin");
    admin.distinguished_name.push(DnType::OrganizationName, "system:masters");
    let admin_cert = admin.signed_by(&admin_key, &issuer)?;

    let sa_key = KeyPair::generate()?;

    let pki = Pki {
        dir: dir.to_path_buf(),
        ca_cert: dir.join("ca.crt"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        admin_cert: dir.join("admin.crt"),
        admin_key: dir.join("admin.key"),
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
        kubelet: node.map(|_| (dir.join("kubelet.crt"), dir.join("kubelet.key"))),
    };
    let write = |p: &Path, s: String| std::fs::write(p, s).map_err(io(format!("writing {}", p.display())));
    write(&pki.ca_cert, ca_cert.pem())?;
    write(&pki.serving_cert, serving_cert.pem())?;
    write(&pki.serving_key, serving_key.serialize_pem())?;
    write(&pki.admin_cert, admin_cert.pem())?;
    write(&pki.admin_key, admin_key.serialize_pem())?;
    write(&pki.sa_key, sa_key.serialize_pem())?;
    // kube-apiserver reads public keys from PKIX PEM, not from a PKCS#8 private key.
    write(&pki.sa_pub, sa_key.public_key_pem())?;
    if let (Some(node), Some((cert, key))) = (node, &pki.kubelet) {
        // What the Node authorizer and NodeRestriction admission know a kubelet by.
        let kubelet_key = KeyPair::generate()?;
        let mut kubelet = CertificateParams::new(Vec::<String>::new())?;
        kubelet.distinguished_name.push(DnType::CommonName, format!("system:node:{node}"));
        kubelet.distinguished_name.push(DnType::OrganizationName, "system:nodes");
        write(cert, kubelet.signed_by(&kubelet_key, &issuer)?.pem())?;
        write(key, kubelet_key.serialize_pem())?;
    }
    Ok(pki)
}

pub(crate) fn write_kubeconfig(path: &Path, server: &str, pki: &Pki) -> Result<(), TestEnvError> {
    write_kubeconfig_for(path, server, &pki.ca_cert, &pki.admin_cert, &pki.admin_key)
}

/// A kubeconfig for `server` with the client certificate `cert`/`key`.
pub(crate) fn write_kubeconfig_for(
    path: &Path,
    server: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<(), TestEnvError> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: peat-testenv\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- name: peat-testenv\n  context:\n    cluster: peat-testenv\n    user: admin\n    namespace: default\ncurrent-context: peat-testenv\n",
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    );
    std::fs::write(path, text).map_err(io("writing the kubeconfig"))
}

/// A CA of its own and a serving certificate for 127.0.0.1 and localhost signed by it, for a TLS
/// registry: returns the CA's PEM and the certificate and key paths.
pub(crate) fn write_registry_tls(dir: &Path) -> Result<(String, PathBuf, PathBuf), TestEnvError> {
    std::fs::create_dir_all(dir).map_err(io("creating tls/"))?;
    let (ca_cert, issuer) = new_ca("peat-test-registry-ca")?;
    let key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    serving.distinguished_name.push(DnType::CommonName, "peat-test-registry");
    let cert = serving.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = (dir.join("registry.crt"), dir.join("registry.key"));
    std::fs::write(&cert_path, cert.pem()).map_err(io("writing the registry certificate"))?;
    std::fs::write(&key_path, key.serialize_pem()).map_err(io("writing the registry key"))?;
    Ok((ca_cert.pem(), cert_path, key_path))
}
