//! Cilium-shaped kvstore data at any scale (nodes, pod IPs, identities), for benchmarks and
//! scale tests, and a fast loader (transactions of puts, several in flight).

use futures::StreamExt as _;

#[derive(Clone, Copy, Debug)]
pub struct ClusterShape {
    pub nodes: u32,
    pub ips: u32,
    pub identities: u32,
}

/// Node `i`: InternalIP 172.16.x.y, pod CIDR 10.a.b.0/24, router .1, health .2.
pub fn node_ip(i: u32) -> String {
    format!("172.{}.{}.{}", 16 + i / 62_500, (i / 250) % 250, i % 250 + 1)
}

pub fn pod_cidr_base(i: u32) -> (u32, u32) {
    (i / 256, i % 256)
}

pub fn node_pair(i: u32) -> (String, String) {
    let (a, b) = pod_cidr_base(i);
    let name = format!("node-{i}");
    let value = format!(
        r#"{{"Name":"{name}","Cluster":"default","IPAddresses":[{{"Type":"InternalIP","IP":"{}"}},{{"Type":"CiliumInternalIP","IP":"10.{a}.{b}.1"}}],"IPv4AllocCIDR":{{"IP":"10.{a}.{b}.0","Mask":"////AA=="}},"IPv6AllocCIDR":null,"IPv4HealthIP":"10.{a}.{b}.2","IPv6HealthIP":"","ClusterID":0,"Source":"local","EncryptionKey":0,"Labels":{{"kubernetes.io/hostname":"{name}"}}}}"#,
        node_ip(i)
    );
    (format!("cilium/state/nodes/v1/default/{name}"), value)
}

pub fn identity_labels(k: u32) -> String {
    format!("k8s:app=app-{k};k8s:io.cilium.k8s.policy.cluster=default;k8s:io.cilium.k8s.policy.serviceaccount=default;k8s:io.kubernetes.pod.namespace=ns-{};", k % 50)
}

/// Every key of a cluster of `shape`: nodes, pod IPs spread over the nodes, identities and one
/// value key per identity (from the node of its first pod).
pub fn cluster_pairs(shape: ClusterShape) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity((shape.nodes + shape.ips + 2 * shape.identities) as usize);
    out.extend((0..shape.nodes).map(node_pair));
    for j in 0..shape.ips {
        let n = j % shape.nodes;
        let (a, b) = pod_cidr_base(n);
        let host = 3 + j / shape.nodes;
        let ip = format!("10.{a}.{b}.{host}");
        let id = 256 + j % shape.identities;
        out.push((
            format!("cilium/state/ip/v1/default/{ip}"),
            format!(r#"{{"IP":"{ip}","Mask":null,"HostIP":"{}","ID":{id},"Key":0,"Metadata":"cilium-global:default:node-{n}:{j}","K8sNamespace":"ns-{}","K8sPodName":"pod-{j}"}}"#, node_ip(n), id % 50),
        ));
    }
    for k in 0..shape.identities {
        let labels = identity_labels(k);
        out.push((format!("cilium/state/identities/v1/id/{}", 256 + k), labels.clone()));
        out.push((format!("cilium/state/identities/v1/value/{labels}/{}", node_ip(k % shape.nodes)), (256 + k).to_string()));
    }
    out
}

/// Loads pairs into etcd in transactions of 128 puts, 8 in flight.
pub async fn load(endpoints: &[String], pairs: Vec<(String, String)>) -> anyhow::Result<()> {
    use etcd_client::{Client, Txn, TxnOp};
    let client = Client::connect(endpoints, None).await?;
    let chunks: Vec<Vec<(String, String)>> = pairs.chunks(128).map(<[_]>::to_vec).collect();
    let results: Vec<Result<(), etcd_client::Error>> = futures::stream::iter(chunks)
        .map(|chunk| {
            let mut kv = client.kv_client();
            async move {
                let ops: Vec<TxnOp> = chunk.into_iter().map(|(k, v)| TxnOp::put(k, v, None)).collect();
                kv.txn(Txn::new().and_then(ops)).await.map(|_| ())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}
