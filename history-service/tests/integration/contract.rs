//! The `Store` contract, written once as generic async fns over `S: Store` and run against
//! every implementation by [`contract_tests!`]:
//! - `contract::sqlite::*` — `SqliteStore` on a temporary file, always;
//! - `contract::remote::*` — `RemoteStore` → `/internal/v1` (real HTTP on 127.0.0.1:0) →
//!   `SqliteStore`, always: the wire format must not lose or change anything;
//! - `contract::scylla::*` — `ScyllaStore`, only when `SCYLLA_URI` is set
//!   (`host:9042` or a full `scylla://host:9042/keyspace`); otherwise each prints
//!   `SKIPPED: ScyllaDB contract tests (SCYLLA_URI not set)` to stderr and passes.
//!
//! Every test uses fresh room ids, so the ScyllaDB runs can share one keyspace.

use std::collections::HashSet;

use history_service::store::{Ban, Page, RoomAccess, Store, StoreError, MUTED_FOREVER};
use proto::rooms::{MessageView, PinView, Role, Visibility};
use proto::{MessageId, RoomId, ServerEvent, Timestamp};

use crate::support::*;

// ---------------------------------------------------------------------------------------------
// The projection: apply, messages, pins, markers

/// Normalized (user, seq) markers, sorted: `at` of a replayed receipt may differ by backend.
async fn markers<S: Store>(s: &S, room: &RoomId) -> Vec<(String, u64)> {
    let mut m: Vec<_> = s
        .markers(room)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.user, m.seq))
        .collect();
    m.sort();
    m
}

async fn pins<S: Store>(s: &S, room: &RoomId) -> Vec<PinView> {
    s.pins(room).await.unwrap()
}

pub async fn apply_is_idempotent<S: Store>(s: &S) {
    let r = room("idem");
    let batch = vec![
        msg(&r, 1, "ann"),
        msg(&r, 2, "bob"),
        msg(&r, 3, "ann"),
        edit(&r, mid(&r, 2), 4, "bob, edited"),
        pin(&r, 1, 5, "ann"),
        receipt(&r, "bob", 3),
        delete(&r, mid(&r, 3), 6, "ann"),
    ];
    s.apply(&batch).await.unwrap();
    let first = (
        all_messages(s, &r).await,
        pins(s, &r).await,
        markers(s, &r).await,
    );
    // The same batch again, a suffix of it, and single events again: nothing changes.
    s.apply(&batch).await.unwrap();
    s.apply(&batch[3..]).await.unwrap();
    for ev in &batch {
        s.apply(std::slice::from_ref(ev)).await.unwrap();
    }
    let again = (
        all_messages(s, &r).await,
        pins(s, &r).await,
        markers(s, &r).await,
    );
    assert_eq!(first, again);

    let (messages, pins, markers) = first;
    assert_eq!(messages.len(), 3, "one row per message id: {messages:?}");
    assert_eq!(messages[0].seq, 3);
    assert!(messages[0].deleted);
    assert_eq!(messages[1].content.as_deref(), Some("bob, edited"));
    assert_eq!(messages[1].edited_at, Some(t(4)));
    assert_eq!(messages[2], view(&r, 1, "ann"));
    assert_eq!(pins.len(), 1);
    assert_eq!(pins[0].message.id, mid(&r, 1));
    assert_eq!(markers, vec![("bob".to_owned(), 3)]);
    // An empty batch is fine.
    s.apply(&[]).await.unwrap();
}

/// The events of one room's history, in seq order; the expected end state is asserted in
/// [`replay_out_of_order_converges`].
fn history(r: &RoomId) -> Vec<ServerEvent> {
    vec![
        msg(r, 1, "ann"),
        msg(r, 2, "bob"),
        msg(r, 3, "ann"),
        msg(r, 4, "cat"),
        edit(r, mid(r, 2), 5, "bob v2"),
        delete(r, mid(r, 3), 6, "ann"),
        edit(r, mid(r, 2), 7, "bob v3"),
        pin(r, 1, 8, "ann"),
        pin(r, 4, 9, "ann"),
        unpin(r, mid(r, 1), 10, "ann"),
        receipt(r, "bob", 4),
        receipt(r, "bob", 2),
        msg(r, 11, "bob"),
        pin(r, 11, 12, "cat"),
        delete(r, mid(r, 11), 13, "bob"),
        receipt(r, "cat", 13),
        msg(r, 14, "ann"),
    ]
}

/// Rewrites the room (and so the message ids) of every view so two rooms' results compare.
fn in_room(mut v: Vec<MessageView>, r: &RoomId) -> Vec<MessageView> {
    for m in &mut v {
        m.room = r.clone();
        m.id = mid(r, m.seq);
    }
    v
}

