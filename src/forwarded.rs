//! The client's real address behind a reverse proxy.
//!
//! Behind nginx, HAProxy or a load balancer every socket comes from the
//! proxy, so the per-address limits would treat every user as one client.
//! Only from the addresses in `server.trusted_proxies` is the client's
//! address taken from what the proxy says: the PROXY protocol header (v1
//! text or v2 binary, where `server.proxy_protocol` is on), else
//! `Forwarded` or `X-Forwarded-For`, whose right-most entry that is not
//! itself a trusted proxy is the client (entries further left are what
//! the client claimed, and a client can claim anything). From anyone
//! else these are ignored: a spoofed header changes nothing.

use async_io::Async;
use futures_lite::AsyncReadExt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream};

/// An address or a network, `10.0.0.0/8` or `::1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// `ADDR` or `ADDR/BITS`.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, bits) = match text.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (text, None),
        };
        let net: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an address or a network such as 10.0.0.0/8"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => match b.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{text:?}: the prefix length must be 0-{max}")),
            },
        };
        Ok(Cidr {
            net: net.to_canonical(),
            bits,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                prefix(u32::from(n).into(), u32::from(a).into(), self.bits, 32)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix(u128::from(n), u128::from(a), self.bits, 128),
            _ => false,
        }
    }
}

/// Whether the first `bits` of `a` and `b` (each `width` bits) agree.
fn prefix(a: u128, b: u128, bits: u8, width: u32) -> bool {
    let shift = width - u32::from(bits);
    shift >= width || (a >> shift) == (b >> shift)
}

/// The proxies whose word about the client is taken.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrustedProxies(pub Vec<Cidr>);

impl TrustedProxies {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The client behind `peer`, from a request's `Forwarded` (preferred,
    /// the standard) or `X-Forwarded-For`: walking from the right, the
    /// first entry that is not a trusted proxy. `peer` itself when it is
    /// not trusted, when there is no header, or when the entry there is
    /// not an address (`unknown`, an obfuscated name): nothing is guessed.
    pub fn client(&self, peer: IpAddr, forwarded: Option<&str>, xff: Option<&str>) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let hops: Vec<Option<IpAddr>> = match (forwarded, xff) {
            (Some(f), _) => f.split(',').map(forwarded_for).collect(),
            (None, Some(x)) => x.split(',').map(|e| address(e.trim())).collect(),
            (None, None) => return peer,
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop {
                Some(ip) => {
                    client = *ip;
                    if !self.contains(*ip) {
                        break;
                    }
                }
                None => break,
            }
        }
        client
    }
}

/// The `for=` of one `Forwarded` element, as an address.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("for")
            .then(|| address(v.trim().trim_matches('"')))
            .flatten()
    })
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `::1`,
/// `[::1]`, `[::1]:5678`.
fn address(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = text.strip_prefix('[') {
        return rest
            .split(']')
            .next()?
            .parse::<IpAddr>()
            .ok()
            .map(|ip| ip.to_canonical());
    }
    let (host, _port) = text.rsplit_once(':')?;
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The v2 header's first twelve bytes.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 line, CRLF included (the specification's bound).
const V1_MAX: usize = 107;

/// Why a PROXY header was refused: the socket is closed.
#[derive(Debug, PartialEq, Eq)]
pub struct BadHeader;

/// Reads a PROXY protocol header (v1 or v2) from a trusted proxy's socket,
/// exactly its bytes and no more: the client's address, or `None` where
/// the proxy speaks for itself (v2 `LOCAL`, v1 `UNKNOWN`: a health check).
/// Anything else is refused: a proxy set up to send it always does.
pub async fn read_header(stream: &mut Async<TcpStream>) -> Result<Option<IpAddr>, BadHeader> {
    let mut start = [0u8; 12];
    stream
        .read_exact(&mut start[..5])
        .await
        .map_err(|_| BadHeader)?;
    if &start[..5] == b"PROXY" {
        // v1: the rest of the line, a byte at a time (it is short).
        let mut line = b"PROXY".to_vec();
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(BadHeader);
            }
            let mut b = [0u8; 1];
            stream.read_exact(&mut b).await.map_err(|_| BadHeader)?;
            line.push(b[0]);
        }
        return parse_v1(&line);
    }
    stream
        .read_exact(&mut start[5..])
        .await
        .map_err(|_| BadHeader)?;
    if &start != V2_SIGNATURE {
        return Err(BadHeader);
    }
    let mut fixed = [0u8; 4];
    stream.read_exact(&mut fixed).await.map_err(|_| BadHeader)?;
    let len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
    // Addresses and extensions (TLVs, which are skipped): bounded by the
    // u16 length, at most 64 KiB.
    let mut rest = vec![0u8; len];
    stream.read_exact(&mut rest).await.map_err(|_| BadHeader)?;
    parse_v2(fixed[0], fixed[1], &rest)
}

/// `PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n`.
fn parse_v1(line: &[u8]) -> Result<Option<IpAddr>, BadHeader> {
    let text = std::str::from_utf8(line).map_err(|_| BadHeader)?;
    let words: Vec<&str> = text.trim_end_matches("\r\n").split(' ').collect();
    match words.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", "TCP4", src, _dst, _sp, _dp] => src
            .parse::<Ipv4Addr>()
            .map(|ip| Some(IpAddr::V4(ip)))
            .map_err(|_| BadHeader),
        ["PROXY", "TCP6", src, _dst, _sp, _dp] => src
            .parse::<Ipv6Addr>()
            .map(|ip| Some(IpAddr::V6(ip).to_canonical()))
            .map_err(|_| BadHeader),
        _ => Err(BadHeader),
    }
}

