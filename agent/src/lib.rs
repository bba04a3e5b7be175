//! kvcheck: does this node's Cilium datapath agree with the cluster state Cilium keeps?
//!
//! Sources are read-only: `datapath` (pinned BPF maps, rtnetlink), `kvstore` (etcd), `k8s`
//! (Cilium's custom resources, in CRD mode), `clustermesh` (the remote clusters a meshed node
//! syncs) and `cilium` (the agent's own API). `model` holds the Cilium vocabulary they share;
//! `check` derives and diffs; `report` renders for people.

pub mod agent;
pub mod backoff;
pub mod check;
pub mod cilium;
pub mod clustermesh;
pub mod datapath;
pub mod k8s;
pub mod kvstore;
pub mod model;
pub mod options;
pub mod report;

/// Gives the heap's free pages back to the kernel (every arena's, not only the top of each).
/// Memory freed on one thread stays in that thread's arena, where another thread's
/// allocations do not reuse it: a full check frees its raw pages on the runtime's workers,
/// then builds its expected state on the main thread.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}
