//! The documentation tells the truth about the options: every option
//! `threadchat --help` lists has a row in docs/OPERATIONS.md's options
//! table with the same environment variable and default, and every row
//! there is an option the server has. (The table lists the options of the
//! default build, so this runs with its features.)

use std::collections::BTreeMap;
use std::process::Command;

/// An option as `--help` or the table gives it: its environment variable
/// and its default, if any.
#[derive(Debug, PartialEq)]
struct Described {
    env: Option<String>,
    default: Option<String>,
}

/// The options `threadchat --help` lists (`--help` and `--version` aside).
fn from_help() -> BTreeMap<String, Described> {
    let output = Command::new(env!("CARGO_BIN_EXE_threadchat"))
        .arg("--help")
        .output()
        .expect("threadchat runs");
    let help = String::from_utf8(output.stdout).unwrap();
    let mut options = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed
            .strip_prefix("--")
            .filter(|_| line.starts_with("      --"))
        {
            let name = rest.split([' ', '=', '<']).next().unwrap().to_owned();
            current = Some(name.clone());
            options.insert(
                name,
                Described {
                    env: None,
                    default: None,
                },
            );
        } else if let Some(name) = &current {
            let entry = options.get_mut(name).unwrap();
            if let Some(env) = trimmed.strip_prefix("[env: ") {
                entry.env = Some(env.trim_end_matches(']').trim_end_matches('=').to_owned());
            } else if let Some(default) = trimmed.strip_prefix("[default: ") {
                entry.default = Some(default.trim_end_matches(']').to_owned());
            }
        }
    }
    options.remove("help");
    options.remove("version");
    options
}

/// The rows of docs/OPERATIONS.md's options table: option, env, and the
/// default cell as written (backticks removed).
fn from_table() -> BTreeMap<String, (Option<String>, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/OPERATIONS.md");
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .filter(|line| line.starts_with("| `--"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let bare = |cell: &str| cell.replace('`', "");
            let name = bare(cells[1]).trim_start_matches("--").to_owned();
            let env = Some(bare(cells[2])).filter(|env| !env.is_empty());
            (name, (env, bare(cells[3])))
        })
        .collect()
}

#[test]
fn the_options_table_matches_help() {
    let help = from_help();
    let table = from_table();
    assert!(help.len() > 20, "parsed --help: {help:?}");
    for (name, described) in &help {
        let Some((env, default)) = table.get(name) else {
            panic!("--{name} is in --help but not in OPERATIONS.md's options table");
        };
        assert_eq!(env, &described.env, "--{name}: env variable");
        if let Some(expected) = &described.default {
            assert!(
                default.contains(expected.as_str()),
                "--{name}: --help says the default is {expected}, OPERATIONS.md says {default}"
            );
        }
    }
    for name in table.keys() {
        assert!(
            help.contains_key(name),
            "--{name} is in OPERATIONS.md's options table but not in --help"
        );
    }
}
