//! The embedded pages, each one file compiled in: the web chat
//! (`src/web/index.html`, on the client port) and the operator's view
//! (`src/web/ops.html`, on the operator port), and their icon. Each is
//! served with a Content-Security-Policy that allows the page's own inline
//! script and style (by their SHA-256, computed once at start) and
//! connections to its own origin only: a string that got past a page's
//! escaping still could not run or load anything.

use super::http::Response;

// As build.rs packs them: without indentation and comment lines.
const CHAT: &str = include_str!(concat!(env!("OUT_DIR"), "/index.html"));
const OPS: &str = include_str!(concat!(env!("OUT_DIR"), "/ops.html"));
const ICON: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\">\
<path d=\"M8 1l6 3.5v7L8 15l-6-3.5v-7z\" fill=\"#2563eb\"/></svg>";

/// A page and its policy.
struct Page {
    body: &'static str,
    csp: String,
}

impl Page {
    fn new(body: &'static str) -> Page {
        let hash = |open: &str, close: &str| {
            let inner = body
                .split_once(open)
                .and_then(|(_, rest)| rest.split_once(close))
                .map_or("", |(inner, _)| inner);
            format!(
                "'sha256-{}'",
                base64(&crate::auth::sha256(inner.as_bytes()))
            )
        };
        Page {
            body,
            csp: format!(
                "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
                 img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                hash("<script>", "</script>"),
                hash("<style>", "</style>"),
            ),
        }
    }

    fn serve(&self) -> Response {
        Response::new(200, "text/html; charset=utf-8", self.body)
            .header("Content-Security-Policy", self.csp.clone())
            .header("Referrer-Policy", "no-referrer")
    }
}

pub struct Web {
    chat: Page,
    ops: Page,
}

impl Default for Web {
    fn default() -> Web {
        Web::new()
    }
}

impl Web {
    pub fn new() -> Web {
        Web {
            chat: Page::new(CHAT),
            ops: Page::new(OPS),
        }
    }

    /// The web chat.
    pub fn page(&self) -> Response {
        self.chat.serve()
    }

    /// The operator's view, for the operator port only.
    pub fn ops(&self) -> Response {
        self.ops.serve()
    }

    pub fn icon(&self) -> Response {
        Response::new(200, "image/svg+xml", ICON)
    }
}

/// Standard base64, with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn the_pages_are_small_and_their_policies_name_their_scripts() {
        for (page, body) in [(Page::new(CHAT), CHAT), (Page::new(OPS), OPS)] {
            assert!(body.len() < 50 * 1024, "{} bytes", body.len());
            assert!(page.csp.contains("script-src 'sha256-"));
            assert!(!page.csp.contains("unsafe"));
            // No inline handlers or styles: the policy would block them.
            assert!(!body.contains(" onclick=") && !body.contains(" style=\""));
            assert_eq!(body.matches("<script>").count(), 1);
            assert_eq!(body.matches("<style>").count(), 1);
        }
    }
}
