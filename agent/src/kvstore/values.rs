//! Typed Cilium kvstore values (pure decoding; no I/O). Every Cilium version's JSON listed in
//! docs: unknown fields are ignored, optional fields optional. A value that does not decode
//! becomes a [`Malformed`] item carrying its key and the reason.

use std::borrow::Cow;
use std::net::IpAddr;

use base64::Engine as _;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub const NODES_PREFIX: &str = "cilium/state/nodes/v1/";
pub const IP_PREFIX: &str = "cilium/state/ip/v1/";
/// The `ip/v1` address space Cilium writes every entry in.
pub const IP_DEFAULT_SPACE: &str = "cilium/state/ip/v1/default/";
pub const IDENTITY_ID_PREFIX: &str = "cilium/state/identities/v1/id/";
pub const IDENTITY_VALUE_PREFIX: &str = "cilium/state/identities/v1/value/";
pub const HEARTBEAT_KEY: &str = "cilium/.heartbeat";
pub const SYNCED_PREFIX: &str = "cilium/synced/";
pub const KVSTOREMESH_CACHE_PREFIX: &str = "cilium/cache/";

/// Where a key/value came from in etcd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KvMeta {
    /// Shared (`Arc`): the expectations derived from an entry name it too.
    pub key: std::sync::Arc<str>,
    pub mod_revision: i64,
    /// The etcd lease holding the key (0 = none).
    pub lease: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Malformed {
    #[serde(flatten)]
    pub meta: KvMeta,
    pub reason: String,
    /// The value (cut to 512 bytes).
    pub value: String,
}

impl Malformed {
    pub fn new(meta: KvMeta, value: &[u8], reason: impl Into<String>) -> Malformed {
        let shown = String::from_utf8_lossy(&value[..value.len().min(512)]).into_owned();
        Malformed {
            meta,
            reason: reason.into(),
            value: shown,
        }
    }
}

// ---------- nodes ----------

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeAddress {
    /// `InternalIP`, `ExternalIP`, `CiliumInternalIP`, ...
    #[serde(rename = "type")]
    pub addr_type: String,
    pub ip: IpAddr,
}

/// `cilium/state/nodes/v1/<cluster>/<node>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeEntry {
    #[serde(flatten)]
    pub meta: KvMeta,
    pub name: String,
    pub cluster: String,
    pub addresses: Vec<NodeAddress>,
    pub ipv4_alloc_cidr: Option<IpNet>,
    pub ipv6_alloc_cidr: Option<IpNet>,
    pub ipv4_secondary_alloc_cidrs: Vec<IpNet>,
    pub ipv6_secondary_alloc_cidrs: Vec<IpNet>,
    pub ipv4_health_ip: Option<IpAddr>,
    pub ipv6_health_ip: Option<IpAddr>,
    pub ipv4_ingress_ip: Option<IpAddr>,
    pub ipv6_ingress_ip: Option<IpAddr>,
    pub cluster_id: u32,
    pub source: String,
    pub encryption_key: u8,
    pub node_identity: u32,
}

impl NodeEntry {
    /// The first address of `addr_type` in `family` (4 or 6).
    pub fn address_of(&self, addr_type: &str, v4: bool) -> Option<IpAddr> {
        self.addresses
            .iter()
            .find(|a| a.addr_type == addr_type && a.ip.is_ipv4() == v4)
            .map(|a| a.ip)
    }