pub async fn replay_out_of_order_converges<S: Store>(s: &S) {
    let in_order = room("order");
    let shuffled = room("shuffled");
    s.apply(&history(&in_order)).await.unwrap();

    // The same history in an order a reclaimed stream batch can produce: later batches
    // first, each batch reversed, and an old batch replayed once more at the end.
    let h = history(&shuffled);
    let mut batches: Vec<Vec<ServerEvent>> = h.chunks(4).map(<[_]>::to_vec).collect();
    batches.reverse();
    for b in &mut batches {
        b.reverse();
    }
    for b in &batches {
        s.apply(b).await.unwrap();
    }
    s.apply(&h[..6]).await.unwrap();

    let a = all_messages(s, &in_order).await;
    let b = in_room(all_messages(s, &shuffled).await, &in_order);
    assert_eq!(a, b, "message rows converge");
    let pa: Vec<_> = pins(s, &in_order)
        .await
        .into_iter()
        .map(|p| (p.message.seq, p.by, p.pinned_at))
        .collect();
    let pb: Vec<_> = pins(s, &shuffled)
        .await
        .into_iter()
        .map(|p| (p.message.seq, p.by, p.pinned_at))
        .collect();
    assert_eq!(pa, pb, "pins converge");
    assert_eq!(markers(s, &in_order).await, markers(s, &shuffled).await);

    // And the state is the one the seqs say.
    let seqs: Vec<u64> = a.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![14, 11, 4, 3, 2, 1]);
    let by_seq = |n: u64| a.iter().find(|m| m.seq == n).unwrap().clone();
    assert_eq!(
        by_seq(2).content.as_deref(),
        Some("bob v3"),
        "the newest edit wins"
    );
    assert_eq!(by_seq(2).edited_at, Some(t(7)));
    assert!(
        by_seq(3).deleted && by_seq(3).content.is_none(),
        "tombstone"
    );
    assert!(by_seq(11).deleted);
    assert_eq!(by_seq(4).content.as_deref(), Some("message 4"));
    let p = pins(s, &shuffled).await;
    assert_eq!(
        p.len(),
        1,
        "unpinned and deleted messages are not pinned: {p:?}"
    );
    assert_eq!(p[0].message.id, mid(&shuffled, 4));
    assert_eq!(p[0].message.room, shuffled);
    assert_eq!(p[0].by, user("ann"));
    assert_eq!(p[0].pinned_at, t(9));
    assert_eq!(
        markers(s, &shuffled).await,
        vec![("bob".to_owned(), 4), ("cat".to_owned(), 13)]
    );
}

pub async fn edit_and_delete_semantics<S: Store>(s: &S) {
    let r = room("edit");
    let other = room("edit-other");
    s.apply(&[msg(&r, 1, "ann"), msg(&r, 2, "ann")])
        .await
        .unwrap();

    // An edit replaces content and sets edited_at; an older edit arriving later loses.
    s.apply(&[edit(&r, mid(&r, 1), 5, "five")]).await.unwrap();
    s.apply(&[edit(&r, mid(&r, 1), 3, "three")]).await.unwrap();
    let m = s.message(&r, mid(&r, 1)).await.unwrap().unwrap();
    assert_eq!(m.content.as_deref(), Some("five"));
    assert_eq!(m.edited_at, Some(t(5)));
    assert_eq!(
        (m.seq, m.ts, m.user.clone()),
        (1, t(1), user("ann")),
        "identity kept"
    );

    // A delete is final: a tombstone without content, still in history; later edits lose.
    s.apply(&[delete(&r, mid(&r, 1), 6, "mod")]).await.unwrap();
    s.apply(&[edit(&r, mid(&r, 1), 7, "after delete")])
        .await
        .unwrap();
    let m = s.message(&r, mid(&r, 1)).await.unwrap().unwrap();
    assert!(m.deleted);
    assert_eq!(m.content, None);
    assert_eq!(m.seq, 1);
    assert_eq!(
        m.edited_at,
        Some(t(5)),
        "the edit after the delete was dropped, not stored behind the tombstone"
    );
    let page = all_messages(s, &r).await;
    assert_eq!(
        page.iter().map(|m| (m.seq, m.deleted)).collect::<Vec<_>>(),
        vec![(2, false), (1, true)]
    );
    // The JSON of a tombstone has `deleted: true` and no `content`.
    let json = serde_json::to_value(&page[1]).unwrap();
    assert_eq!(json["deleted"], true);
    assert!(json.get("content").is_none(), "{json}");

    // An edit and a delete that arrive before their message are folded in when it arrives.
    s.apply(&[edit(&r, mid(&r, 20), 22, "early edit")])
        .await
        .unwrap();
    s.apply(&[delete(&r, mid(&r, 30), 31, "ann")])
        .await
        .unwrap();
    assert_eq!(
        s.message(&r, mid(&r, 20)).await.unwrap(),
        None,
        "not visible before its message"
    );
    s.apply(&[msg(&r, 20, "bob"), msg(&r, 30, "bob")])
        .await
        .unwrap();
    let m20 = s.message(&r, mid(&r, 20)).await.unwrap().unwrap();
    assert_eq!(m20.content.as_deref(), Some("early edit"));
    assert_eq!(m20.edited_at, Some(t(22)));
    assert!(s.message(&r, mid(&r, 30)).await.unwrap().unwrap().deleted);

    // Message lookups are per room.
    assert_eq!(s.message(&other, mid(&r, 2)).await.unwrap(), None);
    assert_eq!(s.message(&r, MessageId(42)).await.unwrap(), None);

    // Events without a seq have no place in the order: skipped.
    s.apply(&[msg(&r, 0, "ann")]).await.unwrap();
    assert_eq!(s.message(&r, mid(&r, 0)).await.unwrap(), None);
}

