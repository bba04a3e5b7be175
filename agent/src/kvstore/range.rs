//! etcd's `KV.Range` called on kvcheck's own gRPC channel, its key-values read in place in the
//! buffer the response arrived in. etcd-client (prost) copies every key and value of a page
//! into a `Vec` of its own: two allocations per key, 250,000 for the bench's 125,000-key read,
//! for bytes kvcheck decodes once and drops. Measured there, that was most of the client's CPU
//! beyond decoding, on a node whose two cores etcd shares.

use bytes::{Buf, BufMut, Bytes};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// One page of a range read: etcd's answer, whichever way it was asked.
pub enum RangePage {
    /// Asked on kvcheck's channel: key-values are slices of `buf`.
    Raw(RawPage),
    /// Asked through etcd-client (a user with a password: its client keeps the auth token).
    Client(etcd_client::GetResponse),
}

/// One key-value of a page, borrowed from it.
#[derive(Clone, Copy, Debug)]
pub struct KvRef<'a> {
    key: &'a [u8],
    value: &'a [u8],
    mod_revision: i64,
    lease: i64,
}

impl<'a> KvRef<'a> {
    pub fn new(key: &'a [u8], value: &'a [u8], mod_revision: i64, lease: i64) -> KvRef<'a> {
        KvRef { key, value, mod_revision, lease }
    }
    pub fn key(&self) -> &'a [u8] {
        self.key
    }
    pub fn value(&self) -> &'a [u8] {
        self.value
    }
    pub fn mod_revision(&self) -> i64 {
        self.mod_revision
    }
    pub fn lease(&self) -> i64 {
        self.lease
    }
}

impl<'a> From<&'a etcd_client::KeyValue> for KvRef<'a> {
    fn from(kv: &'a etcd_client::KeyValue) -> KvRef<'a> {
        KvRef::new(kv.key(), kv.value(), kv.mod_revision(), kv.lease())
    }
}

impl RangePage {
    pub fn len(&self) -> usize {
        match self {
            RangePage::Raw(p) => p.kvs.len(),
            RangePage::Client(r) => r.kvs().len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn kv(&self, i: usize) -> KvRef<'_> {
        match self {
            RangePage::Raw(p) => p.kv(i),
            RangePage::Client(r) => KvRef::from(&r.kvs()[i]),
        }
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = KvRef<'_>> + Clone + '_ {
        (0..self.len()).map(|i| self.kv(i))
    }

    pub fn first(&self) -> Option<KvRef<'_>> {
        (!self.is_empty()).then(|| self.kv(0))
    }

    pub fn last(&self) -> Option<KvRef<'_>> {
        self.len().checked_sub(1).map(|i| self.kv(i))
    }

    /// Whether keys are left in the range beyond this page.
    pub fn more(&self) -> bool {
        match self {
            RangePage::Raw(p) => p.more,
            RangePage::Client(r) => r.more(),
        }
    }

    /// Keys in the range from this page's first on (all of them for a count-only request).
    pub fn count(&self) -> i64 {
        match self {
            RangePage::Raw(p) => p.count,
            RangePage::Client(r) => r.count(),
        }
    }

    /// The revision etcd answered at.
    pub fn revision(&self) -> Option<i64> {
        match self {
            RangePage::Raw(p) => Some(p.revision),
            RangePage::Client(r) => r.header().map(|h| h.revision()),
        }
    }
}

/// A `RangeResponse` with its key-values as offsets into the response's bytes.
pub struct RawPage {
    buf: Bytes,
    kvs: Vec<RawKvAt>,
    revision: i64,
    more: bool,
    count: i64,
}

/// Where a key and its value lie in a [`RawPage`]'s buffer.
#[derive(Clone, Copy)]
struct RawKvAt {
    key: (u32, u32),
    value: (u32, u32),
    mod_revision: i64,
    lease: i64,
}

