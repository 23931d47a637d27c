//! Turns a Markdown reply into Matrix messages: the HTML subset clients show, with links and
//! images limited to safe schemes, and long replies split into parts that each fit in one event.

use std::ops::Range;

use pulldown_cmark::{html, Event, LinkType, Options, Parser, Tag, TagEnd};
use serde::{Deserialize, Serialize};

/// Link schemes a reply may link to.
pub const ALLOWED_LINK_SCHEMES: [&str; 4] = ["http", "https", "mailto", "matrix"];

/// The homeserver's limit on one event (the whole PDU) in bytes.
pub const MAX_EVENT_BYTES: usize = 65_536;

/// The budget for a part's body plus formatted_body, serialised as JSON strings, leaving room
/// for the relation, mentions and the homeserver's PDU envelope.
///
/// The rest of the event stays under about 3 KiB: msgtype, format, `m.relates_to` (two event
/// ids), `m.mentions` (one user id, at most 255 bytes), and the envelope the homeserver adds
/// (room id, sender, a few auth and prev event ids, hashes, one signature, depth, timestamp).
/// 5.5 KiB of headroom covers that with margin while keeping parts as large as possible.
pub const MAX_PART_BYTES: usize = 60_000;

/// Markdown -> the HTML subset Matrix clients show (org.matrix.custom.html).
///
/// Tables and strikethrough are enabled. Raw HTML is shown as escaped text, never passed
/// through. Links keep their anchor only for [`ALLOWED_LINK_SCHEMES`]; any other link
/// (`javascript:`, `data:`, relative, ...) shows its text alone. Images stay `<img>` only for
/// `mxc://` sources; an image at an allowed URL becomes a link to it (clients must not fetch
/// remote images: tracking pixels), any other image shows its alt text alone.
pub fn render_markdown(text: &str) -> String {
    let options = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH;
    // What became of each open link or image, so its end event matches what its start became.
    let mut open: Vec<Opened> = Vec::new();
    let events = Parser::new_ext(text, options).filter_map(move |event| match event {
        Event::Html(raw) | Event::InlineHtml(raw) => Some(Event::Text(raw)),
        Event::Start(Tag::Link {
            link_type,
            dest_url,
            title,
            id,
        }) => {
            // An email autolink has no scheme in dest_url; the writer prefixes mailto:.
            if link_type == LinkType::Email || link_allowed(&dest_url) {
                open.push(Opened::Anchor);
                Some(Event::Start(Tag::Link {
                    link_type,
                    dest_url,
                    title,
                    id,
                }))
            } else {
                open.push(Opened::Dropped);
                None
            }
        }
        Event::Start(Tag::Image {
            link_type,
            dest_url,
            title,
            id,
        }) => {
            let in_anchor = open.contains(&Opened::Anchor);
            if has_scheme(&dest_url, "mxc") {
                open.push(Opened::Image);
                Some(Event::Start(Tag::Image {
                    link_type,
                    dest_url,
                    title,
                    id,
                }))
            } else if link_allowed(&dest_url) && !in_anchor {
                open.push(Opened::Anchor);
                Some(Event::Start(Tag::Link {
                    link_type: LinkType::Inline,
                    dest_url,
                    title,
                    id,
                }))
            } else {
                // Also inside an anchor: nested anchors are invalid HTML.
                open.push(Opened::Dropped);
                None
            }
        }
        Event::End(TagEnd::Link | TagEnd::Image) => match open.pop() {
            Some(Opened::Anchor) => Some(Event::End(TagEnd::Link)),
            Some(Opened::Image) => Some(Event::End(TagEnd::Image)),
            Some(Opened::Dropped) | None => None,
        },
        other => Some(other),
    });
    let mut out = String::new();
    html::push_html(&mut out, events);
    out.trim_end().to_string()
}

/// What a link or image start event was rendered as.
#[derive(PartialEq)]
enum Opened {
    Anchor,
    Image,
    Dropped,
}

/// The scheme of an absolute URL, per RFC 3986; relative and fragment-only URLs have none.
/// Anything odd before the colon (spaces, tabs, entities) means no scheme, so it is refused.
fn scheme(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once(':')?;
    let mut chars = scheme.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(scheme)
}

/// Whether `url` is a well-formed `mxc://<server>/<media id>` content URI.
pub fn is_mxc(url: &str) -> bool {
    url.strip_prefix("mxc://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(server, id)| !server.is_empty() && !id.is_empty() && !id.contains('/'))
}

fn has_scheme(url: &str, wanted: &str) -> bool {
    scheme(url).is_some_and(|s| s.eq_ignore_ascii_case(wanted))
}

fn link_allowed(url: &str) -> bool {
    ALLOWED_LINK_SCHEMES.iter().any(|s| has_scheme(url, s))
}

/// One message of a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// The Markdown of this part, the plain-text fallback.
    pub body: String,
    /// `body` rendered by [`render_markdown`].
    pub formatted_body: String,
}