/// Conflicts counted so far in this process (`chat_store_seq_conflicts_total`). Every
/// backend of these tests reports into this process: SQLite and the remote store's SQLite
/// directly, ScyllaDB through its client.
fn seq_conflicts() -> u64 {
    history_service::server::install_metrics()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix("chat_store_seq_conflicts_total "))
        .map_or(0, |v| {
            v.trim().parse::<f64>().expect("a counter value") as u64
        })
}

/// The conflict tests of the three backends run one at a time, so each sees only its own
/// conflicts in the process-wide counter.
static CONFLICTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The id of a message that is not the one `msg(room, seq, ..)` stores at `seq`.
fn other_id(r: &RoomId, seq: u64) -> MessageId {
    mid(r, seq + 500_000)
}

/// A different message at `seq`, as a broker that lost its state could send after a restart:
/// another id, author, content and time, and a reply.
fn other_msg(r: &RoomId, seq: u64) -> ServerEvent {
    ServerEvent::Message {
        seq,
        room: r.clone(),
        id: other_id(r, seq),
        user: user("mallory"),
        content: format!("other {seq}"),
        ts: t(seq + 100),
        reply_to: Some(mid(r, 1)),
        client_msg_id: None,
    }
}

pub async fn a_reused_seq_keeps_the_first_message<S: Store>(s: &S) {
    let _one_at_a_time = CONFLICTS.lock().await;
    let counted = seq_conflicts();
    let r = room("reuse");
    s.apply(&[msg(&r, 1, "ann"), msg(&r, 2, "bob"), msg(&r, 3, "cat")])
        .await
        .unwrap();
    s.apply(&[delete(&r, mid(&r, 3), 4, "cat")]).await.unwrap();
    let stored = all_messages(s, &r).await;

    // A different message at a stored seq: alone, beside a new message, at a deleted one's.
    s.apply(&[other_msg(&r, 2)]).await.unwrap();
    s.apply(&[msg(&r, 5, "ann"), other_msg(&r, 1), other_msg(&r, 3)])
        .await
        .unwrap();
    // Two messages at one new seq in one batch: the first of the batch is kept.
    s.apply(&[msg(&r, 6, "bob"), other_msg(&r, 6)])
        .await
        .unwrap();
    // Replays of the kept messages are no conflict; an edit of a dropped one touches nothing.
    s.apply(&[msg(&r, 2, "bob"), msg(&r, 6, "bob")])
        .await
        .unwrap();
    s.apply(&[edit(&r, other_id(&r, 2), 7, "edit of the dropped one")])
        .await
        .unwrap();

    let mut expected = vec![view(&r, 6, "bob"), view(&r, 5, "ann")];
    expected.extend(stored);
    assert_eq!(
        all_messages(s, &r).await,
        expected,
        "every seq keeps the message stored first, whole (no merge of the two)"
    );
    assert!(expected[2].deleted, "the tombstone at seq 3 stays one");
    for seq in [1, 2, 3, 6] {
        assert_eq!(
            s.message(&r, other_id(&r, seq)).await.unwrap(),
            None,
            "the newcomer at seq {seq} is not stored"
        );
    }
    assert_eq!(
        seq_conflicts() - counted,
        4,
        "each dropped message is counted once"
    );
}

/// `last_seq` is the highest seq of every stored event given, room-state events included
/// (which the projection does not keep otherwise), never a receipt's (a reader's marker).
pub async fn last_seq_counts_every_stored_event<S: Store>(s: &S) {
    let r = room("last");
    let other = room("last-other");
    assert_eq!(s.last_seq(&r).await.unwrap(), 0);
    s.apply(&[msg(&r, 1, "ann"), msg(&r, 2, "bob"), msg(&other, 9, "ann")])
        .await
        .unwrap();
    assert_eq!(s.last_seq(&r).await.unwrap(), 2);
    let info = proto::rooms::RoomInfo {
        id: r.clone(),
        name: "n".into(),
        topic: String::new(),
        visibility: Visibility::Public,
        max_members: None,
        members_can_pin: false,
        owner: None,
        created_at: t(0),
    };
    let updated = ServerEvent::RoomUpdated { seq: 5, room: info };
    s.apply(&[edit(&r, mid(&r, 1), 3, "x"), pin(&r, 2, 4, "ann"), updated])
        .await
        .unwrap();
    assert_eq!(s.last_seq(&r).await.unwrap(), 5);
    // Older events replayed later, and receipts, leave it.
    s.apply(&[msg(&r, 1, "ann"), receipt(&r, "bob", 50)])
        .await
        .unwrap();
    assert_eq!(s.last_seq(&r).await.unwrap(), 5);
    assert_eq!(s.last_seq(&other).await.unwrap(), 9);
}

