//! The little HTTP/1.1 the gateway speaks: read one request head (bounded in
//! size; the caller bounds it in time), answer it, close.
//!
//! The head is read here rather than by the WebSocket library so that plain
//! routes (`/healthz`, `/metrics`) share the port, and so that admission
//! (caps, origin, token) is decided before a connection exists.

use futures_lite::{AsyncReadExt, AsyncWriteExt};

/// Largest request head accepted; above it the answer is 431.
pub const MAX_HEAD_BYTES: usize = 8192;
/// Most headers accepted; above it the answer is 431.
const MAX_HEADERS: usize = 48;

/// The parts of a request head the gateway acts on.
#[derive(Debug, Default, Clone)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub upgrade_websocket: bool,
    pub connection_upgrade: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    pub origin: Option<String>,
    pub bearer: Option<String>,
    /// For `POST /mcp`: the body's length, what the client accepts, its
    /// MCP session and protocol version.
    pub content_length: Option<usize>,
    pub chunked: bool,
    pub accept: String,
    pub mcp_session: Option<String>,
    pub mcp_version: Option<String>,
    /// The upgrade offers the `mcp` WebSocket subprotocol.
    pub ws_mcp: bool,
    /// The upgrade offers the `hivegate` subprotocol (the op protocol,
    /// named so that a `bearer.TOKEN` entry has one to stand beside).
    pub ws_op: bool,
    /// A `bearer.TOKEN` entry of `Sec-WebSocket-Protocol`: the token of
    /// a browser or SDK that cannot set `Authorization` on a WebSocket.
    pub ws_bearer: Option<String>,
    /// The `Host` header, if any (and whether it came more than once).
    pub host: Option<String>,
    pub hosts: u8,
    /// HTTP/1.1 without `Connection: close`: the client would send its
    /// next request on this connection.
    pub keep_alive: bool,
    /// `Forwarded` and `X-Forwarded-For`, each header's lines joined with
    /// commas: read only from a trusted proxy (`crate::forwarded`).
    pub forwarded: Option<String>,
    pub x_forwarded_for: Option<String>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// The peer closed or reset before a whole head arrived.
    Closed,
    /// Not HTTP/1.x as this server reads it: 400.
    Malformed,
    /// Over [`MAX_HEAD_BYTES`] or [`MAX_HEADERS`]: 431.
    TooLarge,
}

impl std::fmt::Display for HeadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HeadError::Closed => "the client closed before its request head was complete",
            HeadError::Malformed => "malformed request head",
            HeadError::TooLarge => "request head too large",
        })
    }
}

impl std::error::Error for HeadError {}

/// Reads until the blank line ending the head. Returns the head and any
/// bytes that arrived after it (a client may send its first WebSocket frame
/// right behind the upgrade request).
pub async fn read_head<S: futures_lite::AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Head, Vec<u8>), HeadError> {
    // On the heap and dropped after the handshake: an idle connection must
    // not carry this buffer.
    let mut buf = vec![0u8; MAX_HEAD_BYTES];
    let mut len = 0;
    loop {
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        let searched_from = len.saturating_sub(3);
        len += n;
        // A head with bare LF line ends would never show CRLF CRLF: say
        // so at once rather than at the timeout (also `\n\r\n`, an LF
        // line followed by a CRLF blank line).
        let window = &buf[searched_from.saturating_sub(2)..len];
        let lf_end = window.windows(3).any(|w| w == b"\n\r\n") && find_head_end(window).is_none();
        if lf_end || window.windows(2).any(|w| w == b"\n\n") {
            return Err(HeadError::Malformed);
        }
        if let Some(end) = find_head_end(&buf[searched_from..len]) {
            let end = searched_from + end;
            let head = parse_head(&buf[..end])?;
            return Ok((head, buf[end..len].to_vec()));
        }
        if len == buf.len() {
            return Err(HeadError::TooLarge);
        }
    }
}

/// Position just past `\r\n\r\n`, if present.
fn find_head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// A header that may come on several lines, as one comma-separated list.
fn join_header(into: &mut Option<String>, value: &str) {
    match into {
        Some(list) => {
            list.push_str(", ");
            list.push_str(value);
        }
        None => *into = Some(value.to_string()),
    }
}

