//! The node's own addresses through rtnetlink: `cilium_host` and every local interface.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use serde::Serialize;

use super::DatapathError;

/// Cilium's router interface; its address is the node's CiliumInternalIP.
pub const CILIUM_HOST: &str = "cilium_host";

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub addresses: Vec<IpNet>,
    /// XDP programs attached to the link (Cilium's NodePort acceleration): attach mode
    /// (`xdp driver`, `xdp generic`, `xdp offload`) and program id.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub xdp: Vec<(String, u32)>,
}

/// The XDP programs of one link from its `IFLA_XDP` attribute: the per-mode ids when the
/// kernel gives them, else the single program with its attach mode.
fn xdp_programs(attrs: &[LinkAttribute]) -> Vec<(String, u32)> {
    use netlink_packet_route::link::{LinkXdp, XdpAttached};
    let Some(xdp) = attrs.iter().find_map(|a| match a {
        LinkAttribute::Xdp(x) => Some(x),
        _ => None,
    }) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u32)> = xdp
        .iter()
        .filter_map(|x| match x {
            LinkXdp::DrvProgId(id) => Some(("xdp driver".to_owned(), *id)),
            LinkXdp::SkbProgId(id) => Some(("xdp generic".to_owned(), *id)),
            LinkXdp::HwProgId(id) => Some(("xdp offload".to_owned(), *id)),
            _ => None,
        })
        .filter(|(_, id)| *id != 0)
        .collect();
    if out.is_empty() {
        let mode = xdp.iter().find_map(|x| match x {
            LinkXdp::Attached(XdpAttached::Driver) => Some("xdp driver"),
            LinkXdp::Attached(XdpAttached::SocketBuffer) => Some("xdp generic"),
            LinkXdp::Attached(XdpAttached::Hardware) => Some("xdp offload"),
            _ => None,
        });
        out.extend(xdp.iter().filter_map(|x| match x {
            LinkXdp::ProgId(id) if *id != 0 => Some((mode.unwrap_or("xdp").to_owned(), *id)),
            _ => None,
        }));
    }
    out
}

/// Addresses as seen from the network namespace kvcheck runs in.
#[derive(Clone, Debug, Serialize)]
pub struct HostAddresses {
    /// `None` when this namespace has no `cilium_host` link.
    pub cilium_host: Option<Interface>,
    /// Every interface with its addresses, by ifindex.
    pub interfaces: Vec<Interface>,
}

impl HostAddresses {
    /// Every address on every interface (the node's own IPs).
    pub fn all_addresses(&self) -> impl Iterator<Item = &IpNet> {
        self.interfaces.iter().flat_map(|i| i.addresses.iter())
    }
}

/// Opens a route netlink socket inside the network namespace at `netns` (a file such as
/// `/var/run/netns/NAME` or `/proc/PID/ns/net`). The socket stays in that namespace; only a
/// short-lived helper thread switches namespaces, so the process itself does not move.
fn connection_in(netns: &Path) -> Result<NetlinkConnection, DatapathError> {
    let file = std::fs::File::open(netns).map_err(|e| DatapathError::Netlink {
        what: "opening the network namespace",
        message: format!("{}: {e}", netns.display()),
    })?;
    let runtime = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let _guard = runtime.enter();
        // SAFETY: setns on this helper thread only; the fd is valid for the call.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        rtnetlink::new_connection()
    })
    .join()
    .map_err(|_| DatapathError::Netlink { what: "entering the network namespace", message: "helper thread panicked".into() })?
    .map_err(|e| DatapathError::Netlink { what: "opening a route netlink socket in the network namespace", message: format!("{}: {e}", netns.display()) })
}

/// A route netlink connection in `netns`, or in ours.
pub(crate) fn netlink_connection(netns: Option<&Path>) -> Result<NetlinkConnection, DatapathError> {
    match netns {
        Some(path) => connection_in(path),
        None => rtnetlink::new_connection().map_err(|e| DatapathError::Netlink { what: "opening a route netlink socket", message: e.to_string() }),
    }
}

pub(crate) type NetlinkConnection = (
    rtnetlink::proto::Connection<netlink_packet_route::RouteNetlinkMessage>,
    rtnetlink::Handle,
    futures::channel::mpsc::UnboundedReceiver<(rtnetlink::packet_core::NetlinkMessage<netlink_packet_route::RouteNetlinkMessage>, rtnetlink::sys::SocketAddr)>,
);

/// Lists links and addresses of the current network namespace, or of `netns` when given.
pub async fn read_host_addresses(netns: Option<&Path>) -> Result<HostAddresses, DatapathError> {
    let netlink = |what: &'static str| move |e: rtnetlink::Error| DatapathError::Netlink {
        what,
        message: e.to_string(),
    };
    let (connection, handle, _) = netlink_connection(netns)?;
    let conn_task = tokio::spawn(connection);

    let mut links: BTreeMap<u32, Interface> = BTreeMap::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(netlink("listing links"))? {
        let name = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            })
            .unwrap_or_else(|| format!("if{}", msg.header.index));
        links.insert(
            msg.header.index,
            Interface {
                name,
                ifindex: msg.header.index,
                addresses: Vec::new(),
                xdp: xdp_programs(&msg.attributes),
            },
        );
    }

    let mut stream = handle.address().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(netlink("listing addresses"))? {
        // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS the
        // peer there. Elsewhere both are equal, so prefer LOCAL when present.
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        let Some(ip) = local.or(address) else { continue };
        let Ok(net) = IpNet::new(ip, msg.header.prefix_len) else {
            continue;
        };
        if let Some(link) = links.get_mut(&msg.header.index) {
            link.addresses.push(net);
        }
    }
    conn_task.abort();

    let interfaces: Vec<Interface> = links.into_values().collect();
    let cilium_host = interfaces.iter().find(|i| i.name == CILIUM_HOST).cloned();
    Ok(HostAddresses {
        cilium_host,
        interfaces,
    })
}
