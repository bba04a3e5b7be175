//! A kvstore key and value as etcd returns them (`<key>\n<value>`), through the decoder that
//! routes keys to the node, ip, identity and identity-reference decoders (what `check`, `dump`
//! and the agent's watch all use), and the ip/v1 value's fast read against serde's.
#![no_main]

use kvcheck::kvstore::reader::{decode_raw_into, KvstoreSnapshot};
use kvcheck::kvstore::values::{self, KvMeta};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (key, value) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let meta = KvMeta { key: String::from_utf8_lossy(key).as_ref().into(), mod_revision: 1, lease: 0 };
    let mut snap = KvstoreSnapshot::default();
    decode_raw_into(&mut snap, std::iter::once((meta.clone(), value)), None);
    let _ = values::valid_ip_host(&meta.key, value);
    // The ip/v1 value's fast read never disagrees with serde's where it accepts a value.
    assert!(values::ip_value_fast_read_agrees(value), "fast read disagrees with serde");
    if let Ok(text) = std::str::from_utf8(value) {
        let _ = values::mask_bits(text);
        let _ = values::parse_time(text);
    }
});
