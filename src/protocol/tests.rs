//! The protocol's unit tests, and property tests: hostile input never
//! panics.

use super::payload::summarize;
use super::*;

/// The chat text of a client's frame, which is the same on a server that
/// reads token frames as on one that does not.
fn message_text(frame: &str) -> String {
    let chat = |tokens| match ClientFrame::parse(frame, tokens) {
        ClientFrame::Chat(text) => text.into_owned(),
        other => panic!("{frame:?} is not chat: {other:?}"),
    };
    let text = chat(false);
    assert_eq!(chat(true), text, "{frame:?}");
    text
}

#[test]
fn what_a_client_frame_says() {
    assert_eq!(
        message_text(r#"{"nickname":"mallory","message":"hi"}"#),
        "hi"
    );
    assert_eq!(message_text("hello there\n"), "hello there");
    assert_eq!(message_text(r#"{"text":"hi"}"#), r#"{"text":"hi"}"#);
    assert_eq!(clean_message("two\r\nlines").unwrap(), "two\nlines");
    assert_eq!(
        clean_message("\x1b[2J"),
        Err(MessageError::ControlCharacter(0x1b))
    );
}

#[test]
fn nickname_is_percent_decoded() {
    assert_eq!(
        Nickname::from_path_segment("Joe%20Doe").unwrap().as_str(),
        "Joe Doe"
    );
    assert_eq!(
        Nickname::from_path_segment("%C3%A9lodie").unwrap().as_str(),
        "élodie"
    );
    assert_eq!(Nickname::from_path_segment("a+b").unwrap().as_str(), "a+b");
}

#[test]
fn nickname_rules() {
    use NameError::*;
    assert_eq!(Nickname::from_path_segment(""), Err(Empty));
    assert_eq!(Nickname::from_path_segment("%2"), Err(BadEscape));
    assert_eq!(Nickname::from_path_segment("%zz"), Err(BadEscape));
    assert_eq!(Nickname::from_path_segment("%FF"), Err(NotUtf8));
    assert_eq!(Nickname::from_path_segment("a%0Ab"), Err(ControlCharacter));
    assert_eq!(Nickname::from_path_segment("%20bob"), Err(OuterWhitespace));
    assert_eq!(Nickname::from_path_segment("bob%20"), Err(OuterWhitespace));
    assert_eq!(Nickname::parse(&"x".repeat(33)), Err(TooLong));
    assert!(Nickname::parse(&"é".repeat(32)).is_ok());
}

/// Names that would pass for the server's own lines of the text format,
/// or for the server, are refused — as typed and as read (look-alikes).
#[test]
fn nicknames_cannot_pass_for_the_server() {
    use NameError::*;
    for (name, refusal) in [
        ("server", Reserved),
        ("SERVER", Reserved),
        ("ｓｅｒｖｅｒ", Reserved),
        ("ѕerver", Reserved),        // Cyrillic ѕ
        ("ꜱᴇʀᴠᴇʀ", Reserved),        // small capitals
        ("SERVER\u{301}", Reserved), // shown as SERVEŔ
        ("SERVEŔ", Reserved),
        ("serveṙ", Reserved),
        ("! rate limit", ServerLine('!')),
        ("* in lobby", ServerLine('*')),
        ("*bob", ServerLine('*')),
        ("[history] bob", ServerLine('[')),
        ("＊ in lobby", ServerLine('＊')), // full-width asterisk
        ("∗ in lobby", ServerLine('∗')),   // asterisk operator
        ("！ error", ServerLine('！')),
        ("✱ bob", ServerLine('✱')),
        ("❗ x", ServerLine('❗')),
        ("⁅history⁆", ServerLine('⁅')),
        ("〔history〕", ServerLine('〔')),
        ("⟦x⟧", ServerLine('⟦')),
        ("❲x", ServerLine('❲')),
        ("ǃ x", ServerLine('ǃ')), // a letter (click) that reads as `!`
        ("_bob", ServerLine('_')),
        ("😀 x", ServerLine('😀')),
        ("bob: hi", Separator),
        ("bob：hi", Separator), // full-width colon, then no space: NFKC's
    ] {
        let got = Nickname::parse(name);
        if name == "bob：hi" {
            assert!(got.is_ok(), "{name}: {got:?}");
            continue;
        }
        assert_eq!(got, Err(refusal), "{name}");
    }
    for fine in [
        "bob!",
        "a*b",
        "x[1]",
        "servers",
        "the server",
        "joe: ",
        "a:b",
        "élodie",
        "Élodie",
        "田中",
        "Алиса",
        "7of9",
        "ａｌｉｃｅ",
        "bob😀",
    ] {
        let got = Nickname::parse(fine.trim());
        assert!(got.is_ok(), "{fine}: {got:?}");
    }
}

/// The ASCII shortcut of `forges_a_line` holds: read as people read it
/// (either reading), an ASCII character reads as a server line's lead or
/// a `:` exactly when it is one, and as letters of `server` only when it
/// is one of them, so an ASCII name forges a line exactly when it does as
/// typed.
#[test]
fn ascii_reads_as_itself_where_it_matters() {
    for c in (0x20u8..0x7f).map(char::from) {
        for read in readings(&c.to_string()) {
            let lead_or_separator = SERVER_LINE_LEADS.contains(&c) || c == ':';
            assert_eq!(
                read.chars()
                    .any(|r| SERVER_LINE_LEADS.contains(&r) || r == ':'),
                lead_or_separator,
                "{c:?} reads as {read:?}"
            );
            let reads_as_server_letters =
                !read.is_empty() && read.chars().all(|r| "server".contains(r));
            assert_eq!(
                reads_as_server_letters,
                "server".contains(c.to_ascii_lowercase()),
                "{c:?} reads as {read:?}"
            );
        }
    }
    for c in "server".chars() {
        assert_eq!(readings(&c.to_string()), [c.to_string()]);
    }
}

/// Whether two names read the same: they share one of their readings.
fn read_alike(a: &str, b: &str) -> bool {
    let b = readings(b);
    readings(a).iter().any(|reading| b.contains(reading))
}

/// Names that read the same share a reading; names that do not, not.
#[test]
fn look_alikes_share_a_reading() {
    for same in [
        "Alice",
        "ALICE",
        "aIice", // capital I for the l
        "ALİCE", // dotted capital I
        "ᴀʟɪᴄᴇ", // small capitals
        "аlice", // Cyrillic а
        "ａｌｉｃｅ",
    ] {
        assert!(read_alike(same, "alice"), "{same}: {:?}", readings(same));
    }
    for same in ["IVAN", "ivan", "Ivan", "lvan"] {
        assert!(read_alike(same, "Ivan"), "{same}");
    }
    assert!(read_alike("b0b", "BOB"));
    assert!(read_alike("straße", "STRASSE"));
    assert!(!read_alike("alice", "alicia"));
    assert!(!read_alike("bob", "rob"));
    assert!(!read_alike("ivan", "lvan"), "a dot tells i from l");
    assert!(!read_alike("élodie", "elodie"));
}

/// Latin beside Cyrillic or Greek in one name mixes scripts; one script,
/// or Latin beside Han and Kana (as Japanese names are), does not.
#[test]
fn mixed_scripts_are_detected() {
    for mixed in ["аlice", "pаypal", "Ωmega-x", "bob日本語ру"] {
        assert!(mixes_scripts(mixed), "{mixed}");
    }
    for single in [
        "alice",
        "Élodie",
        "алиса",
        "Ωμέγα",
        "田中さん",
        "Tanaka 田中",
        "bob_2 (x)",
    ] {
        assert!(!mixes_scripts(single), "{single}");
    }
}

#[test]
fn client_json_message_is_unwrapped() {
    assert_eq!(
        message_text(r#"{"nickname": "alice", "message": "hi"}"#),
        "hi"
    );
    assert_eq!(message_text(r#"  {"message": ""}"#), "");
}

#[test]
fn one_line_ending_is_removed() {
    assert_eq!(message_text("hi\n"), "hi");
    assert_eq!(message_text("hi\r\n"), "hi");
    assert_eq!(message_text("hi\n\n"), "hi\n");
    assert_eq!(message_text("  indented  \n"), "  indented  ");
    assert_eq!(message_text("{\"message\": \"x\"}\n"), "x");
}

#[test]
fn anything_else_is_the_text_itself() {
    for text in [
        "hello",
        "",
        "{not json",
        r#"{"message": 5}"#,
        r#"["message"]"#,
        "42",
        r#""quoted""#,
    ] {
        assert_eq!(message_text(text), text);
    }
}

#[test]
fn chat_message_round_trips() {
    let nick = Nickname::parse("alice").unwrap();
    let conn = ConnId::new(0xabc, 7);
    let msg = ChatMessage::new(&nick, &conn, 1, "hi \"there\"".into());
    let back = ChatMessage::from_payload(&msg.to_payload()).unwrap();
    assert_eq!(back, msg);
    assert!(back.is_from(&conn));
    assert!(!back.is_from(&ConnId::new(0xabc, 8)));
    assert_eq!(conn.as_str(), "0000000000000abc-7");
}

#[test]
fn original_app_payloads_are_chat_messages() {
    let msg = ChatMessage::from_payload(br#"{"nickname": "bob", "message": "yo"}"#).unwrap();
    assert_eq!(msg.nickname, "bob");
    assert_eq!(msg.message, "yo");
    assert_eq!(msg.conn, None);
    assert!(!msg.is_from(&ConnId::new(1, 1)));
}

#[test]
fn events_and_unknown_types() {
    let nick = Nickname::parse("carol").unwrap();
    let join = ChatMessage::event(Kind::Join, &nick, &ConnId::new(1, 2), "joined");
    let payload = String::from_utf8(join.to_payload()).unwrap();
    assert!(payload.contains(r#""type":"join""#), "{payload}");
    assert_eq!(
        ServerFrame::from_event(&join, Replay::Live).to_text(),
        "* carol joined"
    );
    assert!(matches!(
        ChatMessage::from_payload(br#"{"type":"poll","nickname":"x","message":"y"}"#),
        Err(PayloadError::UnknownType)
    ));
}

#[test]
fn rooms_have_their_own_channels() {
    assert_eq!(Room::global().channel(), "global_room");
    assert_eq!(Room::parse("global_room").unwrap(), Room::global());
    assert_eq!(
        Room::parse("lobby").unwrap().channel(),
        "threadchat:room:lobby"
    );
    assert!(Room::parse(" lobby").is_err());
    assert_eq!(percent_decode("a+b%20c").unwrap(), "a+b c");
    let query = "format=text&room=a+b%20c";
    assert_eq!(
        query_value(query, "room").unwrap().as_deref(),
        Some("a b c")
    );
    assert_eq!(query_value(query, "limit").unwrap(), None);
    assert_eq!(query_value("room=%zz", "room"), Err(NameError::BadEscape));
    assert_eq!(query_value("room=%FF", "room"), Err(NameError::NotUtf8));
}

#[test]
fn text_rendering() {
    let members = vec!["alice".to_owned(), "bob".to_owned()];
    let presence = ServerFrame::Presence {
        nickname: SERVER_NICKNAME,
        message: "in lobby: alice, bob",
        room: "lobby",
        members: &members,
        count: 2,
        offset: None,
        epoch: None,
    };
    assert_eq!(presence.to_text(), "* in lobby: alice, bob");
    assert_eq!(ServerFrame::error("no").to_text(), "! no");
    let json: serde_json::Value = serde_json::from_str(&presence.to_json()).unwrap();
    assert_eq!(json["members"], serde_json::json!(["alice", "bob"]));
}

#[test]
fn junk_payloads_are_errors() {
    for junk in [
        &b"junk"[..],
        b"",
        b"{}",
        br#"{"nickname": "bob"}"#,
        br#"{"nickname": 1, "message": "x"}"#,
        br#"[1,2]"#,
        b"\xff\xfe",
        // Nicknames no client could take.
        br#"{"nickname": "server", "message": "x"}"#,
        br#"{"nickname": "Server", "message": "x"}"#,
        br#"{"nickname": "! rate limit", "message": "x"}"#,
        br#"{"nickname": "* in lobby", "message": "x"}"#,
        br#"{"nickname": "[history] bob", "message": "x"}"#,
        br#"{"nickname": "bob: hi", "message": "x"}"#,
        br#"{"type": "join", "nickname": "* alice", "message": "joined"}"#,
        br#"{"type": "join", "nickname": "server and 2 others", "message": "joined", "count": 3}"#,
        br#"{"type": "join", "nickname": "server and 2 others", "message": "joined", "count": 3, "nicknames": ["server", "a", "b"]}"#,
        br#"{"type": "join", "nickname": "* x and 2 others", "message": "joined", "count": 3, "nicknames": ["ann", "a", "b"]}"#,
        br#"{"nickname": "abcdefghijklmnopqrstuvwxyzabcdefg", "message": "too long"}"#,
    ] {
        assert!(ChatMessage::from_payload(junk).is_err(), "{junk:?}");
    }
    // A coalesced join's summary may be longer than a nickname.
    let summary = br#"{"type": "join", "nickname": "abcdefghijklmnopqrstuvwxyzabcdef, abcdefghijklmnopqrstuvwxyzabcdef and 9 others", "message": "joined", "count": 11, "nicknames": ["abcdefghijklmnopqrstuvwxyzabcdef"]}"#;
    assert!(ChatMessage::from_payload(summary).is_ok());
}

#[test]
fn coalesced_joins_summarise_and_list_everyone() {
    let names: Vec<Nickname> = ["ann", "bea", "cy", "dan"]
        .iter()
        .map(|n| Nickname::parse(n).unwrap())
        .collect();
    let names: Vec<String> = names.iter().map(|n| n.as_str().to_owned()).collect();
    let event = ChatMessage::group_event(Kind::Join, names, &ConnId::new(7, 0));
    assert_eq!(event.nickname, "ann, bea and 2 others");
    assert_eq!(event.message, "joined");
    assert_eq!(event.id.as_deref(), Some("0000000000000007-0:join"));
    assert!(!event.is_from(&ConnId::new(7, 0)));
    let frame = ServerFrame::from_event(&event, Replay::Live);
    assert_eq!(frame.to_text(), "* ann, bea and 2 others joined");
    let json: serde_json::Value = serde_json::from_str(&frame.to_json()).unwrap();
    assert_eq!(
        json["nicknames"],
        serde_json::json!(["ann", "bea", "cy", "dan"])
    );
    assert_eq!(json["count"], 4);
    // A payload round trip keeps the lists.
    let back = ChatMessage::from_payload(&event.to_payload()).unwrap();
    assert_eq!(back, event);
    assert_eq!(summarize(&["a".into(), "b".into()]), "a and b");
}

#[test]
fn a_storm_of_joins_lists_some_and_counts_all() {
    let names: Vec<String> = (0..30).map(|i| format!("n{i}")).collect();
    let event = ChatMessage::group_event(Kind::Join, names, &ConnId::new(7, 0));
    assert_eq!(event.nickname, "n0, n1 and 28 others");
    assert_eq!(event.nicknames.len(), GROUP_LIST);
    assert_eq!(event.count, Some(30));
    let json: serde_json::Value =
        serde_json::from_str(&ServerFrame::from_event(&event, Replay::Live).to_json()).unwrap();
    assert_eq!(json["count"], 30);
    assert_eq!(json["nicknames"].as_array().unwrap().len(), GROUP_LIST);
}

#[test]
fn server_frames_keep_nickname_and_message() {
    let msg = ChatMessage {
        kind: Kind::Chat,
        nickname: "bob".into(),
        message: "<b>hi</b>".into(),
        conn: Some("x".into()),
        id: Some("x:1".into()),
        ts: Some(5),
        nicknames: Vec::new(),
        count: None,
        offset: None,
        tag: None,
        epoch: None,
    };
    let json: serde_json::Value =
        serde_json::from_str(&ServerFrame::from_event(&msg, Replay::Live).to_json()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"type": "chat", "nickname": "bob", "message": "<b>hi</b>", "ts": 5})
    );
    let err = ServerFrame::error("nope");
    let json: serde_json::Value = serde_json::from_str(&err.to_json()).unwrap();
    assert_eq!(json["type"], "error");
    assert_eq!(json["nickname"], "server");
}

/// Hostile input never panics: arbitrary input gives a value or an error.
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn client_frames_never_panic(frame in any::<String>()) {
            let _ = ClientFrame::parse(&frame, false);
            let _ = ClientFrame::parse(&frame, true);
        }

        #[test]
        fn client_json_frames_never_panic(message in any::<String>(), extra in any::<String>()) {
            let frame = serde_json::json!({"message": message, "nickname": extra}).to_string();
            prop_assert_eq!(message_text(&frame), message);
        }

        #[test]
        fn redis_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ChatMessage::from_payload(&payload);
        }

        #[test]
        fn json_like_payloads_never_panic(payload in r#"\{("[a-z]{0,8}": ?("[^"]{0,8}"|[0-9]{1,5}|null|\[\]),? ?){0,4}\}"#) {
            let _ = ChatMessage::from_payload(payload.as_bytes());
        }

        #[test]
        fn path_segments_never_panic(segment in any::<String>()) {
            let _ = Nickname::from_path_segment(&segment);
        }

        #[test]
        fn percent_escapes_never_panic(segment in "(%[0-9a-fA-FzZ]{0,2}|[a-z ]){0,40}") {
            if let Ok(nickname) = Nickname::from_path_segment(&segment) {
                prop_assert!(Nickname::parse(nickname.as_str()).is_ok());
            }
        }

        #[test]
        fn summaries_of_valid_names_are_valid(names in proptest::collection::vec("[^\\p{Cc}]{1,32}", 1..6)) {
            let names: Vec<String> = names.into_iter().filter(|n| Nickname::check(n).is_ok()).collect();
            if !names.is_empty() {
                let event = ChatMessage::group_event(Kind::Join, names, &ConnId::new(7, 7));
                prop_assert!(ChatMessage::from_payload(&event.to_payload()).is_ok(), "{}", event.nickname);
            }
        }

        #[test]
        fn chat_messages_round_trip(nickname in "[^\\p{Cc}]{1,32}", message in any::<String>()) {
            if let Ok(nickname) = Nickname::parse(&nickname) {
                let msg = ChatMessage::new(&nickname, &ConnId::new(7, 7), 1, message);
                prop_assert_eq!(ChatMessage::from_payload(&msg.to_payload()).unwrap(), msg);
            }
        }
    }
}

#[test]
fn a_place_is_written_in_front_and_read_back() {
    let nick = Nickname::parse("ann").unwrap();
    let msg = ChatMessage::new(&nick, &ConnId::new(1, 2), 3, "hi".into());
    let placed = with_place(&msg.to_payload(), 42, "e0e0");
    assert!(placed.starts_with(br#"{"offset":42,"epoch":"e0e0","#));
    let back = ChatMessage::from_payload(&placed).unwrap();
    assert_eq!(
        back.at(),
        Some(At {
            offset: 42,
            epoch: "e0e0"
        })
    );
    let json: serde_json::Value =
        serde_json::from_str(&ServerFrame::from_event(&back, Replay::Recovered).to_json()).unwrap();
    assert_eq!(
        (json["offset"].clone(), json["epoch"].clone()),
        (42.into(), "e0e0".into())
    );
    assert_eq!(json["recovered"], true);
    assert_eq!(
        ServerFrame::from_event(&back, Replay::Recovered).to_text(),
        "[recovered] ann: hi"
    );
}

#[test]
fn join_and_leave_frames_keep_their_json_and_text() {
    let payload = |kind: &str| {
        format!(
            r#"{{"type":"{kind}","nickname":"ann and bea","message":"{kind}s","ts":5,"nicknames":["ann","bea"],"count":2,"offset":7,"epoch":"e1"}}"#
        )
    };
    for kind in ["join", "leave"] {
        let event = ChatMessage::from_payload(payload(kind).as_bytes()).unwrap();
        let frame = ServerFrame::from_event(&event, Replay::Recovered);
        assert_eq!(
            frame.to_json(),
            format!(
                r#"{{"type":"{kind}","nickname":"ann and bea","message":"{kind}s","ts":5,"nicknames":["ann","bea"],"count":2,"offset":7,"epoch":"e1","recovered":true}}"#
            )
        );
        assert_eq!(
            frame.to_text(),
            format!("[recovered] * ann and bea {kind}s")
        );
        let live = ServerFrame::from_event(&event, Replay::Live);
        assert_eq!(live.to_text(), format!("* ann and bea {kind}s"));
        let bare = ChatMessage::from_payload(
            format!(r#"{{"type":"{kind}","nickname":"cy","message":"m"}}"#).as_bytes(),
        )
        .unwrap();
        assert_eq!(
            ServerFrame::from_event(&bare, Replay::Live).to_json(),
            format!(r#"{{"type":"{kind}","nickname":"cy","message":"m"}}"#)
        );
    }
}

#[test]
fn a_token_frame_refreshes_only_where_tokens_are_read() {
    let refresh = |frame: &str| ClientFrame::TokenRefresh(frame.into());
    let chat = |text: &'static str| ClientFrame::Chat(text.into());
    for (frame, with_tokens, without) in [
        (
            r#"{"type":"token","token":"t1"}"#,
            refresh("t1"),
            chat(r#"{"type":"token","token":"t1"}"#),
        ),
        // A token frame's "message" says nothing where tokens are read.
        (
            r#"{"type":"token","token":"t1","message":"hi"}"#,
            refresh("t1"),
            chat("hi"),
        ),
        (
            "{\"type\":\"token\",\"token\":\"t1\"}\r\n",
            refresh("t1"),
            chat(r#"{"type":"token","token":"t1"}"#),
        ),
        // Not a token frame: the type, the token's type, a field said twice.
        (
            r#"{"type":"chat","token":"t1","message":"hi"}"#,
            chat("hi"),
            chat("hi"),
        ),
        (
            r#"{"type":"token","token":5}"#,
            chat(r#"{"type":"token","token":5}"#),
            chat(r#"{"type":"token","token":5}"#),
        ),
        (
            r#"{"type":"token","type":"token","token":"t1","message":"hi"}"#,
            chat("hi"),
            chat("hi"),
        ),
        // A message said twice, or not as a string, is no message.
        (
            r#"{"message":"a","message":"b"}"#,
            chat(r#"{"message":"a","message":"b"}"#),
            chat(r#"{"message":"a","message":"b"}"#),
        ),
        (
            r#"{"type":"token","token":"t1","message":"a","message":"b"}"#,
            refresh("t1"),
            chat(r#"{"type":"token","token":"t1","message":"a","message":"b"}"#),
        ),
        (
            r#"{"message":"hi","token":[1,{"a":2}],"type":null}"#,
            chat("hi"),
            chat("hi"),
        ),
    ] {
        assert_eq!(ClientFrame::parse(frame, true), with_tokens, "{frame}");
        assert_eq!(ClientFrame::parse(frame, false), without, "{frame}");
    }
}
