//! The SQL side's tests, on real database files.

use super::*;
use rusqlite::Connection;

fn db() -> (tempfile::TempDir, Connection) {
    let dir = tempfile::tempdir().unwrap();
    let conn = open_writer(&dir.path().join("t.db"), Synchronous::Full).unwrap();
    (dir, conn)
}

fn publish(id: &str, room: &str, text: &str, ts: i64) -> WriteOp {
    WriteOp::Publish {
        id: id.into(),
        room: room.into(),
        user: "alice".into(),
        text: text.into(),
        ts,
    }
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
