//! A chat message and a reaction change: the one definition of each that
//! every surface uses, and their encodings beside them: the frames
//! clients get, the row a remote store keeps, and the fields the bus
//! carries. A new field is added here (and to the schema's columns).

use crate::json::JsonOut;

/// A message as stored, with its reaction counts. Before it is committed
/// its `seq` is 0; one from another box is numbered when it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: String,
    pub room: String,
    pub seq: i64,
    pub user: String,
    pub text: String,
    pub ts: i64,
    pub reactions: Vec<(String, i64)>,
}

impl StoredMessage {
    /// A new message, not yet numbered (`seq` 0) and without reactions:
    /// as a publisher makes it, or another box's before it is applied.
    pub fn new(id: String, room: String, user: String, text: String, ts: i64) -> StoredMessage {
        StoredMessage {
            id,
            room,
            seq: 0,
            user,
            text,
            ts,
            reactions: Vec::new(),
        }
    }

    /// What a message says, whoever carries it: `from`, `text` and `ts`,
    /// under the protocol's names (the `message` frame and the bus both
    /// write these after the message's `id` and their own keys).
    #[inline]
    pub fn content(&self, out: JsonOut) -> JsonOut {
        out.str("from", &self.user)
            .str("text", &self.text)
            .num("ts", self.ts.max(0) as u64)
    }

    /// `{"op":"message",...}`, as clients get it.
    pub fn frame(&self) -> String {
        let reactions = match self.reactions.is_empty() {
            true => "{}".to_string(),
            false => {
                let mut out = JsonOut::new();
                for (emoji, n) in &self.reactions {
                    out = out.num(emoji, (*n).max(0) as u64);
                }
                out.finish()
            }
        };
        // The keys, numbers and quotes take under 128 bytes; text that
        // needs escaping may grow the buffer once.
        let known = self.room.len() + self.id.len() + self.user.len() + self.text.len();
        let out = JsonOut::with_capacity(known + reactions.len() + 128)
            .str("op", "message")
            .str("room", &self.room)
            .str("id", &self.id)
            .num("seq", self.seq.max(0) as u64);
        self.content(out).raw("reactions", &reactions).finish()
    }

    /// A row of the remote's messages table: its columns are `id`,
    /// `room`, `seq`, `user`, `text` and `ts` (see the README's remote
    /// schema).
    pub fn row(&self) -> String {
        JsonOut::new()
            .str("id", &self.id)
            .str("room", &self.room)
            .num("seq", self.seq.max(0) as u64)
            .str("user", &self.user)
            .str("text", &self.text)
            .num("ts", self.ts.max(0) as u64)
            .finish()
    }
}

/// A change to one user's reaction on a message: added, or taken back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReactionChange {
    pub message_id: String,
    pub emoji: String,
    pub user: String,
    pub added: bool,
    pub ts: i64,
}

impl ReactionChange {
    /// What it is, whoever carries it: `message_id`, `emoji`, `by`,
    /// `added` (the bus writes these after its own keys; the `reaction`
    /// frame too, with the count).
    pub fn content(&self, out: JsonOut) -> JsonOut {
        out.str("message_id", &self.message_id)
            .str("emoji", &self.emoji)
            .str("by", &self.user)
            .bool("added", self.added)
    }

    /// `{"op":"reaction",...}`, as clients get it: the emoji's count on
    /// the message after the change, in the message's room.
    pub fn frame(&self, room: &str, count: i64) -> String {
        JsonOut::op("reaction")
            .str("room", room)
            .str("message_id", &self.message_id)
            .str("emoji", &self.emoji)
            .num("count", count.max(0) as u64)
            .str("by", &self.user)
            .bool("added", self.added)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_encoding_reads_back_the_same_message() {
        let m = StoredMessage {
            id: "01J".into(),
            room: "a.b".into(),
            seq: 4,
            user: "bo\"b".into(),
            text: "line\nbreak".into(),
            ts: 17,
            reactions: vec![("👍".into(), 2)],
        };
        let frame: serde_json::Value = serde_json::from_str(&m.frame()).unwrap();
        assert_eq!(frame["op"], "message");
        assert_eq!(
            (
                &frame["room"],
                &frame["seq"],
                &frame["from"],
                &frame["text"]
            ),
            (
                &serde_json::json!("a.b"),
                &serde_json::json!(4),
                &serde_json::json!("bo\"b"),
                &serde_json::json!("line\nbreak")
            )
        );
        assert_eq!(frame["reactions"]["👍"], 2);
        let row: serde_json::Value = serde_json::from_str(&m.row()).unwrap();
        assert_eq!(row["user"], "bo\"b");
        assert_eq!(
            (&row["seq"], &row["ts"]),
            (&serde_json::json!(4), &serde_json::json!(17))
        );
    }
}
