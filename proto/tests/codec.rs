//! Round trips of every frame shape, and the decoder's behaviour on hostile input.

use proptest::prelude::*;
use proto::client::{decode, encode, DecodeErrorKind};
use proto::rooms::{Role, Visibility};
use proto::{Command, MessageId, Ref, RoomId, ServerEvent, Timestamp, UserRef};

fn room(s: &str) -> RoomId {
    RoomId::new(s).unwrap()
}

fn all_commands() -> Vec<Command> {
    use proto::client::*;
    let r = || room("lobby");
    vec![
        Command::Join(Join {
            room: r(),
            since: Some(3),
            epoch: Some("3f2a".into()),
        }),
        Command::Leave(Leave { room: r() }),
        Command::Message(SendMessage {
            room: r(),
            content: "hi".into(),
            client_msg_id: Some("c1".into()),
            reply_to: Some(MessageId(9)),
        }),
        Command::Edit(Edit {
            room: r(),
            id: MessageId(1),
            content: "x".into(),
        }),
        Command::Delete(Delete {
            room: r(),
            id: MessageId(1),
        }),
        Command::Typing(Typing { room: r() }),
        Command::StopTyping(StopTyping { room: r() }),
        Command::Read(Read { room: r(), seq: 4 }),
        Command::Pin(Pin {
            room: r(),
            id: MessageId(2),
        }),
        Command::Unpin(Unpin {
            room: r(),
            id: MessageId(2),
        }),
        Command::CreateRoom(CreateRoom {
            room: r(),
            name: Some("Lobby".into()),
            visibility: Visibility::Restricted,
            topic: Some("t".into()),
            max_members: Some(10),
        }),
        Command::UpdateRoom(UpdateRoom {
            room: r(),
            name: None,
            topic: Some("t2".into()),
            visibility: Some(Visibility::Private),
            max_members: None,
            members_can_pin: Some(true),
        }),
        Command::DeleteRoom(DeleteRoom { room: r() }),
        Command::AddMember(AddMember {
            room: r(),
            user: "u2".into(),
            role: Some(Role::Admin),
        }),
        Command::RemoveMember(RemoveMember {
            room: r(),
            user: "u2".into(),
            reason: None,
        }),
        Command::Kick(RemoveMember {
            room: r(),
            user: "u2".into(),
            reason: Some("spam".into()),
        }),
        Command::Ban(Ban {
            room: r(),
            user: "u2".into(),
            reason: None,
            duration_s: Some(60),
        }),
        Command::Unban(Unban {
            room: r(),
            user: "u2".into(),
        }),
        Command::Mute(Mute {
            room: r(),
            user: "u2".into(),
            duration_s: None,
        }),
        Command::Unmute(Unmute {
            room: r(),
            user: "u2".into(),
        }),
        Command::SetRole(SetRole {
            room: r(),
            user: "u2".into(),
            role: Role::Member,
        }),
        Command::Refresh(Refresh {
            token: "a.b.c".into(),
        }),
        Command::ListRooms,
        Command::Ping,
    ]
}