pub async fn pin_unpin_semantics<S: Store>(s: &S) {
    let r = room("pins");
    s.apply(&[msg(&r, 1, "ann"), msg(&r, 2, "bob"), msg(&r, 3, "cat")])
        .await
        .unwrap();
    assert!(pins(s, &r).await.is_empty());

    // Most recently pinned first, with who pinned and when.
    s.apply(&[pin(&r, 1, 10, "ann"), pin(&r, 2, 11, "bob")])
        .await
        .unwrap();
    let p = pins(s, &r).await;
    assert_eq!(
        p.iter().map(|p| p.message.id).collect::<Vec<_>>(),
        vec![mid(&r, 2), mid(&r, 1)]
    );
    assert_eq!(p[0].by, user("bob"));
    assert_eq!(p[0].pinned_at, t(11));
    assert_eq!(
        p[0].message,
        view(&r, 2, "bob"),
        "the stored message, not the event's copy"
    );

    // Unpin; a replayed older pin does not bring it back; a newer pin does.
    s.apply(&[unpin(&r, mid(&r, 1), 12, "ann")]).await.unwrap();
    s.apply(&[pin(&r, 1, 10, "ann")]).await.unwrap();
    assert_eq!(
        pins(s, &r)
            .await
            .iter()
            .map(|p| p.message.id)
            .collect::<Vec<_>>(),
        vec![mid(&r, 2)]
    );
    s.apply(&[pin(&r, 1, 13, "cat")]).await.unwrap();
    let p = pins(s, &r).await;
    assert_eq!(
        p.iter().map(|p| p.message.id).collect::<Vec<_>>(),
        vec![mid(&r, 1), mid(&r, 2)]
    );
    assert_eq!((p[0].by.clone(), p[0].pinned_at), (user("cat"), t(13)));

    // A pinned message that is edited shows the edit; once deleted it is unpinned for good.
    s.apply(&[edit(&r, mid(&r, 2), 14, "edited")])
        .await
        .unwrap();
    let p = pins(s, &r).await;
    assert_eq!(p[1].message.content.as_deref(), Some("edited"));
    s.apply(&[delete(&r, mid(&r, 2), 15, "bob")]).await.unwrap();
    s.apply(&[pin(&r, 2, 11, "bob")]).await.unwrap(); // replay of the old pin
    assert_eq!(
        pins(s, &r)
            .await
            .iter()
            .map(|p| p.message.id)
            .collect::<Vec<_>>(),
        vec![mid(&r, 1)]
    );

    // Unpinning something never pinned is harmless.
    s.apply(&[unpin(&r, mid(&r, 3), 16, "ann")]).await.unwrap();
    assert_eq!(pins(s, &r).await.len(), 1);
}

