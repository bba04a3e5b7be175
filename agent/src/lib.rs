//! kvcheck: does this node's Cilium datapath agree with the cluster state Cilium keeps?
//!
//! Sources are read-only: `datapath` (pinned BPF maps, rtnetlink), `kvstore` (etcd), `k8s`
//! (Cilium's custom resources, in CRD mode), `clustermesh` (the remote clusters a meshed node
//! syncs) and `cilium` (the agent's own API). `model` holds the Cilium vocabulary they share;
//! `check` derives and diffs; `report` renders for people.

pub mod agent;
pub mod backoff;
pub mod check;
pub mod cilium;
pub mod clustermesh;
pub mod datapath;
pub mod k8s;
pub mod kvstore;
pub mod model;
pub mod options;
pub mod report;
