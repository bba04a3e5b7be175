//! Rendering for people (tables) and machines (JSON).

pub mod check;
pub mod datapath;
pub mod kvstore;