pub async fn receipts_only_move_forward<S: Store>(s: &S) {
    let r = room("receipts");
    assert!(markers(s, &r).await.is_empty());
    s.apply(&[receipt(&r, "ann", 5)]).await.unwrap();
    s.apply(&[receipt(&r, "ann", 3), receipt(&r, "bob", 1)])
        .await
        .unwrap();
    assert_eq!(
        markers(s, &r).await,
        vec![("ann".into(), 5), ("bob".into(), 1)]
    );
    s.apply(&[
        receipt(&r, "ann", 9),
        receipt(&r, "ann", 7),
        receipt(&r, "ann", 0),
    ])
    .await
    .unwrap();
    assert_eq!(
        markers(s, &r).await,
        vec![("ann".into(), 9), ("bob".into(), 1)]
    );
    let all = s.markers(&r).await.unwrap();
    assert!(all.iter().all(|m| m.at.0 > 0), "`at` is set: {all:?}");
    // one user's marker, as a join reads it
    assert_eq!(s.marker(&r, "ann").await.unwrap(), Some(9));
    assert_eq!(s.marker(&r, "bob").await.unwrap(), Some(1));
    assert_eq!(s.marker(&r, "cat").await.unwrap(), None, "no marker");
    assert_eq!(s.marker(&room("elsewhere"), "ann").await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------------
// Paging

fn seqs(v: &[MessageView]) -> Vec<u64> {
    v.iter().map(|m| m.seq).collect()
}

pub async fn paging_is_exact<S: Store>(s: &S) {
    let r = room("paging");
    // Gaps (seqs also number edits, pins, membership events) and, for ScyllaDB, several seq
    // buckets of 1000 including empty ones in between.
    let mut stored: Vec<u64> = (1..=30).map(|n| n * 3).collect(); // 3..=90
    stored.extend([998, 999, 1000, 1001, 2500, 4999, 5000]);
    let events: Vec<_> = stored.iter().map(|&n| msg(&r, n, "ann")).collect();
    s.apply(&events).await.unwrap();
    let mut newest_first = stored.clone();
    newest_first.reverse();

    // Before pages, newest first, exactly `limit` rows until the end.
    let p1 = s
        .messages(
            &r,
            Page::Before {
                before: None,
                limit: 5,
            },
        )
        .await
        .unwrap();
    assert_eq!(seqs(&p1), newest_first[..5]);
    // New messages arrive between pages: the cursor still continues exactly.
    s.apply(&[msg(&r, 6000, "bob"), msg(&r, 6001, "bob")])
        .await
        .unwrap();
    let mut walked = seqs(&p1);
    let mut before = p1.last().map(|m| m.seq);
    loop {
        let page = s
            .messages(&r, Page::Before { before, limit: 7 })
            .await
            .unwrap();
        assert!(page.len() <= 7);
        if page.is_empty() {
            break;
        }
        walked.extend(seqs(&page));
        if page.len() < 7 {
            let rest = s
                .messages(
                    &r,
                    Page::Before {
                        before: page.last().map(|m| m.seq),
                        limit: 7,
                    },
                )
                .await
                .unwrap();
            assert!(rest.is_empty(), "a short page is the last one");
            break;
        }
        before = page.last().map(|m| m.seq);
    }
    assert_eq!(walked, newest_first, "no row skipped or repeated");

    // Before a cursor in a gap, or past the end.
    let p = s
        .messages(
            &r,
            Page::Before {
                before: Some(1000),
                limit: 3,
            },
        )
        .await
        .unwrap();
    assert_eq!(seqs(&p), vec![999, 998, 90]);
    let p = s
        .messages(
            &r,
            Page::Before {
                before: Some(4000),
                limit: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(seqs(&p), vec![2500, 1001]);
    assert!(s
        .messages(
            &r,
            Page::Before {
                before: Some(3),
                limit: 5
            }
        )
        .await
        .unwrap()
        .is_empty());
    let p = s
        .messages(
            &r,
            Page::Before {
                before: Some(u64::MAX),
                limit: 1,
            },
        )
        .await
        .unwrap();
    assert_eq!(seqs(&p), vec![6001]);

    // After pages, oldest first; messages appended meanwhile show up at the end.
    let mut oldest_first = stored.clone();
    oldest_first.extend([6000, 6001]);
    let mut walked = Vec::new();
    let mut after = 0;
    let mut appended = false;
    loop {
        let page = s
            .messages(&r, Page::After { after, limit: 6 })
            .await
            .unwrap();
        walked.extend(seqs(&page));
        if !appended {
            s.apply(&[msg(&r, 7000, "cat")]).await.unwrap();
            oldest_first.push(7000);
            appended = true;
        }
        if page.len() < 6 {
            break;
        }
        after = page.last().unwrap().seq;
    }
    assert_eq!(walked, oldest_first);
    let p = s
        .messages(
            &r,
            Page::After {
                after: 999,
                limit: 3,
            },
        )
        .await
        .unwrap();
    assert_eq!(seqs(&p), vec![1000, 1001, 2500]);
    assert!(s
        .messages(
            &r,
            Page::After {
                after: 7000,
                limit: 3
            }
        )
        .await
        .unwrap()
        .is_empty());

    // Pages carry full views, tombstones included.
    s.apply(&[delete(&r, mid(&r, 999), 8000, "ann")])
        .await
        .unwrap();
    let p = s
        .messages(
            &r,
            Page::After {
                after: 998,
                limit: 1,
            },
        )
        .await
        .unwrap();
    assert!(p[0].deleted && p[0].content.is_none());
    let p = s
        .messages(&r, Page::After { after: 0, limit: 1 })
        .await
        .unwrap();
    assert_eq!(p, vec![view(&r, 3, "ann")]);

    // Another room sees none of it.
    assert!(all_messages(s, &room("paging-empty")).await.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Room state

fn sorted_members(mut m: Vec<proto::rooms::MemberInfo>) -> Vec<proto::rooms::MemberInfo> {
    m.sort_by(|a, b| a.user.id.cmp(&b.user.id));
    m
}

pub async fn create_room_conflicts<S: Store>(s: &S) {
    let r = room("create");
    let mut info = room_info(&r, Visibility::Public);
    info.owner = Some("somebody-else".into()); // ignored: the owner argument wins
    s.create_room(&info, &user("ann")).await.unwrap();

    let state = s.room_state(&r).await.unwrap().expect("created");
    let mut expected = info.clone();
    expected.owner = Some("ann".into());
    assert_eq!(state.info, expected);
    assert_eq!(state.members.len(), 1);
    assert_eq!(state.members[0].user, user("ann"));
    assert_eq!(state.members[0].role, Role::Owner);
    assert_eq!(state.members[0].muted_until, None);
    assert!(state.bans.is_empty());

    // Taken, by anyone.
    let again = s
        .create_room(&room_info(&r, Visibility::Private), &user("bob"))
        .await;
    assert!(matches!(again, Err(StoreError::Conflict)), "{again:?}");
    assert_eq!(
        s.room_state(&r).await.unwrap().unwrap().info,
        expected,
        "unchanged"
    );

    // Deleted: gone from state, listing and access, but the id stays taken.
    s.delete_room(&r).await.unwrap();
    assert_eq!(s.room_state(&r).await.unwrap(), None);
    assert_eq!(s.access(&r, "ann").await.unwrap(), None);
    assert!(!s.rooms().await.unwrap().iter().any(|(i, _)| i.id == r));
    let reuse = s
        .create_room(&room_info(&r, Visibility::Public), &user("bob"))
        .await;
    assert!(
        matches!(reuse, Err(StoreError::Conflict)),
        "deleted ids are not reused: {reuse:?}"
    );
    s.delete_room(&r)
        .await
        .expect("deleting a deleted room is a no-op");
    let never = s.delete_room(&room("never")).await;
    assert!(matches!(never, Err(StoreError::NotFound)), "{never:?}");

    // Writes to a deleted or absent room are NotFound.
    for target in [r.clone(), room("absent")] {
        let u = s.update_room(&room_info(&target, Visibility::Public)).await;
        assert!(matches!(u, Err(StoreError::NotFound)), "{u:?}");
        let m = s.put_member(&target, &user("bob"), Role::Member).await;
        assert!(matches!(m, Err(StoreError::NotFound)), "{m:?}");
        let b = s.put_ban(&target, &ban("bob", None)).await;
        assert!(matches!(b, Err(StoreError::NotFound)), "{b:?}");
        assert_eq!(s.room_state(&target).await.unwrap(), None);
    }
}

pub async fn update_room_keeps_owner_and_creation<S: Store>(s: &S) {
    let r = room("update");
    s.create_room(&room_info(&r, Visibility::Public), &user("ann"))
        .await
        .unwrap();
    let mut changed = room_info(&r, Visibility::Restricted);
    changed.name = "Renamed".into();
    changed.topic = "New topic".into();
    changed.max_members = None;
    changed.members_can_pin = true;
    changed.owner = Some("mallory".into());
    changed.created_at = t(999);
    s.update_room(&changed).await.unwrap();
    let info = s.room_state(&r).await.unwrap().unwrap().info;
    assert_eq!(info.name, "Renamed");
    assert_eq!(info.topic, "New topic");
    assert_eq!(info.visibility, Visibility::Restricted);
    assert_eq!(info.max_members, None);
    assert!(info.members_can_pin);
    assert_eq!(info.owner.as_deref(), Some("ann"), "owner kept");
    assert_eq!(info.created_at, t(0), "created_at kept");
    // Back to private with a limit.
    changed.visibility = Visibility::Private;
    changed.max_members = Some(3);
    s.update_room(&changed).await.unwrap();
    let info = s.access(&r, "ann").await.unwrap().unwrap().info;
    assert_eq!(
        (info.visibility, info.max_members),
        (Visibility::Private, Some(3))
    );
}

pub async fn member_semantics<S: Store>(s: &S) {
    let r = room("members");
    s.create_room(&room_info(&r, Visibility::Private), &user("ann"))
        .await
        .unwrap();
    s.put_member(&r, &user("bob"), Role::Member).await.unwrap();
    s.put_member(&r, &user("cat"), Role::Admin).await.unwrap();
    let m = sorted_members(s.room_state(&r).await.unwrap().unwrap().members);
    assert_eq!(
        m.iter()
            .map(|m| (m.user.id.as_str(), m.role))
            .collect::<Vec<_>>(),
        vec![
            ("ann", Role::Owner),
            ("bob", Role::Member),
            ("cat", Role::Admin)
        ]
    );
    let bob_joined = m[1].joined_at;

    // Mutes: until a time, without end, cleared.
    let until = Timestamp::now().plus_secs(3600);
    s.set_mute(&r, "bob", Some(until), true).await.unwrap();
    let bob = |st: history_service::store::RoomState| {
        st.members.into_iter().find(|m| m.user.id == "bob").unwrap()
    };
    assert_eq!(
        bob(s.room_state(&r).await.unwrap().unwrap()).muted_until,
        Some(until)
    );
    s.set_mute(&r, "bob", None, true).await.unwrap();
    assert_eq!(
        bob(s.room_state(&r).await.unwrap().unwrap()).muted_until,
        Some(MUTED_FOREVER)
    );

    // put_member is an upsert: role and name change; joined_at and the mute stay.
    let renamed = proto::UserRef {
        id: "bob".into(),
        name: "Robert".into(),
    };
    s.put_member(&r, &renamed, Role::Admin).await.unwrap();
    let b = bob(s.room_state(&r).await.unwrap().unwrap());
    assert_eq!((b.user.clone(), b.role), (renamed.clone(), Role::Admin));
    assert_eq!(b.joined_at, bob_joined);
    assert_eq!(b.muted_until, Some(MUTED_FOREVER));

    s.set_mute(&r, "bob", Some(until), false).await.unwrap();
    assert_eq!(
        bob(s.room_state(&r).await.unwrap().unwrap()).muted_until,
        None,
        "unmuted"
    );

    // Mutes belong to memberships.
    let nm = s.set_mute(&r, "nobody", None, true).await;
    assert!(matches!(nm, Err(StoreError::NotFound)), "{nm:?}");

    // Removing ends the membership and its mute; removing a non-member is a no-op.
    s.set_mute(&r, "bob", None, true).await.unwrap();
    s.remove_member(&r, "bob").await.unwrap();
    s.remove_member(&r, "bob").await.unwrap();
    s.remove_member(&r, "nobody").await.unwrap();
    let st = s.room_state(&r).await.unwrap().unwrap();
    assert!(!st.members.iter().any(|m| m.user.id == "bob"));
    s.put_member(&r, &user("bob"), Role::Member).await.unwrap();
    let b = bob(s.room_state(&r).await.unwrap().unwrap());
    assert_eq!(
        (b.role, b.muted_until),
        (Role::Member, None),
        "a fresh membership"
    );

    // Listing counts members.
    let count = s
        .rooms()
        .await
        .unwrap()
        .into_iter()
        .find(|(i, _)| i.id == r)
        .map(|(_, n)| n);
    assert_eq!(count, Some(3));
}

fn ban(who: &str, until: Option<Timestamp>) -> Ban {
    Ban {
        user: user(who),
        by: user("ann"),
        reason: Some("spam".into()),
        until,
        at: t(50),
    }
}

pub async fn ban_semantics<S: Store>(s: &S) {
    let r = room("bans");
    s.create_room(&room_info(&r, Visibility::Public), &user("ann"))
        .await
        .unwrap();
    s.put_member(&r, &user("bob"), Role::Member).await.unwrap();

    s.put_ban(&r, &ban("bob", Some(t(100)))).await.unwrap();
    let st = s.room_state(&r).await.unwrap().unwrap();
    assert_eq!(st.bans, vec![ban("bob", Some(t(100)))]);
    assert!(
        st.members.iter().any(|m| m.user.id == "bob"),
        "a ban leaves the membership to the gateway"
    );

    // Upsert by user: the newer ban replaces the older one.
    let mut permanent = ban("bob", None);
    permanent.reason = None;
    permanent.at = t(60);
    s.put_ban(&r, &permanent).await.unwrap();
    s.put_ban(&r, &ban("dan", Some(t(200)))).await.unwrap();
    let mut bans = s.room_state(&r).await.unwrap().unwrap().bans;
    bans.sort_by(|a, b| a.user.id.cmp(&b.user.id));
    assert_eq!(bans, vec![permanent.clone(), ban("dan", Some(t(200)))]);
    assert!(bans[0].active_at(Timestamp::now()));
    assert!(!bans[1].active_at(t(200)) && bans[1].active_at(t(199)));

    s.remove_ban(&r, "bob").await.unwrap();
    s.remove_ban(&r, "bob").await.unwrap();
    s.remove_ban(&r, "nobody").await.unwrap();
    let st = s.room_state(&r).await.unwrap().unwrap();
    assert_eq!(st.bans, vec![ban("dan", Some(t(200)))]);
}

pub async fn access_reads_one_user<S: Store>(s: &S) {
    let r = room("access");
    s.create_room(&room_info(&r, Visibility::Private), &user("ann"))
        .await
        .unwrap();
    s.put_member(&r, &user("bob"), Role::Member).await.unwrap();
    s.put_ban(&r, &ban("eve", None)).await.unwrap();
    let info = s.room_state(&r).await.unwrap().unwrap().info;

    let ann: RoomAccess = s.access(&r, "ann").await.unwrap().unwrap();
    assert_eq!(ann.info, info);
    assert_eq!(ann.member.as_ref().map(|m| m.role), Some(Role::Owner));
    assert_eq!(ann.ban, None);
    let bob = s.access(&r, "bob").await.unwrap().unwrap();
    assert_eq!(
        bob.member.as_ref().map(|m| (m.user.clone(), m.role)),
        Some((user("bob"), Role::Member))
    );
    let eve = s.access(&r, "eve").await.unwrap().unwrap();
    assert_eq!(eve.member, None);
    assert_eq!(eve.ban, Some(ban("eve", None)));
    let stranger = s.access(&r, "zed").await.unwrap().unwrap();
    assert_eq!((stranger.member, stranger.ban), (None, None));
    assert_eq!(s.access(&room("access-absent"), "ann").await.unwrap(), None);
}

pub async fn rooms_lists_live_rooms<S: Store>(s: &S) {
    let public = room("list-pub");
    let private = room("list-priv");
    let gone = room("list-gone");
    s.create_room(&room_info(&public, Visibility::Public), &user("ann"))
        .await
        .unwrap();
    s.create_room(&room_info(&private, Visibility::Private), &user("bob"))
        .await
        .unwrap();
    s.create_room(&room_info(&gone, Visibility::Public), &user("ann"))
        .await
        .unwrap();
    s.put_member(&public, &user("bob"), Role::Member)
        .await
        .unwrap();
    s.put_member(&public, &user("cat"), Role::Member)
        .await
        .unwrap();
    s.remove_member(&public, "cat").await.unwrap();
    s.delete_room(&gone).await.unwrap();

    let rooms = s.rooms().await.unwrap();
    let ids: HashSet<&RoomId> = rooms.iter().map(|(i, _)| &i.id).collect();
    assert!(
        ids.contains(&public) && ids.contains(&private),
        "callers filter private rooms"
    );
    assert!(!ids.contains(&gone));
    let find = |r: &RoomId| rooms.iter().find(|(i, _)| &i.id == r).cloned().unwrap();
    assert_eq!(find(&public).1, 2);
    assert_eq!(find(&private).1, 1);
    assert_eq!(find(&private).0.visibility, Visibility::Private);
    assert_eq!(find(&public).0.owner.as_deref(), Some("ann"));
}

// ---------------------------------------------------------------------------------------------
// Backends

mod backends {
    use std::sync::Arc;

    use history_service::http::HistoryApi;
    use history_service::internal::internal_router;
    use history_service::remote::RemoteStore;
    use history_service::store::scylla::{ScyllaConfig, ScyllaStore, DEFAULT_REPLICATION};
    use history_service::store::sqlite::SqliteStore;
    use tokio::sync::OnceCell;

    pub const INTERNAL_TOKEN: &str = "contract-internal-token";

    /// A `RemoteStore` and the server behind it (aborted on drop).
    pub struct Remote {
        pub store: RemoteStore,
        pub base: String,
        server: tokio::task::JoinHandle<()>,
        _backing: Arc<SqliteStore>,
    }

    impl Drop for Remote {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    pub async fn remote() -> Remote {
        let backing = Arc::new(SqliteStore::open_temp().unwrap());
        let api = Arc::new(
            HistoryApi::new(backing.clone(), crate::support::dev_verifier())
                .with_internal_token(Some(INTERNAL_TOKEN.into())),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            axum::serve(listener, internal_router(api)).await.unwrap();
        });
        Remote {
            store: RemoteStore::new(&base, Some(INTERNAL_TOKEN.into())).unwrap(),
            base,
            server,
            _backing: backing,
        }
    }

    /// `SCYLLA_URI` as a store URL: `host:port[,host:port]` gets keyspace
    /// `history_contract`; a full `scylla://...` URL is used as given.
    fn scylla_url() -> Option<String> {
        let uri = std::env::var("SCYLLA_URI")
            .ok()
            .filter(|u| !u.trim().is_empty())?;
        Some(if uri.starts_with("scylla://") {
            uri
        } else {
            format!("scylla://{}/history_contract", uri.trim())
        })
    }

    /// The ScyllaDB store, migrated once per test binary; None (after printing why) when
    /// `SCYLLA_URI` is not set.
    pub async fn scylla() -> Option<ScyllaStore> {
        static MIGRATED: OnceCell<()> = OnceCell::const_new();
        let Some(url) = scylla_url() else {
            eprintln!("SKIPPED: ScyllaDB contract tests (SCYLLA_URI not set)");
            return None;
        };
        let config = ScyllaConfig::parse(&url).expect("SCYLLA_URI");
        MIGRATED
            .get_or_init(|| async {
                history_service::store::scylla::migrate(&config, DEFAULT_REPLICATION)
                    .await
                    .expect("migrate the contract keyspace");
            })
            .await;
        Some(
            ScyllaStore::connect(&config)
                .await
                .expect("connect to SCYLLA_URI"),
        )
    }
}

/// One `#[tokio::test]` per (backend, contract fn).
macro_rules! contract_tests {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let store = history_service::store::sqlite::SqliteStore::open_temp().unwrap();
                    super::$case(&store).await;
                }
            )*
        }
        mod remote {
            $(
                #[tokio::test]
                async fn $case() {
                    let remote = super::backends::remote().await;
                    super::$case(&remote.store).await;
                }
            )*
        }
        mod scylla {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some(store) = super::backends::scylla().await else { return };
                    super::$case(&store).await;
                }
            )*
        }
    };
}