impl RawPage {
    fn kv(&self, i: usize) -> KvRef<'_> {
        let at = &self.kvs[i];
        let slice = |(start, end): (u32, u32)| &self.buf[start as usize..end as usize];
        KvRef::new(slice(at.key), slice(at.value), at.mod_revision, at.lease)
    }

    /// Reads etcd's `RangeResponse` (etcdserverpb, rpc.proto): header = 1 (its revision = 3),
    /// kvs = 2, more = 3, count = 4; each `mvccpb.KeyValue` key = 1, mod_revision = 3,
    /// value = 5, lease = 6. Unknown fields are skipped, as protobuf requires.
    pub fn parse(buf: Bytes) -> Result<RawPage, WireError> {
        let mut page = RawPage { buf: Bytes::new(), kvs: Vec::new(), revision: 0, more: false, count: 0 };
        let mut kvs = 0;
        // Counted first, so the offsets are held in one allocation of the right size.
        for_each_field(&buf, |field| {
            kvs += usize::from(matches!(field, Field { number: 2, value: Value::Bytes(..) }));
            Ok(())
        })?;
        page.kvs.reserve_exact(kvs);
        for_each_field(&buf, |field| {
            match field {
                Field { number: 1, value: Value::Bytes(start, end) } => for_each_field(&buf[start..end], |f| {
                    if let Field { number: 3, value: Value::Varint(rev) } = f {
                        page.revision = rev as i64;
                    }
                    Ok(())
                })?,
                Field { number: 2, value: Value::Bytes(start, end) } => {
                    let mut at = RawKvAt { key: (0, 0), value: (0, 0), mod_revision: 0, lease: 0 };
                    let base = start;
                    for_each_field(&buf[start..end], |f| {
                        match f {
                            Field { number: 1, value: Value::Bytes(s, e) } => at.key = offsets(base + s, base + e)?,
                            Field { number: 5, value: Value::Bytes(s, e) } => at.value = offsets(base + s, base + e)?,
                            Field { number: 3, value: Value::Varint(v) } => at.mod_revision = v as i64,
                            Field { number: 6, value: Value::Varint(v) } => at.lease = v as i64,
                            _ => {}
                        }
                        Ok(())
                    })?;
                    page.kvs.push(at);
                }
                Field { number: 3, value: Value::Varint(v) } => page.more = v != 0,
                Field { number: 4, value: Value::Varint(v) } => page.count = v as i64,
                _ => {}
            }
            Ok(())
        })?;
        page.buf = buf;
        Ok(page)
    }
}