impl Part {
    fn new(body: String) -> Self {
        let formatted_body = render_markdown(&body);
        Part {
            body,
            formatted_body,
        }
    }

    /// The bytes this part takes in the event: body plus formatted_body as JSON strings, the
    /// measure [`MAX_PART_BYTES`] is about.
    pub fn json_len(&self) -> usize {
        json_len(&self.body) + json_len(&self.formatted_body)
    }
}

fn json_len(s: &str) -> usize {
    // Serialising a str cannot fail; MAX makes a failure count as "does not fit".
    serde_json::to_string(s).map_or(usize::MAX, |json| json.len())
}

/// Splits Markdown into chunks of at most `budget` bytes at block boundaries.
///
/// A text within the budget comes back whole. Otherwise the blocks (paragraphs separated by
/// blank lines, and fenced code blocks: ``` or ~~~, indented up to 3 spaces) are packed
/// greedily, each chunk keeping the original text between its blocks; the whitespace between
/// two chunks is dropped. A block larger than the budget is split between lines; a code block
/// split this way is closed at the end of one chunk and reopened with its opening line (fence
/// and info string) at the start of the next, so each chunk renders as code and ends outside
/// a code block, unless the text itself ends inside one. Taking the added fence lines off the
/// chunks and putting back the dropped whitespace gives back `text` exactly.
///
/// Boundaries fall between lines, except in a single line longer than the budget on its own:
/// it is cut at a char boundary, after a space or tab when one is in the second half of the
/// room left. A chunk exceeds the budget only if the budget cannot hold one character plus
/// the fence lines of its code block. A text of whitespace alone, over the budget, gives one
/// empty chunk. Fences inside block quotes, or indented 4 or more spaces in nested lists, are
/// not seen as fences.
pub fn split_markdown(text: &str, budget: usize) -> Vec<String> {
    let blocks = scan(text);
    split_ranges(text, &blocks, budget)
        .iter()
        .map(|range| chunk_text(text, &blocks, range))
        .collect()
}

/// The reply as parts, each within `max_bytes` (body + formatted_body as JSON strings).
///
/// A reply that fits comes back as one part whose body is the text. Otherwise it is cut where
/// [`split_markdown`] would cut it, with a Markdown budget scaled down by how far it overshot;
/// a part still over `max_bytes` (HTML and JSON escaping inflate `<`, `&`, `"` and line
/// breaks) is cut again the same way. Deterministic: the same text gives the same parts. A
/// part exceeds `max_bytes` only when `max_bytes` cannot hold one character with its markup
/// and fences, far below [`MAX_PART_BYTES`].
pub fn render_parts(text: &str, max_bytes: usize) -> Vec<Part> {
    parts_with_ranges(text, max_bytes)
        .into_iter()
        .map(|(_, part)| part)
        .collect()
}

/// [`render_parts`], with the span of `text` each part was cut from.
fn parts_with_ranges(text: &str, max_bytes: usize) -> Vec<(Range<usize>, Part)> {
    let blocks = scan(text);
    let mut parts = Vec::new();
    fit(text, &blocks, 0..text.len(), max_bytes, &mut parts);
    if parts.is_empty() {
        // Only whitespace too large for one part: nothing of it is worth sending.
        parts.push((0..0, Part::new(String::new())));
    }
    parts
}

/// Renders `range` as one part, or splits it smaller until each part fits.
fn fit(
    text: &str,
    blocks: &[Block],
    range: Range<usize>,
    max_bytes: usize,
    out: &mut Vec<(Range<usize>, Part)>,
) {
    let part = Part::new(chunk_text(text, blocks, &range));
    let size = part.json_len();
    if size <= max_bytes {
        out.push((range, part));
        return;
    }
    // Scale by the overshoot, with a tenth to spare so every retry shrinks the chunk.
    let budget = (part.body.len() as u128 * max_bytes as u128 * 9 / (size as u128 * 10)) as usize;
    let pieces = pack(text, blocks, range.clone(), budget);
    if pieces == [range.clone()] {
        // Nothing smaller exists: one character, or the fences alone.
        out.push((range, part));
        return;
    }
    for piece in pieces {
        fit(text, blocks, piece, max_bytes, out);
    }
}

/// A paragraph, or a fenced code block with its fences, as a span of the text.
struct Block {
    range: Range<usize>,
    fence: Option<Fence>,
}

/// How to close and reopen a fenced code block at a chunk boundary.
struct Fence {
    /// The opening line, repeated at the top of a chunk that starts inside the block.
    open: Range<usize>,
    /// The line that closes the block at the end of a chunk that ends inside it.
    close: String,
    /// The lines between the fences.
    content: Range<usize>,
    /// The most bytes the fence lines add to a chunk of the block, terminators included.
    overhead: usize,
}

