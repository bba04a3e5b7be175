//! Watching Cilium's keys against a real etcd: puts, deletes, a forced compaction while the
//! watcher is behind, and a restarted member all end in exactly the state a fresh list gives.

use std::time::Duration;

use kvcheck::kvstore::client::Etcd;
use kvcheck::kvstore::config::EtcdSettings;
use kvcheck::kvstore::reader::ListOptions;
use kvcheck::kvstore::watch::{Change, KvstoreMirror, KvstoreWatcher};
use kvcheck_tests::etcd::EtcdCluster;
use kvcheck_tests::require_root;

fn ip_value(ip: &str, id: u32) -> String {
    format!(r#"{{"IP":"{ip}","Mask":null,"HostIP":"10.5.1.133","ID":{id},"Key":0}}"#)
}

async fn next_with_timeout(w: &mut KvstoreWatcher) -> kvcheck::kvstore::watch::WatchBatch {
    tokio::time::timeout(Duration::from_secs(10), w.next()).await.expect("watch batch within 10 s").expect("watch batch")
}

/// Reads batches until the mirror's revision reaches `rev`.
async fn catch_up(w: &mut KvstoreWatcher, rev: i64) -> Vec<Change> {
    let mut all = Vec::new();
    while w.mirror().revision < rev {
        all.extend(next_with_timeout(w).await.changes);
    }
    all
}

#[test]
fn watch_with_compaction_and_restart_matches_a_fresh_list() {
    if !require_root("watch_with_compaction_and_restart_matches_a_fresh_list") {
        return;
    }
    let mut etcd = EtcdCluster::single().unwrap();
    let ip_key = |ip: &str| format!("cilium/state/ip/v1/default/{ip}");
    etcd.put_all(&[(ip_key("10.6.7.1"), ip_value("10.6.7.1", 300)), (ip_key("10.6.7.2"), ip_value("10.6.7.2", 300))]).unwrap();
    let settings = EtcdSettings { endpoints: etcd.endpoints(), ..Default::default() };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let client = Etcd::connect(&settings, Duration::from_secs(2)).await.unwrap();
        let mut w = KvstoreWatcher::start(settings.clone(), client.clone(), ListOptions::default()).await.unwrap();
        assert_eq!(w.mirror().keys.len(), 2);

        // Puts and deletes while watching, plus a key kvcheck does not read.
        etcd.put_all(&[(ip_key("10.6.7.3"), ip_value("10.6.7.3", 301)), ("cilium/state/services/v1/x".into(), "{}".into())]).unwrap();
        etcd.etcdctl_ok(&["del", &ip_key("10.6.7.1")]).unwrap();
        let changes = catch_up(&mut w, etcd.revision().unwrap()).await;
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(matches!(&changes[0], Change::Put { key, .. } if *key == ip_key("10.6.7.3")));
        assert!(matches!(&changes[1], Change::Delete { key, .. } if *key == ip_key("10.6.7.1")));
        assert_eq!(w.verify().await.unwrap(), None, "a caught-up mirror holds etcd's key counts");

        // A crash and restart of the member: the stream breaks, the next call resumes.
        etcd.kill(0);
        let err = tokio::time::timeout(Duration::from_secs(30), w.next()).await.expect("stream error within 30 s");
        assert!(err.is_err(), "expected the watch to break when etcd died");
        etcd.restart(0).unwrap();
        etcd.put_all(&[(ip_key("10.6.7.4"), ip_value("10.6.7.4", 302))]).unwrap();
        let changes = loop {
            match tokio::time::timeout(Duration::from_secs(10), w.next()).await.expect("batch after restart") {
                Ok(b) => break b.changes,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        assert!(matches!(&changes[0], Change::Put { key, .. } if *key == ip_key("10.6.7.4")), "{changes:?}");

        // Keys change and the history is compacted while the watcher is not reading.
        etcd.etcdctl_ok(&["del", &ip_key("10.6.7.2")]).unwrap();
        etcd.put_all(&[(ip_key("10.6.7.5"), ip_value("10.6.7.5", 303)), (ip_key("10.6.7.3"), ip_value("10.6.7.3", 999))]).unwrap();
        let rev = etcd.revision().unwrap();
        etcd.etcdctl_ok(&["compact", &rev.to_string(), "--physical"]).unwrap();
        // A live stream may deliver these as events, or find its revision compacted and
        // relist; either way the mirror must end equal to a fresh list.
        let batch = loop {
            let b = next_with_timeout(&mut w).await;
            if b.relisted || w.mirror().revision >= rev {
                break b;
            }
        };
        let fresh = KvstoreMirror::list_cilium(&client, &ListOptions::default()).await.unwrap();
        assert_eq!(w.mirror().keys, fresh.keys, "mirror after the watch differs from a fresh list");
        if batch.relisted {
            assert!(batch.changes.iter().any(|c| matches!(c, Change::Delete { key, .. } if *key == ip_key("10.6.7.2"))), "{:?}", batch.changes);
        }
    });
}

#[test]
fn compacted_start_revision_relists() {
    if !require_root("compacted_start_revision_relists") {
        return;
    }
    let etcd = EtcdCluster::single().unwrap();
    let ip_key = |ip: &str| format!("cilium/state/ip/v1/default/{ip}");
    etcd.put_all(&[(ip_key("10.6.8.1"), ip_value("10.6.8.1", 300)), (ip_key("10.6.8.2"), ip_value("10.6.8.2", 300))]).unwrap();
    let settings = EtcdSettings { endpoints: etcd.endpoints(), ..Default::default() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = Etcd::connect(&settings, Duration::from_secs(2)).await.unwrap();
        // List, then (before the first watch is opened) change keys and compact past the list.
        let mut w = KvstoreWatcher::start(settings.clone(), client.clone(), ListOptions::default()).await.unwrap();
        etcd.etcdctl_ok(&["del", &ip_key("10.6.8.1")]).unwrap();
        etcd.put_all(&[(ip_key("10.6.8.3"), ip_value("10.6.8.3", 301)), (ip_key("10.6.8.2"), ip_value("10.6.8.2", 302))]).unwrap();
        let rev = etcd.revision().unwrap();
        etcd.etcdctl_ok(&["compact", &rev.to_string(), "--physical"]).unwrap();
        // The mirror's revision is gone: its counts cannot be verified.
        assert!(w.verify().await.unwrap().is_some());

        let batch = next_with_timeout(&mut w).await;
        assert!(batch.relisted, "a watch from a compacted revision must relist");
        assert_eq!(w.relists, 1);
        let mut keys: Vec<(String, &str)> = batch
            .changes
            .iter()
            .map(|c| match c {
                Change::Put { key, .. } => (key.clone(), "put"),
                Change::Delete { key, .. } => (key.clone(), "delete"),
            })
            .collect();
        keys.sort();
        assert_eq!(keys, vec![(ip_key("10.6.8.1"), "delete"), (ip_key("10.6.8.2"), "put"), (ip_key("10.6.8.3"), "put")]);
        let fresh = KvstoreMirror::list_cilium(&client, &ListOptions::default()).await.unwrap();
        assert_eq!(w.mirror().keys, fresh.keys);
        assert_eq!(w.verify().await.unwrap(), None);
        // Exactly one copy of each change: nothing is reported twice afterwards.
        etcd.put_all(&[(ip_key("10.6.8.4"), ip_value("10.6.8.4", 304))]).unwrap();
        let next = next_with_timeout(&mut w).await;
        assert_eq!(next.changes.len(), 1, "{:?}", next.changes);
        assert!(!next.relisted);
    });
}

