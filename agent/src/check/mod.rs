//! The cross-check: expected datapath from the kvstore (`expected`), compared with what the
//! node holds (`diff`), reported as typed findings (`kinds`); `live` keeps a check current
//! change by change for the agent. Pure logic; `run` does the I/O.

pub mod config;
pub mod diff;
pub mod expected;
mod ip_index;
pub mod kinds;
pub mod live;
pub mod run;

#[cfg(test)]
mod proptests;
