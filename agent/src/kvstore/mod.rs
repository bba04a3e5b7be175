//! Reading Cilium's kvstore (etcd), read-only: connection settings, paged lists pinned to one
//! revision, typed values, cluster health.

pub mod config;
pub mod values;