/// The resync's verification is against etcd's current revision: a watch that has not
/// delivered what etcd holds (here: not read while keys change) is found behind, asked for its
/// progress, and, still short of the revision etcd had at the previous resync, given up. After
/// the relist, the events the stream still had to deliver are not applied a second time.
#[test]
fn resync_verifies_against_the_servers_revision() {
    if !require_root("resync_verifies_against_the_servers_revision") {
        return;
    }
    let etcd = EtcdCluster::single().unwrap();
    let ip_key = |ip: &str| format!("cilium/state/ip/v1/default/{ip}");
    etcd.put_all(&[(ip_key("10.6.9.1"), ip_value("10.6.9.1", 300))]).unwrap();
    let settings = EtcdSettings { endpoints: etcd.endpoints(), ..Default::default() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = Etcd::connect(&settings, Duration::from_secs(2)).await.unwrap();
        let mut w = KvstoreWatcher::start(settings.clone(), client.clone(), ListOptions::default()).await.unwrap().with_progress_interval(Duration::from_secs(3600));
        etcd.put_all(&[(ip_key("10.6.9.2"), ip_value("10.6.9.2", 301))]).unwrap();
        catch_up(&mut w, etcd.revision().unwrap()).await;
        assert_eq!(w.verify().await.unwrap(), None, "a watch at etcd's revision with its counts");

        // A write outside Cilium's prefixes: etcd's revision moves, the counts do not.
        etcd.put_all(&[("other/key".into(), "x".into())]).unwrap();
        assert_eq!(w.verify().await.unwrap(), None, "behind only by keys kvcheck does not follow");
        // The progress it asked for brings the mirror to etcd's revision (no batch: no change).
        let rev = etcd.revision().unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(500), w.next()).await.is_err());
        assert_eq!(w.mirror().revision, rev, "the progress answer advances the watch's revision");

        // Keys change while the watch delivers nothing to the mirror.
        etcd.etcdctl_ok(&["del", &ip_key("10.6.9.1")]).unwrap();
        etcd.put_all(&[(ip_key("10.6.9.2"), ip_value("10.6.9.2", 302)), (ip_key("10.6.9.2"), ip_value("10.6.9.2", 303))]).unwrap();
        let stalls = w.stalls;
        assert_eq!(w.verify().await.unwrap(), None, "events may be in flight: not yet a disagreement");
        let why = w.verify().await.unwrap().expect("still behind the previous resync's revision");
        assert!(why.contains("has not reached"), "{why}");
        assert_eq!(w.stalls, stalls + 1);

        let batch = w.relist().await.unwrap();
        assert_eq!(batch.changes.len(), 2, "{:?}", batch.changes);
        // The reconnected stream starts after the relist; nothing old comes back.
        etcd.put_all(&[(ip_key("10.6.9.3"), ip_value("10.6.9.3", 304))]).unwrap();
        let next = next_with_timeout(&mut w).await;
        assert_eq!(next.changes.iter().map(Change::key).collect::<Vec<_>>(), [ip_key("10.6.9.3")]);
        let fresh = KvstoreMirror::list_cilium(&client, &ListOptions::default()).await.unwrap();
        assert_eq!(w.mirror().keys, fresh.keys);
        assert_eq!(w.verify().await.unwrap(), None);
    });
}

