//! The store's writes, one typed method each: a caller gets the answer its
//! write can have (a publish its message numbered, a reaction its count),
//! and the batch's catch-all op and answer (`db::WriteOp`, `db::WriteOk`)
//! stay inside the store. Each returns the write's future, or at once
//! `Busy` when the write queue is full.

use super::db::bus::{Applied, BusEvent};
use super::{ReactionChange, Spent, Store, StoreError, StoredMessage, WriteOk, WriteOp};
use std::future::Future;

/// What a reaction did: the change (added, or the user's taken back), and
/// the emoji's count on the message after it, in the message's room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reacted {
    pub room: String,
    pub count: i64,
    pub change: ReactionChange,
}

impl Store {
    /// Stores a new message; it resolves to the message with its `seq`.
    pub fn publish(
        &self,
        m: StoredMessage,
    ) -> Result<impl Future<Output = Result<StoredMessage, StoreError>>, StoreError> {
        self.submit(WriteOp::Publish(m), |ok| match ok {
            WriteOk::Stored(m) => Some(*m),
            _ => None,
        })
    }

    /// Toggles `user`'s `emoji` on a message in one of `rooms` (a message
    /// elsewhere is `NotFound`: its existence is not revealed).
    pub fn react(
        &self,
        message_id: String,
        emoji: String,
        user: String,
        ts: i64,
        rooms: Vec<String>,
    ) -> Result<impl Future<Output = Result<Reacted, StoreError>>, StoreError> {
        let mut change = ReactionChange {
            message_id,
            emoji,
            user,
            added: true,
            ts,
        };
        let op = WriteOp::React {
            message_id: change.message_id.clone(),
            emoji: change.emoji.clone(),
            user: change.user.clone(),
            ts,
            rooms,
        };
        self.submit(op, move |ok| match ok {
            WriteOk::Reacted { room, count, added } => {
                change.added = added;
                Some(Reacted {
                    room,
                    count,
                    change,
                })
            }
            _ => None,
        })
    }

    /// Applies an event from another box, once and in order.
    pub fn apply_event(
        &self,
        ev: BusEvent,
    ) -> Result<impl Future<Output = Result<Applied, StoreError>>, StoreError> {
        self.submit(WriteOp::Bus(Box::new(ev)), |ok| match ok {
            WriteOk::Bus(applied) => Some(applied),
            _ => None,
        })
    }

    /// The bus has this box's outbox up to this `bus_log` id.
    pub fn bus_published(
        &self,
        upto: i64,
    ) -> Result<impl Future<Output = Result<(), StoreError>>, StoreError> {
        self.submit(WriteOp::BusPublished { upto }, marked)
    }

    /// Keeps the bus log within `max_rows` and `older_than_ts`, `batch`
    /// rows at a time; resolves to how many never-published rows went.
    pub fn bus_prune(
        &self,
        max_rows: i64,
        older_than_ts: i64,
        batch: i64,
    ) -> Result<impl Future<Output = Result<i64, StoreError>>, StoreError> {
        let op = WriteOp::BusPrune {
            max_rows,
            older_than_ts,
            batch,
        };
        self.submit(op, pruned)
    }

    /// Adds one call's LLM usage to its day, user and provider.
    pub fn spend(
        &self,
        spent: Spent,
    ) -> Result<impl Future<Output = Result<(), StoreError>>, StoreError> {
        self.submit(WriteOp::Spend(Box::new(spent)), marked)
    }

    /// The remote has these: messages by id; reactions by key and the
    /// version that was shipped (a newer change stays unsynced).
    pub fn mark_synced(
        &self,
        messages: Vec<String>,
        reactions: Vec<(String, String, String, i64)>,
    ) -> Result<impl Future<Output = Result<(), StoreError>>, StoreError> {
        self.submit(
            WriteOp::MarkSynced {
                messages,
                reactions,
            },
            marked,
        )
    }

    /// Parks a row the remote refused, and why; resolves to how many old
    /// dead letters were dropped to keep the table within its bound.
    pub fn dead_letter(
        &self,
        kind: &'static str,
        key: Vec<String>,
        row_json: String,
        error: String,
        ts: i64,
    ) -> Result<impl Future<Output = Result<u64, StoreError>>, StoreError> {
        let op = WriteOp::DeadLetter {
            kind,
            key,
            row_json,
            error,
            ts,
        };
        self.submit(op, |ok| match ok {
            WriteOk::Parked { pruned } => Some(pruned),
            _ => None,
        })
    }

    /// Retention: deletes up to `batch` expired messages, then up to
    /// `batch` beyond `max_per_room` in each room (only shipped ones when
    /// `synced_only`); resolves to how many went.
    pub(super) fn prune(
        &self,
        older_than_ts: i64,
        max_per_room: i64,
        batch: i64,
        synced_only: bool,
    ) -> Result<impl Future<Output = Result<i64, StoreError>>, StoreError> {
        let op = WriteOp::Prune {
            older_than_ts,
            max_per_room,
            batch,
            synced_only,
        };
        self.submit(op, pruned)
    }

    /// Storage pressure: deletes the oldest `batch` messages.
    pub(super) fn make_room(
        &self,
        batch: i64,
        synced_only: bool,
    ) -> Result<impl Future<Output = Result<i64, StoreError>>, StoreError> {
        self.submit(WriteOp::MakeRoom { batch, synced_only }, pruned)
    }

    /// Queues `op`; its answer is read by `answer`, which knows the one
    /// kind it can be.
    fn submit<T: 'static>(
        &self,
        op: WriteOp,
        answer: impl FnOnce(WriteOk) -> Option<T> + 'static,
    ) -> Result<impl Future<Output = Result<T, StoreError>>, StoreError> {
        let done = self.write(op)?;
        Ok(async move {
            let ok = done.await?;
            answer(ok)
                .ok_or_else(|| StoreError::Storage("the writer answered another write".into()))
        })
    }
}

fn marked(ok: WriteOk) -> Option<()> {
    matches!(ok, WriteOk::Marked).then_some(())
}

fn pruned(ok: WriteOk) -> Option<i64> {
    match ok {
        WriteOk::Pruned { deleted } => Some(deleted),
        _ => None,
    }
}
