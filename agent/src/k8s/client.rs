//! The Kubernetes API, read-only (get/list/watch): where Cilium keeps cluster state in CRD mode
//! (and its identities with `identity-allocation-mode crd`). Connection from `--kubeconfig` /
//! `KUBECONFIG`, else the pod's ServiceAccount; paged lists, each at one resourceVersion.

use std::fmt::Debug;
use std::path::PathBuf;
use std::time::Duration;

use kube::api::{Api, ListParams};
use serde::de::DeserializeOwned;

/// Objects per list request (the kube-apiserver's own default page is 500).
pub const DEFAULT_PAGE_SIZE: u32 = 500;

#[derive(Clone, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KubernetesAccess {
    /// Use the Kubernetes API when a kubeconfig or the pod's ServiceAccount is there.
    #[default]
    Auto,
    /// Require it (an error when it cannot be configured).
    On,
    /// Never read it.
    Off,
}

#[derive(Clone, Debug)]
pub struct KubeOptions {
    pub access: KubernetesAccess,
    /// `--kubeconfig` (or `KUBECONFIG`); `None`: in-cluster ServiceAccount.
    pub kubeconfig: Option<PathBuf>,
    pub page_size: u32,
    /// Per request (connect and read).
    pub timeout: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions { access: KubernetesAccess::Auto, kubeconfig: None, page_size: DEFAULT_PAGE_SIZE, timeout: Duration::from_secs(10) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("Kubernetes API not configured: {0}")]
    NotConfigured(String),
    #[error("Kubernetes API: listing {resource} is forbidden ({message}); kvcheck's ServiceAccount needs get/list/watch on it (deploy/rbac.yaml)")]
    Forbidden { resource: String, message: String },
    #[error("Kubernetes API: {resource} is not served ({message}): Cilium's CRDs are not installed, or this is not the cluster Cilium runs in")]
    NotFound { resource: String, message: String },
    #[error("Kubernetes API: listing {resource}: {message}")]
    Api { resource: String, message: String },
    #[error("Kubernetes API: listing {resource}: 410 Gone (the list's resourceVersion was compacted while paging)")]
    Gone { resource: String },
    #[error("Kubernetes API: listing {resource} timed out after {timeout:?}")]
    Timeout { resource: String, timeout: Duration },
}

/// Whether there is a Kubernetes API to read, and how to reach it.
pub fn configured(opts: &KubeOptions) -> Option<String> {
    if opts.access == KubernetesAccess::Off {
        return None;
    }
    if let Some(p) = &opts.kubeconfig {
        return Some(format!("kubeconfig {}", p.display()));
    }
    std::env::var_os("KUBERNETES_SERVICE_HOST").map(|_| "in-cluster ServiceAccount".to_owned())
}

/// One read may wait this long: beyond kube-rs's watch timeout (290 s).
const WATCH_READ_TIMEOUT: Duration = Duration::from_secs(295);

/// A client for `opts`; `Ok(None)` when there is no Kubernetes API to read (`auto` without a
/// kubeconfig or ServiceAccount, or `off`).
pub async fn connect(opts: &KubeOptions) -> Result<Option<kube::Client>, K8sError> {
    let Some(how) = configured(opts) else {
        return match opts.access {
            KubernetesAccess::On => Err(K8sError::NotConfigured("--kubernetes on, but no --kubeconfig / KUBECONFIG and no in-cluster ServiceAccount (KUBERNETES_SERVICE_HOST)".into())),
            _ => Ok(None),
        };
    };
    let fail = |e: String| K8sError::NotConfigured(format!("{how}: {e}"));
    let mut config = match &opts.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| fail(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await.map_err(|e| fail(e.to_string()))?
        }
        None => kube::Config::incluster().map_err(|e| fail(e.to_string()))?,
    };
    // An idle watch carries nothing for a minute or more (bookmarks come about once a minute;
    // the server ends the watch after 290 s): the read timeout only catches a dead connection.
    // A list page has its own deadline (`list_each`).
    config.connect_timeout = Some(opts.timeout);
    config.read_timeout = Some(WATCH_READ_TIMEOUT.max(opts.timeout));
    config.write_timeout = Some(opts.timeout);
    kube::Client::try_from(config).map(Some).map_err(|e| fail(e.to_string()))
}

/// A client when there is a Kubernetes API to read, and how it is reached; else why not (for
/// the report: identities then "not checked: <why>").
pub async fn connect_or_reason(opts: &KubeOptions) -> (Option<kube::Client>, Result<String, String>) {
    match connect(opts).await {
        Ok(Some(c)) => (Some(c), Ok(configured(opts).unwrap_or_default())),
        Ok(None) => (None, Err("no Kubernetes API configured: --kubeconfig / KUBECONFIG, or the pod's ServiceAccount".to_owned())),
        Err(e) => (None, Err(e.to_string())),
    }
}

pub fn api_error(resource: &str, e: kube::Error) -> K8sError {
    let resource = resource.to_owned();
    match e {
        kube::Error::Api(s) if s.code == 403 => K8sError::Forbidden { resource, message: s.message },
        kube::Error::Api(s) if s.code == 410 => K8sError::Gone { resource },
        kube::Error::Api(s) if s.code == 404 => K8sError::NotFound { resource, message: s.message },
        kube::Error::Api(s) => K8sError::Api { resource, message: format!("{} {}: {}", s.code, s.reason, s.message) },
        other => K8sError::Api { resource, message: other.to_string() },
    }
}

/// Lists every object of `K` in pages of `page_size`, handing each to `each` as it is decoded
/// (a page at a time is held). All pages are served at the first page's resourceVersion (the
/// continue token carries it); returns that resourceVersion and the number of objects.
pub async fn list_each<K>(client: &kube::Client, opts: &KubeOptions, mut each: impl FnMut(&K)) -> Result<(String, usize), K8sError>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let resource = K::plural(&()).into_owned();
    let api: Api<K> = Api::all(client.clone());
    let mut params = ListParams::default().limit(opts.page_size);
    let (mut version, mut n) = (String::new(), 0);
    loop {
        // A whole page must arrive within the timeout (kube's read timeout is per read).
        let page = tokio::time::timeout(opts.timeout, api.list(&params))
            .await
            .map_err(|_| K8sError::Timeout { resource: resource.clone(), timeout: opts.timeout })?
            .map_err(|e| api_error(&resource, e))?;
        if version.is_empty() {
            version = page.metadata.resource_version.clone().unwrap_or_default();
        }
        n += page.items.len();
        page.items.iter().for_each(&mut each);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok((version, n)),
        }
    }
}
