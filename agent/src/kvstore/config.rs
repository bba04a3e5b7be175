//! etcd connection settings, as Cilium operators already have them: Cilium's `etcd.config`
//! YAML, then the `ETCDCTL_*` environment, then command-line flags (increasing precedence).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where Cilium's Helm chart mounts the etcd client configuration.
pub const DEFAULT_ETCD_CONFIG: &str = "/var/lib/etcd-config/etcd.config";

/// A secret string: never printed, in logs, errors or Debug output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The `etcd.config` keys kvcheck uses (others, such as dial timeouts, are accepted and ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct EtcdConfigFile {
    #[serde(default)]
    endpoints: Vec<String>,
    trusted_ca_file: Option<PathBuf>,
    /// Legacy alias of `trusted-ca-file`, still accepted by Cilium.
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(default)]
    insecure_transport: bool,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
    username: Option<String>,
    password: Option<String>,
}

/// Resolved settings for connecting to Cilium's etcd.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    pub trusted_ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub insecure_transport: bool,
    pub insecure_skip_tls_verify: bool,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Where each setting came from, for `dump kvstore` and error messages.
    pub sources: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading etcd config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing etcd config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("no etcd endpoints: give --etcd-endpoints, ETCDCTL_ENDPOINTS or an etcd.config with `endpoints`")]
    NoEndpoints,
    #[error("{0} needs {1} too (client certificate and key go together)")]
    HalfIdentity(&'static str, &'static str),
}

impl ConfigError {
    /// No endpoints configured (fine until etcd is needed: CRD mode has none).
    pub fn is_no_endpoints(&self) -> bool {
        matches!(self, ConfigError::NoEndpoints)
    }
}

/// Overrides from one source (environment or flags); `None` leaves the lower source's value.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub endpoints: Option<Vec<String>>,
    pub trusted_ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub insecure_skip_tls_verify: Option<bool>,
}

impl Overrides {
    /// `ETCDCTL_ENDPOINTS`, `ETCDCTL_CACERT`, `ETCDCTL_CERT`, `ETCDCTL_KEY`, `ETCDCTL_USER`
    /// (`name:password`, as etcdctl reads it), `ETCDCTL_INSECURE_SKIP_TLS_VERIFY`.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Overrides {
        let (username, password) = match get("ETCDCTL_USER") {
            Some(u) => match u.split_once(':') {
                Some((name, pw)) => (Some(name.to_owned()), Some(Secret::new(pw))),
                None => (Some(u), get("ETCDCTL_PASSWORD").map(Secret::new)),
            },
            None => (None, None),
        };
        Overrides {
            endpoints: get("ETCDCTL_ENDPOINTS").map(|e| split_list(&e)),
            trusted_ca_file: get("ETCDCTL_CACERT").map(PathBuf::from),
            cert_file: get("ETCDCTL_CERT").map(PathBuf::from),
            key_file: get("ETCDCTL_KEY").map(PathBuf::from),
            username,
            password,
            insecure_skip_tls_verify: get("ETCDCTL_INSECURE_SKIP_TLS_VERIFY").map(|v| v == "true" || v == "1"),
        }
    }
}

/// `msg` with every double-quoted part replaced (YAML errors quote the offending value).
fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for (i, part) in msg.split('"').enumerate() {
        if i > 0 {
            out.push('"');
        }
        out.push_str(if i % 2 == 1 { "<redacted>" } else { part });
    }
    out
}

pub fn split_list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_owned).collect()
}