    /// Cilium's node IP for a family: first InternalIP, else last ExternalIP, else the first
    /// other non-CiliumInternalIP address.
    pub fn node_ip(&self, v4: bool) -> Option<IpAddr> {
        let fam = |a: &&NodeAddress| a.ip.is_ipv4() == v4;
        self.address_of("InternalIP", v4)
            .or_else(|| self.addresses.iter().filter(fam).filter(|a| a.addr_type == "ExternalIP").last().map(|a| a.ip))
            .or_else(|| self.addresses.iter().filter(fam).find(|a| a.addr_type != "CiliumInternalIP").map(|a| a.ip))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NodeJson {
    name: String,
    cluster: String,
    #[serde(rename = "IPAddresses", default)]
    ip_addresses: Option<Vec<AddressJson>>,
    #[serde(rename = "IPv4AllocCIDR", default)]
    ipv4_alloc_cidr: Option<CidrJson>,
    #[serde(rename = "IPv6AllocCIDR", default)]
    ipv6_alloc_cidr: Option<CidrJson>,
    #[serde(rename = "IPv4SecondaryAllocCIDRs", default)]
    ipv4_secondary: Option<Vec<CidrJson>>,
    #[serde(rename = "IPv6SecondaryAllocCIDRs", default)]
    ipv6_secondary: Option<Vec<CidrJson>>,
    #[serde(rename = "IPv4HealthIP", default)]
    ipv4_health_ip: Option<String>,
    #[serde(rename = "IPv6HealthIP", default)]
    ipv6_health_ip: Option<String>,
    #[serde(rename = "IPv4IngressIP", default)]
    ipv4_ingress_ip: Option<String>,
    #[serde(rename = "IPv6IngressIP", default)]
    ipv6_ingress_ip: Option<String>,
    #[serde(rename = "ClusterID", default)]
    cluster_id: Option<u32>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    encryption_key: Option<u8>,
    #[serde(default)]
    node_identity: Option<u32>,
}

#[derive(Deserialize)]
struct AddressJson {
    #[serde(rename = "Type")]
    addr_type: String,
    #[serde(rename = "IP")]
    ip: String,
}

#[derive(Deserialize)]
struct CidrJson {
    #[serde(rename = "IP")]
    ip: String,
    #[serde(rename = "Mask")]
    mask: Option<String>,
}

/// A Go `net.IPMask` as base64 → prefix length (contiguous masks only).
pub fn mask_bits(b64: &str) -> Result<u8, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("mask {b64:?} is not base64: {e}"))?;
    let bits: u32 = bytes.iter().map(|b| b.count_ones()).sum();
    let contiguous = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1))
        .skip_while(|&bit| bit == 1)
        .all(|bit| bit == 0);
    if !contiguous || !(bytes.len() == 4 || bytes.len() == 16) {
        return Err(format!("mask {b64:?} is not a contiguous IPv4/IPv6 netmask"));
    }
    Ok(bits as u8)
}

fn parse_ip(s: &str, field: &str) -> Result<IpAddr, String> {
    s.parse().map_err(|_| format!("{field} {s:?} is not an IP address"))
}

fn optional_ip(s: Option<&str>, field: &str) -> Result<Option<IpAddr>, String> {
    match s {
        None | Some("") => Ok(None),
        Some(s) => parse_ip(s, field).map(Some),
    }
}

fn cidr(c: CidrJson, field: &str) -> Result<IpNet, String> {
    let ip = parse_ip(&c.ip, field)?;
    let bits = match c.mask.as_deref() {
        Some(m) => mask_bits(m)?,
        None => if ip.is_ipv4() { 32 } else { 128 },
    };
    IpNet::new(ip, bits).map_err(|e| format!("{field}: {e}"))
}

/// Decodes a node value; the key must be `cilium/state/nodes/v1/<cluster>/<name>`.
pub fn decode_node(meta: KvMeta, value: &[u8]) -> Result<NodeEntry, Malformed> {
    let fail = |reason: String| Malformed::new(meta.clone(), value, reason);
    let j: NodeJson = serde_json::from_slice(value).map_err(|e| fail(format!("node JSON: {e}")))?;
    if j.name.is_empty() || j.cluster.is_empty() {
        return Err(fail("node has an empty Name or Cluster".into()));
    }
    let key_tail = meta.key.strip_prefix(NODES_PREFIX).unwrap_or_default();
    let expected = format!("{}/{}", j.cluster, j.name);
    if key_tail != expected {
        return Err(fail(format!("value names node {expected:?} but the key says {key_tail:?}")));
    }
    let addresses = j
        .ip_addresses
        .unwrap_or_default()
        .into_iter()
        .map(|a| Ok(NodeAddress { ip: parse_ip(&a.ip, &format!("{} address", a.addr_type))?, addr_type: a.addr_type }))
        .collect::<Result<Vec<_>, String>>()
        .map_err(&fail)?;
    let cidrs = |v: Option<Vec<CidrJson>>, f: &str| -> Result<Vec<IpNet>, String> {
        v.unwrap_or_default().into_iter().map(|c| cidr(c, f)).collect()
    };
    let result = (|| -> Result<NodeEntry, String> {
        Ok(NodeEntry {
            ipv4_alloc_cidr: j.ipv4_alloc_cidr.map(|c| cidr(c, "IPv4AllocCIDR")).transpose()?,
            ipv6_alloc_cidr: j.ipv6_alloc_cidr.map(|c| cidr(c, "IPv6AllocCIDR")).transpose()?,
            ipv4_secondary_alloc_cidrs: cidrs(j.ipv4_secondary, "IPv4SecondaryAllocCIDRs")?,
            ipv6_secondary_alloc_cidrs: cidrs(j.ipv6_secondary, "IPv6SecondaryAllocCIDRs")?,
            ipv4_health_ip: optional_ip(j.ipv4_health_ip.as_deref(), "IPv4HealthIP")?,
            ipv6_health_ip: optional_ip(j.ipv6_health_ip.as_deref(), "IPv6HealthIP")?,
            ipv4_ingress_ip: optional_ip(j.ipv4_ingress_ip.as_deref(), "IPv4IngressIP")?,
            ipv6_ingress_ip: optional_ip(j.ipv6_ingress_ip.as_deref(), "IPv6IngressIP")?,
            cluster_id: j.cluster_id.unwrap_or(0),
            source: j.source.unwrap_or_default(),
            encryption_key: j.encryption_key.unwrap_or(0),
            node_identity: j.node_identity.unwrap_or(0),
            name: j.name,
            cluster: j.cluster,
            addresses,
            meta: meta.clone(),
        })
    })();
    result.map_err(fail)
}

