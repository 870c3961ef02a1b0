//! The documentation tells the truth: every option `threadchat --help`
//! lists has a row in docs/OPERATIONS.md's options table with the same
//! environment variable and default, and every row there is an option the
//! server has; every relative link resolves; and `make recipes`
//! (scripts/recipes.sh) runs exactly the commands of the README's "Try it"
//! and OPERATIONS' recipes. (The table and the recipes are the default
//! build's, so this runs with its features.)

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

/// A heading's anchor as GitHub makes it: lower case; letters, digits,
/// spaces, `-` and `_` kept, the rest dropped; spaces become `-`.
fn anchor_of(heading: &str) -> String {
    let mut text = heading.trim().to_lowercase();
    // A link in a heading counts by its text.
    while let (Some(open), Some(mid)) = (text.find('['), text.find("](")) {
        let Some(close) = text[mid..].find(')') else {
            break;
        };
        if open > mid {
            break;
        }
        text = format!(
            "{}{}{}",
            &text[..open],
            &text[open + 1..mid],
            &text[mid + close + 1..]
        );
    }
    text.chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The lines of a Markdown file outside code fences.
fn prose(text: &str) -> impl Iterator<Item = &str> {
    let mut fenced = false;
    text.lines().filter(move |line| {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            return false;
        }
        !fenced
    })
}

/// The anchors of a Markdown file's headings (a repeated one gets `-1`, …).
fn anchors(text: &str) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    prose(text)
        .filter_map(|line| {
            let hashes = line.chars().take_while(|c| *c == '#').count();
            let heading = line
                .get(hashes..)?
                .strip_prefix(' ')
                .filter(|_| hashes > 0)?;
            let anchor = anchor_of(heading.trim_end_matches('#'));
            let n = seen.entry(anchor.clone()).or_default();
            *n += 1;
            Some(if *n == 1 {
                anchor
            } else {
                format!("{anchor}-{}", *n - 1)
            })
        })
        .collect()
}

/// The targets of a line's links (`[text](target)`), outside inline code.
fn link_targets(line: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let outside_code: String = line
        .split('`')
        .enumerate()
        .map(|(i, part)| if i % 2 == 0 { part } else { "" })
        .collect();
    let mut rest = outside_code.as_str();
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            targets.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
    }
    targets
}

/// Every relative link in the README and the docs points at a file that
/// exists, and every anchor at a heading that does.
#[test]
fn every_relative_link_and_anchor_resolves() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for target in prose(&text).flat_map(link_targets) {
            let target = target.split_whitespace().next().unwrap_or("").to_owned();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let linked = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            if !linked.exists() {
                broken.push(format!("{}: {target} (no such file)", file.display()));
                continue;
            }
            if !anchor.is_empty() {
                let linked_text = std::fs::read_to_string(&linked).unwrap_or_default();
                if !anchors(&linked_text).iter().any(|a| a == anchor) {
                    broken.push(format!("{}: {target} (no such heading)", file.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The lines of the ```` ```sh ```` blocks in the section of `text` under
/// `heading` (up to the next heading of its level or above), trimmed,
/// without blank lines and comments: the commands a reader copies.
fn commands_under(text: &str, heading: &str) -> Vec<String> {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let mut lines = text.lines().skip_while(|line| *line != heading).skip(1);
    let mut commands = Vec::new();
    let mut in_sh = false;
    for line in lines.by_ref() {
        if !in_sh {
            let hashes = line.chars().take_while(|c| *c == '#').count();
            if hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
                break;
            }
        }
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            in_sh = !in_sh && trimmed == "```sh";
            continue;
        }
        if in_sh && !trimmed.is_empty() && !trimmed.starts_with('#') {
            commands.push(trimmed.to_owned());
        }
    }
    commands
}

/// The docs' lines that `recipe_NAME` in scripts/recipes.sh runs, in its
/// order: every line but blanks, comments and its own checks (`expect_…`,
/// `given_…`), with the helper that gives a command a terminal of its own
/// (`terminal NAME`) or leaves it running (`background`) taken off.
fn script_runs(script: &str, name: &str) -> Vec<String> {
    let start = format!("recipe_{name}() {{");
    let mut body = script.lines().skip_while(|line| *line != start).skip(1);
    let mut commands = Vec::new();
    for line in body.by_ref().take_while(|line| *line != "}") {
        let trimmed = line.trim();
        if trimmed.is_empty()
            || trimmed.starts_with('#')
            || trimmed.starts_with("expect_")
            || trimmed.starts_with("given_")
        {
            continue;
        }
        let command = if let Some(rest) = trimmed.strip_prefix("terminal ") {
            rest.split_once(' ').expect("terminal NAME COMMAND").1
        } else {
            trimmed.strip_prefix("background ").unwrap_or(trimmed)
        };
        commands.push(command.to_owned());
    }
    assert!(
        !commands.is_empty(),
        "scripts/recipes.sh has no recipe_{name}"
    );
    commands
}

/// `make recipes` (scripts/recipes.sh) runs exactly the commands of the
/// README's "Try it" (over ws:// and over wss://) and of OPERATIONS.md's Tokens, Sentinel and Cluster
/// recipes, in their order, so that docs and script cannot drift apart.
/// (`make test` is left to CI, which runs it anyway.)
#[test]
fn the_recipes_script_runs_the_docs_commands() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let script = read("scripts/recipes.sh");
    let readme = read("README.md");
    let operations = read("docs/OPERATIONS.md");

    let mut try_it = commands_under(&readme, "## Try it");
    try_it.retain(|command| !command.starts_with("make test"));
    // "Try it" over TLS is a recipe of its own: a certificate, a server on
    // another port, and clients that speak wss://.
    let (wss, try_it): (Vec<String>, Vec<String>) = try_it.into_iter().partition(|command| {
        command.starts_with("openssl")
            || command.contains("--tls-cert")
            || command.contains("wss://")
    });
    // "Try it" also starts the example, with the Redis it needs; the
    // example is chatted with as the server is, from two terminals.
    let (mut with_example, try_it): (Vec<String>, Vec<String>) = try_it
        .into_iter()
        .partition(|command| command.starts_with("redis-server") || command.contains("--example"));
    assert!(
        with_example
            .iter()
            .any(|c| c.starts_with("cargo run --example minimal")),
        "README's Try it runs the example"
    );
    with_example.extend(
        try_it
            .iter()
            .filter(|command| command.starts_with("websocat") && !command.contains('?'))
            .cloned(),
    );
    let recipes = [
        ("try_it", try_it),
        ("wss", wss),
        ("example", with_example),
        ("tokens", commands_under(&operations, "## Tokens")),
        ("sentinel", commands_under(&operations, "## Sentinel")),
        ("cluster", commands_under(&operations, "## Cluster")),
    ];
    for (name, documented) in recipes {
        assert!(!documented.is_empty(), "no commands documented for {name}");
        assert_eq!(
            script_runs(&script, name),
            documented,
            "recipe_{name} in scripts/recipes.sh and its docs differ"
        );
    }
}
