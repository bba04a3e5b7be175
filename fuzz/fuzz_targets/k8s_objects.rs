//! CiliumEndpoint, CiliumEndpointSlice, CiliumNode and CiliumIdentity objects as the Kubernetes
//! API serves them (JSON), decoded into the kvstore model as CRD mode does.
#![no_main]

use kvcheck::k8s::crds::{CiliumEndpoint, CiliumEndpointSlice, CiliumIdentity, CiliumNode};
use kvcheck::k8s::decode;
use kvcheck::kvstore::reader::KvstoreSnapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut snap = KvstoreSnapshot::default();
    if let Ok(o) = serde_json::from_slice::<CiliumEndpoint>(data) {
        decode::decode_endpoint(&o, &mut snap);
    }
    if let Ok(o) = serde_json::from_slice::<CiliumEndpointSlice>(data) {
        decode::decode_endpoint_slice(&o, &mut snap);
    }
    if let Ok(o) = serde_json::from_slice::<CiliumNode>(data) {
        decode::decode_node(&o, "default", 1, &mut snap);
    }
    if let Ok(o) = serde_json::from_slice::<CiliumIdentity>(data) {
        decode::decode_identity(&o, &mut snap);
    }
});