/// A protobuf message etcd sent that kvcheck could not read.
#[derive(Debug, thiserror::Error)]
#[error("etcd's range response is not valid protobuf: {0}")]
pub struct WireError(&'static str);

fn offsets(start: usize, end: usize) -> Result<(u32, u32), WireError> {
    let narrow = |n: usize| u32::try_from(n).map_err(|_| WireError("response over 4 GiB"));
    Ok((narrow(start)?, narrow(end)?))
}

/// One field of a message; length-delimited values as `[start, end)` within it.
struct Field {
    number: u64,
    value: Value,
}

enum Value {
    Varint(u64),
    Bytes(usize, usize),
    Fixed,
}

/// Calls `f` with each field of `msg`.
fn for_each_field(msg: &[u8], mut f: impl FnMut(Field) -> Result<(), WireError>) -> Result<(), WireError> {
    let mut rest = msg;
    while !rest.is_empty() {
        let tag = varint(&mut rest)?;
        let (number, wire_type) = (tag >> 3, tag & 7);
        if number == 0 {
            return Err(WireError("field number 0"));
        }
        let value = match wire_type {
            0 => Value::Varint(varint(&mut rest)?),
            2 => {
                let len = usize::try_from(varint(&mut rest)?).map_err(|_| WireError("length out of range"))?;
                if len > rest.len() {
                    return Err(WireError("length beyond the message"));
                }
                let start = msg.len() - rest.len();
                rest.advance(len);
                Value::Bytes(start, start + len)
            }
            1 | 5 => {
                let len = if wire_type == 1 { 8 } else { 4 };
                if len > rest.len() {
                    return Err(WireError("fixed-width value beyond the message"));
                }
                rest.advance(len);
                Value::Fixed
            }
            _ => return Err(WireError("unsupported wire type")),
        };
        f(Field { number, value })?;
    }
    Ok(())
}

fn varint(buf: &mut &[u8]) -> Result<u64, WireError> {
    prost::encoding::decode_varint(buf).map_err(|_| WireError("bad varint"))
}

/// etcd's `RangeRequest` (etcdserverpb, rpc.proto), the fields kvcheck sets.
#[derive(Clone, Debug, Default)]
pub struct RangeRequest {
    pub key: Vec<u8>,
    pub range_end: Vec<u8>,
    /// 0: no limit.
    pub limit: i64,
    /// 0: the current revision.
    pub revision: i64,
    pub serializable: bool,
    pub count_only: bool,
}

impl RangeRequest {
    fn encode(&self, dst: &mut impl BufMut) {
        use prost::encoding::{encode_key, encode_varint, WireType};
        fn bytes(number: u32, b: &[u8], dst: &mut impl BufMut) {
            encode_key(number, WireType::LengthDelimited, dst);
            encode_varint(b.len() as u64, dst);
            dst.put_slice(b);
        }
        fn int(number: u32, v: u64, dst: &mut impl BufMut) {
            if v != 0 {
                encode_key(number, WireType::Varint, dst);
                encode_varint(v, dst);
            }
        }
        bytes(1, &self.key, dst);
        if !self.range_end.is_empty() {
            bytes(2, &self.range_end, dst);
        }
        int(3, self.limit as u64, dst);
        int(4, self.revision as u64, dst);
        int(7, u64::from(self.serializable), dst);
        int(9, u64::from(self.count_only), dst);
    }
}

/// `RangeRequest` out, [`RawPage`] in.
#[derive(Clone, Copy, Default)]
pub struct RangeCodec;

impl Codec for RangeCodec {
    type Encode = RangeRequest;
    type Decode = RawPage;
    type Encoder = RangeCodec;
    type Decoder = RangeCodec;

    fn encoder(&mut self) -> RangeCodec {
        RangeCodec
    }

    fn decoder(&mut self) -> RangeCodec {
        RangeCodec
    }
}

impl Encoder for RangeCodec {
    type Item = RangeRequest;
    type Error = Status;

    fn encode(&mut self, item: RangeRequest, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst);
        Ok(())
    }
}

impl Decoder for RangeCodec {
    type Item = RawPage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<RawPage>, Status> {
        // The whole message, taken from tonic's buffer without a copy.
        let buf = src.copy_to_bytes(src.remaining());
        RawPage::parse(buf).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

/// Calls `KV.Range` on `channel`, with etcd's leader requirement, as all kvcheck's requests
/// (a member cut off from its leader refuses instead of answering from stale data).
pub async fn range(channel: &tonic::transport::Channel, request: RangeRequest, max_response_bytes: usize) -> Result<RawPage, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone()).max_decoding_message_size(max_response_bytes);
    grpc.ready().await.map_err(|e| Status::unavailable(format!("etcd channel not ready: {e}")))?;
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert("hasleader", tonic::metadata::AsciiMetadataValue::from_static("true"));
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/etcdserverpb.KV/Range");
    Ok(grpc.unary(request, path, RangeCodec).await?.into_inner())
}

