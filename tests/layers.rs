//! The layers of `docs/architecture.md` ("Layers"), checked: a module may
//! use the layers above it and never one below, and `plan` reaches no I/O
//! crate at all. Reads the source as text; a violation names file and line.

use std::path::{Path, PathBuf};

/// The crate's top-level modules, layer by layer, top first.
const LAYERS: &[&[&str]] = &[
    &["model", "config", "metrics", "testkit"],
    &["store"],
    &["plan"],
    &["dataplane"],
    &["reconcile", "liveness", "report", "notify"],
    &["api", "dns", "jit"],
    &["gateway", "cli", "doctor", "lock"],
];

/// What `plan` may never name: I/O crates and the std modules that do I/O.
const IMPURE: &[&str] = &[
    "tokio",
    "nftables",
    "rtnetlink",
    "wireguard_control",
    "neli",
    "serde_json",
    "rusqlite",
    "etcd_client",
    "socket2",
    "std::fs",
    "std::process",
    "std::os::unix::net",
    "UdpSocket",
    "TcpStream",
    "TcpListener",
    "std::thread",
    "SystemTime::now",
    "Instant::now",
];

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source files of top-level module `m` (`src/m.rs` and `src/m/**`).
fn module_files(m: &str) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let file = src.join(format!("{m}.rs"));
    if file.exists() {
        out.push(file);
    }
    if src.join(m).is_dir() {
        files(&src.join(m), &mut out);
    }
    out
}

/// Code with `//` comments (doc comments included) removed, line by line.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, String)> + '_ {
    text.lines().enumerate().map(|(i, l)| {
        let code = match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        };
        (i + 1, code.to_owned())
    })
}

/// Whether `line` names `word` as a path segment (not inside a longer name).
fn names(line: &str, word: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    line.match_indices(word).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

/// Every line of `text` that names a forbidden word: `(line, word)`.
fn violations(text: &str, forbidden: &[String]) -> Vec<(usize, String)> {
    code_lines(text)
        .flat_map(|(n, line)| {
            forbidden
                .iter()
                .filter(move |w| names(&line, w))
                .map(move |w| (n, w.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The part of a file that ships: without its `#[cfg(test)] mod tests`
/// (inline, or a `tests.rs` file), where a golden test may write its file.
fn shipped(path: &Path, text: &str) -> String {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return String::new();
    }
    match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => text[..at].to_owned(),
        None => text.to_owned(),
    }
}

fn check(module: &str, forbidden: &[String], tests_too: bool) -> Vec<String> {
    let mut found = Vec::new();
    for f in module_files(module) {
        let text = std::fs::read_to_string(&f).expect("read source");
        let text = if tests_too { text } else { shipped(&f, &text) };
        for (line, word) in violations(&text, forbidden) {
            found.push(format!("{}:{line}: {module} names {word}", f.display()));
        }
    }
    found
}

#[test]
fn no_module_uses_a_layer_below_it() {
    let mut found = Vec::new();
    for (i, layer) in LAYERS.iter().enumerate() {
        let below: Vec<String> = LAYERS[i + 1..]
            .iter()
            .flat_map(|l| l.iter().map(|m| format!("crate::{m}")))
            .collect();
        for m in *layer {
            assert!(
                !module_files(m).is_empty(),
                "layer table names `{m}`, which has no source"
            );
            found.extend(check(m, &below, true));
        }
    }
    assert!(
        found.is_empty(),
        "arrows pointing back up the layers:\n{}",
        found.join("\n")
    );
}

#[test]
fn plan_does_no_io() {
    let forbidden: Vec<String> = IMPURE.iter().map(|s| s.to_string()).collect();
    let found = check("plan", &forbidden, false);
    assert!(
        found.is_empty(),
        "plan must stay pure:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_top_level_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs");
    let lib = std::fs::read_to_string(src).expect("read lib.rs");
    for (_, line) in code_lines(&lib) {
        if let Some(m) = line.trim().strip_prefix("pub mod ") {
            let m = m.trim_end_matches(';');
            assert!(
                LAYERS.iter().any(|l| l.contains(&m)),
                "module `{m}` is in no layer of tests/layers.rs (and docs/architecture.md)"
            );
        }
    }
}

#[test]
fn the_scanner_sees_a_violation_and_ignores_comments_and_longer_names() {
    let forbidden = vec!["tokio".to_string(), "crate::dataplane".to_string()];
    let text = "use tokio::sync::watch;\n// tokio in a comment\nlet tokiox = 1;\nuse crate::dataplane::MTU;\n";
    let v = violations(text, &forbidden);
    assert_eq!(
        v,
        vec![
            (1, "tokio".to_string()),
            (4, "crate::dataplane".to_string())
        ]
    );
}
