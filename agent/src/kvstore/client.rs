//! Connecting to etcd with the resolved settings, every call bounded in time.

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::config::{ConfigError, EtcdSettings};

/// How long one etcd request (or connection attempt) may take before kvcheck gives up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 pings on the etcd connection, so a dead peer is noticed between requests.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(15);

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
    /// The gRPC channel under `client`, for the range reads kvcheck makes itself
    /// ([`super::range`]); `None` with a username and password, whose auth token etcd-client
    /// keeps to itself (those reads then go through `client`).
    pub channel: Option<tonic::transport::Channel>,
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
        let joined = endpoints.join(",");
        // kvcheck builds the channel (time bounds, keep-alive, TLS) so that its own range
        // reads share it with etcd-client's calls.
        let channel = channel(&endpoints, tls_options(settings)?, timeout)
            .map_err(|message| KvstoreError::Etcd { endpoints: joined.clone(), operation: "connect".into(), message })?;
        // etcd's guidance: a member cut off from its leader refuses (and cancels watches)
        // instead of serving stale data.
        let mut opts = ConnectOptions::new().with_require_leader(true);
        if let (Some(user), Some(pw)) = (&settings.username, &settings.password) {
            opts = opts.with_user(user.clone(), pw.expose().to_owned());
        }
        let client = bounded(&joined, "connect", timeout, Client::from_channel(etcd_client::Channel::Tonic(channel.clone()), Some(opts))).await?;
        let channel = settings.username.is_none().then_some(channel);
        Ok(Etcd { client, endpoints, timeout, channel })
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

/// One gRPC channel balanced over `endpoints`, each set up as etcd-client sets up its own
/// (`Client::connect`): a scheme-less endpoint is https with TLS options and http without;
/// TLS options on an http:// endpoint are refused. The channel connects when first used.
fn channel(endpoints: &[String], tls: Option<TlsOptions>, timeout: Duration) -> Result<tonic::transport::Channel, String> {
    if endpoints.is_empty() {
        return Err("no endpoints".into());
    }
    let mut list = Vec::with_capacity(endpoints.len());
    for url in endpoints {
        let url = if url.contains("://") {
            url.clone()
        } else {
            format!("{}://{url}", if tls.is_some() { "https" } else { "http" })
        };
        let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone()).map_err(|e| format!("endpoint {url}: {e}"))?;
        match (url.starts_with("https://"), &tls) {
            (true, tls) => endpoint = endpoint.tls_config(tls.clone().unwrap_or_default()).map_err(|e| format!("endpoint {url}: {e}"))?,
            (false, Some(_)) => return Err(format!("endpoint {url}: TLS settings are given, but the endpoint is not https://")),
            (false, None) => {}
        }
        list.push(
            endpoint
                .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
                .keep_alive_timeout(timeout)
                // As etcd-client's own connections: a dead peer is found between reads too.
                .keep_alive_while_idle(true)
                .timeout(timeout)
                .connect_timeout(timeout),
        );
    }
    Ok(tonic::transport::Channel::balance_list(list.into_iter()))
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
