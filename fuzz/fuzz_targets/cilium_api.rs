//! The Cilium agent's API answers (`/v1/healthz`, `/v1/config`, `/v1/endpoint`), decoded and
//! turned into what kvcheck uses of them.
#![no_main]

use kvcheck::cilium::models::{DaemonConfiguration, Endpoint, StatusResponse};
use kvcheck::cilium::state::AgentConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<StatusResponse>(data);
    let _ = serde_json::from_slice::<Vec<Endpoint>>(data);
    if let Ok(c) = serde_json::from_slice::<DaemonConfiguration>(data) {
        let _ = AgentConfig::from_api(&c);
    }
});
