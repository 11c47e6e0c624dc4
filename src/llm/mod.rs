//! The LLM tool relay: the `chat` tool, answered by OpenAI-compatible
//! providers (Kimi, GLM, a local server...) through a fallback chain.
//!
//! For each provider in the chain: skip it if it is at its call limit, out
//! of quota, or its circuit is open; otherwise call it on the upstream
//! pool. A failure before the first streamed byte is retried with
//! full-jitter backoff (honouring `Retry-After`), then the next provider is
//! tried. A failure after streaming began ends the call: the client holds
//! part of an answer, and a second answer would not continue it. When no
//! provider could answer: `PROVIDER_UNAVAILABLE`, with the time the first
//! of them may be tried again.
//!
//! Calls run on a pool of their own (`llm.max_in_flight` threads): a
//! streamed answer holds its thread for as long as it streams, and must
//! not starve the store's pool.

mod attempt;
mod budget;
pub mod client;
mod config;
pub mod dialect;
mod openai;

/// Every API dialect spoken (`dialect.rs`), the default first.
pub const DIALECTS: &[&dyn dialect::Dialect] = &[&openai::OpenAi];

mod output;
pub use output::{answer_frame, said_frame, Answer, Output, Said};
mod tool;
mod tools;
pub use budget::{day_of, Caller, Ledger, Refused};
pub use tools::{Cancel, ToolCalls, SHUTTING_DOWN};
pub mod sse;

use crate::limit::{BucketParams, InFlight, TokenBucket};
use crate::ops::log::Logger;
use crate::ops::metrics::{counter_with, gauge_with};
use crate::pool::Pool;
use crate::protocol::ErrorCode;
use crate::resilience::{backoff, Breaker, Jitter, Transition};
use async_io::Timer;
pub use attempt::join as join_tool_calls;
use attempt::Attempt;
pub use config::{LlmConfig, ProviderConfig};
use dialect::{CallError, Fault, Usage};
use futures_lite::FutureExt;
use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

/// Roles a message may have.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// A `chat` call, as the client asked for it (the wire form is the call).
pub use crate::protocol::ToolCall as Call;

struct Provider {
    cfg: ProviderConfig,
    /// The API key; `cfg.api_key` is only where it came from at start.
    key: crate::upstream_key::UpstreamKey,
    url: String,
    agent: ureq::Agent,
    breaker: RefCell<Breaker>,
    in_flight: std::rc::Rc<Cell<u32>>,
    quota: Option<(BucketParams, RefCell<TokenBucket>)>,
    calls: Cell<u64>,
    failures: Cell<u64>,
    /// From a call sent to its first event, and to its answer's end.
    first_byte: crate::ops::histogram::Histogram,
    call_time: crate::ops::histogram::Histogram,
    /// Tokens each way, estimates included, and the calls estimated.
    prompt_tokens: Cell<u64>,
    completion_tokens: Cell<u64>,
    estimated: Cell<u64>,
    /// Its last failure, cleaned: a caller told its circuit is open hears
    /// why it opened.
    last_failure: RefCell<Option<String>>,
}

pub struct Llm {
    providers: Vec<Provider>,
    chain: Vec<usize>,
    cfg: LlmConfig,
    /// `None` when no provider is configured: no threads are started.
    pool: Option<Pool>,
    in_flight: std::rc::Rc<Cell<u32>>,
    jitter: RefCell<Jitter>,
    log: Logger,
    /// Replaced by a reload (it must know the new keys).
    redact: RefCell<crate::redact::Redactor>,
    /// Today's spending per user, for the access rules' budgets.
    pub ledger: Ledger,
    /// Calls sent to providers per second (retries included), for the
    /// operator's view.
    pub calls_meter: RefCell<crate::limit::RateMeter<61>>,
}