/// A line of the text: its content, and where the next line starts.
#[derive(Clone, Copy)]
struct Line {
    start: usize,
    /// The end of the content, before "\n" or "\r\n".
    end: usize,
    next: usize,
}

fn lines(text: &str, range: Range<usize>) -> impl Iterator<Item = Line> + '_ {
    let mut pos = range.start;
    std::iter::from_fn(move || {
        if pos >= range.end {
            return None;
        }
        let start = pos;
        let (end, next) = match text[start..range.end].find('\n') {
            Some(i) => (start + i, start + i + 1),
            None => (range.end, range.end),
        };
        pos = next;
        let end = if text[start..end].ends_with('\r') {
            end - 1
        } else {
            end
        };
        Some(Line { start, end, next })
    })
}

/// A code fence: its indentation, character and length.
struct Opener {
    indent: usize,
    ch: u8,
    len: usize,
}

/// The fence a line starts with (up to 3 spaces, then 3 or more backticks or tildes), and the
/// rest of the line.
fn fence_run(line: &str) -> Option<(Opener, &str)> {
    let rest = line.trim_start_matches(' ');
    let indent = line.len() - rest.len();
    let ch = *rest.as_bytes().first()?;
    let len = rest.bytes().take_while(|&b| b == ch).count();
    (indent <= 3 && matches!(ch, b'`' | b'~') && len >= 3)
        .then(|| (Opener { indent, ch, len }, &rest[len..]))
}

fn opener(line: &str) -> Option<Opener> {
    // A backtick fence's info string cannot hold a backtick (CommonMark), else it is inline code.
    fence_run(line)
        .filter(|(fence, info)| fence.ch == b'~' || !info.contains('`'))
        .map(|(fence, _)| fence)
}

impl Opener {
    fn closed_by(&self, line: &str) -> bool {
        fence_run(line).is_some_and(|(fence, rest)| {
            fence.ch == self.ch
                && fence.len >= self.len
                && rest.trim_matches([' ', '\t']).is_empty()
        })
    }

    fn closing_line(&self) -> String {
        " ".repeat(self.indent) + char::from(self.ch).to_string().repeat(self.len).as_str()
    }
}

/// The blocks of `text` in order, without the blank lines between them.
fn scan(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut prose: Option<Range<usize>> = None;
    // The open code block: its opening line, its fence, and the end of its last line.
    let mut code: Option<(Line, Opener, usize)> = None;
    for line in lines(text, 0..text.len()) {
        let content = &text[line.start..line.end];
        if let Some((open, fence, end)) = &mut code {
            if fence.closed_by(content) {
                // The closing line and the line break before it.
                let newline = if text[..line.start].ends_with("\r\n") {
                    2
                } else {
                    1
                };
                let close_len = line.end - line.start + newline;
                blocks.push(code_block(*open, fence, line.start, line.end, close_len));
                code = None;
            } else {
                *end = line.end;
            }
        } else if let Some(fence) = opener(content) {
            // A fence interrupts a paragraph even without a blank line.
            blocks.extend(prose.take().map(|range| Block { range, fence: None }));
            code = Some((line, fence, line.end));
        } else if content.bytes().all(|b| b == b' ' || b == b'\t') {
            blocks.extend(prose.take().map(|range| Block { range, fence: None }));
        } else {
            let start = prose.map_or(line.start, |p| p.start);
            prose = Some(start..line.end);
        }
    }
    blocks.extend(prose.map(|range| Block { range, fence: None }));
    if let Some((open, fence, end)) = code {
        // Unclosed: CommonMark runs it to the end of the text.
        blocks.push(code_block(open, &fence, end, end, 0));
    }
    blocks
}

/// A code block from its opening line to `end`; its content ends where its closing line
/// starts, which with the line break before it takes `close_len` bytes (0 when unclosed).
fn code_block(
    open: Line,
    fence: &Opener,
    content_end: usize,
    end: usize,
    close_len: usize,
) -> Block {
    let close = fence.closing_line();
    // A piece carries the original fence lines or the added ones (each after or before a
    // "\n"), whichever it has; reserve the larger.
    let overhead =
        (open.next - open.start).max(open.end - open.start + 1) + close_len.max(close.len() + 1);
    Block {
        range: open.start..end,
        fence: Some(Fence {
            open: open.start..open.end,
            close,
            content: open.next.min(content_end)..content_end,
            overhead,
        }),
    }
}

/// The fenced code block `pos` lies strictly inside, where a chunk boundary needs fences.
fn code_at(blocks: &[Block], pos: usize) -> Option<&Fence> {
    let i = blocks.partition_point(|b| b.range.end <= pos);
    let block = blocks.get(i).filter(|b| b.range.start < pos)?;
    block.fence.as_ref()
}