#[test]
fn every_command_round_trips_with_its_ref() {
    let cmds = all_commands();
    assert_eq!(cmds.len(), proto::client::COMMAND_TYPES.len());
    for (i, cmd) in cmds.into_iter().enumerate() {
        let r = if i % 2 == 0 {
            Ref::Str(format!("r{i}"))
        } else {
            Ref::Num(i.into())
        };
        let text = encode(&cmd, Some(&r));
        let got = decode(text.as_bytes()).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(got.command, cmd, "{text}");
        assert_eq!(got.r#ref, Some(r));
        assert!(proto::client::COMMAND_TYPES.contains(&got.command.name()));
    }
}

#[test]
fn unknown_fields_are_ignored() {
    let got = decode(br#"{"type":"ping","extra":[1,2],"user":"mallory"}"#).unwrap();
    assert_eq!(got.command, Command::Ping);
}

#[test]
fn errors_are_typed_and_keep_the_ref() {
    let e = decode(b"{not json").unwrap_err();
    assert!(matches!(e.kind, DecodeErrorKind::Json(_)));
    let e = decode(br#"{"type":"warp","ref":"a"}"#).unwrap_err();
    assert_eq!(e.kind, DecodeErrorKind::UnknownType("warp".into()));
    assert_eq!(e.r#ref, Some(Ref::Str("a".into())));
    let e = decode(br#"{"type":"join","ref":7}"#).unwrap_err();
    assert!(matches!(e.kind, DecodeErrorKind::BadField { .. }), "{e:?}");
    assert_eq!(e.r#ref, Some(Ref::Num(7.into())));
    let e = decode(br#"{"type":"join","room":"../x"}"#).unwrap_err();
    assert!(matches!(e.kind, DecodeErrorKind::BadField { .. }));
    let e = decode(br#"[1,2]"#).unwrap_err();
    assert_eq!(e.kind, DecodeErrorKind::MissingType);
    let e = decode(br#"{"ref":"x"}"#).unwrap_err();
    assert_eq!(e.kind, DecodeErrorKind::MissingType);
    let e = decode(br#"{"type":"ping","ref":{"a":1}}"#).unwrap_err();
    assert_eq!(e.kind, DecodeErrorKind::BadRef);
}

#[test]
fn server_events_round_trip_and_seq_is_omitted_until_assigned() {
    let ev = ServerEvent::Message {
        seq: 0,
        room: room("a"),
        id: MessageId(1 << 60),
        user: UserRef {
            id: "u".into(),
            name: "U".into(),
        },
        content: "hello".into(),
        ts: Timestamp(1_768_473_000_123),
        reply_to: None,
        client_msg_id: None,
    };
    let bytes = ev.to_json();
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(!text.contains("seq"), "{text}");
    assert!(text.contains(r#""id":"1152921504606846976""#), "{text}");
    let stored = proto::envelope::with_seq(&bytes, 42);
    let back: ServerEvent = serde_json::from_slice(&stored).unwrap();
    assert_eq!(back.seq(), 42);
    if let ServerEvent::Message { content, .. } = back {
        assert_eq!(content, "hello");
    } else {
        panic!("wrong variant");
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics_and_errors_are_typed(
        kind in prop_oneof![Just("join".to_string()), Just("message".to_string()), "[a-z_]{0,12}"],
        room in ".{0,80}",
        content in ".{0,40}",
        seq in any::<i64>(),
        r in prop_oneof![Just(serde_json::Value::Null), any::<i64>().prop_map(serde_json::Value::from), ".{0,200}".prop_map(serde_json::Value::from)],
    ) {
        let v = serde_json::json!({"type": kind, "room": room, "content": content, "since": seq, "seq": seq, "ref": r});
        match decode(v.to_string().as_bytes()) {
            Ok(inb) => {
                // Whatever decoded must satisfy the wire rules.
                if let Some(room) = inb.command.room() {
                    prop_assert!(RoomId::new(room.as_str()).is_ok());
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

/// Every field name any command has, plus a few that none has.
const FIELDS: &[&str] = &[
    "room",
    "since",
    "content",
    "client_msg_id",
    "reply_to",
    "id",
    "seq",
    "name",
    "visibility",
    "topic",
    "max_members",
    "members_can_pin",
    "user",
    "role",
    "reason",
    "duration_s",
    "ref",
    "type",
    "by",
    "sub",
];

/// Any JSON value, nested a little: the shapes a hostile client can put in a field.
fn any_json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-z0-9_-]{0,70}".prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        prop_oneof![
            Just("public"),
            Just("private"),
            Just("restricted"),
            Just("member"),
            Just("admin"),
            Just("owner"),
            Just("18446744073709551615"),
            Just("18446744073709551616"),
            Just("-1"),
            Just("0"),
            Just("lobby"),
            Just("../x"),
            Just("")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-z_]{1,8}", inner, 0..3)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Every command parser, on objects with a known `type` and random fields of random
    /// shapes: never a panic; an error is a typed field or ref error; whatever decodes is the
    /// command named by `type`, obeys the wire rules, and re-encodes to itself.
    #[test]
    fn every_command_parser_on_random_fields(
        kind in proptest::sample::select(proto::client::COMMAND_TYPES),
        fields in proptest::collection::vec((proptest::sample::select(FIELDS), any_json()), 0..8),
    ) {
        let mut obj = serde_json::Map::new();
        for (k, v) in fields {
            obj.insert(k.to_string(), v);
        }
        obj.insert("type".into(), serde_json::Value::from(kind));
        let text = serde_json::Value::Object(obj).to_string();
        match decode(text.as_bytes()) {
            Ok(inb) => {
                prop_assert_eq!(inb.command.name(), kind);
                if let Some(room) = inb.command.room() {
                    prop_assert!(RoomId::new(room.as_str()).is_ok());
                }
                let again = decode(encode(&inb.command, inb.r#ref.as_ref()).as_bytes()).unwrap();
                prop_assert_eq!(again, inb);
            }
            Err(e) => {
                prop_assert!(
                    matches!(e.kind, DecodeErrorKind::BadField { .. } | DecodeErrorKind::BadRef),
                    "{:?}", e
                );
                if let DecodeErrorKind::BadField { kind: k, .. } = &e.kind {
                    prop_assert_eq!(k.as_str(), kind);
                }
            }
        }
    }
}

#[test]
fn event_kinds_name_the_serialized_type_and_parse_back() {
    use proto::EventKind;
    for k in EventKind::ALL {
        assert_eq!(EventKind::parse(k.as_str()), Some(k));
    }
    assert_eq!(EventKind::parse("warp"), None);
    let u = UserRef {
        id: "u".into(),
        name: "U".into(),
    };
    let events = [
        ServerEvent::Banned {
            seq: 0,
            room: room("a"),
            user: u.clone(),
            by: u.clone(),
            reason: None,
            until: None,
        },
        ServerEvent::Typing {
            room: room("a"),
            user: u.clone(),
        },
        ServerEvent::RoomUpdated {
            seq: 3,
            room: proto::rooms::RoomInfo {
                id: room("a"),
                name: "A".into(),
                topic: String::new(),
                visibility: Visibility::Public,
                max_members: None,
                members_can_pin: false,
                owner: None,
                created_at: Timestamp(0),
            },
        },
        ServerEvent::Pong { r#ref: None },
        ServerEvent::TokenExpiring {
            expires_at: Timestamp(0),
            expires_in_s: 60,
        },
    ];
    for ev in &events {
        let v: serde_json::Value = serde_json::from_slice(&ev.to_json()).unwrap();
        assert_eq!(v["type"], ev.kind().as_str());
    }
    assert_eq!(
        events[0].room(),
        Some(&room("a")),
        "a room event names its room"
    );
    assert_eq!(
        events[2].room(),
        Some(&room("a")),
        "room_updated carries the room as an object"
    );
    assert_eq!(events[3].room(), None);
    assert!(events[0].kind().changes_room_state() && !events[1].kind().changes_room_state());
}