contract_tests!(
    apply_is_idempotent,
    replay_out_of_order_converges,
    edit_and_delete_semantics,
    a_reused_seq_keeps_the_first_message,
    last_seq_counts_every_stored_event,
    pin_unpin_semantics,
    receipts_only_move_forward,
    paging_is_exact,
    create_room_conflicts,
    update_room_keeps_owner_and_creation,
    member_semantics,
    ban_semantics,
    access_reads_one_user,
    rooms_lists_live_rooms,
);

// ---------------------------------------------------------------------------------------------
// RemoteStore specifics

#[tokio::test]
async fn remote_refuses_a_wrong_internal_token_and_maps_an_unreachable_service() {
    let remote = backends::remote().await;
    let wrong =
        history_service::remote::RemoteStore::new(&remote.base, Some("wrong".into())).unwrap();
    let e = wrong.rooms().await.unwrap_err();
    assert!(
        matches!(e, StoreError::Internal(_)),
        "a deployment error, not weather: {e:?}"
    );
    let none = history_service::remote::RemoteStore::new(&remote.base, None).unwrap();
    assert!(matches!(none.rooms().await, Err(StoreError::Internal(_))));

    let dead = format!("http://127.0.0.1:{}", free_port());
    let gone = history_service::remote::RemoteStore::new(&dead, None).unwrap();
    let e = gone.rooms().await.unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert_eq!(e.code(), proto::ErrorCode::Unavailable);
}