// ---------- ip/v1 ----------

/// `cilium/state/ip/v1/default/<ip>[/<bits>]` (IPIdentityPair).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IpEntry {
    #[serde(flatten)]
    pub meta: KvMeta,
    /// The address as a prefix (/32 or /128 for endpoints, whose Mask is null).
    pub prefix: IpNet,
    pub host_ip: Option<IpAddr>,
    pub identity: u32,
    pub encrypt_key: u8,
    /// Cilium's `Metadata`, `K8sNamespace` and `K8sPodName`, serialized as those three fields.
    #[serde(flatten)]
    pub owner: IpOwner,
}

/// An `ip/v1` entry's `Metadata` string and the pod it names (`K8sNamespace`, `K8sPodName`;
/// empty is none), in one allocation: ~100k entries are decoded per full read, and three
/// strings each cost 200k more allocations and frees, and 48 bytes more per entry.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct IpOwner {
    /// The three strings one after another.
    text: Box<str>,
    /// Where the namespace and the pod name start in `text`.
    namespace_at: u32,
    pod_at: u32,
}

impl IpOwner {
    pub fn new(metadata: &str, k8s_namespace: Option<&str>, k8s_pod_name: Option<&str>) -> IpOwner {
        let (namespace, pod) = (k8s_namespace.unwrap_or_default(), k8s_pod_name.unwrap_or_default());
        let mut text = String::with_capacity(metadata.len() + namespace.len() + pod.len());
        for s in [metadata, namespace, pod] {
            text.push_str(s);
        }
        // Values come from etcd responses and API objects, far below 4 GiB; saturating keeps
        // the slices in bounds regardless.
        let at = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        IpOwner { namespace_at: at(metadata.len()), pod_at: at(metadata.len() + namespace.len()), text: text.into_boxed_str() }
    }

    fn part(&self, start: u32, end: usize) -> &str {
        self.text.get(start as usize..end).unwrap_or_default()
    }

    pub fn metadata(&self) -> &str {
        self.part(0, self.namespace_at as usize)
    }

    pub fn k8s_namespace(&self) -> Option<&str> {
        Some(self.part(self.namespace_at, self.pod_at as usize)).filter(|s| !s.is_empty())
    }

    pub fn k8s_pod_name(&self) -> Option<&str> {
        Some(self.part(self.pod_at, self.text.len())).filter(|s| !s.is_empty())
    }
}

impl std::fmt::Debug for IpOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpOwner").field("metadata", &self.metadata()).field("k8s_namespace", &self.k8s_namespace()).field("k8s_pod_name", &self.k8s_pod_name()).finish()
    }
}

impl Serialize for IpOwner {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("IpOwner", 3)?;
        st.serialize_field("metadata", self.metadata())?;
        st.serialize_field("k8s_namespace", &self.k8s_namespace())?;
        st.serialize_field("k8s_pod_name", &self.k8s_pod_name())?;
        st.end()
    }
}