/// A relist while the stream is open and behind: the events the stream then delivers up to the
/// relist's revision are in the mirror already and are not applied again (an old put would
/// undo the newer value).
#[test]
fn events_older_than_a_relist_are_not_reapplied() {
    if !require_root("events_older_than_a_relist_are_not_reapplied") {
        return;
    }
    let etcd = EtcdCluster::single().unwrap();
    let key = "cilium/state/ip/v1/default/10.6.10.1".to_owned();
    let settings = EtcdSettings { endpoints: etcd.endpoints(), ..Default::default() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = Etcd::connect(&settings, Duration::from_secs(2)).await.unwrap();
        let mut w = KvstoreWatcher::start(settings.clone(), client.clone(), ListOptions::default()).await.unwrap();
        etcd.put_all(&[(key.clone(), ip_value("10.6.10.1", 400))]).unwrap();
        catch_up(&mut w, etcd.revision().unwrap()).await;
        etcd.put_all(&[(key.clone(), ip_value("10.6.10.1", 401)), (key.clone(), ip_value("10.6.10.1", 402))]).unwrap();
        let batch = w.relist().await.unwrap();
        assert_eq!(batch.changes.len(), 1);
        etcd.put_all(&[("cilium/state/ip/v1/default/10.6.10.2".into(), ip_value("10.6.10.2", 403))]).unwrap();
        let next = next_with_timeout(&mut w).await;
        assert_eq!(next.changes.iter().map(Change::key).collect::<Vec<_>>(), ["cilium/state/ip/v1/default/10.6.10.2"], "{:?}", next.changes);
        assert!(String::from_utf8_lossy(&w.mirror().keys[key.as_str()].value).contains("402"));
    });
}

