//! The SQL side's tests, on real database files.

use super::*;
use crate::store::{ReactionChange, StoredMessage};
use rusqlite::Connection;

fn db() -> (tempfile::TempDir, Connection) {
    let dir = tempfile::tempdir().unwrap();
    let conn = open_writer(&dir.path().join("t.db"), Synchronous::Full).unwrap();
    (dir, conn)
}

/// A message of `user`, not yet numbered.
fn message(id: &str, room: &str, user: &str, text: &str, ts: i64) -> StoredMessage {
    StoredMessage::new(id.into(), room.into(), user.into(), text.into(), ts)
}

fn publish(id: &str, room: &str, text: &str, ts: i64) -> WriteOp {
    WriteOp::Publish(message(id, room, "alice", text, ts))
}

fn react(id: &str, emoji: &str, user: &str) -> WriteOp {
    WriteOp::React {
        message_id: id.into(),
        emoji: emoji.into(),
        user: user.into(),
        ts: 1,
        rooms: vec!["x".into()],
    }
}

#[test]
fn sequences_are_per_room_and_survive_a_batch() {
    let (_d, mut c) = db();
    let r = write_batch(
        &mut c,
        &[
            publish("a", "x", "1", 1),
            publish("b", "x", "2", 2),
            publish("c", "y", "3", 3),
        ],
    );
    assert_eq!(
        r,
        vec![
            Ok(WriteOk::Published { seq: 1 }),
            Ok(WriteOk::Published { seq: 2 }),
            Ok(WriteOk::Published { seq: 1 })
        ]
    );
    // A duplicate id fails alone; the rest of the batch commits.
    let r = write_batch(
        &mut c,
        &[publish("a", "x", "dup", 4), publish("d", "x", "4", 5)],
    );
    assert!(matches!(r[0], Err(WriteErr::Storage(_))));
    assert_eq!(r[1], Ok(WriteOk::Published { seq: 3 }));
    let h = history(&c, "x", Range::Latest, 10).unwrap();
    let seqs: Vec<i64> = h.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [1, 2, 3], "the failed op's seq was rolled back too");
    // The numbering is kept per batch and written back: the next batch
    // goes on from it, and a room whose only message failed has none.
    let r = write_batch(
        &mut c,
        &[publish("a", "z", "dup", 6), publish("e", "x", "5", 7)],
    );
    assert!(matches!(r[0], Err(WriteErr::Storage(_))));
    assert_eq!(r[1], Ok(WriteOk::Published { seq: 4 }));
    let r = write_batch(&mut c, &[publish("f", "z", "6", 8)]);
    assert_eq!(r[0], Ok(WriteOk::Published { seq: 1 }));
}

