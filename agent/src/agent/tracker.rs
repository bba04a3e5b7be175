//! Which findings are open (pure): a finding opens once it has persisted for the grace period,
//! and resolves when a check no longer reports it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::check::diff::Finding;
use crate::check::kinds::FindingKind;

type Id = (FindingKind, String);

#[derive(Debug)]
pub enum Transition {
    Opened(Finding),
    Resolved(Finding),
}

#[derive(Default)]
pub struct Tracker {
    /// Seen, not yet open: first seen at, latest evidence.
    pending: BTreeMap<Id, (Instant, Finding)>,
    open: BTreeMap<Id, Finding>,
}

impl Tracker {
    /// Takes the findings of a full check made at `now`; returns what opened and resolved.
    pub fn observe(&mut self, findings: Vec<Finding>, now: Instant, grace: Duration) -> Vec<Transition> {
        self.observe_where(findings, |_| true, now, grace)
    }

    /// Takes the findings of a check that looked only at what `covered` says: a known finding
    /// it did not report resolves only when it was covered.
    pub fn observe_where(&mut self, findings: Vec<Finding>, covered: impl Fn(&Id) -> bool, now: Instant, grace: Duration) -> Vec<Transition> {
        let mut current: BTreeMap<Id, Finding> = findings.into_iter().map(|f| (f.id(), f)).collect();
        let mut out = Vec::new();
        let gone: Vec<Id> = self.open.keys().filter(|id| !current.contains_key(*id) && covered(id)).cloned().collect();
        for id in gone {
            if let Some(f) = self.open.remove(&id) {
                out.push(Transition::Resolved(f));
            }
        }
        for (id, f) in self.open.iter_mut() {
            if let Some(newer) = current.remove(id) {
                *f = newer;
            }
        }
        self.pending.retain(|id, _| current.contains_key(id) || !covered(id));
        for (id, f) in current {
            let first = self.pending.get(&id).map_or(now, |(t, _)| *t);
            self.pending.insert(id, (first, f));
        }
        out.extend(self.promote(now, grace));
        out
    }

    /// Opens pending findings whose grace period has ended (no new check needed).
    pub fn promote(&mut self, now: Instant, grace: Duration) -> Vec<Transition> {
        let due: Vec<Id> = self.pending.iter().filter(|(_, (t, _))| now.duration_since(*t) >= grace).map(|(id, _)| id.clone()).collect();
        let mut out = Vec::new();
        for id in due {
            if let Some((_, f)) = self.pending.remove(&id) {
                self.open.insert(id, f.clone());
                out.push(Transition::Opened(f));
            }
        }
        out
    }

    /// Forgets findings not yet open: their grace period starts again at their next
    /// observation (judging was held, or resumes).
    pub fn clear_pending(&mut self) {
        self.pending.clear();
    }

    pub fn open(&self) -> impl Iterator<Item = &Finding> {
        self.open.values()
    }

    /// When the earliest pending finding is due.
    pub fn next_due(&self, grace: Duration) -> Option<Instant> {
        self.pending.values().map(|(t, _)| *t + grace).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(kind: FindingKind, subject: &str) -> Finding {
        Finding::new(kind, subject, "test")
    }

    #[test]
    fn a_partial_check_resolves_only_what_it_covered() {
        let (t0, grace) = (Instant::now(), Duration::from_secs(1));
        let mut tr = Tracker::default();
        let both = vec![finding(FindingKind::IpcacheStale, "10.0.0.1/32"), finding(FindingKind::IpcacheStale, "10.0.0.2/32")];
        assert!(tr.observe(both, t0, grace).is_empty(), "nothing opens before the grace period");
        assert_eq!(tr.promote(t0 + grace, grace).len(), 2);
        // A check that looked at 10.0.0.1/32 only, and found it gone.
        let covered = |id: &Id| id.1 == "10.0.0.1/32";
        let t = tr.observe_where(Vec::new(), covered, t0 + grace, grace);
        assert!(matches!(&t[..], [Transition::Resolved(f)] if f.subject == "10.0.0.1/32"), "{t:?}");
        assert_eq!(tr.open().map(|f| f.subject.as_str()).collect::<Vec<_>>(), ["10.0.0.2/32"]);
        // A full check without it resolves the other.
        assert_eq!(tr.observe(Vec::new(), t0 + grace, grace).len(), 1);
        assert_eq!(tr.open().count(), 0);
    }
}
