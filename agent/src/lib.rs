//! kvcheck: does this node's Cilium datapath agree with Cilium's kvstore?
//!
//! Sources are read-only: `datapath` (pinned BPF maps, rtnetlink) and, later, the kvstore.
//! `model` holds the Cilium vocabulary both sides share; `report` renders for people.

pub mod agent;
pub mod check;
pub mod cilium;
pub mod datapath;
pub mod kvstore;
pub mod model;
pub mod options;
pub mod report;
