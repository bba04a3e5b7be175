//! A TCP relay in front of etcd that can freeze the connections it carries (bytes held in both
//! directions, sockets kept open) while new connections still pass: a path that keeps a watch
//! stream open but delivers nothing on it, while fresh unary calls answer.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Relay {
    pub port: u16,
    /// Connections numbered below this are frozen.
    frozen_below: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Relays 127.0.0.1:<port> to `target`.
    pub fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        let port = listener.local_addr().expect("relay addr").port();
        let (frozen_below, accepted, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (f, a, st) = (frozen_below.clone(), accepted.clone(), stop.clone());
        listener.set_nonblocking(true).expect("relay nonblocking");
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let id = a.fetch_add(1, Ordering::Relaxed);
                let Ok(server) = TcpStream::connect(target) else { continue };
                for (from, to) in [(client.try_clone(), server.try_clone()), (server.try_clone(), client.try_clone())] {
                    let (Ok(from), Ok(to)) = (from, to) else { continue };
                    let (f, st) = (f.clone(), st.clone());
                    std::thread::spawn(move || pump(id, from, to, &f, &st));
                }
            }
        });
        Relay { port, frozen_below, accepted, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The connections open now stop carrying bytes; new ones still pass.
    pub fn freeze_open_connections(&self) {
        self.frozen_below.store(self.accepted.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

fn pump(id: u64, mut from: TcpStream, mut to: TcpStream, frozen_below: &AtomicU64, stop: &AtomicBool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        if id < frozen_below.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
