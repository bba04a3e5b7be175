//! The JSON the Cilium agent's REST API serves, as small serde types of our own: only the
//! fields kvcheck uses, every one optional, unknown fields ignored, so one set of types reads
//! Cilium v1.7 to main. Field names are those of Cilium's OpenAPI spec (`api/v1/openapi.yaml`,
//! generated into `api/v1/models/*.go`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// Cilium's Go models send some empty lists and strings as `null` (no `omitempty`): read
/// `null` as empty.
fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// `Status` (`api/v1/models/status.go`): `state` is `Ok`, `Warning`, `Failure` or `Disabled`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Status {
    #[serde(default, deserialize_with = "nullable")]
    pub state: String,
    #[serde(default, deserialize_with = "nullable")]
    pub msg: String,
}

impl Status {
    pub fn is_ok(&self) -> bool {
        self.state == "Ok"
    }

    /// `Ok`, or not in use on this node.
    pub fn is_ok_or_disabled(&self) -> bool {
        self.state == "Ok" || self.state == "Disabled"
    }
}

/// `GET /v1/healthz` → `StatusResponse` (`api/v1/models/status_response.go`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StatusResponse {
    /// The agent's overall state; its `msg` starts with the version (`1.16.15 (v1.16.15-…)`).
    pub cilium: Option<Status>,
    pub kvstore: Option<Status>,
    pub kubernetes: Option<Status>,
    #[serde(rename = "cluster-mesh")]
    pub cluster_mesh: Option<ClusterMeshStatus>,
    /// Probes of the agent's status collector that have not answered in time (v1.8+).
    #[serde(default, deserialize_with = "nullable")]
    pub stale: BTreeMap<String, String>,
    pub cluster: Option<ClusterStatus>,
    /// Present from v1.9: tells a recent agent (with a host endpoint) when its version string
    /// is empty.
    #[serde(rename = "host-firewall")]
    pub host_firewall: Option<serde_json::Value>,
}

/// `ClusterStatus`: `self` is the node's name as the agent knows it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ClusterStatus {
    #[serde(rename = "self")]
    pub self_name: Option<String>,
}

/// `ClusterMeshStatus` (v1.7+; per-cluster readiness and sync from v1.14).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct ClusterMeshStatus {
    #[serde(default, deserialize_with = "nullable")]
    pub clusters: Vec<RemoteCluster>,
}

/// `RemoteCluster`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct RemoteCluster {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    /// v1.14+; older agents say only `status`.
    pub ready: Option<bool>,
    pub connected: Option<bool>,
    #[serde(default, deserialize_with = "nullable")]
    pub status: String,
    pub synced: Option<RemoteClusterSynced>,
    #[serde(rename = "num-failures", default, deserialize_with = "nullable")]
    pub num_failures: i64,
}

/// `RemoteClusterSynced`: whether the initial list of each kind has been received.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct RemoteClusterSynced {
    #[serde(default, deserialize_with = "nullable")]
    pub nodes: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub endpoints: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub identities: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub services: bool,
}

/// `GET /v1/endpoint` → `[]Endpoint` (`api/v1/models/endpoint.go`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Endpoint {
    #[serde(default, deserialize_with = "nullable")]
    pub id: i64,
    pub status: Option<EndpointStatus>,
}

/// `EndpointStatus`: `state` is an `EndpointState` (`waiting-for-identity`, `not-ready`,
/// `waiting-to-regenerate`, `regenerating`, `restoring`, `ready`, `disconnecting`,
/// `disconnected`, `invalid`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointStatus {
    #[serde(default, deserialize_with = "nullable")]
    pub state: String,
    #[serde(rename = "external-identifiers")]
    pub external_identifiers: Option<EndpointIdentifiers>,
    pub identity: Option<Identity>,
    pub labels: Option<LabelConfigurationStatus>,
    pub networking: Option<EndpointNetworking>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointIdentifiers {
    #[serde(rename = "pod-name")]
    pub pod_name: Option<String>,
    #[serde(rename = "k8s-namespace")]
    pub k8s_namespace: Option<String>,
    #[serde(rename = "k8s-pod-name")]
    pub k8s_pod_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Identity {
    #[serde(default, deserialize_with = "nullable")]
    pub id: i64,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct LabelConfigurationStatus {
    #[serde(rename = "security-relevant", default, deserialize_with = "nullable")]
    pub security_relevant: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointNetworking {
    #[serde(default, deserialize_with = "nullable")]
    pub addressing: Vec<AddressPair>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct AddressPair {
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
}

/// `GET /v1/config` → `DaemonConfiguration` (`api/v1/models/daemon_configuration.go`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DaemonConfiguration {
    pub status: Option<DaemonConfigurationStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct DaemonConfigurationStatus {
    /// The agent's whole `option.DaemonConfig`, by Go field name (v1.9+).
    #[serde(
        rename = "daemonConfigurationMap",
        default,
        deserialize_with = "nullable"
    )]
    pub daemon_configuration_map: BTreeMap<String, serde_json::Value>,
    #[serde(rename = "kvstoreConfiguration")]
    pub kvstore_configuration: Option<KVstoreConfiguration>,
    #[serde(rename = "datapathMode")]
    pub datapath_mode: Option<String>,
    #[serde(rename = "ipam-mode")]
    pub ipam_mode: Option<String>,
    pub addressing: Option<NodeAddressing>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct KVstoreConfiguration {
    #[serde(rename = "type", default, deserialize_with = "nullable")]
    pub kind: String,
}

/// `NodeAddressing`: `ipv4.enabled`, `ipv6.enabled`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeAddressing {
    pub ipv4: Option<NodeAddressingElement>,
    pub ipv6: Option<NodeAddressingElement>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeAddressingElement {
    #[serde(default, deserialize_with = "nullable")]
    pub enabled: bool,
}