impl Llm {
    pub fn new(
        cfg: &LlmConfig,
        log: Logger,
        redact: crate::redact::Redactor,
        tls: &ureq::tls::TlsConfig,
    ) -> std::io::Result<Llm> {
        let now = Instant::now();
        let providers: Vec<Provider> = cfg
            .providers
            .iter()
            .map(|p| Provider {
                url: p.dialect.url(&p.base_url),
                key: crate::upstream_key::UpstreamKey::new(
                    &format!("provider.{}", p.name),
                    p.api_key.clone(),
                    &crate::upstream_key::source(&p.api_key_env, &p.api_key_file),
                    log,
                ),
                agent: client::agent(p, tls),
                breaker: RefCell::new(Breaker::new(p.fail_max, p.reset_timeout, now)),
                in_flight: std::rc::Rc::default(),
                quota: (p.rpm > 0).then(|| {
                    let params = BucketParams {
                        capacity: p.rpm as f64,
                        refill_per_s: p.rpm as f64 / 60.0,
                    };
                    (params, RefCell::new(TokenBucket::new(&params, now)))
                }),
                calls: Cell::new(0),
                first_byte: Default::default(),
                call_time: Default::default(),
                failures: Cell::new(0),
                prompt_tokens: Cell::new(0),
                completion_tokens: Cell::new(0),
                estimated: Cell::new(0),
                last_failure: RefCell::new(None),
                cfg: p.clone(),
            })
            .collect();
        let chain = cfg
            .chain
            .iter()
            .filter_map(|name| providers.iter().position(|p| &p.cfg.name == name))
            .collect();
        let threads = cfg.max_in_flight as usize;
        let pool = if providers.is_empty() {
            None
        } else {
            Some(Pool::new(threads, threads)?)
        };
        let seed = crate::resilience::random_u64();
        Ok(Llm {
            providers,
            chain,
            cfg: cfg.clone(),
            pool,
            in_flight: std::rc::Rc::default(),
            jitter: RefCell::new(Jitter::new(seed)),
            log,
            redact: RefCell::new(redact),
            ledger: Ledger::default(),
            calls_meter: RefCell::new(crate::limit::RateMeter::new(now)),
        })
    }

    /// Checks a call before it costs anything: its shape, then what the
    /// access rules let `caller` use and spend.
    pub fn check(&self, call: &Call, caller: &Caller) -> Result<(), Refused> {
        self.check_shape(call)
            .map_err(|(code, message)| Refused::new(code, message))?;
        let denied = match &caller.grant {
            Err(d) => Some((*d, "the chat tool".to_string())),
            Ok(g) => match &call.provider {
                Some(name) if !g.allows(name) => Some((
                    crate::access::Denied::ByRule(g.rule),
                    format!("provider {name}"),
                )),
                None if !self
                    .chain
                    .iter()
                    .any(|i| g.allows(&self.providers[*i].cfg.name)) =>
                {
                    Some((
                        crate::access::Denied::ByRule(g.rule),
                        "any provider of the chain".into(),
                    ))
                }
                _ => None,
            },
        };
        if let Some((d, what)) = denied {
            let ledger = &self.ledger;
            ledger.denied_provider.set(ledger.denied_provider.get() + 1);
            if caller.who.first_refusal(d.slot()) {
                self.log.info(
                    "access denied",
                    &[
                        ("user", &caller.who.user),
                        ("asked", &what),
                        ("why", &d.describe()),
                    ],
                );
            }
            return Err(Refused::new(
                ErrorCode::Forbidden,
                format!("you may not use {what}: {}", d.describe()),
            ));
        }
        self.ledger.admit(caller, crate::clock::unix_ms())
    }

    fn check_shape(&self, call: &Call) -> Result<(), (ErrorCode, String)> {
        if call.messages.is_empty() {
            return Err((
                ErrorCode::InvalidRequest,
                "messages must not be empty".into(),
            ));
        }
        if let Some(turn) = call
            .messages
            .iter()
            .find(|t| !ROLES.contains(&t.role.as_str()))
        {
            let role: String = turn.role.chars().take(32).collect();
            return Err((
                ErrorCode::InvalidRequest,
                format!("unknown role {role:?}: use {}", ROLES.join(", ")),
            ));
        }
        let total: usize = call.messages.iter().map(|t| t.content.len()).sum();
        if total > self.cfg.max_prompt_bytes {
            return Err((
                ErrorCode::InvalidRequest,
                format!(
                    "the messages hold {total} bytes; at most {} (llm.max_prompt_bytes)",
                    self.cfg.max_prompt_bytes
                ),
            ));
        }
        if let Some(name) = &call.provider {
            if !self.providers.iter().any(|p| &p.cfg.name == name) {
                let name: String = name.chars().take(32).collect();
                return Err((ErrorCode::NotFound, format!("no provider {name:?}")));
            }
        }
        if self.providers.is_empty() {
            return Err((
                ErrorCode::ProviderUnavailable,
                "no LLM provider is configured".into(),
            ));
        }
        Ok(())
    }

