//! Who may do what, where: the `[[access]]` rules of the config file.
//!
//! A rule names whom it is for (`roles`, `users`), and either rooms
//! (`rooms`, glob patterns where `{user}` stands for the asker's name) with
//! what may be done there (`can`), or the LLM providers the `chat` tool may
//! call for them (`providers`, with an optional daily token budget), or
//! both. Rules are checked in order and the first that matches decides;
//! once any rule exists, what no rule allows is denied. Without rules,
//! everyone may do everything (today's behaviour, with a warning at start).
//!
//! `can` holds `join` (be a member: live messages, presence, and reading
//! the history, so join implies read), `read` (read the history without
//! joining), `publish` and `react` (both as a member of the room).

use crate::auth::Identity;

/// What may be done in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Join,
    Read,
    Publish,
    React,
}

impl Action {
    pub const ALL: [Action; 4] = [Action::Join, Action::Read, Action::Publish, Action::React];

    /// How a refusal of it is counted in the metrics.
    pub fn denial(self) -> crate::ops::metrics::Denial {
        use crate::ops::metrics::Denial;
        match self {
            Action::Join => Denial::Join,
            Action::Read => Denial::Read,
            Action::Publish => Denial::Publish,
            Action::React => Denial::React,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Action::Join => "join",
            Action::Read => "read",
            Action::Publish => "publish",
            Action::React => "react",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The set of actions a rule allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Can(u8);

impl Can {
    pub fn parse(names: &[String]) -> Result<Can, String> {
        let mut can = Can(0);
        for n in names {
            let a = Action::ALL
                .iter()
                .find(|a| a.label() == n)
                .ok_or_else(|| format!("{n:?} is not one of join, read, publish, react"))?;
            can.0 |= a.bit();
        }
        Ok(can)
    }

    pub fn allows(self, a: Action) -> bool {
        // Joining gives the history too.
        self.0 & a.bit() != 0 || (a == Action::Read && self.0 & Action::Join.bit() != 0)
    }
}

/// One `[[access]]` entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rule {
    pub roles: Vec<String>,
    pub users: Vec<String>,
    pub rooms: Vec<String>,
    pub can: Can,
    /// `None`: the rule says nothing about the LLM. `"*"`: every provider.
    pub providers: Option<Vec<String>>,
    /// Tokens (prompt and completion) per user and UTC day.
    pub llm_tokens_per_day: Option<u64>,
}

impl Rule {
    /// Whether the rule is for `who`.
    fn covers(&self, who: &Identity) -> bool {
        self.users.iter().any(|u| u == "*" || **u == *who.user)
            || self.roles.iter().any(|r| r == "*" || who.has_role(r))
    }

    fn names_room(&self, who: &Identity, room: &str) -> bool {
        self.rooms.iter().any(|p| glob(p, &who.user, room))
    }

    /// The problems of a rule as written, for the config's error.
    pub fn check(&self, providers: &[String]) -> Result<(), String> {
        if self.roles.is_empty() && self.users.is_empty() {
            return Err("names neither roles nor users (use roles = [\"*\"] for everyone)".into());
        }
        if self.rooms.is_empty() && self.providers.is_none() {
            return Err(
                "names neither rooms (with can) nor providers: it would allow nothing".into(),
            );
        }
        if !self.rooms.is_empty() && self.can == Can::default() {
            return Err("names rooms but no can (join, read, publish, react)".into());
        }
        if self.rooms.is_empty() && self.can != Can::default() {
            return Err("has can but no rooms to apply it to".into());
        }
        for p in &self.rooms {
            if p.is_empty()
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-*?{}".contains(&b))
            {
                return Err(format!(
                    "room pattern {p:?}: use room-name characters, * and ?, and {{user}}"
                ));
            }
            if p.replace("{user}", "").contains(['{', '}']) {
                return Err(format!(
                    "room pattern {p:?}: the only placeholder is {{user}}"
                ));
            }
        }
        if self.llm_tokens_per_day.is_some() && self.providers.is_none() {
            return Err("has llm_tokens_per_day but no providers".into());
        }
        for p in self.providers.iter().flatten() {
            if p != "*" && !providers.contains(p) {
                return Err(format!(
                    "names provider {p:?}, which has no [provider.{p}] section"
                ));
            }
        }
        Ok(())
    }
}

/// Which rule refused (its 1-based place in the file), or none matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    ByRule(usize),
    NoRule,
}

impl Denied {
    /// A small number for "logged once per session and rule" bit sets:
    /// 0 for no rule, 1.. for rules (63 shared by the rest).
    pub fn slot(self) -> u32 {
        match self {
            Denied::NoRule => 0,
            Denied::ByRule(n) => n.min(63) as u32,
        }
    }

