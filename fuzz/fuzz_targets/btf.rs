//! Kernel BTF (`/sys/kernel/btf/vmlinux`), from which the change-event program's field offsets
//! are taken.
#![no_main]

use kvcheck::datapath::btf::{Btf, KernelOffsets};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(btf) = Btf::parse(data) {
        let _ = KernelOffsets::from_btf(&btf);
    }
});
