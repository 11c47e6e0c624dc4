//! Who is calling the `chat` tool, and what the access rules let them
//! spend: which providers (a named one, or those of the chain), and how
//! many tokens a UTC day.
//!
//! The tokens spent are counted from what the upstream reports (an
//! estimate of a token per 4 bytes when it reports nothing), kept here per
//! user for today and written through to SQLite, so a restart does not
//! hand out fresh budgets. A call is refused once the budget is spent; a
//! call already running may take it past (its cost is known only at its
//! end).

use super::dialect::Usage;
use crate::access::{Denied, LlmGrant};
use crate::auth::Identity;
use crate::protocol::ErrorCode;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// Most users with spending tracked today; past it, a user new today with
/// a budget is refused (`OVER_CAPACITY`) rather than let through uncounted.
pub const MAX_USERS: usize = 65_536;

const DAY_MS: i64 = 86_400_000;

/// The UTC day (days since the epoch) of a Unix time in milliseconds.
pub fn day_of(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(DAY_MS)
}

/// Milliseconds from `unix_ms` to the next UTC midnight (at least 1).
pub fn ms_to_midnight(unix_ms: i64) -> u64 {
    (DAY_MS - unix_ms.rem_euclid(DAY_MS)).max(1) as u64
}

/// One session as the relay sees it.
#[derive(Clone)]
pub struct Caller {
    pub who: Rc<Identity>,
    /// What the access rules grant, or which rule refuses the LLM.
    pub grant: Result<LlmGrant, Denied>,
}

impl Caller {
    /// A caller the rules let call everything (no rules, or tests).
    pub fn unrestricted(user: &str) -> Caller {
        Caller {
            who: Rc::new(Identity::new(user, &[crate::auth::DEFAULT_ROLE])),
            grant: Ok(LlmGrant {
                providers: None,
                tokens_per_day: None,
                rule: 0,
            }),
        }
    }

    pub fn may_use(&self, provider: &str) -> bool {
        self.grant.as_ref().is_ok_and(|g| g.allows(provider))
    }
}