/// A `RangeResponse` as etcd (Go's protobuf) writes one: header (cluster id, revision), each
/// key-value with every field, more, count. For tests and the fuzz target's seeds.
#[doc(hidden)]
pub fn encode_response(kvs: &[(&[u8], &[u8], i64, i64)], more: bool, count: i64, revision: i64) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    fn message(number: u32, body: &[u8], out: &mut Vec<u8>) {
        encode_key(number, WireType::LengthDelimited, out);
        encode_varint(body.len() as u64, out);
        out.extend(body);
    }
    fn int(number: u32, v: u64, out: &mut Vec<u8>) {
        encode_key(number, WireType::Varint, out);
        encode_varint(v, out);
    }
    let mut out = Vec::new();
    let mut header = Vec::new();
    int(1, 7, &mut header);
    int(3, revision as u64, &mut header);
    message(1, &header, &mut out);
    for (key, value, mod_revision, lease) in kvs {
        let mut kv = Vec::new();
        message(1, key, &mut kv);
        int(2, 1, &mut kv);
        int(3, *mod_revision as u64, &mut kv);
        int(4, 2, &mut kv);
        message(5, value, &mut kv);
        int(6, *lease as u64, &mut kv);
        message(2, &kv, &mut out);
    }
    int(3, u64::from(more), &mut out);
    int(4, count as u64, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`encode_response`] plus a field of each fixed-width wire type kvcheck does not read.
    fn response(kvs: &[(&[u8], &[u8], i64, i64)], more: bool, count: i64, revision: i64) -> Vec<u8> {
        use prost::encoding::{encode_key, WireType};
        let mut out = encode_response(kvs, more, count, revision);
        encode_key(14, WireType::SixtyFourBit, &mut out);
        out.extend([0u8; 8]);
        encode_key(15, WireType::ThirtyTwoBit, &mut out);
        out.extend([0u8; 4]);
        out
    }

    #[test]
    fn a_range_response_is_read_in_place() {
        let bytes = response(&[(b"cilium/a", b"{}", 5, 0), (b"cilium/b", b"", 9, -1)], true, 40, 12);
        let page = RangePage::Raw(RawPage::parse(Bytes::from(bytes)).unwrap());
        assert_eq!((page.len(), page.more(), page.count(), page.revision()), (2, true, 40, Some(12)));
        let kvs: Vec<_> = page.iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision(), kv.lease())).collect();
        assert_eq!(kvs, [(b"cilium/a".to_vec(), b"{}".to_vec(), 5, 0), (b"cilium/b".to_vec(), vec![], 9, -1)]);
        assert_eq!(page.last().unwrap().key(), b"cilium/b");
        // An empty answer (a count-only one) has no key-values.
        let empty = RawPage::parse(Bytes::from(response(&[], false, 3, 1))).unwrap();
        assert_eq!((empty.kvs.len(), empty.count, empty.more), (0, 3, false));
    }

    #[test]
    fn a_broken_response_is_an_error_not_a_panic() {
        let whole = response(&[(b"k", b"v", 1, 0)], false, 1, 1);
        // Every truncation either reads (cut between fields) or says why not.
        for cut in 0..whole.len() {
            let _ = RawPage::parse(Bytes::copy_from_slice(&whole[..cut]));
        }
        assert!(RawPage::parse(Bytes::from_static(&[0x12, 0x05, 0x0a])).is_err(), "a length beyond the message");
        assert!(RawPage::parse(Bytes::from_static(&[0x0b])).is_err(), "a group (wire type 3)");
        assert!(RawPage::parse(Bytes::from_static(&[0x08, 0xff])).is_err(), "a varint cut short");
        assert!(RawPage::parse(Bytes::from_static(&[0x00, 0x01])).is_err(), "field number 0");
    }

    #[test]
    fn the_request_is_what_prost_would_write() {
        let r = RangeRequest { key: b"a".to_vec(), range_end: b"b".to_vec(), limit: 20_000, revision: 7, serializable: true, count_only: false };
        let mut out = Vec::new();
        r.encode(&mut out);
        // key = "a", range_end = "b", limit = 20000, revision = 7, serializable = true.
        assert_eq!(out, [0x0a, 1, b'a', 0x12, 1, b'b', 0x18, 0xa0, 0x9c, 0x01, 0x20, 7, 0x38, 1]);
    }
}
