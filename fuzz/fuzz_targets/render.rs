//! The reply renderer and splitter: Markdown to Matrix HTML, and a long reply cut into parts.
#![no_main]

use grok_appservice::render::{render_markdown, render_parts, split_markdown};
use libfuzzer_sys::fuzz_target;

/// Whether every non-whitespace char of `text` appears, in order, in `pieces` (splitting only
/// drops whitespace between chunks and adds fence lines: it never loses text).
fn keeps_text(text: &str, pieces: &[&str]) -> bool {
    let mut have = pieces
        .iter()
        .flat_map(|p| p.chars())
        .filter(|c| !c.is_whitespace());
    text.chars()
        .filter(|c| !c.is_whitespace())
        .all(|want| have.any(|c| c == want))
}

fuzz_target!(|data: &[u8]| {
    let (head, text) = data.split_at(data.len().min(4));
    let (budget, max_bytes) = match *head {
        [a, b, c, d] => (
            usize::from(u16::from_le_bytes([a, b])),
            usize::from(u16::from_le_bytes([c, d])),
        ),
        _ => (1_000, 4_000),
    };
    let text = String::from_utf8_lossy(text);
    // The library calls.
    let html = render_markdown(&text);
    let chunks = split_markdown(&text, budget);
    let parts = render_parts(&text, max_bytes);

    // Raw HTML is text, and links and images keep only their allowed schemes.
    assert!(
        !html.contains("<script") && !html.contains("<iframe"),
        "{html:?}"
    );
    for (tag, schemes) in [
        ("<a href=\"", &["http:", "https:", "mailto:", "matrix:"][..]),
        ("<img src=\"", &["mxc:"][..]),
    ] {
        for (at, _) in html.match_indices(tag) {
            let url = html[at + tag.len()..].to_ascii_lowercase();
            assert!(schemes.iter().any(|s| url.starts_with(s)), "{tag}{url}");
        }
    }
    assert!(!chunks.is_empty() && !parts.is_empty());
    // A chunk may only overshoot when the budget cannot hold one char plus a code block's
    // fence lines (each at most the longest line).
    let longest_line = text.lines().map(str::len).max().unwrap_or(0);
    if budget >= 2 * longest_line + 8 {
        for chunk in &chunks {
            assert!(chunk.len() <= budget, "{} > {budget}", chunk.len());
        }
    }
    // Escaping inflates a byte at most sixfold (`\u0000`), in body and HTML alike.
    if max_bytes >= 64 * longest_line + 256 {
        for part in &parts {
            assert!(
                part.json_len() <= max_bytes,
                "{} > {max_bytes}",
                part.json_len()
            );
        }
    }
    for part in &parts {
        assert_eq!(part.formatted_body, render_markdown(&part.body));
    }
    let chunk_refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
    assert!(keeps_text(&text, &chunk_refs), "split_markdown lost text");
    let bodies: Vec<&str> = parts.iter().map(|p| p.body.as_str()).collect();
    assert!(keeps_text(&text, &bodies), "render_parts lost text");
});