    pub fn describe(self) -> String {
        match self {
            Denied::NoRule => "no access rule allows it".into(),
            Denied::ByRule(n) => format!("access rule {n} does not allow it"),
        }
    }
}

/// What the rules say about the LLM for one session.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmGrant {
    /// `None`: every provider.
    pub providers: Option<Vec<String>>,
    pub tokens_per_day: Option<u64>,
    /// The rule that granted it (1-based; 0 without rules).
    pub rule: usize,
}

impl LlmGrant {
    pub fn allows(&self, provider: &str) -> bool {
        self.providers
            .as_ref()
            .is_none_or(|p| p.iter().any(|x| x == "*" || x == provider))
    }
}

/// The rules in force.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    pub fn new(rules: Vec<Rule>) -> Rules {
        Rules { rules }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// May `who` do `action` in `room`?
    pub fn room(&self, who: &Identity, room: &str, action: Action) -> Result<(), Denied> {
        if self.rules.is_empty() {
            return Ok(());
        }
        let first = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.covers(who) && r.names_room(who, room));
        match first {
            Some((_, r)) if r.can.allows(action) => Ok(()),
            Some((i, _)) => Err(Denied::ByRule(i + 1)),
            None => Err(Denied::NoRule),
        }
    }

    /// Which providers `who` may call, and its budget.
    pub fn llm(&self, who: &Identity) -> Result<LlmGrant, Denied> {
        if self.rules.is_empty() {
            return Ok(LlmGrant {
                providers: None,
                tokens_per_day: None,
                rule: 0,
            });
        }
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.covers(who) && r.providers.is_some())
            .map(|(i, r)| LlmGrant {
                providers: r.providers.clone(),
                tokens_per_day: r.llm_tokens_per_day,
                rule: i + 1,
            })
            .ok_or(Denied::NoRule)
    }
}