/// Why a call may not start.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl Refused {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Refused {
        Refused {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

/// Writes one call's usage through to the store.
pub type Persist = Box<dyn Fn(crate::store::Spent)>;

/// Today's spending per budgeted user, and every call's usage recorded
/// through [`Persist`] (for accounting: per day, user and provider).
#[derive(Default)]
pub struct Ledger {
    day: Cell<i64>,
    used: RefCell<HashMap<Rc<str>, u64>>,
    /// False until today's spending was read back from the store.
    loaded: Cell<bool>,
    /// Writes a user's spending through to the store.
    persist: RefCell<Option<Persist>>,
    /// Calls refused for the provider, and for the budget.
    pub denied_provider: Cell<u64>,
    pub denied_budget: Cell<u64>,
}

impl Ledger {
    /// Where spending is written (the store); until [`Ledger::load`] runs,
    /// budgeted calls wait.
    pub fn persist_with(&self, f: Persist) {
        *self.persist.borrow_mut() = Some(f);
    }

    /// What the store holds for `day`.
    pub fn load(&self, day: i64, rows: Vec<(String, u64)>) {
        if day >= self.day.get() {
            self.day.set(day);
            let mut used = self.used.borrow_mut();
            for (user, tokens) in rows.into_iter().take(MAX_USERS) {
                *used.entry(Rc::from(user)).or_insert(0) += tokens;
            }
        }
        self.loaded.set(true);
    }

    /// Without a store (tests, or no budgets at all): nothing to wait for.
    pub fn mark_loaded(&self) {
        self.loaded.set(true);
    }

    fn roll(&self, day: i64) {
        if day > self.day.get() {
            self.day.set(day);
            self.used.borrow_mut().clear();
        }
    }

    pub fn used(&self, user: &str, now_ms: i64) -> u64 {
        self.roll(day_of(now_ms));
        self.used.borrow().get(user).copied().unwrap_or(0)
    }

    /// May `caller` start a call now, as far as its budget goes?
    pub fn admit(&self, caller: &Caller, now_ms: i64) -> Result<(), Refused> {
        let Some(budget) = caller.grant.as_ref().ok().and_then(|g| g.tokens_per_day) else {
            return Ok(());
        };
        if !self.loaded.get() {
            let mut r = Refused::new(
                ErrorCode::OverCapacity,
                "the day's LLM spending is still being read; retry shortly",
            );
            r.retry_after_ms = Some(200);
            return Err(r);
        }
        let used = self.used(&caller.who.user, now_ms);
        if used >= budget {
            self.denied_budget.set(self.denied_budget.get() + 1);
            let mut r = Refused::new(
                ErrorCode::BudgetExceeded,
                format!("today's LLM budget of {budget} tokens is spent ({used} used); it renews at 00:00 UTC"),
            );
            r.retry_after_ms = Some(ms_to_midnight(now_ms));
            return Err(r);
        }
        if used == 0 && self.used.borrow().len() >= MAX_USERS {
            let mut r = Refused::new(
                ErrorCode::OverCapacity,
                "too many users with an LLM budget today",
            );
            r.retry_after_ms = Some(60_000);
            return Err(r);
        }
        Ok(())
    }

    /// Records one call's usage at `provider` (`estimated` when the
    /// provider reported none), and counts it against the caller's budget
    /// today when it has one.
    pub fn spend(
        &self,
        caller: &Caller,
        provider: &str,
        usage: Usage,
        estimated: bool,
        now_ms: i64,
    ) {
        let day = day_of(now_ms);
        let tokens = usage.prompt_tokens + usage.completion_tokens;
        let budgeted = caller
            .grant
            .as_ref()
            .is_ok_and(|g| g.tokens_per_day.is_some());
        if budgeted && tokens > 0 {
            self.roll(day);
            let mut used = self.used.borrow_mut();
            if used.len() < MAX_USERS || used.contains_key(&*caller.who.user) {
                *used.entry(caller.who.user.clone()).or_insert(0) += tokens;
            }
        }
        if let Some(f) = &*self.persist.borrow() {
            f(crate::store::Spent {
                user: caller.who.user.to_string(),
                provider: provider.to_string(),
                day,
                prompt: usage.prompt_tokens,
                completion: usage.completion_tokens,
                estimated,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgeted(user: &str, tokens: u64) -> Caller {
        Caller {
            grant: Ok(LlmGrant {
                providers: None,
                tokens_per_day: Some(tokens),
                rule: 1,
            }),
            ..Caller::unrestricted(user)
        }
    }

    #[test]
    fn a_budget_is_spent_then_renews_at_midnight() {
        let l = Ledger::default();
        let alice = budgeted("alice", 100);
        let noon = 20_000 * DAY_MS + DAY_MS / 2;
        assert_eq!(
            l.admit(&alice, noon).unwrap_err().code,
            ErrorCode::OverCapacity
        );
        let written = Rc::new(RefCell::new(Vec::new()));
        let w = written.clone();
        l.persist_with(Box::new(move |s| {
            w.borrow_mut().push((
                s.user,
                s.provider,
                s.day,
                s.prompt,
                s.completion,
                s.estimated,
            ))
        }));
        l.load(20_000, vec![("alice".into(), 60)]);
        assert!(l.admit(&alice, noon).is_ok());
        let usage = |prompt_tokens, completion_tokens| Usage {
            prompt_tokens,
            completion_tokens,
        };
        l.spend(&alice, "kimi", usage(20, 30), false, noon);
        let r = l.admit(&alice, noon).unwrap_err();
        assert_eq!(r.code, ErrorCode::BudgetExceeded);
        assert_eq!(r.retry_after_ms, Some((DAY_MS / 2) as u64));
        // Another user is untouched; an unbudgeted one is recorded (for
        // accounting) but holds no budget.
        assert!(l.admit(&budgeted("bob", 100), noon).is_ok());
        l.spend(
            &Caller::unrestricted("carol"),
            "glm",
            usage(600, 400),
            true,
            noon,
        );
        assert_eq!(l.used("carol", noon), 0);
        assert_eq!(
            *written.borrow(),
            [
                ("alice".into(), "kimi".into(), 20_000, 20, 30, false),
                ("carol".into(), "glm".into(), 20_000, 600, 400, true)
            ]
        );
        // The next day.
        assert!(l.admit(&alice, noon + DAY_MS).is_ok());
        assert_eq!(ms_to_midnight(21_000 * DAY_MS - 1), 1);
        assert_eq!(ms_to_midnight(21_000 * DAY_MS), DAY_MS as u64);
    }
}
