//! deploy/: the manifests validate offline against the Kubernetes schema, and the Dockerfile
//! builds an image (static musl kvcheck on scratch) that runs `kvcheck --version`.

use std::path::PathBuf;
use std::process::Command;

use kvcheck_tests::require_root;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

fn tool(var: &str, what: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            assert!(std::env::var_os("CI").is_none(), "{var} not set: run through `cargo xtask test` ({what})");
            eprintln!("skipping: {var} not set ({what}); `cargo xtask test` sets it");
            None
        }
    }
}

#[test]
fn manifests_validate_against_the_kubernetes_schema() {
    let Some(tools) = tool("KVCHECK_TOOLS", "kubernetes-validate") else { return };
    let manifests: [(&str, &[&str]); 2] = [
        ("deploy/kvcheck.yaml", &["serviceaccount/kvcheck", "clusterrole/kvcheck", "clusterrolebinding/kvcheck", "configmap/kvcheck-config", "daemonset/kvcheck"]),
        ("deploy/etcd-grpc-proxy.yaml", &["deployment/kvcheck-etcd-proxy", "service/kvcheck-etcd-proxy", "configmap/kvcheck-etcd-config-via-proxy"]),
    ];
    for version in ["1.25.0", "1.30.0"] {
        for (file, resources) in manifests {
            let out = Command::new("python3")
                .args(["-m", "kubernetes_validate", "--strict", "-k", version])
                .arg(root().join(file))
                .env("PYTHONPATH", tools.join("kubernetes-validate"))
                .output()
                .unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "kubernetes-validate {version} {file}: {text}");
            for kind in resources {
                assert!(text.contains(&format!("passed for resource {kind}")), "{file} {kind}: {text}");
            }
        }
    }
    // The proxy: three replicas on three nodes, etcd's own grpc-proxy, Cilium's etcd secrets.
    let proxy = std::fs::read_to_string(root().join("deploy/etcd-grpc-proxy.yaml")).unwrap();
    for needle in ["replicas: 3", "podAntiAffinity", "topologyKey: kubernetes.io/hostname", "- grpc-proxy", "secretName: cilium-etcd-secrets", "https://kvcheck-etcd-proxy.kube-system.svc:2379"] {
        assert!(proxy.contains(needle), "etcd-grpc-proxy.yaml lacks {needle}");
    }
    // What the agent needs from the node is really mounted, read-only.
    let yaml = std::fs::read_to_string(root().join("deploy/kvcheck.yaml")).unwrap();
    for needle in ["hostNetwork: true", "mountPath: /sys/fs/bpf", "mountPath: /sys/kernel/tracing", "fieldPath: spec.nodeName", "secretName: cilium-etcd-secrets", "path: /readyz", "path: /healthz", "prometheus.io/scrape", "system-node-critical", "mountPath: /var/run/cilium\n", "value: /var/run/cilium/cilium.sock", "mountPath: /etc/cilium/config-map", "secretName: kvcheck-etcd", "value: /var/lib/kvcheck-etcd/etcd.config,/var/lib/etcd-config/etcd.config", "mountPath: /var/lib/cilium/clustermesh", "name: cilium-clustermesh"] {
        assert!(yaml.contains(needle), "manifest lacks {needle}");
    }
    // Kubernetes access is read-only and only to Cilium's four resources.
    let docs: Vec<serde_json::Value> = yaml.split("\n---").filter_map(|d| serde_saphyr::from_str(d).ok()).collect();
    // Least privilege on the node: default seccomp, BPF and PERFMON only, nothing created on
    // the host, the etcd client key readable by its owner only.
    let pod = &docs.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["capabilities"]["add"], serde_json::json!(["BPF", "PERFMON"]));
    assert_eq!(container["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
    for v in pod["volumes"].as_array().unwrap() {
        if let Some(t) = v["hostPath"]["type"].as_str() {
            assert_eq!(t, "Directory", "{v}");
        }
        if v["secret"].is_object() {
            assert_eq!(v["secret"]["defaultMode"], 0o400, "{v}");
        }
        if v["projected"].is_object() {
            assert_eq!(v["projected"]["defaultMode"], 0o400, "{v}");
        }
    }
    let role = docs.iter().find(|d| d["kind"] == "ClusterRole").expect("a ClusterRole");
    let rules = role["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1, "{role}");
    assert_eq!(rules[0]["apiGroups"], serde_json::json!(["cilium.io"]));
    assert_eq!(rules[0]["verbs"], serde_json::json!(["get", "list", "watch"]));
    assert_eq!(rules[0]["resources"], serde_json::json!(["ciliumendpoints", "ciliumendpointslices", "ciliumnodes", "ciliumidentities"]));
    let binding = docs.iter().find(|d| d["kind"] == "ClusterRoleBinding").expect("a ClusterRoleBinding");
    assert_eq!((binding["roleRef"]["name"].as_str(), binding["subjects"][0]["name"].as_str()), (Some("kvcheck"), Some("kvcheck")));
    assert!(!docs.iter().any(|d| d["kind"] == "Role" || d["kind"] == "RoleBinding"), "no other grants");
}

#[test]
fn image_builds_from_scratch_and_runs_kvcheck() {
    if !require_root("image_builds_from_scratch_and_runs_kvcheck") {
        return;
    }
    let Some(bin) = tool("KVCHECK_STATIC_BIN", "the static musl build") else { return };
    assert!(bin.exists(), "{} missing", bin.display());
    let ctx = std::env::temp_dir().join(format!("kvcheck-image-{}", std::process::id()));
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy(&bin, ctx.join("kvcheck")).unwrap();
    let tag = format!("localhost/kvcheck-test:{}", std::process::id());
    let buildah = |args: &[&str]| -> String {
        let out = Command::new("buildah").args(["--storage-driver", "vfs"]).args(args).output().unwrap();
        assert!(out.status.success(), "buildah {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    buildah(&["bud", "--isolation", "chroot", "-q", "-t", &tag, "-f", root().join("deploy/Dockerfile").to_str().unwrap(), ctx.to_str().unwrap()]);
    let container = buildah(&["from", &tag]);
    let version = buildah(&["run", "--isolation", "chroot", &container, "--", "/usr/bin/kvcheck", "--version"]);
    buildah(&["rm", &container]);
    buildah(&["rmi", &tag]);
    let _ = std::fs::remove_dir_all(&ctx);
    assert_eq!(version, format!("kvcheck {}", env!("CARGO_PKG_VERSION")));
}