/// The agent's start: the list decoded page by page into a snapshot equal to a one-shot read's,
/// the mirror holding keys and revisions, no values. Changes still carry their values, and a
/// relist reports exactly what differs (equal mod revisions are equal values), not every key.
#[test]
fn a_mirror_without_values_follows_and_relists_exactly() {
    if !require_root("a_mirror_without_values_follows_and_relists_exactly") {
        return;
    }
    let etcd = EtcdCluster::single().unwrap();
    let ip_key = |i: u8| format!("cilium/state/ip/v1/default/10.6.11.{i}");
    let mut puts: Vec<(String, String)> = (1..=10).map(|i| (ip_key(i), ip_value(&format!("10.6.11.{i}"), 500))).collect();
    // Every kind the snapshot holds, one malformed value among them, over more than one page.
    puts.push(("cilium/state/nodes/v1/default/n1".into(), r#"{"Name":"n1","Cluster":"default","IPAddresses":[{"Type":"InternalIP","IP":"10.5.1.133"}]}"#.into()));
    puts.push(("cilium/state/identities/v1/id/500".into(), "k8s:app=a;k8s:io.kubernetes.pod.namespace=default;".into()));
    puts.push(("cilium/state/ip/v1/default/10.6.11.99".into(), "{not json".into()));
    etcd.put_all(&puts).unwrap();
    let settings = EtcdSettings { endpoints: etcd.endpoints(), ..Default::default() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = Etcd::connect(&settings, Duration::from_secs(2)).await.unwrap();
        let opts = ListOptions { page_size: 4, ..Default::default() };
        let (mut w, snap) = KvstoreWatcher::start_decoded(settings.clone(), client.clone(), opts.clone()).await.unwrap();
        let one_shot = kvcheck::kvstore::reader::read_snapshot(&client, &opts).await.unwrap();
        assert_eq!(snap.revision, one_shot.revision);
        assert_eq!(serde_json::to_value(&snap).unwrap(), serde_json::to_value(&one_shot).unwrap(), "the agent's decoded start differs from a one-shot read");
        assert!(snap.ips.len() == 10 && snap.nodes.len() == 1 && snap.identities.len() == 1 && snap.malformed.len() == 1, "{snap:?}");
        assert!(w.mirror().keys.values().all(|v| v.value.is_empty()) && w.mirror().keys.len() == 13);
        etcd.put_all(&[(ip_key(1), ip_value("10.6.11.1", 501))]).unwrap();
        let changes = catch_up(&mut w, etcd.revision().unwrap()).await;
        assert!(matches!(&changes[..], [Change::Put { key, value, .. }] if *key == ip_key(1) && value.contains("501")), "{changes:?}");
        // Changes the stream has not delivered yet, then a relist.
        etcd.etcdctl_ok(&["del", &ip_key(2)]).unwrap();
        etcd.put_all(&[(ip_key(3), ip_value("10.6.11.3", 503))]).unwrap();
        let mut changes: Vec<(String, Option<String>)> = w
            .relist()
            .await
            .unwrap()
            .changes
            .into_iter()
            .map(|c| match c {
                Change::Put { key, value, .. } => (key, Some(value)),
                Change::Delete { key, .. } => (key, None),
            })
            .collect();
        changes.sort();
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(changes[0].0, ip_key(2));
        assert!(changes[0].1.is_none());
        assert!(changes[1].0 == ip_key(3) && changes[1].1.as_deref().is_some_and(|v| v.contains("503")), "{changes:?}");
        assert!(w.mirror().keys.values().all(|v| v.value.is_empty()));
        assert_eq!(w.verify().await.unwrap(), None);
    });
}

/// A prefix longer than two pages is read as sub-ranges at once after its first page; the
/// snapshot must equal one unlimited range's, entry for entry and in key order, however the
/// keys fall (IPv4 whose text sorts unevenly, IPv6, CIDR keys, numeric identity ids) and at
/// any page size.
#[test]
fn sub_range_reads_equal_one_range() {
    if !require_root("sub_range_reads_equal_one_range") {
        return;
    }
    let etcd = EtcdCluster::single().unwrap();
    let mut puts: Vec<(String, String)> = Vec::new();
    for a in [1, 2, 9, 10, 11, 19, 100, 255] {
        for h in [1, 7, 10, 99, 200] {
            let ip = format!("10.{a}.0.{h}");
            puts.push((format!("cilium/state/ip/v1/default/{ip}"), ip_value(&ip, 300 + a)));
        }
    }
    for ip in ["f00d::a0f:0:0:1", "f00d::a0f:0:0:2", "fd00::1", "fd00:10:244::ab", "::ffff:10.1.0.1"] {
        puts.push((format!("cilium/state/ip/v1/default/{ip}"), ip_value(ip, 400)));
    }
    puts.push(("cilium/state/ip/v1/default/10.200.0.0/24".into(), r#"{"IP":"10.200.0.0","Mask":"////AA==","HostIP":"","ID":2,"Key":0,"Metadata":""}"#.into()));
    puts.push(("cilium/state/ip/v1/other/10.1.0.1".into(), ip_value("10.1.0.1", 401)));
    for id in [256, 257, 1000, 65535, 70000, 16777215] {
        puts.push((format!("cilium/state/identities/v1/id/{id}"), format!("k8s:app=a{id};")));
    }
    etcd.put_all(&puts).unwrap();
    let settings = EtcdSettings { endpoints: etcd.endpoints(), ..Default::default() };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let client = Etcd::connect(&settings, Duration::from_secs(2)).await.unwrap();
        let read = |page_size| {
            let client = client.clone();
            async move { kvcheck::kvstore::reader::read_snapshot(&client, &ListOptions { page_size, ..Default::default() }).await.unwrap() }
        };
        let whole = read(0).await;
        assert_eq!((whole.ips.len(), whole.identities.len(), whole.malformed.len()), (47, 6, 0), "{:?}", whole.malformed);
        let whole = serde_json::to_value(&whole).unwrap();
        for page_size in [1, 2, 3, 5, 7, 16] {
            assert_eq!(serde_json::to_value(read(page_size).await).unwrap(), whole, "pages of {page_size} differ from one range");
        }
        // kvcheck's own range call (read in place) and etcd-client's (what a user with a
        // password reads through) give the same snapshot.
        assert!(client.channel.is_some(), "no user: ranges are read on kvcheck's channel");
        let through_client = Etcd { channel: None, ..client.clone() };
        for page_size in [0, 3, 16] {
            let snap = kvcheck::kvstore::reader::read_snapshot(&through_client, &ListOptions { page_size, ..Default::default() }).await.unwrap();
            assert_eq!(serde_json::to_value(snap).unwrap(), whole, "etcd-client's pages of {page_size} differ from kvcheck's read");
        }
    });
}