/// Borrows from the value where it can: 100k of these are decoded per full read.
#[derive(Debug, Deserialize, PartialEq)]
struct IpJson<'a> {
    #[serde(rename = "IP", borrow)]
    ip: Cow<'a, str>,
    #[serde(rename = "Mask", default, borrow)]
    mask: Option<Cow<'a, str>>,
    #[serde(rename = "HostIP", default, borrow)]
    host_ip: Option<Cow<'a, str>>,
    #[serde(rename = "ID")]
    id: u32,
    #[serde(rename = "Key", default)]
    key: Option<u8>,
    #[serde(rename = "Metadata", default, borrow)]
    metadata: Option<Cow<'a, str>>,
    #[serde(rename = "K8sNamespace", default, borrow)]
    k8s_namespace: Option<Cow<'a, str>>,
    #[serde(rename = "K8sPodName", default, borrow)]
    k8s_pod_name: Option<Cow<'a, str>>,
}

impl<'a> IpJson<'a> {
    /// The value read the way Cilium's Go encoder writes it: one flat object, no whitespace,
    /// no escapes, no nested values. Measured over 100k entries, parsing and checking them
    /// (key, JSON, addresses) took 41 ms with serde and 31 ms with this. Anything else is
    /// `None`, and serde reads (or rejects) it exactly as before; where this accepts, it
    /// agrees with serde (the kvstore_values fuzz target checks it).
    fn fast(v: &'a [u8]) -> Option<IpJson<'a>> {
        let mut r = FlatJson { v, at: 0 };
        r.expect(b'{')?;
        let (mut ip, mut mask, mut host_ip, mut id, mut key, mut metadata, mut namespace, mut pod) = (None, None, None, None, None, None, None, None);
        loop {
            let name = r.string()?;
            r.expect(b':')?;
            let value = r.value()?;
            match name {
                "IP" => once(&mut ip, value.string()?)?,
                "Mask" => once(&mut mask, value.optional_string()?)?,
                "HostIP" => once(&mut host_ip, value.optional_string()?)?,
                "ID" => once(&mut id, value.number().and_then(|n| u32::try_from(n).ok())?)?,
                "Key" => once(&mut key, value.optional_number().map(|n| n.map(u8::try_from).transpose().ok())??)?,
                "Metadata" => once(&mut metadata, value.optional_string()?)?,
                "K8sNamespace" => once(&mut namespace, value.optional_string()?)?,
                "K8sPodName" => once(&mut pod, value.optional_string()?)?,
                _ => {}
            }
            match r.next()? {
                b',' => {}
                b'}' if r.at == v.len() => break,
                _ => return None,
            }
        }
        let borrowed = |s: Option<Option<&'a str>>| s.flatten().map(Cow::Borrowed);
        Some(IpJson {
            ip: Cow::Borrowed(ip?),
            mask: borrowed(mask),
            host_ip: borrowed(host_ip),
            id: id?,
            key: key.flatten(),
            metadata: borrowed(metadata),
            k8s_namespace: borrowed(namespace),
            k8s_pod_name: borrowed(pod),
        })
    }
}

/// Files a field's value; `None` when it was seen before (serde's error to report).
fn once<T>(slot: &mut Option<T>, v: T) -> Option<()> {
    slot.replace(v).is_none().then_some(())
}

/// Whether [`IpJson`]'s fast read of `value`, where it accepts it, agrees with serde's (for
/// the fuzz target).
#[doc(hidden)]
pub fn ip_value_fast_read_agrees(value: &[u8]) -> bool {
    IpJson::fast(value).is_none_or(|fast| serde_json::from_slice::<IpJson>(value).ok() == Some(fast))
}

/// A cursor over the flat JSON objects [`IpJson::fast`] reads.
struct FlatJson<'a> {
    v: &'a [u8],
    at: usize,
}

/// A flat JSON value: a string without escapes, an unsigned integer, null, true or false.
enum FlatValue<'a> {
    Str(&'a str),
    Number(u64),
    Null,
    Bool,
}

impl<'a> FlatValue<'a> {
    fn string(self) -> Option<&'a str> {
        match self {
            FlatValue::Str(s) => Some(s),
            _ => None,
        }
    }

    fn optional_string(self) -> Option<Option<&'a str>> {
        match self {
            FlatValue::Null => Some(None),
            v => v.string().map(Some),
        }
    }

    fn number(self) -> Option<u64> {
        match self {
            FlatValue::Number(n) => Some(n),
            _ => None,
        }
    }

    fn optional_number(self) -> Option<Option<u64>> {
        match self {
            FlatValue::Null => Some(None),
            v => v.number().map(Some),
        }
    }
}