// ---------------------------------------------------------------------------------------------
// ScyllaDB configuration that needs no server

#[test]
fn scylla_schema_is_idempotent_ddl_and_urls_parse() {
    use history_service::store::scylla::{schema_statements, SchemaStatement, ScyllaConfig};
    let statements = schema_statements().expect("the schema file parses");
    assert!(statements.len() >= 5, "{statements:?}");
    for s in &statements {
        let cql = match s {
            SchemaStatement::Create(cql) => cql,
            SchemaStatement::AddColumn { cql, .. } => cql,
        };
        let upper = cql.to_ascii_uppercase();
        assert!(
            upper.starts_with("CREATE ") && upper.contains("IF NOT EXISTS")
                || upper.starts_with("ALTER TABLE ") && upper.contains(" ADD "),
            "re-runnable DDL only: {cql}"
        );
        assert!(!cql.contains("--"), "comments stripped: {cql}");
    }

    let c = ScyllaConfig::parse("scylla://a:9042,b/chat").unwrap();
    assert_eq!(c.nodes, vec!["a:9042".to_owned(), "b:9042".to_owned()]);
    assert_eq!(c.keyspace, "chat");
    assert_eq!(c.credentials, None);
    let c = ScyllaConfig::parse("scylla://u:p@scylla-client:9043/chat_2").unwrap();
    assert_eq!(c.credentials, Some(("u".into(), "p".into())));
    assert_eq!(c.nodes, vec!["scylla-client:9043".to_owned()]);
    for bad in [
        "scylla://host",
        "scylla://host/Bad-Keyspace",
        "scylla://host:notaport/chat",
        "scylla:///chat",
        "cassandra://host/chat",
    ] {
        assert!(ScyllaConfig::parse(bad).is_err(), "{bad} accepted");
    }
}
