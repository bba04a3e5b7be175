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

    pub fn open(&self) -> impl Iterator<Item = &Finding> {
        self.open.values()
    }

    /// When the earliest pending finding is due.
    pub fn next_due(&self, grace: Duration) -> Option<Instant> {
        self.pending.values().map(|(t, _)| *t + grace).min()
    }
}