impl<'a> FlatJson<'a> {
    fn next(&mut self) -> Option<u8> {
        let b = *self.v.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        (self.next()? == b).then_some(())
    }

    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let rest = &self.v[self.at..];
        let len = rest.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if rest[len] != b'"' {
            return None;
        }
        self.at += len + 1;
        std::str::from_utf8(&rest[..len]).ok()
    }

    fn value(&mut self) -> Option<FlatValue<'a>> {
        let rest = &self.v[self.at..];
        let literal = |word: &[u8], v: FlatValue<'a>| rest.starts_with(word).then_some((word.len(), v));
        let (len, value) = match *rest.first()? {
            b'"' => return self.string().map(FlatValue::Str),
            b'n' => literal(b"null", FlatValue::Null)?,
            b't' => literal(b"true", FlatValue::Bool)?,
            b'f' => literal(b"false", FlatValue::Bool)?,
            b'0'..=b'9' => {
                let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
                // JSON has no leading zeros; a fraction or exponent follows as a byte the
                // caller does not accept.
                if digits > 1 && rest[0] == b'0' {
                    return None;
                }
                (digits, FlatValue::Number(std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?))
            }
            _ => return None,
        };
        self.at += len;
        Some(value)
    }
}

/// The prefix a key names: `<ip>` or `<ip>/<bits>` after `cilium/state/ip/v1/<space>/`, and
/// the address as written when the key names a bare address.
fn ip_key_prefix(key: &str) -> Result<(IpNet, Option<&str>), String> {
    let rest = key.strip_prefix(IP_PREFIX).ok_or("not an ip/v1 key")?;
    let (_space, addr) = rest.split_once('/').ok_or("ip/v1 key has no address space segment")?;
    if addr.contains('/') {
        let prefix = addr.parse::<IpNet>().map_err(|_| format!("key suffix {addr:?} is not an IP prefix"))?;
        Ok((prefix, None))
    } else {
        let ip = addr.parse::<IpAddr>().map_err(|_| format!("key suffix {addr:?} is not an IP address"))?;
        Ok((IpNet::from(ip), Some(addr)))
    }
}

/// Parses and validates an `ip/v1` value against its key, allocating nothing for the strings.
fn parse_ip_value<'a>(key: &str, value: &'a [u8]) -> Result<(IpNet, Option<IpAddr>, IpJson<'a>), String> {
    let (key_prefix, key_addr) = ip_key_prefix(key)?;
    let j = match IpJson::fast(value) {
        Some(j) => j,
        None => serde_json::from_slice(value).map_err(|e| format!("IPIdentityPair JSON: {e}"))?,
    };
    let prefix = match j.mask.as_deref() {
        // The key's own address, already parsed (once is enough at 100k entries a read).
        None if key_addr == Some(&*j.ip) => key_prefix,
        None => IpNet::from(parse_ip(&j.ip, "IP")?),
        Some(m) => IpNet::new(parse_ip(&j.ip, "IP")?, mask_bits(m)?).map_err(|e| e.to_string())?,
    };
    if prefix != key_prefix {
        return Err(format!("value is for {prefix} but the key names {key_prefix}"));
    }
    let host_ip = optional_ip(j.host_ip.as_deref(), "HostIP")?;
    Ok((prefix, host_ip, j))
}

pub fn decode_ip(meta: KvMeta, value: &[u8]) -> Result<IpEntry, Malformed> {
    let (prefix, host_ip, j) = parse_ip_value(&meta.key, value).map_err(|reason| Malformed::new(meta.clone(), value, reason))?;
    Ok(IpEntry {
        prefix,
        host_ip,
        identity: j.id,
        encrypt_key: j.key.unwrap_or(0),
        owner: IpOwner::new(j.metadata.as_deref().unwrap_or_default(), j.k8s_namespace.as_deref(), j.k8s_pod_name.as_deref()),
        meta,
    })
}

/// The host IP of a valid `ip/v1` value, without building the entry: a node's view keeps a
/// handful of the ~100k entries, and needs only to know the rest are valid. `None` when the
/// value is malformed (decode it with [`decode_ip`] for the reason).
pub fn valid_ip_host(key: &str, value: &[u8]) -> Option<Option<IpAddr>> {
    parse_ip_value(key, value).ok().map(|(_, host, _)| host)
}