#[test]
fn history_ranges_are_oldest_first() {
    let (_d, mut c) = db();
    let ops: Vec<WriteOp> = (1..=10)
        .map(|i| publish(&format!("m{i}"), "x", &i.to_string(), i))
        .collect();
    write_batch(&mut c, &ops);
    let seqs = |r, l| {
        history(&c, "x", r, l)
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(seqs(Range::Latest, 3), [8, 9, 10]);
    assert_eq!(seqs(Range::Before(5), 2), [3, 4]);
    assert_eq!(seqs(Range::After(7), 100), [8, 9, 10]);
    assert!(seqs(Range::After(10), 5).is_empty());
}

#[test]
fn reactions_toggle_and_are_bounded() {
    let (_d, mut c) = db();
    write_batch(&mut c, &[publish("m", "x", "hi", 1)]);
    let r = write_batch(
        &mut c,
        &[
            react("m", "👍", "a"),
            react("m", "👍", "b"),
            react("m", "👍", "a"),
        ],
    );
    assert_eq!(
        r[0],
        Ok(WriteOk::Reacted {
            room: "x".into(),
            count: 1,
            added: true
        })
    );
    assert_eq!(
        r[1],
        Ok(WriteOk::Reacted {
            room: "x".into(),
            count: 2,
            added: true
        })
    );
    assert_eq!(
        r[2],
        Ok(WriteOk::Reacted {
            room: "x".into(),
            count: 1,
            added: false
        })
    );
    assert_eq!(
        write_batch(&mut c, &[react("nope", "👍", "a")])[0],
        Err(WriteErr::NotFound)
    );
    let elsewhere = WriteOp::React {
        message_id: "m".into(),
        emoji: "👍".into(),
        user: "z".into(),
        ts: 1,
        rooms: vec!["other".into()],
    };
    assert_eq!(
        write_batch(&mut c, &[elsewhere])[0],
        Err(WriteErr::NotFound)
    );
    // 100 users on one emoji, then the 101st is refused.
    let ops: Vec<WriteOp> = (0..99)
        .map(|i| react("m", "👍", &format!("u{i}")))
        .collect();
    assert!(write_batch(&mut c, &ops).iter().all(|r| r.is_ok()));
    assert!(matches!(
        write_batch(&mut c, &[react("m", "👍", "late")])[0],
        Err(WriteErr::LimitExceeded(_))
    ));
    // 50 distinct emoji, then the 51st is refused; an existing one still toggles.
    let ops: Vec<WriteOp> = (0..49).map(|i| react("m", &format!("e{i}"), "a")).collect();
    assert!(write_batch(&mut c, &ops).iter().all(|r| r.is_ok()));
    assert!(matches!(
        write_batch(&mut c, &[react("m", "new", "a")])[0],
        Err(WriteErr::LimitExceeded(_))
    ));
    assert!(write_batch(&mut c, &[react("m", "e0", "b")])[0].is_ok());
    let h = history(&c, "x", Range::Latest, 1).unwrap();
    assert_eq!(h[0].reactions.len(), 50);
    assert!(h[0].reactions.contains(&("👍".to_string(), 100)));
    assert!(h[0].reactions.contains(&("e0".to_string(), 2)));
}

#[test]
fn dead_letters_are_kept_to_their_bound() {
    let (_d, mut c) = db();
    let park = |i: i64| WriteOp::DeadLetter {
        kind: "message",
        key: vec![format!("m{i}")],
        row_json: "{}".into(),
        error: "HTTP 400".into(),
        ts: i,
    };
    let ops: Vec<WriteOp> = (0..MAX_DEAD_LETTERS).map(park).collect();
    assert!(write_batch(&mut c, &ops)
        .iter()
        .all(|r| *r == Ok(WriteOk::Parked { pruned: 0 })));
    let more: Vec<WriteOp> = (MAX_DEAD_LETTERS..MAX_DEAD_LETTERS + 5).map(park).collect();
    assert!(write_batch(&mut c, &more)
        .iter()
        .all(|r| *r == Ok(WriteOk::Parked { pruned: 1 })));
    let (n, oldest): (i64, String) = c
        .query_row("SELECT COUNT(*), MIN(row_key) FROM dead_letters", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(n, MAX_DEAD_LETTERS);
    let first: String = c
        .query_row(
            "SELECT row_key FROM dead_letters ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(first, "m5", "the oldest went first ({oldest})");
}

#[test]
fn the_outbox_lists_unsynced_rows_and_marks_only_what_was_shipped() {
    let (_d, mut c) = db();
    write_batch(
        &mut c,
        &[
            publish("a", "x", "1", 1),
            publish("b", "x", "2", 2),
            react("a", "👍", "u"),
        ],
    );
    let o = outbox(&c, 10).unwrap();
    assert_eq!(
        o.messages.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(o.backlog, 3);
    assert_eq!(o.oldest_ts, Some(1));
    let r = o.reactions[0].clone();
    assert!(!r.removed);
    // The reaction is toggled off while the batch is being shipped.
    write_batch(&mut c, &[react("a", "👍", "u")]);
    let mark = WriteOp::MarkSynced {
        messages: vec!["a".into(), "b".into()],
        reactions: vec![(r.message_id, r.emoji, r.user, r.version)],
    };
    assert_eq!(write_batch(&mut c, &[mark])[0], Ok(WriteOk::Marked));
    let o = outbox(&c, 10).unwrap();
    assert!(o.messages.is_empty());
    assert_eq!(o.reactions.len(), 1, "the newer change still waits");
    assert!(o.reactions[0].removed);
    // Parked rows leave the outbox.
    let dl = WriteOp::DeadLetter {
        kind: "reaction",
        key: vec!["a".into(), "👍".into(), "u".into()],
        row_json: "{}".into(),
        error: "400".into(),
        ts: 3,
    };
    write_batch(&mut c, &[dl]);
    assert_eq!(outbox(&c, 10).unwrap().backlog, 0);
    assert!(used_bytes(&c).unwrap() > 0);
}

#[test]
fn unsynced_messages_are_never_pruned_when_a_remote_is_set() {
    let (_d, mut c) = db();
    let ops: Vec<WriteOp> = (1..=4)
        .map(|i| publish(&format!("m{i}"), "x", "t", i))
        .collect();
    write_batch(&mut c, &ops);
    let mark = WriteOp::MarkSynced {
        messages: vec!["m1".into(), "m2".into()],
        reactions: vec![],
    };
    write_batch(&mut c, &[mark]);
    let prune = WriteOp::Prune {
        older_than_ts: 100,
        max_per_room: 1000,
        batch: 10,
        synced_only: true,
    };
    assert_eq!(
        write_batch(&mut c, &[prune])[0],
        Ok(WriteOk::Pruned { deleted: 2 })
    );
    assert_eq!(
        write_batch(
            &mut c,
            &[WriteOp::MakeRoom {
                batch: 10,
                synced_only: true
            }]
        )[0],
        Ok(WriteOk::Pruned { deleted: 0 })
    );
    assert_eq!(history(&c, "x", Range::Latest, 10).unwrap().len(), 2);
}

#[test]
fn pruning_removes_old_and_surplus_messages_in_batches() {
    let (_d, mut c) = db();
    let ops: Vec<WriteOp> = (1..=30)
        .map(|i| publish(&format!("m{i}"), "x", "t", i))
        .collect();
    write_batch(&mut c, &ops);
    write_batch(&mut c, &[react("m1", "👍", "a")]);
    // Older than ts 6: five messages, deleted three at a time.
    let prune = |c: &mut Connection, ts, max| {
        write_batch(
            c,
            &[WriteOp::Prune {
                synced_only: false,
                older_than_ts: ts,
                max_per_room: max,
                batch: 3,
            }],
        )
    };
    assert_eq!(
        prune(&mut c, 6, 1000)[0],
        Ok(WriteOk::Pruned { deleted: 3 })
    );
    assert_eq!(
        prune(&mut c, 6, 1000)[0],
        Ok(WriteOk::Pruned { deleted: 2 })
    );
    assert_eq!(
        prune(&mut c, 6, 1000)[0],
        Ok(WriteOk::Pruned { deleted: 0 })
    );
    // At most 20 per room: 25 left, so 5 more go (3, then 2).
    prune(&mut c, 0, 20);
    prune(&mut c, 0, 20);
    let h = history(&c, "x", Range::Latest, 100).unwrap();
    assert_eq!(h.len(), 20);
    assert_eq!(h[0].seq, 11);
    let orphans: i64 = c
        .query_row("SELECT COUNT(*) FROM reactions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(orphans, 0);
}

#[test]
fn a_file_that_is_not_a_database_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.db");
    std::fs::write(
        &path,
        b"this is not a database, just some text that is long enough",
    )
    .unwrap();
    let err = open_writer(&path, Synchronous::Full).unwrap_err();
    assert!(err.contains("junk.db"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap()[..4],
        *b"this",
        "the file is left alone"
    );
}

#[test]
fn reopening_keeps_data_and_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    {
        let mut c = open_writer(&path, Synchronous::Full).unwrap();
        write_batch(&mut c, &[publish("a", "x", "1", 1)]);
    }
    let c = open_writer(&path, Synchronous::Normal).unwrap();
    assert_eq!(history(&c, "x", Range::Latest, 5).unwrap().len(), 1);
    c.execute_batch("PRAGMA user_version = 99").unwrap();
    drop(c);
    assert!(open_writer(&path, Synchronous::Full)
        .unwrap_err()
        .contains("newer"));
}

#[test]
fn backup_copies_a_consistent_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let mut c = open_writer(&path, Synchronous::Full).unwrap();
    write_batch(
        &mut c,
        &[publish("a", "x", "1", 1), publish("b", "x", "2", 2)],
    );
    let out = dir.path().join("copy.db");
    backup(&path, &out).unwrap();
    let copy = open_reader(&out).unwrap();
    assert_eq!(history(&copy, "x", Range::Latest, 5).unwrap().len(), 2);
}

mod bus_log {
    use super::*;
    use crate::store::db::bus::{self, Applied, BusEvent, BusKind, BusLog, Effect};

    /// The store keeps whatever text the cluster's encoder writes; this
    /// one shows what it was given.
    fn log_as(node: &str) -> BusLog {
        BusLog {
            node: node.into(),
            encode: |node, room, oseq, ev| format!("{node} {room} {oseq} {ev:?}"),
        }
    }

    fn event(origin: &str, oseq: i64, id: &str) -> WriteOp {
        WriteOp::Bus(Box::new(BusEvent {
            origin: origin.into(),
            room: "x".into(),
            oseq,
            kind: BusKind::Message(message(id, "x", "bob", &format!("from {origin}"), 7)),
        }))
    }

    #[test]
    fn a_cluster_box_logs_what_it_commits_with_an_origin_sequence_per_room() {
        let (_d, mut c) = db();
        let ops = [
            publish("a", "x", "1", 1),
            publish("b", "y", "2", 2),
            publish("c", "x", "3", 3),
            react("a", "👍", "bob"),
        ];
        let r = write_batch_as(&mut c, &ops, Some(&log_as("box-a")));
        assert!(r.iter().all(Result::is_ok), "{r:?}");
        let (rows, backlog) = bus::unpublished(&c, 0, 10).unwrap();
        assert_eq!(backlog, 4);
        let seen: Vec<(&str, i64)> = rows.iter().map(|r| (r.room.as_str(), r.oseq)).collect();
        assert_eq!(seen, [("x", 1), ("y", 1), ("x", 2), ("x", 3)]);
        assert!(
            rows[0].body.starts_with("box-a x 1 Message(") && rows[0].body.contains("text: \"1\""),
            "{}",
            rows[0].body
        );
        assert!(
            rows[3].body.starts_with("box-a x 3 Reaction(")
                && rows[3].body.contains("emoji: \"👍\"")
                && rows[3].body.contains("added: true"),
            "{}",
            rows[3].body
        );
        // The published mark only moves forward; the backlog follows it.
        write_batch(&mut c, &[WriteOp::BusPublished { upto: rows[2].id }]);
        write_batch(&mut c, &[WriteOp::BusPublished { upto: rows[0].id }]);
        assert_eq!(bus::published_mark(&c).unwrap(), rows[2].id);
        assert_eq!(bus::unpublished(&c, rows[2].id, 10).unwrap().1, 1);
        // Without a node nothing is logged.
        write_batch(&mut c, &[publish("d", "x", "4", 4)]);
        assert_eq!(bus::unpublished(&c, 0, 10).unwrap().1, 4);
    }

    #[test]
    fn events_from_another_box_apply_once_and_in_order() {
        let (_d, mut c) = db();
        let r = write_batch(
            &mut c,
            &[
                event("b", 1, "m1"),
                event("b", 1, "m1"),
                event("b", 3, "m3"),
            ],
        );
        assert_eq!(
            r,
            vec![
                Ok(WriteOk::Bus(Applied::Changed(Effect::Message { seq: 1 }))),
                Ok(WriteOk::Bus(Applied::Duplicate)),
                Ok(WriteOk::Bus(Applied::Gap { have: 1 })),
            ]
        );
        let r = write_batch(
            &mut c,
            &[
                event("b", 2, "m2"),
                event("b", 3, "m3"),
                event("c", 1, "n1"),
            ],
        );
        assert_eq!(
            r,
            vec![
                Ok(WriteOk::Bus(Applied::Changed(Effect::Message { seq: 2 }))),
                Ok(WriteOk::Bus(Applied::Changed(Effect::Message { seq: 3 }))),
                Ok(WriteOk::Bus(Applied::Changed(Effect::Message { seq: 4 }))),
            ]
        );
        // A reaction from the bus sets the state it carries (no toggle).
        let reaction = |added| {
            WriteOp::Bus(Box::new(BusEvent {
                origin: "c".into(),
                room: "x".into(),
                oseq: if added { 2 } else { 3 },
                kind: BusKind::Reaction(ReactionChange {
                    message_id: "m1".into(),
                    emoji: "👍".into(),
                    user: "carol".into(),
                    added,
                    ts: 9,
                }),
            }))
        };
        let r = write_batch(&mut c, &[reaction(true), reaction(false)]);
        assert_eq!(
            r,
            vec![
                Ok(WriteOk::Bus(Applied::Changed(Effect::Reaction {
                    room: "x".into(),
                    count: 1
                }))),
                Ok(WriteOk::Bus(Applied::Changed(Effect::Reaction {
                    room: "x".into(),
                    count: 0
                }))),
            ]
        );
        let h = history(&c, "x", Range::Latest, 10).unwrap();
        let ids: Vec<&str> = h.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["m1", "m2", "m3", "n1"]);
        // Received rows are not shipped to a remote by this box.
        assert_eq!(outbox(&c, 10).unwrap().backlog, 0);
        // A skip moves past what the origin pruned.
        let skip = WriteOp::Bus(Box::new(BusEvent {
            origin: "b".into(),
            room: "x".into(),
            oseq: 10,
            kind: BusKind::Skip,
        }));
        write_batch(&mut c, &[skip]);
        assert_eq!(
            write_batch(&mut c, &[event("b", 11, "m11")])[0],
            Ok(WriteOk::Bus(Applied::Changed(Effect::Message { seq: 5 })))
        );
    }

    #[test]
    fn replay_serves_a_peer_from_where_it_is_and_says_what_was_pruned() {
        let (_d, mut c) = db();
        let ops: Vec<WriteOp> = (0..10)
            .map(|i| publish(&format!("m{i}"), "x", "t", i))
            .collect();
        write_batch_as(&mut c, &ops, Some(&log_as("a")));
        let bus::Replay { skip, rows, head } = bus::replay(&c, "x", 7, 100).unwrap();
        assert_eq!((skip, head), (None, 10));
        assert_eq!(rows.iter().map(|r| r.oseq).collect::<Vec<_>>(), [8, 9, 10]);
        // Keep 4 rows: 6 go, none published yet: counted as lost.
        let lost = bus::prune_log(&c, 4, 0, 100).unwrap();
        assert_eq!(lost, 6);
        let bus::Replay { skip, rows, .. } = bus::replay(&c, "x", 2, 100).unwrap();
        assert_eq!(skip, Some(6));
        assert_eq!(rows.first().map(|r| r.oseq), Some(7));
        // Past the head there is nothing, and nothing to skip.
        let past = bus::Replay {
            head: 10,
            ..Default::default()
        };
        assert_eq!(bus::replay(&c, "x", 10, 100).unwrap(), past);
    }
}

#[test]
fn reactions_from_the_bus_keep_the_local_emoji_bounds() {
    use super::bus::{Applied, BusEvent, BusKind};
    let (_d, mut c) = db();
    write_batch(&mut c, &[publish("m1", "x", "hi", 1)]);
    let mut oseq = 0;
    let mut react_as = |emoji: String, user: &str| {
        oseq += 1;
        WriteOp::Bus(Box::new(BusEvent {
            origin: "rogue".into(),
            room: "x".into(),
            oseq,
            kind: BusKind::Reaction(ReactionChange {
                message_id: "m1".into(),
                emoji,
                user: user.into(),
                added: true,
                ts: 2,
            }),
        }))
    };
    // 60 distinct emoji: the first 50 are applied, the rest refused in
    // order (the next event still applies).
    let ops: Vec<WriteOp> = (0..60).map(|i| react_as(format!("e{i}"), "u")).collect();
    let r = write_batch(&mut c, &ops);
    let refused = r
        .iter()
        .filter(|x| **x == Ok(WriteOk::Bus(Applied::Refused)))
        .count();
    assert_eq!(refused, 10);
    // 150 users behind one emoji: 100 of them count.
    let ops: Vec<WriteOp> = (0..150)
        .map(|i| react_as("e0".into(), &format!("user{i}")))
        .collect();
    write_batch(&mut c, &ops);
    let h = history(&c, "x", Range::Latest, 10).unwrap();
    assert_eq!(h[0].reactions.len(), 50);
    let e0 = h[0].reactions.iter().find(|(e, _)| e == "e0").unwrap();
    assert_eq!(e0.1, 100);
}

#[test]
fn usage_adds_up_per_day_user_and_provider_and_version_4_totals_carry_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    {
        // A version 4 database: one table of totals per user and day.
        let c = open_writer(&path, Synchronous::Full).unwrap();
        c.execute_batch(
            "DROP TABLE llm_tokens; CREATE TABLE llm_usage (user TEXT NOT NULL, day INTEGER NOT NULL, \
             tokens INTEGER NOT NULL, PRIMARY KEY (day, user)) WITHOUT ROWID; \
             INSERT INTO llm_usage VALUES ('ada', 100, 42); PRAGMA user_version = 4;",
        )
        .unwrap();
    }
    let mut c = open_writer(&path, Synchronous::Full).unwrap();
    let spend = |user: &str, provider: &str, day, prompt, estimated| {
        WriteOp::Spend(Box::new(Spent {
            user: user.into(),
            provider: provider.into(),
            day,
            prompt,
            completion: 1,
            estimated,
        }))
    };
    write_batch(
        &mut c,
        &[
            spend("ada", "kimi", 100, 10, false),
            spend("ada", "kimi", 100, 5, true),
            spend("bob", "glm", 101, 7, false),
        ],
    );
    assert_eq!(spent(&c, 100).unwrap(), [("ada".to_string(), 42 + 17)]);
    let rows = usage(&c, 100, Some("ada")).unwrap();
    let row = |provider: &str, prompt, completion, calls, estimated| UsageRow {
        day: 100,
        user: "ada".into(),
        provider: provider.into(),
        prompt,
        completion,
        calls,
        estimated,
    };
    assert_eq!(rows, [row("?", 42, 0, 0, 0), row("kimi", 15, 2, 2, 1)]);
    assert_eq!(usage(&c, 101, None).unwrap().len(), 1);
    // Days past the kept ones go with the next write.
    write_batch(
        &mut c,
        &[spend("ada", "kimi", 101 + USAGE_DAYS + 1, 1, false)],
    );
    assert!(usage(&c, 0, Some("bob")).unwrap().is_empty());
}
