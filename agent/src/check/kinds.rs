//! Finding kinds: one enum variant each, with its stable name, severity and explanation.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Traffic is (or will be) dropped or mis-policed.
    Critical,
    /// Inconsistent state that usually hurts later or in some paths.
    Warning,
    /// Worth knowing; not drift by itself.
    Info,
}

macro_rules! kinds {
    ($( $variant:ident = $name:literal, $sev:ident, $summary:literal, $explain:literal; )*) => {
        /// What kind of disagreement a finding reports. Names are stable (used in JSON, metrics
        /// and `kvcheck explain`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum FindingKind { $( $variant, )* }

        impl FindingKind {
            pub const ALL: &'static [FindingKind] = &[ $( FindingKind::$variant, )* ];

            pub fn name(self) -> &'static str {
                match self { $( FindingKind::$variant => $name, )* }
            }

            pub fn severity(self) -> Severity {
                match self { $( FindingKind::$variant => Severity::$sev, )* }
            }

            /// One line: what it means.
            pub fn summary(self) -> &'static str {
                match self { $( FindingKind::$variant => $summary, )* }
            }

            /// Usual causes in Cilium and what to do.
            pub fn explain(self) -> &'static str {
                match self { $( FindingKind::$variant => $explain, )* }
            }
        }
    };
}