// ---------- identities ----------

/// `cilium/state/identities/v1/id/<id>` → its label string.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdentityEntry {
    #[serde(flatten)]
    pub meta: KvMeta,
    pub id: u32,
    /// `source:key=value;` labels as Cilium renders them.
    pub labels: String,
}

pub fn decode_identity(meta: KvMeta, value: &[u8]) -> Result<IdentityEntry, Malformed> {
    let fail = |reason: String| Malformed::new(meta.clone(), value, reason);
    let id_str = meta.key.strip_prefix(IDENTITY_ID_PREFIX).unwrap_or_default();
    let id: u32 = id_str.parse().map_err(|_| fail(format!("identity id {id_str:?} is not a number")))?;
    let labels = std::str::from_utf8(value).map_err(|_| fail("labels are not UTF-8".into()))?;
    if labels.is_empty() {
        return Err(fail("identity has no labels".into()));
    }
    Ok(IdentityEntry { id, labels: labels.to_owned(), meta })
}

/// `cilium/state/identities/v1/value/<labels>/<node-ip>` → id: this node uses the identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdentityReference {
    #[serde(flatten)]
    pub meta: KvMeta,
    pub labels: String,
    /// The suffix: the node's IP (docs say name; Cilium writes the IP).
    pub node: String,
    pub id: u32,
}

pub fn decode_identity_reference(meta: KvMeta, value: &[u8]) -> Result<IdentityReference, Malformed> {
    let fail = |reason: String| Malformed::new(meta.clone(), value, reason);
    let rest = meta.key.strip_prefix(IDENTITY_VALUE_PREFIX).unwrap_or_default();
    // Labels may contain '/', the node suffix does not.
    let (labels, node) = rest.rsplit_once('/').ok_or_else(|| fail("value key has no /<node> suffix".into()))?;
    let text = std::str::from_utf8(value).map_err(|_| fail("id is not UTF-8".into()))?;
    let id: u32 = text.trim().parse().map_err(|_| fail(format!("id {text:?} is not a number")))?;
    Ok(IdentityReference { labels: labels.to_owned(), node: node.to_owned(), id, meta })
}

/// A node whose kvstore key was deleted and whose datapath entries Cilium may still hold.
#[derive(Clone, Debug, Serialize)]
pub struct HeldNode {
    /// The node's last value before the delete.
    pub node: NodeEntry,
    pub deleted_revision: i64,
    /// The delete happened after this (the heartbeat written before it), if known.
    pub deleted_after: Option<chrono::DateTime<chrono::Utc>>,
    /// ... and no later than this (the next heartbeat, or when kvcheck saw or read it).
    pub deleted_by: chrono::DateTime<chrono::Utc>,
    /// Cilium has certainly applied the delete by then: `deleted_by` + the hold-off.
    pub held_until: chrono::DateTime<chrono::Utc>,
    /// How `deleted_by` was bounded.
    pub bounded_by: String,
}

impl HeldNode {
    pub fn key(&self) -> &str {
        &self.node.meta.key
    }
}

/// A heartbeat value (RFC 3339, surrounding whitespace allowed) as a time.
pub fn parse_time(rfc3339: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(rfc3339.trim()).ok().map(|t| t.with_timezone(&chrono::Utc))
}


