//! Our own serde types for the four Cilium custom resources kvcheck reads (no maintained crate
//! has root types for CiliumEndpoint or CiliumEndpointSlice, see docs/cilium-expected-state.md).
//! Only the fields the expected-state rules use; every field optional and unknown fields
//! ignored, so v2alpha1/v2 differences and newer Cilium fields do not break decoding.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope};
use serde::Deserialize;

/// Implements `kube::Resource` for a Cilium CRD type (kube's derive needs a `spec`, which
/// CiliumEndpoint and CiliumIdentity do not have).
macro_rules! cilium_resource {
    ($ty:ident, $kind:literal, $version:literal, $plural:literal, $scope:ty) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;
            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed("cilium.io")
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// `cilium.io/v2 CiliumEndpoint` (namespaced): one per pod, written by the hosting agent.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CiliumEndpoint {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub status: Option<EndpointStatus>,
}
cilium_resource!(CiliumEndpoint, "CiliumEndpoint", "v2", "ciliumendpoints", NamespaceResourceScope);

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointStatus {
    /// The endpoint ID on its node (the endpoint map's lxc id).
    #[serde(default)]
    pub id: Option<i64>,
    #[serde(default)]
    pub identity: Option<EndpointIdentity>,
    #[serde(default)]
    pub networking: Option<EndpointNetworking>,
    #[serde(default)]
    pub encryption: Option<Encryption>,
    #[serde(default)]
    pub state: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointIdentity {
    #[serde(default)]
    pub id: Option<i64>,
    #[serde(default)]
    pub labels: Option<Vec<String>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointNetworking {
    #[serde(default)]
    pub addressing: Option<Vec<AddressPair>>,
    /// The hosting node's IP (Cilium's tunnel endpoint for these addresses).
    #[serde(default)]
    pub node: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct AddressPair {
    #[serde(default)]
    pub ipv4: Option<String>,
    #[serde(default)]
    pub ipv6: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Encryption {
    #[serde(default)]
    pub key: Option<i64>,
}

/// `cilium.io/v2alpha1 CiliumEndpointSlice` (cluster-scoped): the operator's batches of CEPs
/// (`enable-cilium-endpoint-slice`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CiliumEndpointSlice {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub endpoints: Option<Vec<CoreCiliumEndpoint>>,
}
cilium_resource!(CiliumEndpointSlice, "CiliumEndpointSlice", "v2alpha1", "ciliumendpointslices", ClusterResourceScope);

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CoreCiliumEndpoint {
    #[serde(default)]
    pub name: String,
    /// The identity ID (not the endpoint ID: a slice has none).
    #[serde(default)]
    pub id: Option<i64>,
    #[serde(default)]
    pub networking: Option<EndpointNetworking>,
    #[serde(default)]
    pub encryption: Option<Encryption>,
}

/// `cilium.io/v2 CiliumNode` (cluster-scoped): one per node, written by its agent.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CiliumNode {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<CiliumNodeSpec>,
}
cilium_resource!(CiliumNode, "CiliumNode", "v2", "ciliumnodes", ClusterResourceScope);

#[derive(Clone, Debug, Default, Deserialize)]
pub struct CiliumNodeSpec {
    #[serde(default)]
    pub addresses: Option<Vec<NodeAddress>>,
    #[serde(default)]
    pub health: Option<AddressPair>,
    #[serde(default)]
    pub ingress: Option<AddressPair>,
    #[serde(default)]
    pub ipam: Option<IpamSpec>,
    #[serde(default)]
    pub encryption: Option<Encryption>,
    /// v1.16 only.
    #[serde(default)]
    pub nodeidentity: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct NodeAddress {
    #[serde(rename = "type", default)]
    pub addr_type: String,
    #[serde(default)]
    pub ip: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct IpamSpec {
    #[serde(rename = "podCIDRs", default)]
    pub pod_cidrs: Option<Vec<String>>,
    #[serde(default)]
    pub pools: Option<IpamPools>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct IpamPools {
    #[serde(default)]
    pub allocated: Option<Vec<IpamPoolAllocation>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct IpamPoolAllocation {
    #[serde(default)]
    pub cidrs: Option<Vec<String>>,
}

/// `cilium.io/v2 CiliumIdentity` (cluster-scoped): name = numeric identity.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CiliumIdentity {
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The identity's labels, `"<source>:<key>" → value`.
    #[serde(rename = "security-labels", default)]
    pub security_labels: Option<BTreeMap<String, String>>,
}
cilium_resource!(CiliumIdentity, "CiliumIdentity", "v2", "ciliumidentities", ClusterResourceScope);
