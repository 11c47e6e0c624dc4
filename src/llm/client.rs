//! One call to a provider, on a pool thread: the HTTP transport. ureq
//! sends what the provider's dialect (`dialect.rs`) wrote, the answer is
//! read as it arrives (Server-Sent Events, or a plain JSON answer from a
//! server that does not stream) and read by the dialect, and every text
//! delta goes back to the event loop through a bounded channel. Nothing
//! here knows an API's shapes.
//!
//! The job stops reading when the event loop's side of the channel is gone
//! or the cancel flag is set: checked after every read, so within one
//! chunk (or one `idle_timeout` on a stalled upstream, which is ureq's
//! per-read timeout).

use super::dialect::{CallError, Dialect, Streamed, ToolCallDelta, Usage};
use super::sse::SseParser;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Most bytes of an error body kept for the message.
const ERROR_BODY_BYTES: u64 = 2048;
/// Largest non-streamed answer accepted.
const MAX_JSON_ANSWER: u64 = 8 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Delta(String),
    /// Reasoning text a model streams before its answer
    /// (`delta.reasoning_content`, as DeepSeek, Kimi and vLLM send it).
    Reasoning(String),
    /// Pieces of the function calls the model makes.
    ToolCalls(Vec<ToolCallDelta>),
    Done {
        model: Option<String>,
        usage: Option<Usage>,
        finish_reason: Option<String>,
    },
    Failed(CallError),
}

/// What a call needs, owned so it can move to a pool thread.
pub struct Request {
    pub agent: ureq::Agent,
    pub url: String,
    /// Written by the dialect, the API key among them.
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    /// Reads what comes back.
    pub dialect: &'static dyn Dialect,
    /// Cleans the upstream's words before they leave this thread.
    pub redact: crate::redact::Redactor,
}

/// Bytes of each call's read and write buffers, and the longest response
/// head read. ureq's defaults (128 KiB each way) cost 256 KiB a call:
/// 50 MiB for 200 streams, where an answer's events are a few hundred
/// bytes each.
const CALL_BUFFER_BYTES: usize = 16 << 10;

/// Resolves a provider given by IP address without a thread. ureq's own
/// resolver spawns one for every lookup that has a timeout (every call
/// here), even of an address; for a provider on the box or the LAN that
/// was the largest part of the relay's overhead. Host names still go to
/// ureq's resolver, under the timeout.
#[derive(Debug, Default)]
struct Resolver(ureq::unversioned::resolver::DefaultResolver);

impl ureq::unversioned::resolver::Resolver for Resolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let address = uri.authority().and_then(|a| {
            let ip = a.host().trim_matches(['[', ']']).parse().ok()?;
            let port = a.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            Some(std::net::SocketAddr::new(ip, port))
        });
        match address {
            Some(address) => {
                let mut one = self.empty();
                one.push(address);
                Ok(one)
            }
            None => self.0.resolve(uri, config, timeout),
        }
    }
}

/// An agent with the provider's timeouts. `http_status_as_error` is off so
/// that a 429's `Retry-After` and an error body can be read.
pub fn agent(cfg: &super::ProviderConfig, tls: &ureq::tls::TlsConfig) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .tls_config(tls.clone())
        .input_buffer_size(CALL_BUFFER_BYTES)
        .output_buffer_size(CALL_BUFFER_BYTES)
        .max_response_header_size(CALL_BUFFER_BYTES)
        .http_status_as_error(false)
        .timeout_connect(Some(cfg.connect_timeout))
        .timeout_recv_response(Some(cfg.first_byte_timeout))
        .timeout_per_read(Some(cfg.idle_timeout))
        .timeout_global(Some(cfg.total_timeout))
        .user_agent(concat!("hivegate/", env!("CARGO_PKG_VERSION")))
        .build();
    ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        Resolver::default(),
    )
}

/// Runs the call, sending events; the last one is always `Done` or
/// `Failed` (unless the receiver went away or the call was cancelled).
pub fn run(req: Request, events: &async_channel::Sender<Event>, cancel: &AtomicBool) {
    let outcome = call(&req, events, cancel);
    if cancel.load(Ordering::Relaxed) {
        return;
    }
    let last = match outcome {
        Ok(Some(done)) => done,
        Ok(None) => return,
        Err(e) => Event::Failed(e.redacted(&req.redact)),
    };
    let _ = events.send_blocking(last);
}

fn map_ureq(e: ureq::Error) -> CallError {
    match e {
        ureq::Error::Timeout(t) => CallError::Timeout(match t {
            ureq::Timeout::Connect | ureq::Timeout::Resolve => "connecting",
            ureq::Timeout::RecvResponse | ureq::Timeout::SendRequest | ureq::Timeout::SendBody => {
                "waiting for the first byte"
            }
            ureq::Timeout::Global | ureq::Timeout::PerCall => "after the whole call's time",
            _ => "between chunks",
        }),
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
            CallError::Timeout("between chunks")
        }
        other => CallError::Transport(other.to_string()),
    }
}

fn map_io(e: std::io::Error) -> CallError {
    match e.kind() {
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
            CallError::Timeout("between chunks")
        }
        _ => {
            // ureq wraps its own timeouts in io errors while reading a body.
            let text = e.to_string();
            if text.contains("timeout") || text.contains("timed out") {
                CallError::Timeout("between chunks")
            } else {
                CallError::Transport(text)
            }
        }
    }
}

