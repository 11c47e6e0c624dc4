//! systemd integration without a crate: `sd_notify` is one datagram to the
//! socket named by `$NOTIFY_SOCKET` (a leading `@` means Linux's abstract
//! namespace).

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, String)>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`; without it every notification is a no-op.
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|p| !p.is_empty())
            .and_then(|path| UnixDatagram::unbound().ok().map(|s| (s, path)));
        Notifier { socket }
    }

    pub fn notify(&self, state: &str) {
        let Some((sock, path)) = &self.socket else {
            return;
        };
        // Failing to notify is not worth failing the service over: systemd
        // will time the start out, which is the right report.
        let _ = if let Some(name) = path.strip_prefix('@') {
            send_abstract(sock, name.as_bytes(), state)
        } else {
            sock.send_to(state.as_bytes(), path).map(|_| ())
        };
    }

    /// Half of `$WATCHDOG_USEC`, the period to send `WATCHDOG=1` at.
    pub fn watchdog_period() -> Option<Duration> {
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
        // WATCHDOG_PID, when set, must be ours.
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.parse::<u32>().ok() != Some(std::process::id()) {
                return None;
            }
        }
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}

fn send_abstract(sock: &UnixDatagram, name: &[u8], state: &str) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(state.as_bytes(), &addr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: Some((UnixDatagram::unbound().unwrap(), path.display().to_string())),
        };
        n.notify("READY=1");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("hivegate-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier {
            socket: Some((UnixDatagram::unbound().unwrap(), format!("@{name}"))),
        };
        n.notify("STOPPING=1");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1");
    }
}
