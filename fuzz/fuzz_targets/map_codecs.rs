//! A BPF map entry as the kernel returns it: byte 0 picks the Cilium layout, byte 1 the key
//! length, then the key and the value, through the ipcache, endpoint (lxc) and tunnel decoders
//! of that layout.
#![no_main]

use kvcheck::datapath::{endpoints, ipcache, tunnel};
use kvcheck::model::version::Layout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [layout, key_len, rest @ ..] = data else { return };
    let layout = Layout::ALL[usize::from(*layout) % Layout::ALL.len()];
    let (key, value) = rest.split_at(usize::from(*key_len).min(rest.len()));
    let _ = ipcache::decode_key(layout, key);
    let _ = ipcache::decode(layout, key, value);
    let _ = endpoints::decode(layout, key, value);
    let _ = tunnel::decode(layout, key, value);
});
