//! Reading Cilium's kvstore (etcd), read-only: connection settings, paged lists pinned to one
//! revision, typed values, cluster health.

pub mod client;
pub mod config;
pub mod health;
pub mod history;
pub mod range;
pub mod reader;
pub mod values;
pub mod view;
pub mod watch;
