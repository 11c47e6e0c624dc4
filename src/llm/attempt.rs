//! One attempt at one provider: the call sent on the upstream pool, its
//! events relayed to the caller as they come, until the answer is whole,
//! the call fails, the client cancels, or a deadline passes. Streamed
//! function-call pieces are joined here, so every transport gets whole
//! calls with the answer.

use super::client::{self, Event};
use super::dialect::{CallError, ToolCallDelta, Usage};
use super::{Call, Llm, Output, Provider, Said};
use crate::limit::InFlight;
use async_io::Timer;
use futures_lite::FutureExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Stops a pool job when dropped.
struct Stop(Arc<AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How one attempt at one provider ended.
pub(super) enum Attempt {
    Done {
        text: String,
        tool_calls: Vec<ToolCallDelta>,
        finish_reason: Option<String>,
        model: Option<String>,
        usage: Option<Usage>,
    },
    Failed {
        error: CallError,
        chunks: u64,
        bytes: usize,
    },
    Cancelled,
    /// The upstream pool is full: nothing was sent, nothing to count.
    NoSlot,
}

/// Adds streamed pieces to the calls made so far: a piece continues the
/// call of its `index` (its arguments appended) or starts one.
pub fn join(calls: &mut Vec<ToolCallDelta>, pieces: &[ToolCallDelta]) {
    for piece in pieces {
        match calls.iter_mut().find(|c| c.index == piece.index) {
            Some(call) => {
                call.arguments.push_str(&piece.arguments);
                if call.id.is_none() {
                    call.id.clone_from(&piece.id);
                }
                if call.name.is_none() {
                    call.name.clone_from(&piece.name);
                }
            }
            None => calls.push(piece.clone()),
        }
    }
}

/// The bytes pieces add to an answer, for `llm.max_response_bytes`.
fn size(pieces: &[ToolCallDelta]) -> usize {
    pieces
        .iter()
        .map(|p| p.arguments.len() + p.name.as_ref().map_or(0, String::len))
        .sum()
}

impl Llm {
    /// One call to one provider, relayed until it ends.
    pub(super) async fn attempt(&self, p: &Provider, call: &Call, out: &dyn Output) -> Attempt {
        let Some(pool) = &self.pool else {
            return Attempt::NoSlot;
        };
        let (tx, rx) = async_channel::bounded::<Event>(64);
        // The job's own stop, set however this attempt ends (the client
        // cancelled, a bound was passed, the attempt was dropped). Not the
        // caller's cancel flag: that would silence the failure the caller
        // must still hear.
        let stop = Stop(Arc::default());
        let model = call.model.as_deref().unwrap_or(&p.cfg.model);
        let req = client::Request {
            agent: p.agent.clone(),
            url: p.url.clone(),
            headers: p.cfg.dialect.headers(p.key.for_call().as_ref()),
            body: p
                .cfg
                .dialect
                .body(model, &call.messages, call.options.as_deref()),
            dialect: p.cfg.dialect.0,
            redact: self.redact.borrow().clone(),
        };
        let job_stop = stop.0.clone();
        let Ok(job) = pool.submit(p.cfg.total_timeout, move || {
            client::run(req, &tx, &job_stop)
        }) else {
            return Attempt::NoSlot;
        };
        let _slot = InFlight::take(&p.in_flight);
        let sent = Instant::now();
        let mut first = true;
        let deadline = sent + p.cfg.total_timeout;
        let (mut text, mut chunks) = (String::new(), 0u64);
        let mut thought = 0usize;
        let mut tool_calls: Vec<ToolCallDelta> = Vec::new();
        let mut called = 0usize;
        enum Step {
            Event(Option<Event>),
            Silence,
            Cancelled,
            Deadline,
        }
        loop {
            let step = async { Step::Event(rx.recv().await.ok()) }
                .or(async {
                    out.until_cancelled().await;
                    Step::Cancelled
                })
                .or(async {
                    Timer::after(self.cfg.progress_interval).await;
                    Step::Silence
                })
                .or(async {
                    Timer::at(deadline).await;
                    Step::Deadline
                })
                .await;
            if first && matches!(step, Step::Event(Some(_))) {
                first = false;
                p.first_byte.observe(sent.elapsed());
            }
            let (field, piece, calls) = match step {
                Step::Cancelled => return Attempt::Cancelled,
                Step::Silence => {
                    // The client has heard nothing for a while: say why.
                    let msg = format!("waiting for {}", p.cfg.name);
                    out.say(Said::Waiting(&msg));
                    continue;
                }
                Step::Deadline => {
                    let error = CallError::Timeout("after the whole call's time");
                    return Attempt::Failed {
                        error,
                        chunks,
                        bytes: text.len(),
                    };
                }
                Step::Event(Some(Event::Delta(t))) => ("chunk", t, Vec::new()),
                // Reasoning is relayed and counts against the size bound,
                // but is not part of the result.
                Step::Event(Some(Event::Reasoning(t))) => ("reasoning", t, Vec::new()),
                Step::Event(Some(Event::ToolCalls(c))) => ("tool_calls", String::new(), c),
                Step::Event(Some(Event::Done {
                    model,
                    usage,
                    finish_reason,
                })) => {
                    return Attempt::Done {
                        text,
                        tool_calls,
                        finish_reason,
                        model,
                        usage,
                    }
                }
                Step::Event(Some(Event::Failed(error))) => {
                    return Attempt::Failed {
                        error,
                        chunks,
                        bytes: text.len(),
                    }
                }
                Step::Event(None) => {
                    // The job ended without a last word: cancelled, or it
                    // waited past its deadline in the queue.
                    if out.cancelled() {
                        return Attempt::Cancelled;
                    }
                    let error = match job.await {
                        Err(crate::pool::PoolError::Timeout) => {
                            CallError::Timeout("waiting for a free upstream slot")
                        }
                        _ => CallError::Transport("the call ended without an answer".into()),
                    };
                    return Attempt::Failed {
                        error,
                        chunks,
                        bytes: text.len(),
                    };
                }
            };
            if out.cancelled() {
                return Attempt::Cancelled;
            }
            let added = piece.len() + size(&calls);
            if text.len() + thought + called + added > self.cfg.max_response_bytes {
                let error = CallError::TooLong(self.cfg.max_response_bytes);
                return Attempt::Failed {
                    error,
                    chunks,
                    bytes: text.len(),
                };
            }
            chunks += 1;
            match field {
                "chunk" => text.push_str(&piece),
                "tool_calls" => {
                    called += size(&calls);
                    join(&mut tool_calls, &calls);
                }
                _ => thought += piece.len(),
            }
            if !call.stream {
                continue;
            }
            if calls.is_empty() {
                out.say(Said::Piece {
                    field,
                    text: &piece,
                });
            } else {
                out.say(Said::ToolCalls(&calls));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_join_into_calls_by_index() {
        let piece = |index, id: Option<&str>, arguments: &str| ToolCallDelta {
            index,
            id: id.map(String::from),
            name: id.map(|_| "f".to_string()),
            arguments: arguments.into(),
        };
        let mut calls = Vec::new();
        join(
            &mut calls,
            &[piece(0, Some("a"), "{\"x\""), piece(1, Some("b"), "")],
        );
        join(&mut calls, &[piece(0, None, ":1}"), piece(1, None, "{}")]);
        assert_eq!(
            calls,
            [piece(0, Some("a"), "{\"x\":1}"), piece(1, Some("b"), "{}")]
        );
        assert_eq!(size(&calls), 7 + 2 + 2);
    }
}