kinds! {
    IpcacheMissing = "ipcache-missing", Critical,
        "the kvstore says this prefix should be in the node's ipcache, and it is not",
        "Traffic to the prefix is classified as world (or by a covering prefix): policy drops it or, in tunnel mode, it leaves unencapsulated. Usual causes: the agent missed a kvstore watch event (etcd connectivity loss, a compaction it did not recover from), a failed map update (map full: see map-pressure), or an agent restart that has not resynced yet. Check `cilium status` for kvstore health, `cilium bpf ipcache get <ip>`, and the agent log for ipcache errors; restarting the agent rebuilds the ipcache from the kvstore.";
    IpcacheStale = "ipcache-stale", Critical,
        "the ipcache holds a prefix that nothing in the kvstore (or on the node) explains",
        "A pod or node that went away is still mapped to an identity and tunnel endpoint, so a new owner of the IP is policed as the old one, or its traffic is tunnelled to the wrong node. Usual causes: a missed delete event, a leaked entry after an identity or IP was reused, or a restored map after an agent restart (a v1.7 agent removes entries stale from its downtime only at its first ipcache GC, up to 5 min later). A deleted node's entries are held for Cilium's 30 s node-delete hold-off before they count. Confirm with `etcdctl get cilium/state/ip/v1/default/<ip>` and `cilium bpf ipcache get <ip>`; an agent restart (or `cilium bpf ipcache delete`, carefully) removes it.";
    IpcacheIdentityMismatch = "ipcache-identity-mismatch", Critical,
        "the ipcache maps the prefix to a different security identity than the kvstore",
        "Policy for traffic from/to this IP is evaluated against the wrong identity: allowed traffic is dropped or denied traffic passes. Usual causes: an identity change (relabelled pod) whose kvstore update the agent missed, or two writers for the same IP. Compare `cilium bpf ipcache get <ip>` with the ip/v1 key's ID and `cilium identity get <id>`.";
    IpcacheTunnelMismatch = "ipcache-tunnel-mismatch", Critical,
        "the ipcache's tunnel endpoint for the prefix is not the node the kvstore says hosts it",
        "Encapsulated traffic goes to the wrong node (or none) and is dropped there. Usual causes: a pod IP moved to another node and the update was missed, or a node's IP changed. Check the ip/v1 key's HostIP and the hosting node's nodes/v1 entry.";
    IpcacheEncryptKeyMismatch = "ipcache-encrypt-key-mismatch", Warning,
        "the ipcache's encrypt key for the prefix differs from the key the kvstore announces",
        "With IPsec, packets are encrypted with a key index the peer does not expect (drops during or after key rotation); with WireGuard (key 255) traffic may bypass or wrongly enter the tunnel. Usual causes: a key rotation in progress or a node that missed it. Compare `cilium encrypt status` on both nodes.";
    EndpointNotInKvstore = "endpoint-not-in-kvstore", Critical,
        "a local endpoint has no cilium/state/ip/v1 entry, so other nodes do not know its identity",
        "Remote nodes classify this pod's traffic as world (or by a stale entry): their policies drop it. Usual causes: the agent lost its etcd lease (keys expire 15 min after the agent stops renewing), a failed kvstore write, or an endpoint restored after restart before kvstore sync. Check `cilium endpoint list`, `cilium status` (kvstore), and that the lease is alive.";
    EndpointIdentityMismatch = "endpoint-identity-mismatch", Critical,
        "the endpoint map's identity for a local endpoint differs from its ip/v1 entry",
        "This node and the rest of the cluster disagree on who the pod is. Usual causes: an identity change not yet propagated, or a stale ip/v1 key from a previous pod with the same IP. Compare `cilium endpoint get <id>` with the ip/v1 key.";
    KvstoreGhostEndpoint = "kvstore-ghost-endpoint", Warning,
        "an ip/v1 entry says this node hosts the IP, but no local endpoint has it",
        "Other nodes route and police the IP as a pod on this node that does not exist; if the IP is reused elsewhere, traffic is misdirected. Usual causes: a pod deleted while the agent could not reach etcd (the key stays until its lease expires), or a crashed agent whose lease is still alive. Check the key's lease with `etcdctl lease timetolive`.";
    IdentityMissing = "identity-missing", Critical,
        "an identity this node's datapath refers to (a local endpoint, an ip/v1 entry or an ipcache entry) has no cilium/state/identities/v1/id/<id> key",
        "This node cannot resolve the identity's labels, so its policies selecting it (e.g. an ingress rule allowing a remote pod's app label) do not apply; the evidence names the prefixes that carry it. Usual causes: identity garbage collection by the operator while still in use, or a kvstore restore from an old backup. Check `cilium identity get <id>` and the operator's identity-GC log.";
    IdentityReferenceMissing = "identity-reference-missing", Warning,
        "a local endpoint's identity lacks this node's value/<labels>/<node-ip> reference key",
        "The operator's identity garbage collector may delete an identity this node still uses. Usual causes: a lost lease or a failed allocator write. The agent re-creates references on resync; an agent restart forces it.";
    IdentityReferenceLeaked = "identity-reference-leaked", Info,
        "this node holds a value/<labels>/<node-ip> reference for an identity no local endpoint uses",
        "The identity is kept alive needlessly (it will not be garbage collected). Usual causes: an endpoint deleted while etcd was unreachable. Harmless until many accumulate; it disappears when the node's lease expires or on agent resync.";
    NodeMissing = "node-missing", Critical,
        "this node has no cilium/state/nodes/v1/<cluster>/<node> entry",
        "Other nodes have no tunnel endpoint, health IP or CIDR for this node: cross-node traffic to its pods fails. Usual causes: the agent lost its lease or cannot write to etcd, or --node-name / --cluster-name do not match the agent's.";
    CiliumHostMissing = "cilium-host-missing", Critical,
        "the node has no cilium_host interface",
        "The datapath's router interface is gone: pod-to-host and routed traffic fail. Usual causes: the agent is not running or is re-initialising, or kvcheck runs in a different network namespace than the host (the DaemonSet needs hostNetwork).";
    CiliumHostMismatch = "cilium-host-mismatch", Critical,
        "cilium_host's address is not the node's CiliumInternalIP",
        "Other nodes send tunnelled traffic for this node's router IP to an address it does not own; health checks and host-reachable services break. Usual causes: an IPAM change (new pod CIDR) not applied to the interface, or a stale nodes/v1 entry. Compare `ip addr show cilium_host` with the node entry.";
    NodeIpNotLocal = "node-ip-not-local", Warning,
        "an InternalIP/ExternalIP of this node's kvstore entry is not on any local interface",
        "Other nodes use it as this node's tunnel endpoint; packets to it do not arrive. Usual causes: the node's IP changed (DHCP, re-IP) and the entry is stale, or kvcheck runs in another network namespace.";
    PodcidrViolation = "podcidr-violation", Warning,
        "a local endpoint, router or health IP lies outside the node's alloc CIDRs",
        "Other nodes route the pod CIDR to this node; an IP outside it is unreachable from them (or belongs to another node). Usual causes: a pod CIDR change with old endpoints still running, or IPAM mode confusion.";
    HealthEndpointMissing = "health-endpoint-missing", Warning,
        "the node's health IP has no local endpoint in the endpoint map",
        "cilium-health probes to this node fail, so connectivity status is wrong cluster-wide. Usual causes: the health endpoint failed to start or was removed; `cilium status` shows it.";
    TunnelMissing = "tunnel-missing", Critical,
        "a remote node's pod CIDR has no tunnel map entry (tunnel mode, v1.17 and older)",
        "Traffic to that node's pods is not encapsulated and is dropped. Usual causes: a missed node add event or a full tunnel map. Check `cilium bpf tunnel list` against the node entries.";
    TunnelStale = "tunnel-stale", Warning,
        "the tunnel map holds a pod CIDR no node in the kvstore owns",
        "A removed node's CIDR is still tunnelled to its old IP; if the CIDR is reassigned, traffic goes to the wrong node. Cilium keeps a deleted node's entries for its 30 s node-delete hold-off on purpose; kvcheck reports them only once that has certainly passed. Usual causes: a missed node delete event.";
    TunnelMismatch = "tunnel-mismatch", Critical,
        "the tunnel map sends a pod CIDR to a different node IP than the kvstore says",
        "Encapsulated traffic for that CIDR goes to the wrong node. Usual causes: a node's IP changed and the update was missed.";
    KvstoreMalformed = "kvstore-malformed", Warning,
        "a Cilium key's value does not decode (bad JSON, IP/key mismatch, non-numeric id)",
        "Cilium agents skip such values (or log errors on every resync), so whatever they describe is missing from every node. Usual causes: a manual edit, a foreign writer, or a version skew. Inspect with `etcdctl get <key>`.";
    KvstoreNotSynced = "kvstore-not-synced", Warning,
        "sync canaries (cilium/synced/...) are present but incomplete",
        "The writer of a cluster's data (clustermesh-apiserver, KVStoreMesh) has not finished its initial sync, so agents may act on partial data (and delete what they miss). Check the writer's logs and status.";
    HeartbeatStale = "heartbeat-stale", Warning,
        "cilium/.heartbeat has not been renewed recently",
        "The operator writes it every minute; agents treat a stale heartbeat as a kvstore problem and may restart their session. Check the cilium-operator pods and their etcd connectivity.";
    MapPressure = "map-pressure", Warning,
        "a datapath map is at least 90 % full",
        "New entries will fail to insert (missing ipcache entries, endpoints that cannot start). Raise the map size (bpf-map-dynamic-size-ratio, bpf-*-map-max) or find what fills it.";
    EndpointNodeUnknown = "endpoint-node-unknown", Warning,
        "CiliumEndpoints name a hosting node IP (status.networking.node) that no CiliumNode has (CRD mode)",
        "Every node's ipcache still sends these pods' IPs to a node that is gone, so traffic to them is black-holed, and a new pod that reuses an IP is policed as the old one until the CEP goes. Cilium does not remove them itself: a CEP lives until its Pod is deleted, or until the operator's CEP garbage collection (every 5 min, CEPs older than 5 min whose pod is missing or not running) removes it; a node deleted without draining leaves them. Check `kubectl get ciliumendpoints -A -o wide` for the node IP, then the pods behind them (`kubectl get pod -o wide`), and the cilium-operator's endpoint-GC log.";
    EndpointIpConflict = "endpoint-ip-conflict", Warning,
        "one IP is in two live CiliumEndpoints (CRD mode)",
        "Cilium's ipcache keeps whichever CEP event it saw last, and deleting the older CEP does not remove the entry (Cilium deletes only when the namespace/name still match), so nodes may disagree on the IP's identity and node. Usual causes: IP reuse after a pod moved while its old CEP was not yet garbage-collected, or a stale CEP of a pod whose node is gone. `kubectl get ciliumendpoints -A -o wide | grep <ip>` shows both; deleting the stale pod (or CEP) resolves it.";
    IpcacheUnknownCluster = "ipcache-unknown-cluster", Critical,
        "the ipcache holds an entry whose identity belongs to a cluster id no configured remote cluster has (ClusterMesh)",
        "Global identities carry their cluster id (bits 16-23, or 15-23 with 511 clusters). An entry of a cluster that is no longer in the mesh was not drained: Cilium drains a remote when its config file leaves the ClusterMesh config directory, and a missed drain (an agent that was down or stuck then) leaves its pods mapped to identities nobody resolves, so a new owner of the IP is policed as a stranger. Also seen after a cluster's id changed (#36338). Check the config files in --clustermesh-config (`cilium-dbg status --all-clusters`) and `cilium bpf ipcache get <ip>`; an agent restart rebuilds the ipcache from the remotes it has.";
    RemoteIdentityInvalid = "remote-identity-invalid", Critical,
        "a remote cluster's identity that this node uses is refused by Cilium: it lacks the cluster's label or carries another cluster's id (ClusterMesh)",
        "Cilium accepts a remote identity only if its id lies in the remote cluster's range and its labels include `k8s:io.cilium.k8s.policy.cluster=<cluster>`; otherwise the identity has no labels on this node and policy treats the pod as unknown (cilium/cilium#32060), and v1.17+ also drops the pod IPs that use it. Usual causes: a cluster id changed while pods kept identities from the old range (#36338), or a foreign writer in the remote kvstore. Check the identity in the remote (`etcdctl get cilium/state/identities/v1/id/<id>`) and the cluster-config id.";
    ClustermeshIpOverlap = "clustermesh-ip-overlap", Warning,
        "two clusters of the mesh announce the same prefix (overlapping pod CIDRs or an IP in use twice)",
        "Cilium keeps the local cluster's entry over a remote one; between two remotes the last event wins, and a delete from either removes the entry. Traffic to the IP reaches one of the two pods, policed by that one's identity. ClusterMesh requires disjoint pod CIDRs; fix the IPAM of one cluster. The evidence names both clusters' keys.";
    RemoteClusterConfigInvalid = "remote-cluster-config-invalid", Warning,
        "a configured remote cluster has no usable cilium/cluster-config/<name>, so Cilium syncs nothing from it (ClusterMesh)",
        "Cilium v1.16+ requires the remote's cluster-config (written by its operator, clustermesh-apiserver or KVStoreMesh) and validates it: id 1-255 (or 511), not the local one, not taken by another remote. Without it the agent retries and never syncs that cluster: pods there are unreachable or policed as world from this node. Also seen when the writer's lease expired (#37701). Check `etcdctl get cilium/cluster-config/<name>` in that cluster and `cilium-dbg status --all-clusters`.";
    DatapathMapMismatch = "datapath-map-mismatch", Critical,
        "the BPF programs attached to the node's interfaces use a map other than the pinned one under a Cilium map name, or two different maps under one name",
        "Cilium's agent writes (and `cilium bpf ... list` shows) the pinned map, while the datapath looks up another one: traffic is dropped or mis-policed although every listing looks right (cilium/cilium#45196: pinned ipcache empty, programs on an unpinned populated one; #25154: several ipcache maps alive with tail-call programs on old ones; #11517: endpoints running with an outdated ipcache after the map was recreated). The evidence lists the pinned id and entries, and each map id in use with its entries and the interfaces and programs (tail calls included) using it. kvcheck then checks the map the programs use. Usual causes: a map re-created under its pin (restart, upgrade, size change) while some endpoints were not regenerated. During a Cilium restart this is the normal transition (new maps pinned, programs switched as endpoints regenerate): with access to Cilium's API socket kvcheck does not judge until the agent is ready and has regenerated every endpoint it restored, so a mismatch reported then is a program left on an orphaned map. Regenerate the affected endpoints (restart the pods or the agent) and compare `bpftool prog show id <id>` map_ids with `bpftool map show pinned <path>`.";
}

impl FindingKind {
    pub fn from_name(name: &str) -> Option<FindingKind> {
        FindingKind::ALL.iter().copied().find(|k| k.name() == name)
    }
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FindingKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FindingKind::from_name(s).ok_or_else(|| {
            let names: Vec<&str> = FindingKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown finding kind {s:?}; known: {}", names.join(", "))
        })
    }
}

impl Serialize for FindingKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}
