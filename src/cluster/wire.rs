//! What boxes say to each other on the bus: events (`msg`, `react`,
//! `skip`: [`encode_event`] writes them, the store keeps the text in its
//! log, [`parse_event`] reads a peer's), subjects, beats (who of a room is
//! on a box, and how far its events in the room go), heads (the same
//! without members, at the end of a replay) and sync requests (what a box
//! has, so peers send the rest).

use crate::json::JsonOut;
use crate::store::db::bus::{BusEvent, BusKind};
use crate::store::{ReactionChange, StoredMessage};
use std::collections::HashMap;

/// `PREFIX.room.TOKEN`: a room's events and beats. Room names may hold
/// `.`, NATS's separator: `.` and `_` are written as `_2e` and `_5f`, so
/// every room has its own token and no token holds a separator.
pub fn room_subject(prefix: &str, room: &str) -> String {
    let mut s = format!("{prefix}.room.");
    for c in room.chars() {
        match c {
            '.' => s.push_str("_2e"),
            '_' => s.push_str("_5f"),
            c => s.push(c),
        }
    }
    s
}

/// `PREFIX.sync`: every box listens.
pub fn sync_subject(prefix: &str) -> String {
    format!("{prefix}.sync")
}

/// `PREFIX.inbox.NODE`: replays for one box.
pub fn inbox_subject(prefix: &str, node: &str) -> String {
    format!("{prefix}.inbox.{node}")
}

/// A node id: 1-64 of `[A-Za-z0-9_-]`, so it is one subject token.
pub fn valid_node(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A subject prefix: dot-separated tokens of `[A-Za-z0-9_-]`.
pub fn valid_prefix(p: &str) -> bool {
    p.len() <= 64 && p.split('.').all(valid_node)
}

/// The host name, as a node id (invalid characters become `-`).
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let id: String = host
        .trim()
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.is_empty() {
        "hivegate".into()
    } else {
        id
    }
}

/// Any message on the bus, by its `t`; the event types (`msg`, `react`,
/// `skip`) are read again, whole, by [`parse_event`].
#[derive(serde::Deserialize)]
pub struct Envelope {
    pub t: String,
    pub node: String,
    pub room: String,
    #[serde(default)]
    pub members: Vec<String>,
    #[serde(default)]
    pub head: i64,
    #[serde(default)]
    pub have: HashMap<String, i64>,
}

/// The bus body of one of this box's events (`store::db::bus::Encode`).
pub fn encode_event(node: &str, room: &str, oseq: i64, event: &BusKind) -> String {
    let head = |t: &str| {
        JsonOut::new()
            .str("t", t)
            .str("node", node)
            .str("room", room)
            .num("oseq", oseq.max(0) as u64)
    };
    match event {
        BusKind::Message(m) => m.content(head("msg").str("id", &m.id)).finish(),
        BusKind::Reaction(r) => r
            .content(head("react"))
            .num("ts", r.ts.max(0) as u64)
            .finish(),
        BusKind::Skip => head("skip").finish(),
    }
}

/// The fields any bus event may carry; which ones it needs depends on `t`.
#[derive(serde::Deserialize)]
struct Wire {
    t: String,
    node: String,
    room: String,
    oseq: i64,
    id: Option<String>,
    from: Option<String>,
    text: Option<String>,
    message_id: Option<String>,
    emoji: Option<String>,
    by: Option<String>,
    added: Option<bool>,
    ts: Option<i64>,
}

/// Reads a `msg`, `react` or `skip` body from another box. Whatever else
/// a peer (or something posing as one) sends is an error saying what.
pub fn parse_event(text: &str) -> Result<BusEvent, String> {
    let w: Wire = crate::json::from_json(text).map_err(|e| e.message)?;
    let need =
        |v: Option<String>, name: &str| v.ok_or_else(|| format!("{} event without {name}", w.t));
    let kind = match w.t.as_str() {
        "msg" => BusKind::Message(StoredMessage::new(
            need(w.id, "id")?,
            w.room.clone(),
            need(w.from, "from")?,
            need(w.text, "text")?,
            w.ts.unwrap_or(0),
        )),
        "react" => BusKind::Reaction(ReactionChange {
            message_id: need(w.message_id, "message_id")?,
            emoji: need(w.emoji, "emoji")?,
            user: need(w.by, "by")?,
            added: w.added.ok_or("react event without added")?,
            ts: w.ts.unwrap_or(0),
        }),
        "skip" => BusKind::Skip,
        other => return Err(format!("unknown event type {other:?}")),
    };
    if w.oseq < 1 {
        return Err("oseq must be at least 1".into());
    }
    Ok(BusEvent {
        origin: w.node,
        room: w.room,
        oseq: w.oseq,
        kind,
    })
}

