//! Network namespaces with Cilium's `cilium_host`/`cilium_net` veth pair.

use std::process::Command;

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Netns {
    pub fn new(prefix: &str) -> std::io::Result<Netns> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> std::io::Result<()> {
        let mut args = vec!["netns", "exec", self.name.as_str()];
        args.extend_from_slice(cmd);
        ip(&args)
    }

    /// Adds the `cilium_host`/`cilium_net` veth pair (what Cilium creates; this kernel has no
    /// dummy driver) and gives `cilium_host` the addresses given (`10.6.1.124/32`).
    pub fn add_cilium_host(&self, addrs: &[&str]) -> std::io::Result<()> {
        self.exec(&["ip", "link", "add", "cilium_host", "type", "veth", "peer", "name", "cilium_net"])?;
        for a in addrs {
            self.add_address("cilium_host", a)?;
        }
        self.exec(&["ip", "link", "set", "cilium_host", "up"])?;
        self.exec(&["ip", "link", "set", "cilium_net", "up"])
    }

    /// Adds a stand-in node interface (a veth with a peer) with addresses.
    pub fn add_interface(&self, name: &str, addrs: &[&str]) -> std::io::Result<()> {
        let peer = format!("{name}-peer");
        self.exec(&["ip", "link", "add", name, "type", "veth", "peer", "name", &peer])?;
        for a in addrs {
            self.add_address(name, a)?;
        }
        self.exec(&["ip", "link", "set", name, "up"])
    }
}

impl Netns {
    /// Adds an address; IPv6 ones without duplicate address detection so they are usable at once.
    pub fn add_address(&self, dev: &str, addr: &str) -> std::io::Result<()> {
        if addr.contains(':') {
            self.exec(&["ip", "addr", "add", addr, "dev", dev, "nodad"])
        } else {
            self.exec(&["ip", "addr", "add", addr, "dev", dev])
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
