//! Start-up errors: one clear line and a non-zero exit.

use std::net::TcpListener;
use std::process::{Command, Output};

use crate::support::{Server, free_port};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_threadchat"))
        .args(args)
        .env_remove("THREADCHAT_REDIS")
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn an_unreachable_redis_is_one_clear_error() {
    let redis = format!("127.0.0.1:{}", free_port());
    Server::fails_on_redis(&redis, "cannot reach Redis at redis://127.0.0.1:");
    // Its password is not printed.
    let redis = format!("redis://:sekrit@127.0.0.1:{}", free_port());
    Server::fails_on_redis(&redis, "cannot reach Redis at redis://***@127.0.0.1:");
}

#[test]
fn a_port_in_use_is_one_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = run(&["--host", "127.0.0.1", "--port", &port, "--in-process"]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("cannot listen on 127.0.0.1:"), "{err}");
    assert_eq!(err.matches("in use").count(), 1, "said once: {err}");
}

/// A taken port says what to do: another port, with `--port`.
#[test]
fn a_port_in_use_suggests_another() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let output = run(&["--host", "127.0.0.1", "--port", &port, "--in-process"]);
    let err = stderr(&output);
    assert!(err.contains("choose another with --port"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

/// The start-up log says where to go next, with addresses that work as
/// printed: the web page, and a websocat command (the loopback address when
/// the server listens on every address).
#[test]
fn the_start_up_log_says_where_to_chat() {
    let server = Server::start(&["--in-process"]);
    let port = server.addr.port();
    let line = server.wait_for_log("in a browser");
    assert!(
        line.contains(&format!("open http://127.0.0.1:{port}/")),
        "{line}"
    );
    assert!(
        line.contains(&format!("websocat -E ws://127.0.0.1:{port}/chat/alice")),
        "{line}"
    );
    let (status, _) = server.get("/");
    assert!(status.contains("200"), "{status}");
}

/// Listening on every address (the default) with no token required, the
/// log says once that the chat is open to the network, and how to keep it
/// on this machine; on the loopback address it says nothing of the kind.
#[test]
fn an_open_chat_on_every_address_is_said_once() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_threadchat"))
        .args(["--host", "0.0.0.0", "--port", "0", "--in-process"])
        .env_remove("THREADCHAT_REDIS")
        .env_remove("THREADCHAT_AUTH_SECRET")
        .env_remove("THREADCHAT_AUTH_SECRET_FILE")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.contains("every address");
        log.push(line);
        if done || log.len() > 20 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let warning = log
        .iter()
        .find(|l| l.contains("every address"))
        .expect("said");
    assert!(warning.contains("without tokens"), "{warning}");
    assert!(warning.contains("--host 127.0.0.1"), "{warning}");
    assert!(warning.len() < 220, "{warning}");
    let server = Server::start(&["--in-process"]);
    server.wait_for_log("in a browser");
    assert_eq!(server.log_count("every address"), 0);
}

#[test]
fn bad_option_values_are_refused() {
    for args in [
        &["--port", "99999"][..],
        &["--port", "http"],
        &["--redis", "http://example"],
        &["--redis", "rediss://secure:6379"],
        &["--max-connections", "0"],
        &["--log-level", "loud"],
        &["--redis", "localhost", "--in-process"],
    ] {
        let output = run(args);
        assert!(!output.status.success(), "{args:?}");
        assert!(!stderr(&output).is_empty(), "{args:?}");
    }
}

/// Built without Sentinel and Cluster (`--no-default-features`), their
/// URLs are one clear error that names the feature to build with.
#[test]
#[cfg(not(feature = "redis-ha"))]
fn without_redis_ha_a_sentinel_or_cluster_url_names_the_feature() {
    for url in [
        "redis+sentinel://127.0.0.1:1/mymaster",
        "redis+cluster://127.0.0.1:1",
    ] {
        let output = run(&["--redis", url]);
        assert!(!output.status.success(), "{url}");
        let err = stderr(&output);
        assert!(err.contains("`redis-ha` feature"), "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
}

/// Built without tokens (`--no-default-features`), their flags and
/// `threadchat token` are unknown, as any other unknown argument is.
#[test]
#[cfg(not(feature = "tokens"))]
fn without_tokens_their_flags_and_command_are_unknown() {
    for (args, unknown) in [
        (
            &["--auth-secret-file", "secret"][..],
            "'--auth-secret-file'",
        ),
        (
            &["--max-connections-per-user", "3"],
            "'--max-connections-per-user'",
        ),
        (&["token", "alice"], "'token'"),
    ] {
        let output = run(args);
        assert!(!output.status.success(), "{args:?}");
        let err = stderr(&output);
        assert!(
            err.contains(&format!("unexpected argument {unknown}")),
            "{err}"
        );
    }
    let help = String::from_utf8_lossy(&run(&["--help"]).stdout).into_owned();
    assert!(!help.contains("--auth-"), "{help}");
}

#[test]
fn help_explains_every_option() {
    let output = run(&["--help"]);
    let help = String::from_utf8_lossy(&output.stdout);
    for option in [
        "--host",
        "--port",
        "--redis",
        "--log-level",
        "--log-file",
        "--max-connections",
        "--in-process",
    ] {
        assert!(help.contains(option), "{option} in --help");
    }
    assert!(
        help.contains("THREADCHAT_REDIS"),
        "environment fallbacks are shown"
    );
}

/// Without --redis: Redis on localhost:6379 if it answers, otherwise the
/// in-process broker, with one line saying so.
#[test]
fn without_redis_it_falls_back_to_in_process_or_uses_localhost() {
    let local_redis = std::net::TcpStream::connect("127.0.0.1:6379").is_ok();
    let server = Server::start(&[]);
    let line = server.wait_for_log("listening on");
    if local_redis {
        assert!(line.contains("Redis at redis://localhost:6379"), "{line}");
    } else {
        let note = server.wait_for_log("no Redis at localhost:6379");
        assert!(note.contains("--redis"), "{note}");
        assert!(line.contains("in-process"), "{line}");
        let mut a = server.client("a");
        let mut b = server.client("b");
        a.send("works without Redis");
        assert_eq!(b.recv_chat().1, "works without Redis");
    }
}

#[test]
fn the_log_file_gets_the_log_too() {
    let dir = std::env::temp_dir().join(format!("threadchat-log-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("chat.log");
    let server = Server::start(&["--in-process", "--log-file", path.to_str().unwrap()]);
    let alice = server.client("alice");
    alice.close();
    server.wait_for_log("alice left");
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(log.contains("alice joined"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}
