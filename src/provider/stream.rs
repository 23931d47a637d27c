//! Streamed answers (`"stream": true`): the server-sent events of the Responses API, parsed
//! incrementally. Text arrives as `response.output_text.delta` events; the terminal
//! `response.completed` or `response.incomplete` event carries the whole response with its
//! usage; `response.failed` and `error` end it with a failure. There is no `[DONE]` line.

use serde_json::Value;

use super::{parse_response, ParsedResponse, ProviderError};

/// One server-sent event: its `event:` name (may be empty) and its joined `data:` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Splits a byte stream into events; bytes of an unfinished event wait for the next chunk.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    event: String,
    data: Vec<String>,
}

impl SseParser {
    /// Feeds one chunk; returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() || !self.event.is_empty() {
                    out.push(SseEvent {
                        event: std::mem::take(&mut self.event),
                        data: std::mem::take(&mut self.data).join("\n"),
                    });
                }
            } else if let Some(v) = field(line, "data") {
                self.data.push(v.to_string());
            } else if let Some(v) = field(line, "event") {
                self.event = v.to_string();
            }
            // Comments (`:`), `id:` and `retry:` lines carry nothing the bot uses.
        }
        out
    }
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(name)?.strip_prefix(':')?;
    Some(rest.strip_prefix(' ').unwrap_or(rest))
}

/// What one event means for the answer.
#[derive(Debug, Clone)]
pub enum Step {
    /// More of the answer's text.
    Delta(String),
    /// The stream ended: the whole response, or why it failed.
    Done(Result<ParsedResponse, ProviderError>),
    /// Bookkeeping the bot ignores (created, in progress, output item added, ...).
    Skip,
}

/// Interprets one event (the type is read from the data's `type`, else the event name).
pub fn step(ev: &SseEvent) -> Step {
    let Ok(data) = serde_json::from_str::<Value>(&ev.data) else {
        return Step::Skip;
    };
    let kind = data["type"].as_str().unwrap_or(&ev.event).to_string();
    let failed = |message: String| {
        Step::Done(Err(ProviderError::Retryable {
            status: None,
            message,
            retry_after: None,
            maybe_billed: true,
        }))
    };
    match kind.as_str() {
        "response.output_text.delta" => Step::Delta(data["delta"].as_str().unwrap_or("").into()),
        "response.completed" | "response.incomplete" => {
            let body = serde_json::to_vec(&data["response"]).unwrap_or_default();
            Step::Done(parse_response(&body))
        }
        "response.failed" => failed(
            data.pointer("/response/error/message")
                .and_then(Value::as_str)
                .unwrap_or("response failed")
                .chars()
                .take(300)
                .collect(),
        ),
        "error" => failed(
            data["message"]
                .as_str()
                .or_else(|| data.pointer("/error/message").and_then(Value::as_str))
                .unwrap_or("stream error")
                .chars()
                .take(300)
                .collect(),
        ),
        _ => Step::Skip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sse(kind: &str, data: Value) -> String {
        format!("event: {kind}\ndata: {data}\n\n")
    }

    #[test]
    fn events_are_split_across_any_chunking() {
        let stream = format!(
            ": keep-alive\n\n{}{}",
            sse(
                "response.output_text.delta",
                json!({"type": "response.output_text.delta", "delta": "Hel"})
            ),
            "event: response.output_text.delta\r\ndata: {\"type\":\"response.output_text.delta\",\r\ndata: \"delta\":\"lo\"}\r\n\r\n"
        );
        for size in [1, 3, 7, stream.len()] {
            let mut p = SseParser::default();
            let events: Vec<SseEvent> = stream
                .as_bytes()
                .chunks(size)
                .flat_map(|c| p.push(c))
                .collect();
            assert_eq!(events.len(), 2, "chunks of {size}");
            assert!(matches!(step(&events[0]), Step::Delta(d) if d == "Hel"));
            assert!(
                matches!(step(&events[1]), Step::Delta(d) if d == "lo"),
                "multi-line data"
            );
        }
    }

    #[test]
    fn terminal_events_carry_the_response_or_the_failure() {
        let done = SseEvent {
            event: "response.completed".into(),
            data: json!({"type": "response.completed", "response": {
                "id": "r1", "status": "completed",
                "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hello"}]}],
                "usage": {"input_tokens": 10, "output_tokens": 2, "cost_in_usd_ticks": 99},
            }})
            .to_string(),
        };
        let Step::Done(Ok(r)) = step(&done) else {
            panic!("completed")
        };
        assert_eq!(
            (r.text.as_str(), r.usage.reported_cost_ticks),
            ("Hello", Some(99))
        );
        let failed = SseEvent {
            event: String::new(),
            data: json!({"type": "response.failed", "response": {"error": {"message": "boom"}}})
                .to_string(),
        };
        match step(&failed) {
            Step::Done(Err(e)) => {
                assert!(e.may_have_been_billed() && e.to_string().contains("boom"))
            }
            other => panic!("{other:?}"),
        }
        let created = SseEvent {
            event: "response.created".into(),
            data: json!({"type": "response.created"}).to_string(),
        };
        assert!(matches!(step(&created), Step::Skip));
    }
}
