//! Chatting, as a user sees it. Every test here runs five times: relayed
//! through a real Redis (per-client and shared subscriptions, each also
//! over `wss://`), and through the in-process broker.

use std::time::Duration;

use tungstenite::Message;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::support::{Client, Closed, Redis, Server, with_both_brokers};

with_both_brokers!(tls:
    everyone_else_receives_and_the_sender_does_not,
    typed_lines_arrive_as_typed,
    the_server_stamps_the_nickname,
    other_json_is_just_text,
    twins_with_one_nickname_hear_each_other,
    nicknames_are_percent_decoded,
    pings_get_pongs_without_corrupting_chat_frames => ["--rate-limit", "0"],
    binary_frames_close_only_that_connection,
    invalid_utf8_closes_only_that_connection,
    oversized_messages_close_only_that_connection,
);

/// A message reaches every other client; its sender gets no echo (the next
/// thing the sender hears is someone else's later message).
fn everyone_else_receives_and_the_sender_does_not(server: &Server) {
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    let mut carol = server.client("carol");

    alice.send("hello everyone");
    assert_eq!(bob.recv_chat(), ("alice".into(), "hello everyone".into()));
    assert_eq!(carol.recv_chat(), ("alice".into(), "hello everyone".into()));

    bob.send("hi alice");
    assert_eq!(alice.recv_chat(), ("bob".into(), "hi alice".into()));
    assert_eq!(carol.recv_chat(), ("bob".into(), "hi alice".into()));
    bob.expect_nothing(Duration::from_millis(200));
}

/// websocat sends each typed line with its newline; the others see the line
/// as typed, wrapped in a JSON chat frame with a timestamp.
fn typed_lines_arrive_as_typed(server: &Server) {
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    bob.send("  spaced   out  \n");
    let frame = alice.recv_live();
    assert_eq!(frame["type"], "chat");
    assert_eq!(frame["nickname"], "bob");
    assert_eq!(frame["message"], "  spaced   out  ");
    assert!(frame["ts"].as_u64().unwrap() > 1_600_000_000_000);
    // Characters JSON must escape survive the trip.
    bob.send("quote \" backslash \\ tab \t <b>é</b> 🎉");
    assert_eq!(
        alice.recv_chat().1,
        "quote \" backslash \\ tab \t <b>é</b> 🎉"
    );
}

/// A client of the original app sends `{"nickname", "message"}`; the message
/// is unwrapped, and the nickname is the connection's own, whatever it claims.
fn the_server_stamps_the_nickname(server: &Server) {
    let mut mallory = server.client("mallory");
    let mut bob = server.client("bob");
    mallory.send(r#"{"nickname": "bob", "message": "trust me"}"#);
    assert_eq!(bob.recv_chat(), ("mallory".into(), "trust me".into()));
}

/// JSON without a string "message" is not interpreted: it is the text.
fn other_json_is_just_text(server: &Server) {
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    for text in [r#"{"text": "hi"}"#, r#"{"message": 42}"#, "[1, 2]", "{oops"] {
        alice.send(text);
        assert_eq!(bob.recv_chat(), ("alice".into(), text.into()));
    }
}

/// Echo suppression is per connection, not per nickname.
fn twins_with_one_nickname_hear_each_other(server: &Server) {
    let mut carol1 = server.client("carol");
    let mut carol2 = server.client("carol");
    carol1.send("am I alone?");
    assert_eq!(carol2.recv_chat(), ("carol".into(), "am I alone?".into()));
    carol2.send("no");
    assert_eq!(carol1.recv_chat(), ("carol".into(), "no".into()));
}

fn nicknames_are_percent_decoded(server: &Server) {
    let mut joe = server.client("Joe%20Doe");
    let mut ana = server.client("%C3%81na");
    joe.send("hi");
    assert_eq!(ana.recv_chat(), ("Joe Doe".into(), "hi".into()));
    ana.send("olá");
    assert_eq!(joe.recv_chat(), ("Ána".into(), "olá".into()));
}

/// Pongs are written by the reader thread while the subscriber thread writes
/// chat frames to the same socket. With one writer, every frame arrives whole.
fn pings_get_pongs_without_corrupting_chat_frames(server: &Server) {
    const N: usize = 300;
    let mut pinger = server.client("pinger");
    let mut talker = server.client("talker");
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            talker.send(&format!("message {i} {}", "x".repeat(i % 50)));
        }
        talker
    });
    for i in 0..N {
        pinger.send_message(Message::Ping(format!("ping {i}").into_bytes().into()));
    }
    let (mut pongs, mut chats) = (0, 0);
    while pongs < N || chats < N {
        match pinger.ws.read().expect("every frame is well formed") {
            Message::Pong(data) => {
                assert_eq!(data, format!("ping {pongs}").as_bytes());
                pongs += 1;
            }
            Message::Text(text) => {
                let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                if frame["type"] != "chat" {
                    continue; // talker joining, the member list
                }
                assert_eq!(
                    frame["message"],
                    format!("message {chats} {}", "x".repeat(chats % 50))
                );
                chats += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    sender.join().unwrap();
}

fn binary_frames_close_only_that_connection(server: &Server) {
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    let mut bad = server.client("bad");
    bad.send_message(Message::Binary(vec![1, 2, 3].into()));
    match bad.recv_close() {
        Closed::Frame(code, reason) => {
            assert_eq!(code, 1003);
            assert!(reason.contains("binary"), "{reason}");
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    still_chatting(&mut alice, &mut bob);
}

fn invalid_utf8_closes_only_that_connection(server: &Server) {
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    let mut bad = server.client("bad");
    let frame = Frame::message(vec![b'h', 0xff, 0xfe], OpCode::Data(Data::Text), true);
    bad.send_message(Message::Frame(frame));
    assert!(matches!(bad.recv_close(), Closed::Frame(1007, _)));
    still_chatting(&mut alice, &mut bob);
}

fn oversized_messages_close_only_that_connection(server: &Server) {
    let mut alice = server.client("alice");
    let mut bob = server.client("bob");
    let mut big = server.client("big");
    big.send(&"x".repeat(64 * 1024 + 1));
    assert!(matches!(big.recv_close(), Closed::Frame(1009, _)));
    still_chatting(&mut alice, &mut bob);
    // Exactly at the limit is fine.
    alice.send(&"y".repeat(64 * 1024));
    assert_eq!(bob.recv_chat().1.len(), 64 * 1024);
}

fn still_chatting(alice: &mut Client, bob: &mut Client) {
    alice.send("still here?");
    assert_eq!(bob.recv_chat(), ("alice".into(), "still here?".into()));
}

/// Messages sent by one client arrive at every other client in the order
/// they were sent, also while several clients send at once.
#[test]
fn each_senders_order_is_kept() {
    let redis = Redis::start();
    let server = Server::start(&["--redis", &redis.url(), "--rate-limit", "0"]);
    let mut reader = server.client("reader");
    let senders: Vec<_> = (0..4)
        .map(|s| {
            let mut client = server.client(&format!("sender{s}"));
            std::thread::spawn(move || {
                for i in 0..200 {
                    client.send(&i.to_string());
                }
                client
            })
        })
        .collect();
    let mut next = [0u32; 4];
    for _ in 0..800 {
        let (nickname, message) = reader.recv_chat();
        let s: usize = nickname.trim_start_matches("sender").parse().unwrap();
        assert_eq!(message, next[s].to_string(), "order of {nickname}");
        next[s] += 1;
    }
    for sender in senders {
        sender.join().unwrap();
    }
}
