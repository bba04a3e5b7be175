//! Cilium's node_config.h (`#define` lines) as the datapath configuration reader takes it.
#![no_main]

use kvcheck::check::config::DatapathConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = DatapathConfig::from_node_config(&text, "fuzz");
});