fn parse_head(b: &[u8]) -> Result<Head, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(b) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Malformed),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    }
    let mut head = Head {
        method: req.method.unwrap_or_default().to_string(),
        path: req.path.unwrap_or_default().to_string(),
        keep_alive: req.version == Some(1),
        ..Head::default()
    };
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            head.upgrade_websocket = value.eq_ignore_ascii_case("websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            let has = |token: &str| {
                value
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case(token))
            };
            head.connection_upgrade = has("upgrade");
            head.keep_alive &= !has("close");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            head.ws_key = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            head.ws_version = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("origin") {
            head.origin = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            for p in value.split(',').map(str::trim) {
                match p {
                    "mcp" => head.ws_mcp = true,
                    "hivegate" => head.ws_op = true,
                    _ => {
                        if let Some(t) = p.strip_prefix("bearer.").filter(|t| !t.is_empty()) {
                            head.ws_bearer = Some(t.to_string());
                        }
                    }
                }
            }
        } else if name.eq_ignore_ascii_case("forwarded") {
            join_header(&mut head.forwarded, value);
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            join_header(&mut head.x_forwarded_for, value);
        } else if name.eq_ignore_ascii_case("host") {
            head.hosts = head.hosts.saturating_add(1);
            head.host = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("content-length") {
            // Digits only ("+40" and " 40 " are not lengths), and a
            // second, different length is a smuggling attempt.
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::Malformed);
            }
            let len: usize = value.parse().map_err(|_| HeadError::Malformed)?;
            if head.content_length.is_some_and(|l| l != len) {
                return Err(HeadError::Malformed);
            }
            head.content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = true;
        } else if name.eq_ignore_ascii_case("accept") {
            head.accept = value.chars().take(256).collect();
        } else if name.eq_ignore_ascii_case("mcp-session-id") {
            head.mcp_session = Some(value.chars().take(64).collect());
        } else if name.eq_ignore_ascii_case("mcp-protocol-version") {
            head.mcp_version = Some(value.chars().take(32).collect());
        } else if name.eq_ignore_ascii_case("authorization") {
            let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
            if scheme.eq_ignore_ascii_case("bearer") {
                head.bearer = Some(token.trim().to_string());
            }
        }
    }
    Ok(head)
}

/// Whether `key` is the base64 encoding of 16 bytes: 22 characters of the
/// base64 alphabet and `==`.
pub fn valid_ws_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[22..] == *b"=="
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        // The last character before the padding carries 2 bits: the rest
        // of its 6 must be zero.
        && b"AQgw".contains(&b[21])
}

impl Head {
    /// The path without its query string.
    pub fn route(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }
}

