//! Just enough of a BTF reader to find struct member offsets in /sys/kernel/btf/vmlinux (the
//! change-event program walks kernel structs whose layout differs between kernels).
//! Pure: parses bytes; members inside anonymous structs/unions are found too.

use std::collections::HashMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF (bad magic or truncated header)")]
    Header,
    #[error("BTF type section is truncated at type {0}")]
    Truncated(u32),
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF struct {0} has no member {1}")]
    NoMember(String, String),
    #[error("BTF member {0}.{1} is a bitfield")]
    Bitfield(String, String),
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

struct Member {
    name_off: u32,
    type_id: u32,
    /// Bit offset (or, with kind_flag, bitfield size << 24 | bit offset).
    offset: u32,
}

struct Composite {
    name_off: u32,
    kind_flag: bool,
    members: Vec<Member>,
}

/// Structs and unions of a BTF blob, by type id.
pub struct Btf {
    strings: Vec<u8>,
    composites: HashMap<u32, Composite>,
    by_name: HashMap<String, u32>,
    /// Type id → the id it refers to, for typedef/const/volatile chains.
    aliases: HashMap<u32, u32>,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl Btf {
    pub fn parse(data: &[u8]) -> Result<Btf, BtfError> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Header);
        }
        let hdr_len = u32_at(data, 4).ok_or(BtfError::Header)? as usize;
        let type_off = u32_at(data, 8).ok_or(BtfError::Header)? as usize;
        let type_len = u32_at(data, 12).ok_or(BtfError::Header)? as usize;
        let str_off = u32_at(data, 16).ok_or(BtfError::Header)? as usize;
        let str_len = u32_at(data, 20).ok_or(BtfError::Header)? as usize;
        let types = data.get(hdr_len + type_off..hdr_len + type_off + type_len).ok_or(BtfError::Header)?;
        let strings = data.get(hdr_len + str_off..hdr_len + str_off + str_len).ok_or(BtfError::Header)?.to_vec();
        let mut btf = Btf { strings, composites: HashMap::new(), by_name: HashMap::new(), aliases: HashMap::new() };
        let mut pos = 0usize;
        let mut id = 1u32;
        while pos < types.len() {
            let name_off = u32_at(types, pos).ok_or(BtfError::Truncated(id))?;
            let info = u32_at(types, pos + 4).ok_or(BtfError::Truncated(id))?;
            let size_or_type = u32_at(types, pos + 8).ok_or(BtfError::Truncated(id))?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            pos += 12;
            let extra = match kind {
                1 => 4,                    // INT
                3 => 12,                   // ARRAY
                4 | 5 => 12 * vlen,        // STRUCT, UNION
                6 => 8 * vlen,             // ENUM
                13 => 8 * vlen,            // FUNC_PROTO
                14 => 4,                   // VAR
                15 => 12 * vlen,           // DATASEC
                17 => 4,                   // DECL_TAG
                19 => 12 * vlen,           // ENUM64
                _ => 0,                    // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
            };
            if kind == KIND_STRUCT || kind == KIND_UNION {
                let mut members = Vec::with_capacity(vlen);
                for m in 0..vlen {
                    let base = pos + 12 * m;
                    members.push(Member {
                        name_off: u32_at(types, base).ok_or(BtfError::Truncated(id))?,
                        type_id: u32_at(types, base + 4).ok_or(BtfError::Truncated(id))?,
                        offset: u32_at(types, base + 8).ok_or(BtfError::Truncated(id))?,
                    });
                }
                if name_off != 0 && kind == KIND_STRUCT {
                    let name = btf.string(name_off).to_owned();
                    // Keep the first complete definition.
                    btf.by_name.entry(name).or_insert(id);
                }
                btf.composites.insert(id, Composite { name_off, kind_flag: info >> 31 == 1, members });
            } else if matches!(kind, 8..=11 | 18) {
                btf.aliases.insert(id, size_or_type);
            }
            pos += extra;
            id += 1;
        }
        Ok(btf)
    }

    fn string(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or_default()
    }

    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.aliases.get(&id) {
                Some(next) => id = *next,
                None => break,
            }
        }
        id
    }

    /// Byte offset of `member` in `struct_name`, looking into anonymous structs and unions.
    pub fn member_offset(&self, struct_name: &str, member: &str) -> Result<u64, BtfError> {
        let id = *self.by_name.get(struct_name).ok_or_else(|| BtfError::NoStruct(struct_name.to_owned()))?;
        let bits = self
            .find(id, member, 0)
            .ok_or_else(|| BtfError::NoMember(struct_name.to_owned(), member.to_owned()))?;
        if bits % 8 != 0 {
            return Err(BtfError::Bitfield(struct_name.to_owned(), member.to_owned()));
        }
        Ok(bits / 8)
    }

    fn find(&self, id: u32, member: &str, depth: u32) -> Option<u64> {
        let c = self.composites.get(&id)?;
        if depth > 8 {
            return None;
        }
        let _ = c.name_off;
        for m in &c.members {
            let bit_off = u64::from(if c.kind_flag { m.offset & 0x00ff_ffff } else { m.offset });
            if m.name_off != 0 {
                if self.string(m.name_off) == member {
                    return Some(bit_off);
                }
            } else if let Some(inner) = self.find(self.resolve(m.type_id), member, depth + 1) {
                return Some(bit_off + inner);
            }
        }
        None
    }
}

/// The offsets the change-event program needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_files: u64,
    pub files_fdt: u64,
    pub fdt_max_fds: u64,
    pub fdt_fd: u64,
    pub file_private_data: u64,
    pub map_id: u64,
}

impl KernelOffsets {
    pub fn from_btf(btf: &Btf) -> Result<KernelOffsets, BtfError> {
        Ok(KernelOffsets {
            task_files: btf.member_offset("task_struct", "files")?,
            files_fdt: btf.member_offset("files_struct", "fdt")?,
            fdt_max_fds: btf.member_offset("fdtable", "max_fds")?,
            fdt_fd: btf.member_offset("fdtable", "fd")?,
            file_private_data: btf.member_offset("file", "private_data")?,
            map_id: btf.member_offset("bpf_map", "id")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_btf() {
        assert_eq!(Btf::parse(b"not btf at all, definitely not").err(), Some(BtfError::Header));
    }

    #[test]
    fn this_kernels_offsets() {
        let Ok(data) = std::fs::read("/sys/kernel/btf/vmlinux") else {
            eprintln!("skipping: no /sys/kernel/btf/vmlinux");
            return;
        };
        let btf = Btf::parse(&data).unwrap();
        let off = KernelOffsets::from_btf(&btf).unwrap();
        // fdtable starts with max_fds; toolchain notes measured bpf_map.id at 92 on 6.18.
        assert_eq!(off.fdt_max_fds, 0);
        assert!(off.map_id > 0 && off.task_files > 0 && off.file_private_data > 0, "{off:?}");
        assert!(matches!(btf.member_offset("task_struct", "no_such_member"), Err(BtfError::NoMember(..))));
    }
}
