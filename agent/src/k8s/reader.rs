//! Cilium's cluster state from the Kubernetes API into the one model: CiliumNodes and
//! CiliumEndpoints (or CiliumEndpointSlices) for nodes and pod IPs, CiliumIdentities for
//! identities. Each kind is one paged list at one resourceVersion, recorded in the snapshot.

use super::client::{self, K8sError, KubeOptions};
use super::crds::{CiliumEndpoint, CiliumEndpointSlice, CiliumIdentity, CiliumNode};
use super::decode;
use crate::kvstore::reader::KvstoreSnapshot;
use crate::model::source::StateSource;

/// A list whose continue token expired (410 Gone) is started again this many times.
const GONE_RETRIES: usize = 3;

/// Lists `K` into `snap` through `decode`, starting over (from `reset`) when the list's
/// resourceVersion is compacted while paging.
async fn list_into<K>(
    kube: &kube::Client,
    opts: &KubeOptions,
    snap: &mut KvstoreSnapshot,
    reset: impl Fn(&mut KvstoreSnapshot),
    decode: impl Fn(&K, &mut KvstoreSnapshot),
) -> Result<(), K8sError>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut attempt = 0;
    loop {
        match client::list_each::<K>(kube, opts, |o| decode(o, snap)).await {
            Ok((version, _)) => {
                snap.origin.resource_versions.insert(K::plural(&()).into_owned(), version);
                return Ok(());
            }
            Err(K8sError::Gone { resource }) if attempt < GONE_RETRIES => {
                tracing::warn!(resource, "list expired while paging (410 Gone): listing again");
                reset(snap);
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Nodes and endpoint IPs of the local cluster (CRD mode).
pub async fn read_endpoints(kube: &kube::Client, opts: &KubeOptions, cluster: &str, cluster_id: u32, slices: bool, snap: &mut KvstoreSnapshot) -> Result<(), K8sError> {
    snap.origin.endpoints = StateSource::Kubernetes;
    snap.origin.endpoint_slices = slices;
    let forget_nodes = |s: &mut KvstoreSnapshot| {
        s.nodes.clear();
        s.counts.nodes = 0;
        s.malformed.retain(|m| !m.meta.key.starts_with("CiliumNode "));
    };
    // A re-read (settling) replaces what an earlier list put in.
    forget_nodes(snap);
    list_into::<CiliumNode>(kube, opts, snap, forget_nodes, |o, s| decode::decode_node(o, cluster, cluster_id, s)).await?;
    let forget_ips = |s: &mut KvstoreSnapshot| {
        s.ips.clear();
        s.counts.ips = 0;
        s.malformed.retain(|m| !m.meta.key.starts_with("CiliumEndpoint"));
    };
    forget_ips(snap);
    if slices {
        list_into::<CiliumEndpointSlice>(kube, opts, snap, forget_ips, decode::decode_endpoint_slice).await
    } else {
        list_into::<CiliumEndpoint>(kube, opts, snap, forget_ips, decode::decode_endpoint).await
    }
}

/// Identities as CiliumIdentity objects (`identity-allocation-mode crd`), replacing any from
/// the kvstore once the whole list is read (on an error `snap` is left as it was).
pub async fn read_identities(kube: &kube::Client, opts: &KubeOptions, snap: &mut KvstoreSnapshot) -> Result<(), K8sError> {
    let forget = |s: &mut KvstoreSnapshot| {
        s.identities.clear();
        s.counts.identities = 0;
        s.malformed.clear();
    };
    let mut read = KvstoreSnapshot::default();
    list_into::<CiliumIdentity>(kube, opts, &mut read, forget, decode::decode_identity).await?;
    snap.identities = read.identities;
    snap.counts.identities = read.counts.identities;
    snap.identity_references.clear();
    snap.malformed.retain(|m| !m.meta.key.starts_with("CiliumIdentity ") && !m.meta.key.starts_with(crate::kvstore::values::IDENTITY_ID_PREFIX));
    snap.malformed.extend(read.malformed);
    snap.origin.resource_versions.extend(read.origin.resource_versions);
    snap.origin.identities = StateSource::Kubernetes;
    snap.origin.identities_unread = None;
    Ok(())
}
