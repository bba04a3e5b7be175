//! etcd's `RangeResponse` bytes, read in place by kvcheck's own range call (`kvstore::range`),
//! every key-value then routed through the decoders as a listed page is.
#![no_main]

use kvcheck::kvstore::range::{RangePage, RawPage};
use kvcheck::kvstore::reader::{decode_into, KvstoreSnapshot};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(page) = RawPage::parse(bytes::Bytes::copy_from_slice(data)) else { return };
    let page = RangePage::Raw(page);
    // Every offset lies within the buffer (slicing would panic otherwise).
    let bytes: usize = page.iter().map(|kv| kv.key().len() + kv.value().len()).sum();
    assert!(bytes <= data.len());
    let _ = (page.more(), page.count(), page.revision(), page.last());
    decode_into(&mut KvstoreSnapshot::default(), page.iter());
});
