//! Reading Cilium's state kept in the Kubernetes API, read-only (CRD mode, and CRD identities
//! beside a kvstore): connection, our own CRD types, decoding into the cluster-state model, lists.

pub mod client;
pub mod crds;
pub mod decode;
pub mod reader;
pub mod watch;
