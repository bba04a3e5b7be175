//! The live check's index of its `ip/v1` entries by key.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::kvstore::values::IpEntry;

/// Positions in the entries' vector by kvstore key, holding no key of its own: each slot is a
/// position and compares through the entry's key. At 100k entries this costs ~1 MB where a
/// map of boxed keys to positions cost 7 MB (a third copy of every key, beside the entries'
/// and the kvstore watch's).
#[derive(Default)]
pub struct IpIndex {
    table: HashTable<u32>,
    hasher: std::collections::hash_map::RandomState,
}

impl IpIndex {
    /// Indexes the entries of `ips` that `wanted` keeps.
    pub fn of(ips: &[IpEntry], wanted: impl Fn(&IpEntry) -> bool) -> IpIndex {
        let mut index = IpIndex::default();
        for (i, _) in ips.iter().enumerate().filter(|(_, e)| wanted(e)) {
            index.insert(ips, i);
        }
        index.table.shrink_to_fit(|&p| index.hasher.hash_one(key_at(ips, p)));
        index
    }

    /// The position of `key`'s entry.
    pub fn get(&self, ips: &[IpEntry], key: &str) -> Option<usize> {
        self.table.find(self.hasher.hash_one(key), |&p| key_at(ips, p) == key).map(|&p| p as usize)
    }

    /// Indexes the entry at `at` (replacing the position its key had).
    pub fn insert(&mut self, ips: &[IpEntry], at: usize) {
        let key = key_at(ips, at as u32);
        let hash = self.hasher.hash_one(key);
        match self.table.find_mut(hash, |&p| p as usize != at && key_at(ips, p) == key) {
            Some(p) => *p = at as u32,
            None => {
                let hasher = &self.hasher;
                self.table.insert_unique(hash, at as u32, |&p| hasher.hash_one(key_at(ips, p)));
            }
        }
    }

    /// Forgets `key` (its entry still in `ips`); its position.
    pub fn remove(&mut self, ips: &[IpEntry], key: &str) -> Option<usize> {
        let entry = self.table.find_entry(self.hasher.hash_one(key), |&p| key_at(ips, p) == key).ok()?;
        Some(entry.remove().0 as usize)
    }

    /// The entry once at `from` is now at `to` (a swap-remove moved it; `ips[to]` is it).
    pub fn moved(&mut self, ips: &[IpEntry], from: usize, to: usize) {
        if let Some(p) = self.table.find_mut(self.hasher.hash_one(key_at(ips, to as u32)), |&p| p as usize == from) {
            *p = to as u32;
        }
    }
}

/// The key at position `p` (none past the end: a slot left by a swap-remove is found by
/// position, not key).
fn key_at(ips: &[IpEntry], p: u32) -> &str {
    ips.get(p as usize).map_or("", |e| e.meta.key.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvstore::values::KvMeta;

    fn entry(key: &str) -> IpEntry {
        let value = format!(r#"{{"IP":"{}","ID":300}}"#, key.rsplit('/').next().unwrap());
        crate::kvstore::values::decode_ip(KvMeta { key: key.into(), mod_revision: 1, lease: 0 }, value.as_bytes()).unwrap()
    }

    /// The index agrees with a map of keys to positions through inserts, swap-removes and
    /// re-inserts of the same keys.
    #[test]
    fn index_follows_swap_removes() {
        let key = |i: u32| format!("cilium/state/ip/v1/default/10.0.{}.{}", i / 250, i % 250);
        let mut ips: Vec<IpEntry> = (0..1000).map(|i| entry(&key(i))).collect();
        let mut index = IpIndex::of(&ips, |e| !e.meta.key.ends_with(".7"));
        assert_eq!(index.get(&ips, &key(7)), None);
        assert_eq!(index.get(&ips, &key(8)), Some(8));
        for round in 0..3 {
            for i in (0..1000).step_by(3 + round) {
                let Some(at) = index.remove(&ips, &key(i)) else { continue };
                let last = ips.len() - 1;
                ips.swap_remove(at);
                if at < ips.len() {
                    index.moved(&ips, last, at);
                }
            }
            for i in (0..1000).step_by(5) {
                if index.get(&ips, &key(i)).is_none() {
                    ips.push(entry(&key(i)));
                    index.insert(&ips, ips.len() - 1);
                }
            }
            for (p, e) in ips.iter().enumerate().filter(|(_, e)| !e.meta.key.ends_with(".7")) {
                assert_eq!(index.get(&ips, &e.meta.key), Some(p), "round {round}: {}", e.meta.key);
            }
            assert_eq!(index.table.len(), ips.iter().filter(|e| !e.meta.key.ends_with(".7")).count());
        }
    }
}