#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str) -> KvMeta {
        KvMeta { key: key.into(), mod_revision: 1, lease: 0 }
    }

    #[test]
    fn ip_values_as_cilium_writes_them_are_read_without_serde_and_agree_with_it() {
        let canonical = [
            r#"{"IP":"10.6.1.28","Mask":null,"HostIP":"10.5.1.132","ID":16195,"Key":0,"Metadata":"cilium-global:default:k8s-node1:541","K8sNamespace":"default","K8sPodName":"pod-a"}"#,
            r#"{"IP":"10.6.1.0","Mask":"////AA==","HostIP":"10.5.1.132","ID":2,"Key":0,"Metadata":""}"#,
            r#"{"IP":"f00d::a0f:0:0:1","Mask":null,"HostIP":"","ID":2,"Key":255,"Metadata":"","Other":true,"More":false,"N":7,"S":"x"}"#,
            r#"{"ID":0,"IP":"10.0.0.1","Key":null,"Metadata":null}"#,
        ];
        for v in canonical {
            let fast = IpJson::fast(v.as_bytes()).unwrap_or_else(|| panic!("{v} should be read fast"));
            assert_eq!(Some(fast), serde_json::from_slice::<IpJson>(v.as_bytes()).ok(), "{v}");
        }
        // Left to serde: whitespace, escapes, nested values, duplicates, numbers serde reads
        // differently or rejects, missing fields, trailing bytes, bad UTF-8.
        let other: &[&[u8]] = &[
            br#"{ "IP":"10.0.0.1","ID":1}"#,
            br#"{"IP":"10.0.0.1","ID":1} "#,
            br#"{"IP":"10.0.0.1\u0030","ID":1}"#,
            br#"{"IP":"10.0.0.1","ID":1,"NamedPorts":[{"Name":"http","Port":80}]}"#,
            br#"{"IP":"10.0.0.1","ID":1,"IP":"10.0.0.2"}"#,
            br#"{"IP":"10.0.0.1","ID":01}"#,
            br#"{"IP":"10.0.0.1","ID":1.0}"#,
            br#"{"IP":"10.0.0.1","ID":1e3}"#,
            br#"{"IP":"10.0.0.1","ID":-1}"#,
            br#"{"IP":"10.0.0.1","ID":4294967296}"#,
            br#"{"IP":"10.0.0.1","ID":1,"Key":256}"#,
            br#"{"IP":null,"ID":1}"#,
            br#"{"ID":1}"#,
            br#"{"IP":"10.0.0.1"}"#,
            br#"{}"#,
            br#"["10.0.0.1",null,null,1]"#,
            br#"{"IP":"10.0.0.1","ID":1}{}"#,
            b"{\"IP\":\"10.0.0.\xff\",\"ID\":1}",
            b"{\"IP\":\"10.0.0.1\t\",\"ID\":1}",
            br#"{"IP":"10.0.0.1","ID":1,}"#,
            br#"{"IP":"10.0.0.1","ID":nul}"#,
        ];
        for v in other {
            assert!(IpJson::fast(v).is_none(), "{} should be left to serde", String::from_utf8_lossy(v));
            assert!(ip_value_fast_read_agrees(v));
        }
    }

    #[test]
    fn masks() {
        assert_eq!(mask_bits("////AA=="), Ok(24));
        assert_eq!(mask_bits("//8AAA=="), Ok(16));
        assert_eq!(mask_bits("//////////8AAAAAAAAAAA=="), Ok(64));
        assert!(mask_bits("/w8AAA==").is_err());
        assert!(mask_bits("%%").is_err());
    }

    #[test]
    fn real_1_7_node_and_clustermesh_node() {
        let v = br#"{"Name":"k8s-node1","Cluster":"default","IPAddresses":[{"Type":"InternalIP","IP":"10.5.1.132"},{"Type":"CiliumInternalIP","IP":"10.6.1.124"}],"IPv4AllocCIDR":{"IP":"10.6.1.0","Mask":"////AA=="},"IPv6AllocCIDR":null,"IPv4HealthIP":"","IPv6HealthIP":"","ClusterID":0,"Source":"local","EncryptionKey":0}"#;
        let n = decode_node(meta("cilium/state/nodes/v1/default/k8s-node1"), v).unwrap();
        assert_eq!(n.address_of("CiliumInternalIP", true), Some("10.6.1.124".parse().unwrap()));
        assert_eq!(n.node_ip(true), Some("10.5.1.132".parse().unwrap()));
        assert_eq!(n.ipv4_alloc_cidr, Some("10.6.1.0/24".parse().unwrap()));
        assert_eq!((n.ipv4_health_ip, n.ipv6_alloc_cidr), (None, None));

        let s1 = br#"{"Name":"test-node-1","Cluster":"cluster3","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.2"},{"Type":"InternalIP","IP":"fc00:c111::2"},{"Type":"CiliumInternalIP","IP":"10.244.0.10"},{"Type":"CiliumInternalIP","IP":"fd00:10:244::e2d6"}],"IPv4AllocCIDR":{"IP":"10.244.0.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{"IP":"fd00:10:244::","Mask":"//////////8AAAAAAAAAAA=="},"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.244.0.134","IPv6HealthIP":"fd00:10:244::d812","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":3,"Source":"custom-resource","EncryptionKey":0,"Labels":{"kubernetes.io/hostname":"test-node-1"},"Annotations":{"network.cilium.io/wg-pub-key":"VRks"},"NodeIdentity":0,"WireguardPubKey":"VRks","BootID":"570d3fd1"}"#;
        let n = decode_node(meta("cilium/state/nodes/v1/cluster3/test-node-1"), s1).unwrap();
        assert_eq!(n.cluster_id, 3);
        assert_eq!(n.ipv6_alloc_cidr, Some("fd00:10:244::/64".parse().unwrap()));
        assert_eq!(n.node_ip(false), Some("fc00:c111::2".parse().unwrap()));
        assert_eq!(n.ipv6_health_ip, Some("fd00:10:244::d812".parse().unwrap()));

        let wrong_key = decode_node(meta("cilium/state/nodes/v1/default/other"), v).unwrap_err();
        assert!(wrong_key.reason.contains("key says"), "{}", wrong_key.reason);
        assert!(decode_node(meta("cilium/state/nodes/v1/default/x"), b"{not json").is_err());
    }

    #[test]
    fn ip_entries() {
        let v = br#"{"IP":"10.244.2.74","Mask":null,"HostIP":"172.18.0.2","ID":199475,"Key":5,"Metadata":"","K8sNamespace":"bar","K8sPodName":"cep-002"}"#;
        let e = decode_ip(meta("cilium/state/ip/v1/default/10.244.2.74"), v).unwrap();
        assert_eq!((e.identity, e.encrypt_key), (199475, 5));
        assert_eq!(e.prefix, "10.244.2.74/32".parse().unwrap());
        assert_eq!(e.host_ip, Some("172.18.0.2".parse().unwrap()));
        // The three strings share one allocation; empty ones are none, and they serialize
        // as the three fields they were.
        assert_eq!((e.owner.metadata(), e.owner.k8s_namespace(), e.owner.k8s_pod_name()), ("", Some("bar"), Some("cep-002")));
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!((&json["metadata"], &json["k8s_namespace"], &json["k8s_pod_name"]), (&serde_json::json!(""), &serde_json::json!("bar"), &serde_json::json!("cep-002")));
        let owner = IpOwner::new("cilium-global:default:k8s1:541", None, Some("p"));
        assert_eq!((owner.metadata(), owner.k8s_namespace(), owner.k8s_pod_name()), ("cilium-global:default:k8s1:541", None, Some("p")));
        assert_eq!((IpOwner::default().metadata(), IpOwner::default().k8s_namespace(), IpOwner::new("m", Some("ns"), Some("")).k8s_pod_name()), ("", None, None));
        let cidr = br#"{"IP":"10.0.114.0","Mask":"////AA==","HostIP":"","ID":2}"#;
        assert_eq!(decode_ip(meta("cilium/state/ip/v1/default/10.0.114.0/24"), cidr).unwrap().prefix, "10.0.114.0/24".parse().unwrap());
        let mismatch = decode_ip(meta("cilium/state/ip/v1/default/10.244.2.75"), v).unwrap_err();
        assert!(mismatch.reason.contains("key names 10.244.2.75/32"), "{}", mismatch.reason);
        assert!(decode_ip(meta("cilium/state/ip/v1/default/10.abfd.114.197"), v).is_err());
        assert!(decode_ip(meta("cilium/state/ip/v1/default/192.0.2.3/54"), v).is_err());
        let bad_id = br#"{"IP":"10.244.2.74","ID":"x"}"#;
        assert!(decode_ip(meta("cilium/state/ip/v1/default/10.244.2.74"), bad_id).unwrap_err().reason.contains("JSON"));
    }

    #[test]
    fn identities() {
        let i = decode_identity(meta("cilium/state/identities/v1/id/13110"), b"unspec:app=foo;reserved:init=;").unwrap();
        assert_eq!(i.id, 13110);
        assert!(decode_identity(meta("cilium/state/identities/v1/id/abc"), b"x;").unwrap_err().reason.contains("not a number"));
        let r = decode_identity_reference(meta("cilium/state/identities/v1/value/k8s:app.kubernetes.io/name=x;/10.5.1.132"), b"13110").unwrap();
        assert_eq!((r.labels.as_str(), r.node.as_str(), r.id), ("k8s:app.kubernetes.io/name=x;", "10.5.1.132", 13110));
        assert!(decode_identity_reference(meta("cilium/state/identities/v1/value/a;/10.0.0.1"), b"twelve").is_err());
    }
}
