//! Connecting to etcd with the resolved settings, every call bounded in time.

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::config::{ConfigError, EtcdSettings};

/// How long one etcd request (or connection attempt) may take before kvcheck gives up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum KvstoreError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("reading {what} {path}: {source}")]
    TlsFile {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("insecure-skip-tls-verify is set, but kvcheck always verifies etcd's certificate: give trusted-ca-file (ETCDCTL_CACERT, --etcd-cacert)")]
    SkipVerifyUnsupported,
    #[error("etcd at {endpoints}: {operation}: {message}")]
    Etcd {
        endpoints: String,
        operation: String,
        message: String,
    },
    #[error("{status}: no etcd endpoint answered ({reasons})")]
    NoneAnswered { status: String, reasons: String },
    #[error("etcd at {endpoints}: {operation}: no answer within {timeout:?}")]
    Timeout {
        endpoints: String,
        operation: String,
        timeout: Duration,
    },
}

/// A connected client plus what is needed to say where it points in errors.
#[derive(Clone)]
pub struct Etcd {
    pub client: Client,
    pub endpoints: Vec<String>,
    pub timeout: Duration,
}

fn tls_options(s: &EtcdSettings) -> Result<Option<TlsOptions>, KvstoreError> {
    if !s.uses_tls() {
        return Ok(None);
    }
    if s.insecure_skip_tls_verify && s.trusted_ca_file.is_none() {
        return Err(KvstoreError::SkipVerifyUnsupported);
    }
    let read = |what: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| KvstoreError::TlsFile {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let mut tls = TlsOptions::new();
    if let Some(ca) = &s.trusted_ca_file {
        tls = tls.ca_certificate(Certificate::from_pem(read("trusted CA", ca)?));
    }
    if let (Some(cert), Some(key)) = (&s.cert_file, &s.key_file) {
        tls = tls.identity(Identity::from_pem(read("client certificate", cert)?, read("client key", key)?));
    }
    Ok(Some(tls))
}

/// Error text from etcd-client, with the tonic/hyper cause chain that says what went wrong
/// (e.g. "invalid peer certificate: UnknownIssuer").
pub fn describe(e: &etcd_client::Error) -> String {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

impl Etcd {
    pub async fn connect(settings: &EtcdSettings, timeout: Duration) -> Result<Etcd, KvstoreError> {
        settings.validate()?;
        Self::connect_to(settings, settings.endpoints.clone(), timeout).await
    }

    /// Connects to `endpoints` only (used to ask each member for its own status).
    pub async fn connect_to(settings: &EtcdSettings, endpoints: Vec<String>, timeout: Duration) -> Result<Etcd, KvstoreError> {
        let mut opts = ConnectOptions::new()
            .with_timeout(timeout)
            .with_connect_timeout(timeout)
            .with_keep_alive(Duration::from_secs(15), timeout)
            // etcd's guidance: a member cut off from its leader refuses (and cancels watches)
            // instead of serving stale data.
            .with_require_leader(true);
        if let Some(tls) = tls_options(settings)? {
            opts = opts.with_tls(tls);
        }
        if let (Some(user), Some(pw)) = (&settings.username, &settings.password) {
            opts = opts.with_user(user.clone(), pw.expose().to_owned());
        }
        let joined = endpoints.join(",");
        let client = bounded(&joined, "connect", timeout, Client::connect(&endpoints, Some(opts))).await?;
        Ok(Etcd { client, endpoints, timeout })
    }

    /// Runs one etcd call with this client's time bound and error context.
    pub async fn call<T>(
        &self,
        operation: impl Into<String>,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, KvstoreError> {
        bounded(&self.endpoints.join(","), operation, self.timeout, fut).await
    }
}

async fn bounded<T>(
    endpoints: &str,
    operation: impl Into<String>,
    timeout: Duration,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, KvstoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(KvstoreError::Etcd {
            endpoints: endpoints.to_owned(),
            operation: operation.into(),
            message: describe(&e),
        }),
        Err(_) => Err(KvstoreError::Timeout {
            endpoints: endpoints.to_owned(),
            operation: operation.into(),
            timeout,
        }),
    }
}
