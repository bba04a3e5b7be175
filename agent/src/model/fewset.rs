//! A small sorted set for the values one expected entry allows (identities, tunnel endpoints,
//! encryption keys): almost always one value, at most a handful. One value is held inline; a
//! `BTreeSet` would allocate a node (50-250 bytes) per set, and a check holds one expectation
//! per ipcache prefix (100,000s).

use serde::{Serialize, Serializer};

/// Sorted and deduplicated. Invariant: `Many` never holds exactly one value (so equal sets
/// have one representation and the derived comparisons are the set's).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum FewSet<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Default for FewSet<T> {
    fn default() -> Self {
        FewSet::Many(Vec::new())
    }
}

impl<T: Ord> FewSet<T> {
    pub fn insert(&mut self, v: T) {
        match std::mem::take(self) {
            FewSet::One(a) if a == v => *self = FewSet::One(a),
            FewSet::One(a) => *self = FewSet::Many(if a < v { vec![a, v] } else { vec![v, a] }),
            FewSet::Many(all) if all.is_empty() => *self = FewSet::One(v),
            FewSet::Many(mut all) => {
                if let Err(at) = all.binary_search(&v) {
                    all.insert(at, v);
                }
                *self = FewSet::Many(all);
            }
        }
    }

    pub fn contains(&self, v: &T) -> bool {
        match self {
            FewSet::One(a) => a == v,
            FewSet::Many(all) => all.binary_search(v).is_ok(),
        }
    }
}

impl<T> FewSet<T> {
    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        match self {
            FewSet::One(a) => std::slice::from_ref(a).iter(),
            FewSet::Many(all) => all.iter(),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            FewSet::One(_) => 1,
            FewSet::Many(all) => all.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: Ord> Extend<T> for FewSet<T> {
    fn extend<I: IntoIterator<Item = T>>(&mut self, items: I) {
        for v in items {
            self.insert(v);
        }
    }
}

impl<T: Ord> FromIterator<T> for FewSet<T> {
    fn from_iter<I: IntoIterator<Item = T>>(items: I) -> Self {
        let mut s = FewSet::default();
        s.extend(items);
        s
    }
}

impl<'a, T> IntoIterator for &'a FewSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T> IntoIterator for FewSet<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;
    fn into_iter(self) -> Self::IntoIter {
        match self {
            FewSet::One(a) => vec![a].into_iter(),
            FewSet::Many(all) => all.into_iter(),
        }
    }
}

/// As a JSON array, like the `BTreeSet` it replaces.
impl<T: Serialize> Serialize for FewSet<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::FewSet;
    use std::collections::BTreeSet;

    #[test]
    fn behaves_as_a_sorted_set() {
        let inputs: [&[u32]; 6] = [&[], &[7], &[7, 7], &[9, 3, 7, 3], &[1, 2, 3, 4, 5, 1], &[5, 4]];
        for input in inputs {
            let few: FewSet<u32> = input.iter().copied().collect();
            let tree: BTreeSet<u32> = input.iter().copied().collect();
            assert_eq!(few.iter().copied().collect::<Vec<_>>(), tree.iter().copied().collect::<Vec<_>>(), "{input:?}");
            assert_eq!((few.len(), few.is_empty()), (tree.len(), tree.is_empty()));
            assert!((0..10).all(|v| few.contains(&v) == tree.contains(&v)));
            assert_eq!(serde_json::to_string(&few).unwrap(), serde_json::to_string(&tree).unwrap());
            // One representation per set.
            assert_eq!(few, tree.iter().rev().copied().collect::<FewSet<u32>>());
        }
        assert!(matches!([3u32].into_iter().collect::<FewSet<u32>>(), FewSet::One(3)));
    }
}
