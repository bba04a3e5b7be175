//! Cilium vocabulary shared by the datapath and kvstore sides.

pub mod fewset;
pub mod identity;
pub mod source;
pub mod version;