impl EtcdSettings {
    /// Parses Cilium's `etcd.config` YAML.
    pub fn from_config_file(path: &Path) -> Result<EtcdSettings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_config_text(&text, path)
    }

    pub fn from_config_text(text: &str, path: &Path) -> Result<EtcdSettings, ConfigError> {
        // No source snippet in the error: the line shown could hold the password.
        let options = serde_saphyr::options! { with_snippet: false };
        let file: EtcdConfigFile = serde_saphyr::from_str_with_options(text, options).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            // A wrongly typed value may be the password: the message names its place, not it.
            message: redact_quoted(&e.to_string()),
        })?;
        let mut s = EtcdSettings {
            endpoints: file.endpoints,
            trusted_ca_file: file.trusted_ca_file.or(file.ca_file),
            cert_file: file.cert_file,
            key_file: file.key_file,
            insecure_transport: file.insecure_transport,
            insecure_skip_tls_verify: file.insecure_skip_tls_verify,
            username: file.username,
            password: file.password.map(Secret::new),
            sources: vec![format!("etcd.config {}", path.display())],
        };
        s.take_url_credentials();
        Ok(s)
    }

    /// Moves `user:password@` out of endpoint URLs into the credentials (unless credentials were
    /// given), so that no endpoint kvcheck prints, logs or reports carries a secret.
    fn take_url_credentials(&mut self) {
        for e in &mut self.endpoints {
            let Some((scheme, rest)) = e.split_once("://") else { continue };
            let Some((userinfo, host)) = rest.rsplit_once('@') else { continue };
            let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            if self.username.is_none() && !user.is_empty() {
                self.username = Some(user.to_owned());
                self.password = (!password.is_empty()).then(|| Secret::new(password));
            }
            *e = format!("{scheme}://{host}");
        }
    }

    /// Applies a higher-precedence source.
    pub fn apply(&mut self, o: Overrides, source: &str) {
        fn take<T>(slot: &mut T, v: Option<T>) -> bool {
            v.map(|v| *slot = v).is_some()
        }
        let used = [
            take(&mut self.endpoints, o.endpoints),
            take(&mut self.trusted_ca_file, o.trusted_ca_file.map(Some)),
            take(&mut self.cert_file, o.cert_file.map(Some)),
            take(&mut self.key_file, o.key_file.map(Some)),
            take(&mut self.username, o.username.map(Some)),
            take(&mut self.password, o.password.map(Some)),
            take(&mut self.insecure_skip_tls_verify, o.insecure_skip_tls_verify),
        ];
        if used.contains(&true) {
            self.sources.push(source.to_owned());
        }
        self.take_url_credentials();
    }

    /// Checks the settings are complete enough to connect.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_identity()?;
        if self.endpoints.is_empty() {
            return Err(ConfigError::NoEndpoints);
        }
        Ok(())
    }

    fn validate_identity(&self) -> Result<(), ConfigError> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Err(ConfigError::HalfIdentity("cert-file", "key-file")),
            (None, Some(_)) => Err(ConfigError::HalfIdentity("key-file", "cert-file")),
            _ => Ok(()),
        }
    }

    /// Whether to speak TLS: any https endpoint or any TLS file, unless `insecure-transport`.
    pub fn uses_tls(&self) -> bool {
        !self.insecure_transport
            && (self.endpoints.iter().any(|e| e.starts_with("https://"))
                || self.trusted_ca_file.is_some()
                || self.cert_file.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helm_etcd_config_parses() {
        // cilium-reference S5 (Helm's etcd.config), plus the legacy ca-file alias.
        let text = "---\nendpoints:\n  - https://etcd-1:2379\n  - https://etcd-2:2379\ntrusted-ca-file: '/var/lib/etcd-secrets/etcd-client-ca.crt'\nkey-file: '/var/lib/etcd-secrets/etcd-client.key'\ncert-file: '/var/lib/etcd-secrets/etcd-client.crt'\ndial-timeout: 5s\n";
        let s = EtcdSettings::from_config_text(text, Path::new("etcd.config")).unwrap();
        assert_eq!(s.endpoints, vec!["https://etcd-1:2379", "https://etcd-2:2379"]);
        assert_eq!(s.trusted_ca_file.as_deref(), Some(Path::new("/var/lib/etcd-secrets/etcd-client-ca.crt")));
        assert!(s.uses_tls());
        let legacy = EtcdSettings::from_config_text("endpoints: [https://e:2379]\nca-file: /ca.pem\n", Path::new("x")).unwrap();
        assert_eq!(legacy.trusted_ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert!(EtcdSettings::from_config_text("endpoints: {", Path::new("x")).is_err());
    }

    #[test]
    fn precedence_file_env_flags() {
        let mut s = EtcdSettings::from_config_text("endpoints: [http://file:2379]\ncert-file: /f.crt\nkey-file: /f.key\npassword: hunter2\nusername: u\n", Path::new("etcd.config")).unwrap();
        let env = Overrides::from_env(|k| match k {
            "ETCDCTL_ENDPOINTS" => Some("http://env1:2379, http://env2:2379".into()),
            "ETCDCTL_CERT" => Some("/env.crt".into()),
            _ => None,
        });
        s.apply(env, "environment");
        assert_eq!(s.endpoints, vec!["http://env1:2379", "http://env2:2379"]);
        assert_eq!(s.cert_file.as_deref(), Some(Path::new("/env.crt")));
        assert_eq!(s.key_file.as_deref(), Some(Path::new("/f.key")));
        s.apply(Overrides { endpoints: Some(vec!["http://flag:2379".into()]), ..Default::default() }, "flags");
        assert_eq!(s.endpoints, vec!["http://flag:2379"]);
        assert_eq!(s.sources, vec!["etcd.config etcd.config", "environment", "flags"]);
        // The password never shows.
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    /// Secrets never reach an endpoint string or an error message.
    #[test]
    fn no_secret_in_endpoints_or_errors() {
        // Userinfo in an endpoint (file, environment, flags) becomes the credentials.
        let s = EtcdSettings::from_config_text("endpoints: [\"http://kv:s3cr3t@etcd-1:2379\"]\n", Path::new("f")).unwrap();
        assert_eq!((s.endpoints.as_slice(), s.username.as_deref(), s.password.as_ref().map(Secret::expose)), (&["http://etcd-1:2379".to_owned()][..], Some("kv"), Some("s3cr3t")));
        let mut s = EtcdSettings::default();
        s.apply(Overrides::from_env(|k| (k == "ETCDCTL_ENDPOINTS").then(|| "https://a:pw1@e1:2379,https://e2:2379".into())), "environment");
        assert_eq!(s.endpoints, ["https://e1:2379", "https://e2:2379"]);
        s.apply(Overrides { endpoints: Some(vec!["http://b:pw2@flag:2379".into()]), ..Default::default() }, "flags");
        assert_eq!(s.endpoints, ["http://flag:2379"]);
        // Credentials given on their own win over the URL's; the URL's are still dropped.
        assert_eq!(s.username.as_deref(), Some("a"));
        let shown = format!("{s:?}");
        assert!(!shown.contains("pw1") && !shown.contains("pw2"), "{shown}");
        // A password where YAML wants a bool or a list: the error names the place only.
        for text in ["insecure-transport: \"hunter2\"\n", "endpoints: hunter2\n", "username: [\"hunter2\"]\n"] {
            let e = EtcdSettings::from_config_text(text, Path::new("f")).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
            assert!(e.contains("parsing etcd config f"), "{e}");
        }
    }

    #[test]
    fn incomplete_settings_are_errors() {
        assert!(matches!(EtcdSettings::default().validate(), Err(ConfigError::NoEndpoints)));
        let s = EtcdSettings { endpoints: vec!["http://e".into()], cert_file: Some("/c".into()), ..Default::default() };
        assert!(s.validate().unwrap_err().to_string().contains("key-file"));
    }
}