    /// Each provider's name and configured model.
    pub fn providers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.providers
            .iter()
            .map(|p| (p.cfg.name.as_str(), p.cfg.model.as_str()))
    }

    /// The fallback chain's providers, by name.
    pub fn chain(&self) -> impl Iterator<Item = &str> {
        self.chain
            .iter()
            .map(|i| self.providers[*i].cfg.name.as_str())
    }

    /// Tool calls one connection may have in flight.
    pub fn max_in_flight_per_session(&self) -> u32 {
        self.cfg.max_in_flight_per_session
    }

    /// Takes a gateway-wide call slot, if one is free; it is held until the
    /// returned guard is dropped.
    pub fn try_start(&self) -> Option<InFlight> {
        InFlight::try_take(&self.in_flight, self.cfg.max_in_flight)
    }

    fn note(&self, p: &Provider, t: Option<Transition>) {
        if let Some((from, to)) = t {
            self.log.warn(
                "circuit breaker",
                &[
                    ("service", &p.cfg.name),
                    ("from", &from.label()),
                    ("to", &to.label()),
                ],
            );
        }
    }

    /// Runs a checked call to its end, sending every frame to `out`.
    pub async fn run(&self, call: Call, caller: &Caller, out: &dyn Output) {
        let mut candidates: Vec<usize> = match &call.provider {
            Some(name) => self
                .providers
                .iter()
                .position(|p| &p.cfg.name == name)
                .into_iter()
                .collect(),
            None => self.chain.clone(),
        };
        candidates.retain(|i| caller.may_use(&self.providers[*i].cfg.name));
        let mut soonest: Option<Instant> = None;
        let mut later = |at: Instant| soonest = Some(soonest.map_or(at, |s: Instant| s.min(at)));
        let mut last = String::from("no provider could be tried");
        // Whether anything that failed could pass with time (a quota, a
        // busy or failing upstream, an open circuit): only then is the
        // client told when to try again. A refused key is not.
        let mut transient = false;
        for i in candidates {
            let p = &self.providers[i];
            let now = Instant::now();
            if p.in_flight.get() >= p.cfg.max_in_flight {
                last = format!(
                    "{} is at its limit of {} calls",
                    p.cfg.name, p.cfg.max_in_flight
                );
                transient = true;
                later(now + Duration::from_secs(1));
                continue;
            }
            if let Some((params, bucket)) = &p.quota {
                if let Err(wait) = bucket.borrow_mut().take(params, now) {
                    last = format!(
                        "{} is out of its quota of {} requests a minute",
                        p.cfg.name, p.cfg.rpm
                    );
                    transient = true;
                    later(now + wait);
                    continue;
                }
            }
            let mut attempt = 0;
            loop {
                match p.breaker.borrow_mut().allow(Instant::now()) {
                    Err(at) => {
                        last = match p.last_failure.borrow().as_ref() {
                            Some(why) => format!("{}: circuit open after {why}", p.cfg.name),
                            None => format!("{}: circuit open", p.cfg.name),
                        };
                        transient = true;
                        later(at);
                        break;
                    }
                    Ok(t) => self.note(p, t),
                }
                p.calls.set(p.calls.get() + 1);
                self.calls_meter.borrow_mut().record(Instant::now());
                let key_id = p.key.id();
                let began = Instant::now();
                let attempted = self.attempt(p, &call, out).await;
                if matches!(attempted, Attempt::Done { .. }) {
                    p.call_time.observe(began.elapsed());
                }
                match attempted {
                    Attempt::Done {
                        text,
                        tool_calls,
                        finish_reason,
                        model,
                        usage,
                    } => {
                        let t = p.breaker.borrow_mut().success();
                        self.note(p, t);
                        // Spent as reported, or about a token per 4 bytes
                        // (and recorded as an estimate).
                        let spent = usage.unwrap_or_else(|| {
                            let asked: usize = call.messages.iter().map(|t| t.content.len()).sum();
                            let called: usize = tool_calls.iter().map(|c| c.arguments.len()).sum();
                            Usage {
                                prompt_tokens: asked.div_ceil(4) as u64,
                                completion_tokens: (text.len() + called).div_ceil(4) as u64,
                            }
                        });
                        let now_ms = crate::clock::unix_ms();
                        let estimated = usage.is_none();
                        self.ledger
                            .spend(caller, &p.cfg.name, spent, estimated, now_ms);
                        p.prompt_tokens
                            .set(p.prompt_tokens.get() + spent.prompt_tokens);
                        p.completion_tokens
                            .set(p.completion_tokens.get() + spent.completion_tokens);
                        p.estimated.set(p.estimated.get() + estimated as u64);
                        // The client hears what the provider reported.
                        let usage = usage.unwrap_or_default();
                        let model = model
                            .or_else(|| call.model.clone())
                            .unwrap_or_else(|| p.cfg.model.clone());
                        out.answer(&Answer {
                            text: &text,
                            tool_calls: &tool_calls,
                            finish_reason: finish_reason.as_deref(),
                            provider: &p.cfg.name,
                            model: &model,
                            usage,
                        });
                        return;
                    }
                    Attempt::Cancelled => {
                        p.breaker.borrow_mut().release();
                        return;
                    }
                    Attempt::NoSlot => {
                        p.breaker.borrow_mut().release();
                        last = "every upstream slot is busy".into();
                        transient = true;
                        later(Instant::now() + Duration::from_secs(1));
                        break;
                    }
                    Attempt::Failed {
                        error,
                        chunks,
                        bytes,
                    } => {
                        p.failures.set(p.failures.get() + 1);
                        if error.counted() {
                            // What a caller told the circuit is open hears.
                            *p.last_failure.borrow_mut() = Some(error.to_string());
                            let t = p.breaker.borrow_mut().failure(Instant::now());
                            self.note(p, t);
                        } else {
                            p.breaker.borrow_mut().release();
                        }
                        self.log.warn(
                            "llm call failed",
                            &[
                                ("provider", &p.cfg.name),
                                ("attempt", &(attempt + 1)),
                                ("chunks", &chunks),
                                ("error", &error),
                            ],
                        );
                        if chunks > 0 {
                            // Streaming began: the client holds part of an
                            // answer, and no retry can continue it.
                            let code = if error.is_timeout() {
                                ErrorCode::Timeout
                            } else {
                                ErrorCode::ProviderUnavailable
                            };
                            let msg = format!(
                                "{} failed after {chunks} chunks ({bytes} bytes) had been delivered: {error}",
                                p.cfg.name
                            );
                            out.fail(code, &msg, None);
                            return;
                        }
                        last = format!("{}: {error}", p.cfg.name);
                        match error.fault() {
                            // Every provider would refuse the same request.
                            Fault::Request => {
                                let msg = format!("{} rejected the request: {error}", p.cfg.name);
                                out.fail(ErrorCode::UpstreamRejected, &msg, None);
                                return;
                            }
                            Fault::Key => {
                                if let Some(id) = &key_id {
                                    p.key.refused(id);
                                }
                            }
                            Fault::Quota | Fault::Upstream => transient = true,
                            Fault::Bound => {}
                        }
                        let retry_after = match &error {
                            CallError::Status { retry_after, .. } => *retry_after,
                            _ => None,
                        };
                        if let Some(ra) = retry_after {
                            later(Instant::now() + ra);
                        }
                        if !error.retryable() || attempt >= self.cfg.max_retries {
                            break;
                        }
                        let mut wait = backoff(
                            attempt,
                            self.cfg.backoff_base,
                            self.cfg.backoff_cap,
                            self.jitter.borrow_mut().unit(),
                        );
                        if let Some(ra) = retry_after {
                            if ra > self.cfg.backoff_cap {
                                // Longer than we would wait: next provider.
                                break;
                            }
                            wait = wait.max(ra);
                        }
                        attempt += 1;
                        let cancelled = async {
                            out.until_cancelled().await;
                            true
                        }
                        .or(async {
                            Timer::after(wait).await;
                            false
                        })
                        .await;
                        if cancelled {
                            return;
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        let retry_ms = soonest.map_or(1000, |at| {
            at.saturating_duration_since(now).as_millis().max(1) as u64
        });
        let msg = format!("no provider could answer; last: {last}");
        out.fail(
            ErrorCode::ProviderUnavailable,
            &msg,
            transient.then_some(retry_ms),
        );
    }

    /// Each provider's breaker, for the metrics.
    pub fn breakers(&self) -> Vec<(String, Breaker)> {
        self.providers
            .iter()
            .map(|p| (p.cfg.name.clone(), p.breaker.borrow().clone()))
            .collect()
    }

    /// Key rotation: each provider named in `cfg` uses the key read for
    /// it now. Providers added or removed need a restart (the caller says
    /// so); everything else about a provider stays as it started.
    pub fn reload_keys(&self, cfg: &LlmConfig, redact: crate::redact::Redactor) {
        *self.redact.borrow_mut() = redact;
        for new in &cfg.providers {
            if let Some(p) = self.providers.iter().find(|p| p.cfg.name == new.name) {
                let source = crate::upstream_key::source(&new.api_key_env, &new.api_key_file);
                p.key.replace(new.api_key.clone(), &source);
            }
        }
    }

    /// Each provider's API key (for its per-key metrics).
    pub fn keys(&self) -> impl Iterator<Item = &crate::upstream_key::UpstreamKey> {
        self.providers.iter().map(|p| &p.key)
    }

    pub fn render(&self, out: &mut String) {
        let names: Vec<&str> = self.providers.iter().map(|p| p.cfg.name.as_str()).collect();
        let per = |f: &dyn Fn(&Provider) -> u64| -> Vec<(&str, u64)> {
            self.providers
                .iter()
                .zip(&names)
                .map(|(p, n)| (*n, f(p)))
                .collect()
        };
        counter_with(
            out,
            "hivegate_llm_calls_total",
            "Calls sent to each provider (retries included).",
            "provider",
            &per(&|p| p.calls.get()),
        );
        counter_with(
            out,
            "hivegate_llm_failures_total",
            "Failed calls per provider.",
            "provider",
            &per(&|p| p.failures.get()),
        );
        for (name, help, which) in [
            (
                "hivegate_llm_first_byte_seconds",
                "From a call sent to a provider to its first event (the upstream's time to first byte, the pool's wait included).",
                (|p: &Provider| &p.first_byte) as fn(&Provider) -> &crate::ops::histogram::Histogram,
            ),
            (
                "hivegate_llm_call_seconds",
                "From a call sent to a provider to the end of its answer, for calls that succeeded.",
                |p: &Provider| &p.call_time,
            ),
        ] {
            crate::ops::histogram::family(out, name, help);
            for p in &self.providers {
                which(p).write(out, name, &format!("provider=\"{}\"", p.cfg.name));
            }
        }
        out.push_str(
            "# HELP hivegate_llm_tokens_total Tokens per provider and direction (prompt, completion), as reported or estimated.\n\
             # TYPE hivegate_llm_tokens_total counter\n",
        );
        for p in &self.providers {
            for (direction, n) in [
                ("prompt", p.prompt_tokens.get()),
                ("completion", p.completion_tokens.get()),
            ] {
                let name = &p.cfg.name;
                out.push_str(&format!(
                    "hivegate_llm_tokens_total{{provider=\"{name}\",direction=\"{direction}\"}} {n}\n"
                ));
            }
        }
        counter_with(
            out,
            "hivegate_llm_estimated_calls_total",
            "Calls whose tokens were estimated (the provider reported none).",
            "provider",
            &per(&|p| p.estimated.get()),
        );
        gauge_with(
            out,
            "hivegate_llm_in_flight",
            "Calls in flight per provider.",
            "provider",
            &per(&|p| p.in_flight.get() as u64),
        );
        crate::ops::metrics::gauge(
            out,
            "hivegate_llm_calls_in_flight",
            "Tool calls in flight, gateway-wide.",
            self.in_flight.get() as u64,
        );
    }
}
