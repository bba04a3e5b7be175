//! Rendering for people (tables) and machines (JSON).

pub mod datapath;
pub mod kvstore;