/// `Ok(Some(last event))`, or `Ok(None)` when the receiver is gone.
fn call(
    req: &Request,
    events: &async_channel::Sender<Event>,
    cancel: &AtomicBool,
) -> Result<Option<Event>, CallError> {
    let mut r = req
        .agent
        .post(&req.url)
        .header("Content-Type", "application/json")
        .header("Accept", "text/event-stream");
    for (name, value) in &req.headers {
        r = r.header(*name, value);
    }
    let response = r.send(req.body.as_str()).map_err(map_ureq)?;
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let mut body = String::new();
        let _ = response
            .into_body()
            .into_reader()
            .take(ERROR_BODY_BYTES)
            .read_to_string(&mut body);
        return Err(CallError::Status {
            code: status,
            retry_after,
            // Cut here, cleaned (secrets, controls, length) before it
            // leaves the pool thread: see `run`.
            message: req.dialect.error_message(&body),
        });
    }
    let streaming = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let mut reader = response.into_body().into_reader();
    if !streaming {
        let mut body = String::new();
        reader
            .take(MAX_JSON_ANSWER)
            .read_to_string(&mut body)
            .map_err(map_io)?;
        let whole = req.dialect.answer(&body)?;
        if !whole.text.is_empty() && events.send_blocking(Event::Delta(whole.text)).is_err() {
            return Ok(None);
        }
        if !whole.tool_calls.is_empty()
            && events
                .send_blocking(Event::ToolCalls(whole.tool_calls))
                .is_err()
        {
            return Ok(None);
        }
        return Ok(Some(Event::Done {
            model: whole.model,
            usage: whole.usage,
            finish_reason: whole.finish_reason,
        }));
    }
    let mut parser = SseParser::default();
    let mut buf = vec![0u8; 8192];
    let mut datas = Vec::new();
    let (mut model, mut usage, mut finish_reason) = (None, None, None);
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let n = reader.read(&mut buf).map_err(map_io)?;
        if n == 0 {
            parser
                .finish(&mut datas)
                .map_err(|e| CallError::Malformed(format!("{e:?}")))?;
        } else {
            parser
                .feed(&buf[..n], &mut datas)
                .map_err(|e| CallError::Malformed(format!("{e:?}")))?;
        }
        for data in datas.drain(..) {
            let chunk = match req.dialect.event(&data)? {
                Streamed::End => {
                    return Ok(Some(Event::Done {
                        model,
                        usage,
                        finish_reason,
                    }))
                }
                Streamed::Chunk(chunk) => chunk,
            };
            model = chunk.model.or(model);
            usage = chunk.usage.or(usage);
            finish_reason = chunk.finish_reason.or(finish_reason);
            if let Some(text) = chunk.reasoning.filter(|t| !t.is_empty()) {
                if events.send_blocking(Event::Reasoning(text)).is_err() {
                    return Ok(None);
                }
            }
            if let Some(text) = chunk.delta.filter(|t| !t.is_empty()) {
                if events.send_blocking(Event::Delta(text)).is_err() {
                    return Ok(None);
                }
            }
            if !chunk.tool_calls.is_empty()
                && events
                    .send_blocking(Event::ToolCalls(chunk.tool_calls))
                    .is_err()
            {
                return Ok(None);
            }
        }
        if n == 0 {
            return Err(CallError::Transport(
                "the stream ended before its end".into(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_resolves_to_itself_with_the_schemes_port() {
        use ureq::unversioned::resolver::Resolver as _;
        let config = ureq::config::Config::default();
        let resolve = |url: &str| -> Vec<std::net::SocketAddr> {
            let uri: ureq::http::Uri = url.parse().unwrap();
            let timeout = ureq::unversioned::transport::NextTimeout::default();
            Resolver::default()
                .resolve(&uri, &config, timeout)
                .unwrap()
                .to_vec()
        };
        assert_eq!(
            resolve("http://127.0.0.1:9/v1"),
            ["127.0.0.1:9".parse().unwrap()]
        );
        assert_eq!(
            resolve("https://10.0.0.1/v1"),
            ["10.0.0.1:443".parse().unwrap()]
        );
        assert_eq!(resolve("http://[::1]/"), ["[::1]:80".parse().unwrap()]);
    }

    #[test]
    fn which_failures_count_and_which_retry() {
        let status = |code| CallError::Status {
            code,
            retry_after: None,
            message: String::new(),
        };
        use super::super::dialect::Fault;
        assert!(status(500).counted() && status(500).retryable());
        assert!(
            status(408).counted() && status(408).retryable(),
            "408 is the upstream's"
        );
        assert!(!status(429).counted() && status(429).retryable());
        for code in [400, 404, 413, 422] {
            let e = status(code);
            assert_eq!(e.fault(), Fault::Request);
            assert!(!e.counted() && !e.retryable(), "{code}");
        }
        for code in [401, 403] {
            let e = status(code);
            assert_eq!(e.fault(), Fault::Key);
            assert!(e.counted() && !e.retryable(), "{code}");
        }
        assert!(CallError::Timeout("x").counted());
        assert!(CallError::Malformed("x".into()).counted());
    }
}
