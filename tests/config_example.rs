//! `config.example.yaml` states the defaults: every key it sets equals the built-in default,
//! unless its line carries a trailing comment starting with `# changed:` (which should say the
//! default), and then it must really differ. `homeserver.*` is required and has no default.
//!
//! Each key is checked with the real parser: a config with only `homeserver` and that one key
//! is parsed with [`Config::parse`] and compared with the config parsed without it, so a
//! changed default fails here until the example is updated or marked.

use std::collections::BTreeSet;

use grok_appservice::config::Config;
use serde_norway::{Mapping, Value};

const EXAMPLE: &str = include_str!("../config.example.yaml");
const MARKER: &str = "# changed:";
/// Required, so it is in every probe config and not compared.
const REQUIRED: &str = "homeserver";

/// One key the example sets: its section (or `None` at the top level) and name.
type Key = (Option<String>, String);

/// The keys the example's lines set (top level, or two spaces into a section), with whether
/// the line is marked as changed.
fn keys_by_line() -> Vec<(Key, bool)> {
    let mut section: Option<String> = None;
    let mut keys = Vec::new();
    for line in EXAMPLE.lines() {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim_start();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let Some((name, rest)) = text.split_once(':') else {
            continue;
        };
        let value = rest.split(" #").next().unwrap_or("").trim();
        let marked = line.contains(MARKER);
        match indent {
            0 if value.is_empty() => section = Some(name.to_string()),
            0 => keys.push(((None, name.to_string()), marked)),
            2 => keys.push(((section.clone(), name.to_string()), marked)),
            _ => {}
        }
    }
    keys
}

fn yaml() -> Mapping {
    match serde_norway::from_str(EXAMPLE).expect("config.example.yaml is YAML") {
        Value::Mapping(m) => m,
        other => panic!("config.example.yaml is not a mapping: {other:?}"),
    }
}

/// The example's keys and values as YAML parses them (sections are walked one level).
fn keys_by_yaml() -> Vec<(Key, Value)> {
    let mut keys = Vec::new();
    for (name, value) in yaml() {
        let name = name.as_str().expect("string keys").to_string();
        match value {
            Value::Mapping(section) => {
                for (key, value) in section {
                    let key = key.as_str().expect("string keys").to_string();
                    keys.push(((Some(name.clone()), key), value));
                }
            }
            value => keys.push(((None, name), value)),
        }
    }
    keys
}

/// A config with only the required section, plus `key: value` when given.
fn probe(key: Option<(&Key, &Value)>) -> String {
    let mut doc = Mapping::new();
    let required = yaml()
        .get(REQUIRED)
        .cloned()
        .expect("the example sets homeserver");
    doc.insert(Value::from(REQUIRED), required);
    if let Some(((section, name), value)) = key {
        match section {
            Some(section) => {
                let mut inner = Mapping::new();
                inner.insert(Value::from(name.as_str()), value.clone());
                doc.insert(Value::from(section.as_str()), Value::Mapping(inner));
            }
            None => {
                doc.insert(Value::from(name.as_str()), value.clone());
            }
        }
    }
    let text = serde_norway::to_string(&doc).unwrap();
    // Debug prints every field (the API key is not in the file), so equal text = equal config.
    format!("{:?}", Config::parse(&text).unwrap())
}

fn dotted((section, name): &Key) -> String {
    match section {
        Some(s) => format!("{s}.{name}"),
        None => name.clone(),
    }
}

#[test]
fn the_line_scan_sees_every_key_yaml_sees() {
    let by_line: BTreeSet<Key> = keys_by_line().into_iter().map(|(k, _)| k).collect();
    let by_yaml: BTreeSet<Key> = keys_by_yaml().into_iter().map(|(k, _)| k).collect();
    assert_eq!(by_line, by_yaml);
    assert!(by_yaml.len() > 50, "only {} keys found", by_yaml.len());
}

#[test]
fn every_key_is_the_default_or_marked_changed() {
    let marked: BTreeSet<Key> = keys_by_line()
        .into_iter()
        .filter(|(_, m)| *m)
        .map(|(k, _)| k)
        .collect();
    let defaults = probe(None);
    let mut wrong = Vec::new();
    for (key, value) in keys_by_yaml() {
        if key.0.as_deref() == Some(REQUIRED) {
            continue;
        }
        let differs = probe(Some((&key, &value))) != defaults;
        match (differs, marked.contains(&key)) {
            (true, false) => wrong.push(format!(
                "{} = {value:?} is not the default: fix it or mark its line `{MARKER} ...`",
                dotted(&key)
            )),
            (false, true) => wrong.push(format!(
                "{} is marked `{MARKER}` but equals the default",
                dotted(&key)
            )),
            _ => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "config.example.yaml:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_example_loads_and_validates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, EXAMPLE).unwrap();
    Config::load_with_env(&path, |_| None).expect("config.example.yaml validates");
}