/// The v2 header after its signature: version and command, family and
/// transport, then the addresses.
fn parse_v2(ver_cmd: u8, family: u8, rest: &[u8]) -> Result<Option<IpAddr>, BadHeader> {
    if ver_cmd >> 4 != 2 {
        return Err(BadHeader);
    }
    match ver_cmd & 0x0f {
        0 => return Ok(None), // LOCAL: the proxy's own connection
        1 => {}               // PROXY
        _ => return Err(BadHeader),
    }
    match family >> 4 {
        1 if rest.len() >= 12 => Ok(Some(IpAddr::V4(Ipv4Addr::new(
            rest[0], rest[1], rest[2], rest[3],
        )))),
        2 if rest.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&rest[..16]);
            Ok(Some(IpAddr::V6(Ipv6Addr::from(a)).to_canonical()))
        }
        // AF_UNSPEC or AF_UNIX: no address to take; the proxy's own.
        0 | 3 => Ok(None),
        _ => Err(BadHeader),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies(list.iter().map(|c| Cidr::parse(c).unwrap()).collect())
    }

    #[test]
    fn networks_hold_their_addresses() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.200.1.2")) && !c.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("127.0.0.1")
            .unwrap()
            .contains(ip("::ffff:127.0.0.1")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(!Cidr::parse("::/0").unwrap().contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "example.org", "10.0.0/8", "::1/129", ""] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_hop() {
        let t = trusted(&["127.0.0.1", "10.0.0.0/8"]);
        let proxy = ip("127.0.0.1");
        // What the client claimed (left) is never taken over the hop the
        // proxy saw.
        let xff = Some("6.6.6.6, 203.0.113.7, 10.1.1.1");
        assert_eq!(t.client(proxy, None, xff), ip("203.0.113.7"));
        assert_eq!(
            t.client(proxy, None, Some("203.0.113.7:4711")),
            ip("203.0.113.7")
        );
        assert_eq!(
            t.client(
                proxy,
                Some("for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https"),
                xff
            ),
            ip("2001:db8::7")
        );
        // Nothing usable: the proxy itself, never a guess.
        assert_eq!(t.client(proxy, None, None), proxy);
        assert_eq!(t.client(proxy, Some("for=unknown"), None), proxy);
        assert_eq!(t.client(proxy, None, Some("garbage")), proxy);
        // Every hop trusted: the left-most.
        assert_eq!(
            t.client(proxy, None, Some("10.0.0.5, 10.0.0.6")),
            ip("10.0.0.5")
        );
        // From anyone else the headers are ignored.
        let stranger = ip("198.51.100.9");
        assert_eq!(t.client(stranger, None, Some("1.2.3.4")), stranger);
        assert_eq!(TrustedProxies::default().client(proxy, None, xff), proxy);
    }

    #[test]
    fn proxy_headers_v1_and_v2() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n"),
            Ok(Some(ip("203.0.113.7")))
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::7 ::1 56324 443\r\n"),
            Ok(Some(ip("2001:db8::7")))
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n"), Ok(None));
        for bad in [
            &b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n"[..],
            b"PROXY UDP4 a b c d\r\n",
            b"PROXY\r\n",
        ] {
            assert_eq!(parse_v1(bad), Err(BadHeader));
        }
        let mut v4 = vec![203, 0, 113, 7, 10, 0, 0, 1, 0xdc, 0x04, 0x01, 0xbb];
        assert_eq!(parse_v2(0x21, 0x11, &v4), Ok(Some(ip("203.0.113.7"))));
        assert_eq!(parse_v2(0x20, 0x00, &[]), Ok(None));
        assert_eq!(parse_v2(0x31, 0x11, &v4), Err(BadHeader));
        v4.truncate(5);
        assert_eq!(parse_v2(0x21, 0x11, &v4), Err(BadHeader));
    }

    #[test]
    fn a_header_is_read_to_its_end_and_no_further() {
        let (listener, addr) = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let a = l.local_addr().unwrap();
            (l, a)
        };
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[
            0x21, 0x11, 0, 12, 203, 0, 113, 7, 10, 0, 0, 1, 0xdc, 0x04, 0x01, 0xbb,
        ]);
        for (sent, want) in [
            (
                b"PROXY TCP4 198.51.100.2 10.0.0.1 1 2\r\nGET /".to_vec(),
                Ok(Some(ip("198.51.100.2"))),
            ),
            (
                [v2.as_slice(), b"GET /"].concat(),
                Ok(Some(ip("203.0.113.7"))),
            ),
            (b"GET / HTTP/1.1\r\n\r\n".to_vec(), Err(BadHeader)),
            (
                [b"PROXY ".as_slice(), &[b'x'; 200]].concat(),
                Err(BadHeader),
            ),
        ] {
            let mut client = std::net::TcpStream::connect(addr).unwrap();
            std::io::Write::write_all(&mut client, &sent).unwrap();
            let (server, _) = listener.accept().unwrap();
            let mut server = Async::new(server).unwrap();
            let got = futures_lite::future::block_on(read_header(&mut server));
            assert_eq!(got, want);
            if want.is_ok() {
                let mut next = [0u8; 5];
                futures_lite::future::block_on(server.read_exact(&mut next)).unwrap();
                assert_eq!(&next, b"GET /");
            }
        }
    }
}
