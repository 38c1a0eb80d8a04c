//! Errors of the test environment.

use thiserror::Error;

/// Errors of the test environment.
#[derive(Debug, Error)]
pub enum TestEnvError {
    /// The build script failed.
    #[error("building the test environment's binaries failed: {0}")]
    Build(String),
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A process did not become ready in time, or exited.
    #[error("{name} did not become ready: {why}\n--- last lines of {log} ---\n{tail}")]
    NotReady {
        /// The process.
        name: String,
        /// Why.
        why: String,
        /// Its log file.
        log: String,
        /// The end of its log.
        tail: String,
    },
    /// A certificate could not be made.
    #[error("certificates: {0}")]
    Certs(#[from] rcgen::Error),
    /// Talking to the API server failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// Reading the kubeconfig failed.
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// The CRDs did not become Established in time.
    #[error("CRD {0} did not become Established within 60 s")]
    CrdNotEstablished(String),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestEnvError {
    let what = what.into();
    move |source| TestEnvError::Io { what, source }
}