/// Whether `name` matches `pattern`: `*` any run of characters, `?` one,
/// `{user}` the asker's name. Linear in the inputs (the classic
/// backtrack-to-the-last-star walk), so no pattern can make it slow.
pub fn glob(pattern: &str, user: &str, name: &str) -> bool {
    let pattern = pattern.replace("{user}", user);
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == b'?' || (p[i] == n[j] && p[i] != b'*')) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(roles: &[&str], rooms: &[&str], can: &[&str]) -> Rule {
        Rule {
            roles: roles.iter().map(|s| s.to_string()).collect(),
            rooms: rooms.iter().map(|s| s.to_string()).collect(),
            can: Can::parse(&can.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap(),
            ..Rule::default()
        }
    }

    #[test]
    fn globs() {
        for (p, n, want) in [
            ("*", "anything", true),
            ("lobby", "lobby", true),
            ("lobby", "lobby2", false),
            ("team-*", "team-a", true),
            ("team-*", "team-", true),
            ("team-*", "tea", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*-*-x", "a-b-c-x", true),
            ("dm-{user}-*", "dm-alice-bob", true),
            ("dm-{user}-*", "dm-bob-alice", false),
            ("dm-*-{user}", "dm-bob-alice", true),
        ] {
            assert_eq!(glob(p, "alice", n), want, "{p} ~ {n}");
        }
        // No blow-up on a pattern made to backtrack.
        let n = "a".repeat(64);
        assert!(!glob(&format!("{}b", "*a".repeat(20)), "u", &n));
    }

    /// Roles x rooms x actions, for the README's worked example.
    #[test]
    fn the_first_matching_rule_decides() {
        let rules = Rules::new(vec![
            rule(&["ops"], &["*"], &["join", "publish", "react"]),
            rule(
                &["staff"],
                &["lobby", "team-*", "dm-{user}-*", "dm-*-{user}"],
                &["join", "publish", "react"],
            ),
            rule(&["guest", "kiosk"], &["lobby"], &["join", "react"]),
            rule(&["*"], &["announcements"], &["read"]),
        ]);
        let ops = Identity::new("olga", &["ops"]);
        let staff = Identity::new("alice", &["staff"]);
        let guest = Identity::new("guest-1", &["guest"]);
        let nobody = Identity::new("zed", &["user"]);
        use Action::*;
        let cases: &[(&Identity, &str, Action, Result<(), Denied>)] = &[
            (&ops, "anything", Publish, Ok(())),
            (&staff, "lobby", Publish, Ok(())),
            (&staff, "team-red", Join, Ok(())),
            (&staff, "team-red", Read, Ok(())),
            (&staff, "dm-alice-bob", Join, Ok(())),
            (&staff, "dm-bob-alice", Join, Ok(())),
            (&staff, "dm-bob-carol", Join, Err(Denied::NoRule)),
            (&staff, "secret", Join, Err(Denied::NoRule)),
            (&staff, "announcements", Read, Ok(())),
            (&staff, "announcements", Join, Err(Denied::ByRule(4))),
            (&guest, "lobby", Join, Ok(())),
            (&guest, "lobby", React, Ok(())),
            (&guest, "lobby", Publish, Err(Denied::ByRule(3))),
            (&guest, "team-red", Join, Err(Denied::NoRule)),
            (&nobody, "lobby", Join, Err(Denied::NoRule)),
            (&nobody, "announcements", Read, Ok(())),
            (&nobody, "announcements", Publish, Err(Denied::ByRule(4))),
        ];
        for (who, room, action, want) in cases {
            assert_eq!(
                rules.room(who, room, *action),
                *want,
                "{} {} {}",
                who.user,
                action.label(),
                room
            );
        }
        assert_eq!(Rules::default().room(&guest, "x", Publish), Ok(()));
    }

    #[test]
    fn providers_and_budgets_come_from_the_first_rule_naming_providers() {
        let mut ops = rule(&["ops"], &[], &[]);
        ops.providers = Some(vec!["*".into()]);
        let mut users = rule(&["user", "staff"], &[], &[]);
        users.providers = Some(vec!["cheap".into()]);
        users.llm_tokens_per_day = Some(1000);
        let rooms = rule(&["*"], &["*"], &["join"]);
        let rules = Rules::new(vec![rooms, ops, users]);
        let g = rules.llm(&Identity::new("o", &["ops"])).unwrap();
        assert!(g.allows("expensive") && g.tokens_per_day.is_none());
        let g = rules.llm(&Identity::new("a", &["staff"])).unwrap();
        assert!(g.allows("cheap") && !g.allows("expensive"));
        assert_eq!(g.tokens_per_day, Some(1000));
        assert_eq!(
            rules.llm(&Identity::new("g", &["guest"])),
            Err(Denied::NoRule)
        );
    }

    #[test]
    fn rules_that_allow_nothing_are_refused() {
        let names = ["kimi".to_string()];
        assert!(rule(&[], &["*"], &["join"]).check(&names).is_err());
        assert!(rule(&["a"], &[], &[]).check(&names).is_err());
        assert!(rule(&["a"], &["*"], &[]).check(&names).is_err());
        assert!(rule(&["a"], &["x y"], &["join"]).check(&names).is_err());
        assert!(rule(&["a"], &["{room}"], &["join"]).check(&names).is_err());
        let mut r = rule(&["a"], &[], &[]);
        r.providers = Some(vec!["nope".into()]);
        assert!(r.check(&names).unwrap_err().contains("nope"));
        r.providers = Some(vec!["kimi".into()]);
        assert!(r.check(&names).is_ok());
        assert!(Can::parse(&["write".into()]).is_err());
    }
}
