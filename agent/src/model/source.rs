//! Where a kind of cluster state was read: Cilium keeps nodes and pod IPs, and independently
//! its identities, either in the kvstore or as Kubernetes objects (its `kvstore` and
//! `identity-allocation-mode` settings).

use std::collections::BTreeMap;

use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StateSource {
    /// etcd keys under `cilium/state/`.
    #[default]
    Kvstore,
    /// CiliumNode / CiliumEndpoint(Slice) / CiliumIdentity objects.
    Kubernetes,
}

impl StateSource {
    pub fn name(self) -> &'static str {
        match self {
            StateSource::Kvstore => "kvstore",
            StateSource::Kubernetes => "kubernetes",
        }
    }

    /// The source a piece of evidence names: an etcd key (`cilium/...`, or a remote cluster's
    /// `<cluster>:cilium/...`) or an object (`CiliumEndpoint default/pod-a`).
    pub fn of_reference(key: &str) -> StateSource {
        if key.starts_with("Cilium") { StateSource::Kubernetes } else { StateSource::Kvstore }
    }
}

/// Which source each kind of a snapshot came from, and the read points of Kubernetes lists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// Nodes and endpoint IPs.
    pub endpoints: StateSource,
    pub identities: StateSource,
    /// CiliumEndpointSlices rather than CiliumEndpoints (`enable-cilium-endpoint-slice`).
    pub endpoint_slices: bool,
    /// Kubernetes lists: resource (plural) → the resourceVersion it was served at.
    pub resource_versions: BTreeMap<String, String>,
    /// Why identities kept as CiliumIdentity objects were not read (no Kubernetes API, or
    /// the error reading them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identities_unread: Option<String>,
}

impl Origin {
    pub fn identity_reference(&self, id: u32) -> String {
        match self.identities {
            StateSource::Kvstore => format!("cilium/state/identities/v1/id/{id}"),
            StateSource::Kubernetes => format!("CiliumIdentity {id}"),
        }
    }

    pub fn node_reference(&self, cluster: &str, node: &str) -> String {
        match self.endpoints {
            StateSource::Kvstore => format!("cilium/state/nodes/v1/{cluster}/{node}"),
            StateSource::Kubernetes => format!("CiliumNode {node}"),
        }
    }
}