/// The chunk for `range`: its text, with the fence lines that balance a code block cut at
/// either end.
fn chunk_text(text: &str, blocks: &[Block], range: &Range<usize>) -> String {
    let mut out = String::new();
    if let Some(fence) = code_at(blocks, range.start) {
        out.push_str(&text[fence.open.clone()]);
        out.push('\n');
    }
    out.push_str(&text[range.clone()]);
    if let Some(fence) = code_at(blocks, range.end) {
        out.push('\n');
        out.push_str(&fence.close);
    }
    out
}

/// The length of [`chunk_text`] for `range`.
fn chunk_len(blocks: &[Block], range: &Range<usize>) -> usize {
    let open = code_at(blocks, range.start).map_or(0, |f| f.open.len() + 1);
    let close = code_at(blocks, range.end).map_or(0, |f| f.close.len() + 1);
    open + range.len() + close
}

/// The chunks of [`split_markdown`] as spans of `text`.
fn split_ranges(text: &str, blocks: &[Block], budget: usize) -> Vec<Range<usize>> {
    if text.len() <= budget {
        return std::iter::once(0..text.len()).collect();
    }
    let chunks = pack(text, blocks, 0..text.len(), budget);
    if chunks.is_empty() {
        std::iter::once(0..0).collect()
    } else {
        chunks
    }
}

/// Packs the blocks within `range` greedily into chunks of at most `budget` bytes.
fn pack(text: &str, blocks: &[Block], range: Range<usize>, budget: usize) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    let mut current: Option<Range<usize>> = None;
    for block in blocks {
        let unit = block.range.start.max(range.start)..block.range.end.min(range.end);
        if unit.is_empty() {
            continue;
        }
        if let Some(cur) = &current {
            let joined = cur.start..unit.end;
            if chunk_len(blocks, &joined) <= budget {
                current = Some(joined);
                continue;
            }
        }
        chunks.extend(current.take());
        let mut pieces = if chunk_len(blocks, &unit) <= budget {
            vec![unit]
        } else {
            split_block(text, block, unit, budget)
        };
        // The tail of a split block may share a chunk with the blocks after it.
        current = pieces.pop();
        chunks.append(&mut pieces);
    }
    chunks.extend(current);
    chunks
}

/// Splits `unit`, a block or part of one, between lines into pieces whose chunks fit `budget`.
fn split_block(text: &str, block: &Block, unit: Range<usize>, budget: usize) -> Vec<Range<usize>> {
    let (inner, room) = match &block.fence {
        // The fences go with the first and last piece, so split only the lines between them;
        // that way no chunk is an empty code block.
        Some(fence) => (
            fence.content.start.max(unit.start)..fence.content.end.min(unit.end),
            budget.saturating_sub(fence.overhead),
        ),
        None => (unit.clone(), budget),
    };
    let mut pieces = split_lines(text, inner, room);
    if pieces.is_empty() {
        // No lines between the fences: the fences alone exceed the budget.
        return vec![unit];
    }
    let last = pieces.len() - 1;
    pieces[0].start = unit.start;
    pieces[last].end = unit.end;
    pieces
}

/// Greedily groups the lines of `range` into pieces of at most `room` bytes. A line longer
/// than `room` on its own is cut, first filling what the piece before it left.
fn split_lines(text: &str, range: Range<usize>, room: usize) -> Vec<Range<usize>> {
    let mut pieces = Vec::new();
    let mut piece: Option<Range<usize>> = None;
    for line in lines(text, range) {
        let start = piece.as_ref().map_or(line.start, |p| p.start);
        if line.end - start <= room {
            piece = Some(start..line.end);
            continue;
        }
        if line.end - line.start <= room {
            pieces.extend(piece.replace(line.start..line.end));
            continue;
        }
        let mut from = line.start;
        if let Some(p) = piece.take() {
            let cut = cut_point(text, from, p.start + room);
            if cut > from {
                pieces.push(p.start..cut);
                from = cut;
            } else {
                pieces.push(p);
            }
        }
        while line.end - from > room {
            let mut cut = cut_point(text, from, from + room);
            if cut == from {
                // Less room than one character: take one anyway, to make progress.
                cut += text[from..].chars().next().map_or(1, char::len_utf8);
            }
            pieces.push(from..cut);
            from = cut;
        }
        // Taking one char at a time can reach the line's end: an empty piece would make the
        // caller split the same range again, forever.
        piece = (from < line.end).then_some(from..line.end);
    }
    pieces.extend(piece);
    pieces
}