/// A peer's event holds to what a local client may send: text, names,
/// ids and emoji within their bounds (a frame for members is then within
/// what their outboxes take).
pub fn within_limits(ev: &BusEvent, max_text_bytes: usize) -> bool {
    let id_ok = |id: &str| !id.is_empty() && id.len() <= crate::protocol::MAX_MESSAGE_ID;
    match &ev.kind {
        BusKind::Message(m) => {
            id_ok(&m.id)
                && crate::auth::valid_user(&m.user)
                && !m.text.is_empty()
                && m.text.len() <= max_text_bytes
        }
        BusKind::Reaction(r) => {
            id_ok(&r.message_id)
                && crate::auth::valid_user(&r.user)
                && crate::protocol::valid_emoji(&r.emoji)
        }
        BusKind::Skip => true,
    }
}

pub fn beat(node: &str, room: &str, members: &[std::rc::Rc<str>], head: i64) -> String {
    JsonOut::new()
        .str("t", "beat")
        .str("node", node)
        .str("room", room)
        .raw("members", &crate::chat::names_json(members))
        .num("head", head.max(0) as u64)
        .finish()
}

pub fn head(node: &str, room: &str, head: i64) -> String {
    JsonOut::new()
        .str("t", "head")
        .str("node", node)
        .str("room", room)
        .num("head", head.max(0) as u64)
        .finish()
}

pub fn sync(node: &str, room: &str, have: &[(String, i64)]) -> String {
    let have = have
        .iter()
        .fold(JsonOut::new(), |o, (origin, oseq)| {
            o.num(origin, (*oseq).max(0) as u64)
        })
        .finish();
    JsonOut::new()
        .str("t", "sync")
        .str("node", node)
        .str("room", room)
        .raw("have", &have)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_room_has_its_own_subject_token() {
        assert_eq!(room_subject("hg", "general"), "hg.room.general");
        assert_eq!(room_subject("hg", "a.b"), "hg.room.a_2eb");
        assert_eq!(room_subject("hg", "a_2eb"), "hg.room.a_5f2eb");
        assert_ne!(room_subject("hg", "a.b"), room_subject("hg", "a_2eb"));
        assert!(valid_prefix("hivegate") && valid_prefix("site-1.hivegate"));
        assert!(!valid_prefix("a..b") && !valid_prefix("a.*") && !valid_prefix(""));
        assert!(valid_node("box-1") && !valid_node("box 1") && !valid_node("a.b"));
        assert!(valid_node(&default_node_id()));
    }

    #[test]
    fn envelopes_read_what_they_write() {
        let b = beat("a", "r", &[std::rc::Rc::from("x\"y")], 7);
        let e: Envelope = crate::json::from_json(&b).unwrap();
        assert_eq!((e.t.as_str(), e.node.as_str(), e.head), ("beat", "a", 7));
        assert_eq!(e.members, ["x\"y"]);
        let s = sync("b", "r", &[("a".into(), 3)]);
        let e: Envelope = crate::json::from_json(&s).unwrap();
        assert_eq!(e.have.get("a"), Some(&3));
    }

    #[test]
    fn events_read_back_as_they_were_written() {
        let events = [
            BusKind::Message(StoredMessage::new(
                "m1".into(),
                "x.y".into(),
                "bob".into(),
                "a \"quoted\" line\n".into(),
                7,
            )),
            BusKind::Reaction(ReactionChange {
                message_id: "m1".into(),
                emoji: "👍".into(),
                user: "carol".into(),
                added: false,
                ts: 9,
            }),
            BusKind::Skip,
        ];
        for kind in events {
            let body = encode_event("box-a", "x.y", 3, &kind);
            let ev = parse_event(&body).unwrap();
            assert_eq!(
                ev,
                BusEvent {
                    origin: "box-a".into(),
                    room: "x.y".into(),
                    oseq: 3,
                    kind
                }
            );
        }
    }

    #[test]
    fn malformed_events_are_refused_with_a_reason() {
        for bad in [
            "{}",
            r#"{"t":"msg","node":"a","room":"x","oseq":1}"#,
            r#"{"t":"drop","node":"a","room":"x","oseq":1}"#,
            r#"{"t":"skip","node":"a","room":"x","oseq":0}"#,
            "not json",
        ] {
            assert!(parse_event(bad).is_err(), "{bad}");
        }
    }
}