/// One whole response, written and flushed; the caller closes the socket.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    pub extra: Vec<(&'static str, String)>,
    /// An answer to `HEAD`: the head as for `GET`, no body.
    pub head_only: bool,
    /// The connection stays open for the client's next request.
    pub keep_alive: bool,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
            extra: Vec::new(),
            head_only: false,
            keep_alive: false,
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response::new(status, "text/plain; charset=utf-8", body)
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.extra.push((name, value.into()));
        self
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            if self.keep_alive { "keep-alive" } else { "close" }
        );
        for (name, value) in &self.extra {
            out.push_str(name);
            out.push_str(": ");
            out.push_str(value);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        if !self.head_only {
            out.push_str(&self.body);
        }
        out.into_bytes()
    }

    pub async fn send<S: futures_lite::AsyncWrite + Unpin>(&self, stream: &mut S) {
        // The client may already be gone; there is nobody to tell.
        let _ = stream.write_all(&self.to_bytes()).await;
        let _ = stream.flush().await;
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        421 => "Misdirected Request",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The `101 Switching Protocols` answer to a valid upgrade request, with
/// the subprotocol chosen (`mcp` or `hivegate`), if the client offered one.
/// A `bearer.TOKEN` entry is never chosen: the token is not echoed.
pub fn switching_protocols(ws_key: &str, protocol: Option<&str>) -> Vec<u8> {
    let accept = async_tungstenite::tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    let protocol = match protocol {
        Some(p) => format!("Sec-WebSocket-Protocol: {p}\r\n"),
        None => String::new(),
    };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{protocol}\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Result<(Head, Vec<u8>), HeadError> {
        let mut cursor = futures_lite::io::Cursor::new(bytes.to_vec());
        futures_lite::future::block_on(read_head(&mut cursor))
    }

    #[test]
    fn reads_an_upgrade_request_and_keeps_what_follows() {
        let (head, rest) = read(
            b"GET /ws?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
              Authorization: Bearer tok 1 \r\nOrigin: https://x\r\n\r\n\x81\x80",
        )
        .unwrap();
        assert_eq!(head.route(), "/ws");
        assert!(head.upgrade_websocket && head.connection_upgrade);
        assert_eq!(head.ws_version.as_deref(), Some("13"));
        assert_eq!(head.bearer.as_deref(), Some("tok 1"));
        assert_eq!(head.origin.as_deref(), Some("https://x"));
        assert_eq!(rest, b"\x81\x80");
    }

    #[test]
    fn refuses_bad_and_oversized_heads() {
        assert_eq!(read(b"NOT HTTP\r\n\r\n").unwrap_err(), HeadError::Malformed);
        assert_eq!(read(b"GET / HTTP/1.1\r\n").unwrap_err(), HeadError::Closed);
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        assert_eq!(read(&big).unwrap_err(), HeadError::TooLarge);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..60 {
            many.extend(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(read(&many).unwrap_err(), HeadError::TooLarge);
    }

    #[test]
    fn leftover_head_shapes_are_refused() {
        // An LF line, then a CRLF blank line: refused at once.
        assert_eq!(
            read(b"GET / HTTP/1.1\nHost: a\n\r\n").unwrap_err(),
            HeadError::Malformed
        );
        for bad in ["+40", "-1", " ", "4 0", "0x10"] {
            let req = format!("POST /mcp HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(
                read(req.as_bytes()).unwrap_err(),
                HeadError::Malformed,
                "{bad}"
            );
        }
        let two = b"POST /mcp HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\n";
        assert_eq!(read(two).unwrap_err(), HeadError::Malformed);
        let same = b"POST /mcp HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n";
        assert_eq!(read(same).unwrap().0.content_length, Some(4));
        let (h, _) = read(
            b"GET /ws HTTP/1.1\r\nHost: h:1\r\nSec-WebSocket-Protocol: hivegate, bearer.abc.def\r\n\r\n",
        )
        .unwrap();
        assert!(h.ws_op && !h.ws_mcp);
        assert_eq!(h.ws_bearer.as_deref(), Some("abc.def"));
        assert_eq!((h.host.as_deref(), h.hosts), (Some("h:1"), 1));
    }

    #[test]
    fn bare_lf_heads_and_bad_keys_are_refused() {
        assert_eq!(
            read(b"GET / HTTP/1.1\nHost: a\n\n").unwrap_err(),
            HeadError::Malformed
        );
        // Split across reads, the two LFs are still found.
        assert_eq!(
            read(b"GET / HTTP/1.1\n\n").unwrap_err(),
            HeadError::Malformed
        );
        for key in [
            "",
            "abc",
            "dGhlIHNhbXBsZSBub25jZQ=",
            "dGhlIHNhbXBsZSBub25jZQ!=",
            "dGhlIHNhbXBsZSBub25jZR==",
            "not base64 at all!!!!!!=",
        ] {
            assert!(!valid_ws_key(key), "{key:?}");
        }
        assert!(valid_ws_key("dGhlIHNhbXBsZSBub25jZQ=="));
    }

    #[test]
    fn accept_key_matches_rfc_6455() {
        let r = String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", None)).unwrap();
        assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(!r.contains("Sec-WebSocket-Protocol"));
        let mcp = String::from_utf8(switching_protocols("dGhlIHNhbXBsZSBub25jZQ==", Some("mcp")))
            .unwrap();
        assert!(mcp.ends_with("Sec-WebSocket-Protocol: mcp\r\n\r\n"));
    }
}
