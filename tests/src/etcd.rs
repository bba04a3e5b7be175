//! Real etcd servers for tests: a single plaintext member or a 3-member cluster with TLS
//! client-certificate auth (certificates made at test time with openssl), on free loopback
//! ports with temporary data dirs. Members are stopped and their data removed on drop.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A member's data dir: on tmpfs (/dev/shm) where there is one, so fsync costs nothing and the
/// tests' write rates are not bound by this machine's disk.
fn data_dir(prefix: &str) -> Result<PathBuf> {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        return temp_dir(prefix);
    }
    let dir = shm.join(format!("{prefix}-{}-{}", std::process::id(), free_port()?));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn temp_dir(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{}", std::process::id(), free_port()?));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Certificates for a TLS cluster.
pub struct Tls {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate without a Common Name: `etcd grpc-proxy` refuses one with a CN
    /// towards the members (etcd would take the CN for a user name).
    pub proxy_cert: PathBuf,
    pub proxy_key: PathBuf,
    /// A CA that signed nothing here (for wrong-CA tests).
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").current_dir(dir).args(args).output().context("running openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Tls {
    pub fn generate() -> Result<Tls> {
        let dir = temp_dir("kvcheck-tls")?;
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let (key, crt, subj) = (format!("{ca}.key"), format!("{ca}.crt"), format!("/CN=kvcheck test {ca}"));
            let mut a = vec!["req", "-x509"];
            a.extend(ec);
            a.extend(["-keyout", key.as_str(), "-out", crt.as_str(), "-days", "2", "-subj", subj.as_str()]);
            openssl(&dir, &a)?;
        }
        for (name, usage) in [("server", "serverAuth,clientAuth"), ("client", "clientAuth"), ("proxy", "clientAuth")] {
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let mut a = vec!["req"];
            a.extend(ec);
            let subj = if name == "proxy" { "/O=kvcheck grpc-proxy".to_owned() } else { format!("/CN={name}") };
            a.extend(["-keyout", key.as_str(), "-out", csr.as_str(), "-subj", subj.as_str()]);
            openssl(&dir, &a)?;
            let ext = format!("{name}.ext");
            std::fs::write(dir.join(&ext), format!("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n"))?;
            let crt = format!("{name}.crt");
            openssl(&dir, &["x509", "-req", "-in", &csr, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", &crt, "-days", "2", "-extfile", &ext])?;
        }
        Ok(Tls {
            ca: dir.join("ca.crt"),
            server_cert: dir.join("server.crt"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.crt"),
            client_key: dir.join("client.key"),
            proxy_cert: dir.join("proxy.crt"),
            proxy_key: dir.join("proxy.key"),
            other_ca: dir.join("other-ca.crt"),
            dir,
        })
    }

    /// Cilium's etcd.config for these endpoints, written into the TLS dir.
    pub fn etcd_config(&self, endpoints: &[String], ca: &Path) -> Result<PathBuf> {
        let path = self.dir.join(format!("etcd-{}.config", free_port()?));
        let list: String = endpoints.iter().map(|e| format!("  - {e}\n")).collect();
        std::fs::write(
            &path,
            format!(
                "---\nendpoints:\n{list}trusted-ca-file: '{}'\nkey-file: '{}'\ncert-file: '{}'\n",
                ca.display(),
                self.client_key.display(),
                self.client_cert.display()
            ),
        )?;
        Ok(path)
    }
}

impl Drop for Tls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Member {
    pub name: String,
    /// How to start it again (same name, ports and data dir).
    command: Vec<std::ffi::OsString>,
    pub client_url: String,
    pub metrics_port: u16,
    data_dir: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// The running process's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One etcd cluster (1 or 3 members).
pub struct EtcdCluster {
    pub members: Vec<Member>,
    pub tls: Option<Tls>,
    binary: String,
}

fn health_ok(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// The etcd server binary under test: Debian's `etcd` (3.4) unless `KVCHECK_TEST_ETCD` names
/// another build (`cargo xtask test` runs the kvstore tests again with etcd 3.5 this way).
pub fn etcd_binary() -> String {
    std::env::var("KVCHECK_TEST_ETCD").unwrap_or_else(|_| "etcd".to_owned())
}

/// The matching etcdctl (`KVCHECK_TEST_ETCDCTL`).
pub fn etcdctl_binary() -> String {
    std::env::var("KVCHECK_TEST_ETCDCTL").unwrap_or_else(|_| "etcdctl".to_owned())
}

impl EtcdCluster {
    pub fn single() -> Result<EtcdCluster> {
        Self::start(1, false, &etcd_binary())
    }

    pub fn three_tls() -> Result<EtcdCluster> {
        Self::start(3, true, &etcd_binary())
    }

    /// Starts `n` members of `binary` (Debian's `etcd` 3.4, or another etcd build). Ports are
    /// picked free but may be taken by a parallel test before etcd binds them: a cluster that
    /// does not come up is retried on new ports.
    pub fn start(n: usize, tls: bool, binary: &str) -> Result<EtcdCluster> {
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once(n, tls, binary) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    fn start_once(n: usize, tls: bool, binary: &str) -> Result<EtcdCluster> {
        let tls = if tls { Some(Tls::generate()?) } else { None };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut plan = Vec::new();
        for i in 0..n {
            plan.push((format!("m{i}"), free_port()?, free_port()?, free_port()?));
        }
        let initial: Vec<String> = plan.iter().map(|(name, _, peer, _)| format!("{name}=http://127.0.0.1:{peer}")).collect();
        let token = format!("kvcheck-{}-{}", std::process::id(), plan[0].1);
        let mut members = Vec::new();
        for (name, client, peer, metrics) in plan {
            let data_dir = data_dir(&format!("kvcheck-etcd-{name}"))?;
            let client_url = format!("{scheme}://127.0.0.1:{client}");
            let mut cmd = Command::new(binary);
            cmd.args(["--name", &name, "--data-dir"])
                .arg(&data_dir)
                .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-token", &token])
                .args(["--initial-cluster-state", "new"])
                .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{metrics}")])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(data_dir.with_extension("log"))?);
            if let Some(t) = &tls {
                cmd.arg("--cert-file").arg(&t.server_cert).arg("--key-file").arg(&t.server_key);
                cmd.arg("--trusted-ca-file").arg(&t.ca).arg("--client-cert-auth");
            }
            let command: Vec<std::ffi::OsString> = std::iter::once(cmd.get_program().to_owned())
                .chain(cmd.get_args().map(ToOwned::to_owned))
                .collect();
            let child = cmd.spawn().with_context(|| format!("starting {binary}"))?;
            members.push(Member { name, command, client_url, metrics_port: metrics, data_dir, child: Some(child) });
        }
        let cluster = EtcdCluster { members, tls, binary: binary.to_owned() };
        if let Err(e) = cluster.wait_ready(Duration::from_secs(10)) {
            let logs: Vec<String> = cluster
                .members
                .iter()
                .map(|m| std::fs::read_to_string(m.data_dir.with_extension("log")).unwrap_or_default())
                .map(|l| l.lines().rev().take(3).collect::<Vec<_>>().join(" | "))
                .collect();
            return Err(e.context(format!("etcd logs: {}", logs.join(" || "))));
        }
        Ok(cluster)
    }

    fn wait_ready(&self, limit: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.members.iter().filter(|m| m.is_running()).all(|m| health_ok(m.metrics_port)) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{} cluster not healthy after {limit:?}", self.binary)
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// Kills member `i` (SIGKILL: a crash, not a clean leave).
    pub fn kill(&mut self, i: usize) {
        self.members[i].stop();
    }

    /// Starts a stopped member again with its data (as after a crash and restart).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.spawn_stopped(i)?;
        self.wait_ready(Duration::from_secs(20))
    }

    /// Starts every stopped member (a cluster that lost quorum needs them together).
    pub fn restart_all(&mut self) -> Result<()> {
        for i in 0..self.members.len() {
            self.spawn_stopped(i)?;
        }
        self.wait_ready(Duration::from_secs(20))
    }

    fn spawn_stopped(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        if m.child.is_none() {
            let child = Command::new(&m.command[0])
                .args(&m.command[1..])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("restarting etcd")?;
            m.child = Some(child);
        }
        Ok(())
    }

    /// `etcdctl` against this cluster (ETCDCTL_API=3), with TLS flags when needed.
    pub fn etcdctl(&self) -> Command {
        let mut c = Command::new(etcdctl_binary());
        c.env("ETCDCTL_API", "3").arg("--endpoints").arg(self.endpoints_arg());
        if let Some(t) = &self.tls {
            c.arg("--cacert").arg(&t.ca).arg("--cert").arg(&t.client_cert).arg("--key").arg(&t.client_key);
        }
        c
    }

    /// Runs etcdctl with `args`, failing on error; returns stdout.
    /// Retried for a few seconds: right after a member is killed the cluster may be electing
    /// a leader.
    pub fn etcdctl_ok(&self, args: &[&str]) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.etcdctl().args(args).output()?;
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            if Instant::now() >= deadline {
                bail!("etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The cluster's current revision.
    pub fn revision(&self) -> Result<i64> {
        let out = self.etcdctl_ok(&["endpoint", "status", "-w", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v[0]["Status"]["header"]["revision"].as_i64().context("no revision in endpoint status")
    }

    /// Writes key/value pairs (seeding test data; kvcheck itself never writes).
    pub fn put_all(&self, pairs: &[(String, String)]) -> Result<()> {
        for (k, v) in pairs {
            // `--` so values starting with '-' are not taken for flags.
            self.etcdctl_ok(&["put", "--", k, v])?;
        }
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        // Followers first, then the leader, is the fast order; killing all at once is fine
        // for tests since data dirs are thrown away.
        for m in &mut self.members {
            m.stop();
            let _ = std::fs::remove_dir_all(&m.data_dir);
            let _ = std::fs::remove_file(m.data_dir.with_extension("log"));
        }
    }
}

/// An `etcd grpc-proxy` in front of a cluster (same binary as the members). With TLS it
/// terminates TLS on both sides: the cluster's server certificate towards clients, its client
/// certificate towards the members.
pub struct GrpcProxy {
    pub url: String,
    args: Vec<String>,
    binary: String,
    log: PathBuf,
    child: Option<std::process::Child>,
}

impl GrpcProxy {
    pub fn start(cluster: &EtcdCluster) -> Result<GrpcProxy> {
        let port = free_port()?;
        let upstream: Vec<String> = cluster.endpoints().iter().map(|e| e.trim_start_matches("http://").trim_start_matches("https://").to_owned()).collect();
        let mut args = vec!["grpc-proxy".to_owned(), "start".into(), format!("--endpoints={}", upstream.join(",")), format!("--listen-addr=127.0.0.1:{port}")];
        args.push(format!("--advertise-client-url=127.0.0.1:{port}"));
        let scheme = match &cluster.tls {
            Some(t) => {
                args.extend([format!("--cacert={}", t.ca.display()), format!("--cert={}", t.proxy_cert.display()), format!("--key={}", t.proxy_key.display())]);
                args.extend([format!("--cert-file={}", t.server_cert.display()), format!("--key-file={}", t.server_key.display()), format!("--trusted-ca-file={}", t.ca.display())]);
                "https"
            }
            None => "http",
        };
        let log = std::env::temp_dir().join(format!("kvcheck-grpc-proxy-{}-{port}.log", std::process::id()));
        let mut p = GrpcProxy { url: format!("{scheme}://127.0.0.1:{port}"), args, binary: cluster.binary.clone(), log, child: None };
        p.restart()?;
        Ok(p)
    }

    /// Kills the proxy (as a crashed or evicted proxy pod).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (again) on the same address, and waits until it serves.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let child = Command::new(&self.binary).args(&self.args).stdout(Stdio::null()).stderr(std::fs::File::create(&self.log)?).spawn().context("starting etcd grpc-proxy")?;
        self.child = Some(child);
        let addr = self.url.rsplit('/').next().unwrap_or_default().to_owned();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            if Instant::now() > deadline {
                bail!("grpc-proxy not listening on {addr}: {}", std::fs::read_to_string(&self.log).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }
}

impl Drop for GrpcProxy {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}
