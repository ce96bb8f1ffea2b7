//! The README as a user copies it: every path in its code resolves in a crate
//! that depends on `minibatch` (`minibatch::...`, never a member crate's
//! `minibatch_optim::...`), its training script is the prelude's doc test
//! (so it compiles), and its `[dependencies]` block pins the candle the
//! workspace builds with.

use std::path::Path;

fn read(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// The fenced code blocks of a markdown text: (info string, body).
fn fenced_blocks(md: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(String, String)> = None;
    for line in md.lines() {
        let t = line.trim_start();
        if let Some(info) = t.strip_prefix("```") {
            match cur.take() {
                Some(block) => out.push(block),
                None => cur = Some((info.trim().to_string(), String::new())),
            }
        } else if let Some((_, body)) = cur.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    assert!(cur.is_none(), "an unclosed code block");
    out
}

/// The inline code spans (`...`) of the prose outside fenced blocks.
fn inline_spans(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        let parts: Vec<&str> = line.split('`').collect();
        out.extend(parts.iter().skip(1).step_by(2).map(|s| s.to_string()));
    }
    out
}

/// Paths a user of the `minibatch` package cannot write: a member crate
/// named directly (`minibatch_optim::Sgd`, `use minibatch_train::{..}`).
fn member_crate_paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(i) = code[from..].find("minibatch_") {
        let start = from + i;
        let ident_before = start > 0 && {
            let c = bytes[start - 1];
            c.is_ascii_alphanumeric() || c == b'_'
        };
        let end = start
            + code[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(code.len() - start);
        if !ident_before && code[end..].starts_with("::") {
            found.push(code[start..end + 2].to_string());
        }
        from = end;
    }
    found
}

#[test]
fn the_path_check_finds_member_crate_paths() {
    assert_eq!(
        member_crate_paths(
            "use minibatch_optim::{Sgd};\nlet t = minibatch_train::Trainer::builder"
        ),
        ["minibatch_optim::", "minibatch_train::"]
    );
    assert!(member_crate_paths("use minibatch::optim::Sgd; // minibatch-optim crate").is_empty());
    assert!(member_crate_paths("my_minibatch_x::y").is_empty());
    let md = "a `minibatch_nn::ops` b\n```rust\nuse minibatch_data::X;\n```\n";
    assert_eq!(fenced_blocks(md).len(), 1);
    assert_eq!(inline_spans(md), ["minibatch_nn::ops"]);
}

#[test]
fn readme_code_uses_only_minibatch_paths() {
    let md = read("README.md");
    let blocks = fenced_blocks(&md);
    assert!(blocks.len() > 10, "found {} code blocks", blocks.len());
    let mut bad = Vec::new();
    for (i, (info, body)) in blocks.iter().enumerate() {
        for p in member_crate_paths(body) {
            bad.push(format!("code block {i} ({info}): {p}"));
        }
    }
    for span in inline_spans(&md) {
        for p in member_crate_paths(&span) {
            bad.push(format!("inline `{span}`: {p}"));
        }
    }
    assert!(
        bad.is_empty(),
        "README code a `minibatch` user cannot compile (write minibatch::data/nn/optim/train::...):\n{}",
        bad.join("\n")
    );
}

/// The first ```rust block of the README, and the first doc example of the
/// prelude in src/lib.rs.
#[test]
fn readme_training_script_is_the_prelude_doc_test() {
    let md = read("README.md");
    let (_, script) = fenced_blocks(&md)
        .into_iter()
        .find(|(info, _)| info == "rust")
        .expect("a rust block in the README");
    assert!(
        script.contains("fn main()"),
        "the script is a whole program"
    );
    assert!(
        script.contains("seeded_var_builder("),
        "the script is seeded"
    );

    let lib = read("src/lib.rs");
    let start = lib
        .find("pub mod prelude")
        .and_then(|end| lib[..end].rfind("/// The names most training scripts use"))
        .expect("the prelude's doc");
    let doc: Vec<&str> = lib[start..]
        .lines()
        .take_while(|l| l.starts_with("///"))
        .map(|l| {
            l.strip_prefix("/// ")
                .unwrap_or(l.strip_prefix("///").unwrap())
        })
        .collect();
    let open = doc
        .iter()
        .position(|l| l.starts_with("```"))
        .expect("a doc example");
    let close = open
        + 1
        + doc[open + 1..]
            .iter()
            .position(|l| *l == "```")
            .expect("its end");
    let mut example = doc[open + 1..close].join("\n");
    example.push('\n');
    assert_eq!(
        example, script,
        "README.md's training script and the prelude's doc test in src/lib.rs differ: change both"
    );
}

#[test]
fn readme_install_block_pins_the_workspace_candle() {
    let md = read("README.md");
    let (_, toml) = fenced_blocks(&md)
        .into_iter()
        .find(|(info, body)| info == "toml" && body.contains("[dependencies]"))
        .expect("a [dependencies] block in the README");
    let manifest = read("Cargo.toml");
    for krate in ["candle-core", "candle-nn"] {
        let pin = manifest
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{krate} = ")))
            .unwrap_or_else(|| panic!("{krate} in [workspace.dependencies]"));
        let line = format!("{krate} = {pin}");
        assert!(
            toml.contains(&line),
            "README's block lacks `{line}`:\n{toml}"
        );
    }
    assert!(toml.contains("minibatch = "), "{toml}");
    assert!(toml.contains("serde = "), "{toml}");
}