/// Where to cut a line between `from` and at most `limit`: after the last space or tab if it
/// is in the second half (so pieces stay large), else at the last char boundary. `from` when
/// there is no room.
fn cut_point(text: &str, from: usize, limit: usize) -> usize {
    if limit <= from {
        return from;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let window = &text[from..end];
    match window.rfind([' ', '\t']) {
        Some(i) if i >= window.len() / 2 => from + i + 1,
        _ => end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulldown_cmark::CodeBlockKind;

    #[test]
    fn disallowed_schemes_never_become_href_or_src() {
        let urls = [
            "javascript:alert(1)",
            "JAVASCRIPT:alert(1)",
            "JavaScript:alert(1)",
            "data:text/html;base64,PHNjcmlwdD4=",
            "vbscript:msgbox(1)",
            "file:///etc/passwd",
            "java&#9;script:alert(1)",
            "/relative/path",
            "#fragment",
            "example.com",
        ];
        for url in urls {
            for md in [
                format!("[click]({url})"),
                format!("[click][r]\n\n[r]: {url}"),
                format!("<{url}>"),
                format!("![click]({url})"),
            ] {
                let html = render_markdown(&md);
                assert!(!html.contains("href"), "{md:?} -> {html}");
                assert!(!html.contains("<img"), "{md:?} -> {html}");
                assert!(!html.contains("<a"), "{md:?} -> {html}");
            }
            let html = render_markdown(&format!("[click]({url})"));
            assert_eq!(html, "<p>click</p>", "{url}");
        }
        // The autolink's text is its URL: shown as inert text, not as a link.
        assert_eq!(
            render_markdown("<javascript:alert(1)>"),
            "<p>javascript:alert(1)</p>"
        );
    }

    #[test]
    fn allowed_links_are_kept() {
        for (md, href) in [
            ("[a](http://example.com)", "http://example.com"),
            (
                "[a](https://example.com/x?y=1)",
                "https://example.com/x?y=1",
            ),
            ("[a](HTTPS://EXAMPLE.COM)", "HTTPS://EXAMPLE.COM"),
            ("[a](mailto:me@example.com)", "mailto:me@example.com"),
            (
                "[a](matrix:r/room:example.org)",
                "matrix:r/room:example.org",
            ),
            ("<https://example.com>", "https://example.com"),
            ("<me@example.com>", "mailto:me@example.com"),
        ] {
            let html = render_markdown(md);
            assert!(
                html.contains(&format!("<a href=\"{href}\">")),
                "{md} -> {html}"
            );
        }
    }

    #[test]
    fn content_uris_are_recognised() {
        assert!(is_mxc("mxc://example.org/abc123"));
        for bad in [
            "mxc://example.org/",
            "mxc:///abc",
            "https://x/y",
            "mxc://a/b/c",
            "",
        ] {
            assert!(!is_mxc(bad), "{bad}");
        }
    }

    #[test]
    fn mxc_image_stays_an_image() {
        assert_eq!(
            render_markdown("![a cat](mxc://example.org/abc)"),
            "<p><img src=\"mxc://example.org/abc\" alt=\"a cat\" /></p>"
        );
        assert!(render_markdown("![x](MXC://example.org/abc)").contains("<img src=\"MXC://"));
    }

    #[test]
    fn remote_image_becomes_a_link() {
        assert_eq!(
            render_markdown("![a cat](https://example.org/cat.png)"),
            "<p><a href=\"https://example.org/cat.png\">a cat</a></p>"
        );
        // A badge inside a link: the image shows as its alt text, no nested anchor.
        let html = render_markdown("[![build](https://ci.example/b.svg)](https://example.org)");
        assert_eq!(html, "<p><a href=\"https://example.org\">build</a></p>");
        // An image at a disallowed scheme shows its alt text alone.
        assert_eq!(
            render_markdown("![alt](data:image/png;base64,AA)"),
            "<p>alt</p>"
        );
    }

    #[test]
    fn raw_html_is_escaped() {
        let html = render_markdown("<script>alert(1)</script>\n\nhi <b onclick=\"x\">there</b>");
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("<b "), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(html.contains("&lt;b onclick="), "{html}");
    }

    #[test]
    fn tables_and_strikethrough_render_and_output_is_trimmed() {
        let html = render_markdown("| a | b |\n|---|---|\n| 1 | 2 |\n\n~~gone~~\n\n");
        assert!(
            html.contains("<table>") && html.contains("<td>1</td>"),
            "{html}"
        );
        assert!(html.ends_with("<p><del>gone</del></p>"), "{html}");
    }

    #[test]
    fn short_text_is_one_chunk_and_one_part() {
        let text = "  hello **world**\n\n```\ncode\n```\n\n";
        assert_eq!(split_markdown(text, 1000), vec![text.to_string()]);
        let parts = render_parts(text, MAX_PART_BYTES);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].body, text);
        assert_eq!(parts[0].formatted_body, render_markdown(text));
    }

    #[test]
    fn split_code_block_is_closed_and_reopened() {
        let text = "intro\n\n~~~~rust title=x\nline 1\n~~~\nline 3\n\nline 5\n~~~~\n\noutro";
        let chunks = split_markdown(text, 32);
        assert_eq!(
            chunks,
            [
                "intro",
                "~~~~rust title=x\nline 1\n~~~\n~~~~",
                "~~~~rust title=x\nline 3\n\n~~~~",
                "~~~~rust title=x\nline 5\n~~~~",
                "outro",
            ]
        );
    }

    #[test]
    fn overlong_line_is_cut_after_whitespace() {
        let text = "aaaa bbbb cccc dddd eeee";
        assert_eq!(
            split_markdown(text, 12),
            ["aaaa bbbb ", "cccc dddd ", "eeee"]
        );
        // Inside code the cut falls anywhere; the fences still balance.
        let chunks = split_markdown("```\nxxxxxxxxxxxxxxxxxxxx\n```", 14);
        let six = "```\nxxxxxx\n```";
        assert_eq!(chunks, [six, six, six, "```\nxx\n```"]);
        // A multibyte character is never split.
        for chunk in split_markdown(&"日本語".repeat(10), 8) {
            assert!(chunk.len() <= 8 && !chunk.is_empty());
        }
    }

    #[test]
    fn whitespace_only_text_over_budget_gives_one_empty_chunk() {
        let text = " \n\n  \n".repeat(100);
        assert_eq!(split_markdown(&text, 10), [""]);
        let parts = render_parts(&"\n".repeat(40_000), MAX_PART_BYTES);
        assert_eq!(parts.len(), 1);
        assert!(parts[0].json_len() <= MAX_PART_BYTES);
    }

    #[test]
    fn budgets_below_one_char_still_end() {
        // Found by fuzz/render: a stack overflow (the last piece was empty and fit() split
        // the same range again, forever).
        let text = "a\u{2}t\u{f}\0\0\0";
        let parts = render_parts(text, 0);
        assert_eq!(parts.len(), text.chars().count());
        assert_eq!(split_markdown(text, 0).len(), text.chars().count());
        // The same with production-sized parts: a code block whose fence line is longer than
        // what is left for a part leaves no room for its lines.
        let code = format!("```{}\n{}\n```\n", "x".repeat(70_000), "code ".repeat(20));
        let parts = render_parts(&code, MAX_PART_BYTES);
        assert!(parts.len() > 1);
        for chunk in split_markdown(&code, 60_000) {
            assert!(!chunk.is_empty());
        }
    }

    // --- Invariants -------------------------------------------------------------------

    /// The opening line of the fenced code block still open at the end of `text`, if any.
    /// Written apart from the module's scanner, on `str::lines`, as a cross-check.
    fn open_fence(text: &str) -> Option<&str> {
        let mut open: Option<(&str, char, usize)> = None;
        for line in text.lines() {
            if let Some((indent, ch, run, rest)) = fence_parts(line) {
                match open {
                    Some((_, c, n))
                        if indent <= 3 && ch == c && run >= n && rest.trim().is_empty() =>
                    {
                        open = None
                    }
                    None if indent <= 3 && !(ch == '`' && rest.contains('`')) => {
                        open = Some((line, ch, run))
                    }
                    _ => {}
                }
            }
        }
        open.map(|(line, _, _)| line)
    }

    fn fence_parts(line: &str) -> Option<(usize, char, usize, &str)> {
        let body = line.trim_start_matches(' ');
        let ch = body.chars().next().filter(|c| *c == '`' || *c == '~')?;
        let run = body.chars().take_while(|c| *c == ch).count();
        (run >= 3).then(|| (line.len() - body.len(), ch, run, &body[run..]))
    }

    /// How many lines of `chunk` open or close a fenced code block.
    fn fence_lines(chunk: &str) -> usize {
        let mut count = 0;
        let mut seen = String::new();
        for line in chunk.split_inclusive('\n') {
            let before = open_fence(&seen).is_some();
            seen.push_str(line);
            if open_fence(&seen).is_some() != before {
                count += 1;
            }
        }
        count
    }

    /// The concatenated text of every code block, whitespace removed: the same before and
    /// after splitting if every chunk renders its code as code.
    fn code_text(markdown: &str) -> String {
        let mut out = String::new();
        let mut in_code = false;
        for event in Parser::new_ext(markdown, Options::ENABLE_TABLES) {
            match event {
                Event::Start(Tag::CodeBlock(kind)) => {
                    in_code = true;
                    if let CodeBlockKind::Indented = kind {
                        out.push_str("<indented>");
                    }
                }
                Event::End(TagEnd::CodeBlock) => in_code = false,
                Event::Text(t) if in_code => out.extend(t.chars().filter(|c| !c.is_whitespace())),
                _ => {}
            }
        }
        out
    }

    fn is_blank(s: &str) -> bool {
        s.chars().all(char::is_whitespace)
    }

    /// Checks the invariants of chunks cut from `text` at `ranges`:
    /// - the ranges are in order and the text outside them is whitespace only;
    /// - each chunk is `text[range]`, plus the opening line of the code block the range
    ///   starts inside and a closing fence when it ends inside one, and nothing else; so the
    ///   chunks, minus those lines, interleaved with the dropped whitespace, give back `text`
    ///   exactly;
    /// - a boundary falls mid-line only in a line longer than `overlong` bytes;
    /// - every chunk has an even number of fence lines (unless `text` itself ends inside a
    ///   code block: then only the last chunk, like `text`, does not);
    /// - every code block's text is still code, in order.
    fn check_chunks(text: &str, ranges: &[Range<usize>], chunks: &[String], overlong: usize) {
        assert_eq!(ranges.len(), chunks.len());
        assert!(!chunks.is_empty());
        let mut rebuilt = String::new();
        let mut pos = 0;
        for (i, (range, chunk)) in ranges.iter().zip(chunks).enumerate() {
            assert!(pos <= range.start && range.start <= range.end, "{ranges:?}");
            let gap = &text[pos..range.start];
            assert!(is_blank(gap), "non-blank gap {gap:?}");
            rebuilt.push_str(gap);

            let mut core = chunk.as_str();
            if let Some(open) = open_fence(&text[..range.start]) {
                core = core
                    .strip_prefix(open)
                    .and_then(|c| c.strip_prefix('\n'))
                    .unwrap_or_else(|| panic!("chunk {i} not reopened: {chunk:?}"));
            }
            if let Some(open) = open_fence(&text[..range.end]) {
                if !is_blank(&text[range.end..]) {
                    let (rest, close) = core
                        .rsplit_once('\n')
                        .unwrap_or_else(|| panic!("chunk {i} not closed: {chunk:?}"));
                    let (_, ch, run, tail) = fence_parts(close).expect("closing fence");
                    let (_, open_ch, open_run, _) = fence_parts(open).unwrap();
                    assert!(
                        ch == open_ch && run >= open_run && tail.is_empty(),
                        "{chunk:?}"
                    );
                    core = rest;
                }
            }
            assert_eq!(core, &text[range.clone()], "chunk {i}");
            rebuilt.push_str(core);
            pos = range.end;

            for at in [range.start, range.end] {
                let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
                let line = text[line_start..line_end].trim_end_matches('\r');
                let at_edge = at == line_start || at >= line_start + line.len();
                assert!(
                    at_edge || line.len() > overlong,
                    "mid-line cut at {at} in {line:?}"
                );
            }

            let ends_open = i + 1 == chunks.len() && open_fence(text).is_some();
            assert_eq!(
                open_fence(chunk).is_some(),
                ends_open,
                "chunk {i}: {chunk:?}"
            );
            assert_eq!(
                fence_lines(chunk) % 2 == 1,
                ends_open,
                "chunk {i}: {chunk:?}"
            );
        }
        let tail = &text[pos..];
        assert!(is_blank(tail));
        rebuilt.push_str(tail);
        assert_eq!(rebuilt, text);
        let code: String = chunks.iter().map(|c| code_text(c)).collect();
        assert_eq!(code, code_text(text));
    }

    /// Checks [`split_markdown`]; returns how many chunks it made, and how many of them
    /// reopen a code block.
    fn check_split(text: &str, budget: usize) -> (usize, usize) {
        let blocks = scan(text);
        let ranges = split_ranges(text, &blocks, budget);
        let reopened = ranges
            .iter()
            .filter(|r| code_at(&blocks, r.start).is_some())
            .count();
        let chunks = split_markdown(text, budget);
        for chunk in &chunks {
            assert!(
                chunk.len() <= budget,
                "{} > {budget}: {chunk:?}",
                chunk.len()
            );
        }
        // Fence lines of at most 40 bytes, twice over, are all a chunk adds to a line.
        check_chunks(text, &ranges, &chunks, budget.saturating_sub(84));
        (chunks.len(), reopened)
    }

    fn check_parts(text: &str, max_bytes: usize, overlong: usize) -> Vec<Part> {
        let with_ranges = parts_with_ranges(text, max_bytes);
        let (ranges, parts): (Vec<_>, Vec<_>) = with_ranges.into_iter().unzip();
        for part in &parts {
            assert!(
                part.json_len() <= max_bytes,
                "{} > {max_bytes}",
                part.json_len()
            );
            assert_eq!(part.formatted_body, render_markdown(&part.body));
        }
        let bodies: Vec<String> = parts.iter().map(|p| p.body.clone()).collect();
        check_chunks(text, &ranges, &bodies, overlong);
        assert_eq!(render_parts(text, max_bytes), parts, "not deterministic");
        parts
    }

    /// A small LCG, so the generated documents are the same on every run.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) % n as u64) as usize
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }
    }

    const WORDS: [&str; 16] = [
        "word",
        "grok",
        "<<<<",
        "\"quoted\"",
        "a&b",
        "é",
        "日本語",
        "🦀",
        "`x`",
        "[link](https://example.org)",
        "**bold**",
        "<b>raw</b>",
        "a<script>",
        "~~s~~",
        "x",
        "matrix",
    ];

    fn words(rng: &mut Lcg, n: usize) -> String {
        (0..n)
            .map(|_| rng.pick(&WORDS))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn random_doc(rng: &mut Lcg, scale: usize) -> String {
        let nl = if rng.below(5) == 0 { "\r\n" } else { "\n" };
        let mut doc = String::new();
        let blocks = 1 + rng.below(12);
        for b in 0..blocks {
            match rng.below(5) {
                0 | 1 => {
                    for _ in 0..1 + rng.below(6) {
                        let n = if rng.below(10) == 0 {
                            scale
                        } else {
                            1 + rng.below(12)
                        };
                        doc.push_str(&words(rng, n));
                        doc += nl;
                    }
                }
                2 | 3 => {
                    let indent = " ".repeat(rng.below(4));
                    let fence = rng.pick(&["```", "~~~", "````", "~~~~~"]);
                    let info = rng.pick(&["", "rust", "py title=\"a b\"", " sh"]);
                    doc.push_str(&format!("{indent}{fence}{info}{nl}"));
                    for _ in 0..rng.below(30) {
                        let line = match rng.below(8) {
                            0 => String::new(),
                            1 => "   ".to_string(),
                            // Fences that must not close this block.
                            2 if fence.starts_with('`') => "~~~".to_string(),
                            2 => "```".to_string(),
                            3 if fence.len() > 3 => fence[..3].to_string(),
                            4 if rng.below(4) == 0 => "x".repeat(scale),
                            _ => {
                                let n = 1 + rng.below(10);
                                format!("    {}", words(rng, n))
                            }
                        };
                        doc.push_str(&line);
                        doc += nl;
                    }
                    // Sometimes the last block is left open, as a truncated reply would be.
                    if b + 1 < blocks || rng.below(4) != 0 {
                        doc.push_str(&format!("{indent}{fence}{nl}"));
                    }
                }
                _ => {
                    doc += rng.pick(&[
                        "# Heading",
                        // A paragraph after the list ends it, so no fence below is
                        // inside an item: the splitter does not track containers.
                        "- item one\n- item two\n\nafter",
                        "| a | b |\n|---|---|\n| 1 | 2 |",
                        "> quoted\n> more",
                        "1. first\n2. second\n\nafter",
                    ]);
                    doc += nl;
                }
            }
            doc += rng.pick(&["", nl, nl, "  ", "\t"]);
            doc += nl;
        }
        doc
    }

    #[test]
    fn random_documents_keep_the_invariants() {
        let mut rng = Lcg(0x5eed);
        let (mut split, mut reopened, mut many_parts) = (0, 0, 0);
        for _ in 0..300 {
            let scale = 20 + rng.below(200);
            let doc = random_doc(&mut rng, scale);
            let budget = 64 + rng.below(1500);
            let (chunks, reopens) = check_split(&doc, budget);
            split += usize::from(chunks > 1);
            reopened += usize::from(reopens > 0);
            let max_bytes = 300 + rng.below(4000);
            many_parts += usize::from(check_parts(&doc, max_bytes, 0).len() > 1);
        }
        // The documents do exercise splitting, of code blocks too.
        assert!(
            split > 150 && reopened > 50 && many_parts > 150,
            "{split} {reopened} {many_parts}"
        );
    }

    #[test]
    fn a_large_mixed_reply_fits_in_parts() {
        let mut text = String::new();
        let mut rng = Lcg(42);
        while text.len() < 200_000 {
            text.push_str(&words(&mut rng, 60));
            text += "\n";
            text.push_str(&words(&mut rng, 40));
            text += "\n\n```rust\n";
            for i in 0..800 {
                text.push_str(&format!(
                    "    let x{i} = \"<{i}>\"; // {}\n",
                    words(&mut rng, 3)
                ));
                if i % 100 == 0 {
                    text += "\n";
                }
            }
            text += "```\n\n";
        }
        // One line over a part on its own, in code and in prose.
        text.push_str(&format!("~~~\n{}\n~~~\n\n", "y".repeat(70_000)));
        text.push_str(&words(&mut rng, 12_000));
        text += "\n\nThe end.";
        let parts = check_parts(&text, MAX_PART_BYTES, 60_000);
        assert!(parts.len() >= 4, "{}", parts.len());
        let (chunks, reopened) = check_split(&text, 30_000);
        assert!(chunks > 7 && reopened > 0);
    }

    #[test]
    fn escaping_inflation_still_fits() {
        let text = "<<<< \"\"\"\" &&&& \\\\ \n".repeat(10_000);
        let parts = check_parts(&text, MAX_PART_BYTES, 0);
        assert!(parts.len() > 1);
        // Inflation hits code blocks too.
        let code = format!("```\n{}```\n", "<\"&<\"&<\"&\n".repeat(20_000));
        check_parts(&code, MAX_PART_BYTES, 0);
        check_parts(&code, 500, 0);
    }
}
