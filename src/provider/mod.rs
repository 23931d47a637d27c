//! The xAI client: the Responses API (`POST {base_url}/responses`), typed errors, retries,
//! usage and cost in integer ticks.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{usd_to_ticks, PriceConfig, ProviderConfig};
use crate::context::Turn;
use crate::vision::{ImageInput, IMAGE_TOKENS};

mod account;
pub mod stream;

pub use account::AccountCheck;

/// A provider failure; callers branch on [`ProviderError::is_retryable`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// Worth trying again: a rate limit that is not about money, a 5xx, a timeout, a dropped
    /// connection.
    #[error("provider temporarily failed ({status:?}): {message}")]
    Retryable {
        status: Option<u16>,
        message: String,
        retry_after: Option<Duration>,
        /// The request reached xAI and may have been billed with no usage to say what.
        maybe_billed: bool,
    },
    /// Trying again cannot help: bad request, auth, unknown model, gone, exhausted credits.
    #[error("provider rejected the request ({status:?}): {message}")]
    Fatal {
        status: Option<u16>,
        message: String,
    },
    /// Not called: the worker lost its claim (or could not confirm it), so another replica
    /// may be answering.
    #[error("not called: the claim was lost")]
    ClaimLost,
}

impl ProviderError {
    /// Whether a retry (or a fallback model) could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProviderError::Retryable { .. })
    }

    /// Whether the failed attempt may have been billed: the request reached xAI and the
    /// answer was neither a refusal (4xx, 429) nor a usage report. Such attempts are charged at
    /// their worst case ([`worst_case_ticks`]) so the ceiling holds.
    pub fn may_have_been_billed(&self) -> bool {
        matches!(
            self,
            ProviderError::Retryable {
                maybe_billed: true,
                ..
            }
        )
    }

    /// What kind of failure this is, for the operator's metrics and alerts.
    pub fn kind(&self) -> FailureKind {
        match self {
            ProviderError::ClaimLost => FailureKind::ClaimLost,
            ProviderError::Fatal { status, message } => match status {
                Some(401 | 403) => FailureKind::ApiKey,
                // xAI answers a malformed or unknown key with a 400 that says so.
                Some(400) if message.to_ascii_lowercase().contains("api key") => {
                    FailureKind::ApiKey
                }
                Some(429) => FailureKind::Credits,
                Some(410) => FailureKind::Gone,
                // No key configured at all.
                None => FailureKind::ApiKey,
                Some(_) => FailureKind::Rejected,
            },
            ProviderError::Retryable { status, .. } => match status {
                Some(408) | None => FailureKind::Transport,
                Some(409 | 429) => FailureKind::RateLimited,
                Some(_) => FailureKind::Server,
            },
        }
    }

    /// A problem of the whole account (the key or the money), not of this request: another
    /// model or stage would fail the same way, so the cascade stops at the first one.
    pub fn is_account_problem(&self) -> bool {
        matches!(self.kind(), FailureKind::ApiKey | FailureKind::Credits)
    }

    /// How long the provider asked to wait before a retry (`Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Retryable { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status, when the provider answered at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            ProviderError::Retryable { status, .. } | ProviderError::Fatal { status, .. } => {
                *status
            }
            ProviderError::ClaimLost => None,
        }
    }
}

/// The kinds of provider failure, each with its stable label in `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The key is wrong, revoked, blocked or missing (401, 403, a 400 about the key).
    ApiKey,
    /// The team's credits or spending limit ran out (a 429 that says so).
    Credits,
    /// A rate limit or conflict: worth retrying later (429, 409).
    RateLimited,
    /// A 5xx from xAI.
    Server,
    /// A timeout, a dropped or refused connection, an unreadable or broken answer.
    Transport,
    /// The feature or endpoint is gone (410).
    Gone,
    /// Any other refusal of the request (400, 404, 422, ...).
    Rejected,
    /// Not called: the claim was lost.
    ClaimLost,
}

impl FailureKind {
    /// The label in `grok_provider_failures_total{kind=...}`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::ApiKey => "api_key",
            FailureKind::Credits => "credits",
            FailureKind::RateLimited => "rate_limited",
            FailureKind::Server => "server",
            FailureKind::Transport => "transport",
            FailureKind::Gone => "gone",
            FailureKind::Rejected => "rejected",
            FailureKind::ClaimLost => "claim_lost",
        }
    }
}

/// Maps an HTTP error answer to a typed error. A 429 that says the credits or the spending
/// limit ran out is fatal: retrying only burns time.
pub fn classify_http_error(
    status: u16,
    body: &str,
    retry_after: Option<Duration>,
) -> ProviderError {
    let message = error_message(body);
    let lowered = message.to_ascii_lowercase();
    let out_of_money = ["credit", "spending limit", "billing", "quota"]
        .iter()
        .any(|w| lowered.contains(w));
    match status {
        429 if out_of_money => ProviderError::Fatal {
            status: Some(status),
            message,
        },
        408 | 409 | 429 | 500..=599 => ProviderError::Retryable {
            status: Some(status),
            message,
            retry_after,
            // A 5xx or a request timeout may come after the model ran; a 409 or 429 is a
            // refusal before it.
            maybe_billed: status == 408 || status >= 500,
        },
        _ => ProviderError::Fatal {
            status: Some(status),
            message,
        },
    }
}

/// The provider's error text, from `{"error": "..."}`, `{"error": {"message": ...}}` or the raw
/// body, cut short so nothing large reaches a log.
fn error_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let text = parsed
        .as_ref()
        .and_then(|v| {
            v.get("error")
                .and_then(|e| {
                    e.as_str()
                        .map(str::to_string)
                        .or_else(|| e.get("message").and_then(Value::as_str).map(str::to_string))
                })
                .or_else(|| v.get("message").and_then(Value::as_str).map(str::to_string))
        })
        .unwrap_or_else(|| body.to_string());
    text.chars().take(300).collect()
}

/// Token counts and cost of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: i64,
    pub cached_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub web_search_calls: i64,
    /// `usage.cost_in_usd_ticks`, when the provider reported it.
    pub reported_cost_ticks: Option<i64>,
}

/// Where a cost figure came from (`request_log.cost_source`), from the most to the least
/// exact: a request's figure is as exact as its least exact stage (the maximum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CostSource {
    /// `cost_in_usd_ticks` from the response.
    Reported,
    /// Computed from the configured price table.
    Computed,
    /// Includes an attempt that failed after reaching xAI, charged at its worst case.
    Estimated,
    /// No price is configured for a model that ran.
    Unknown,
}

impl CostSource {
    /// The stored token.
    pub fn as_str(self) -> &'static str {
        match self {
            CostSource::Reported => "reported",
            CostSource::Computed => "computed",
            CostSource::Estimated => "estimated",
            CostSource::Unknown => "unknown",
        }
    }
}

/// Tokens assumed for the instructions and message framing of any call.
pub const FRAMING_TOKENS: i64 = 300;

/// Tokens of a text, estimated offline from its UTF-8 bytes: 3 bytes a token errs high for
/// English and code (about 4) and holds for CJK (one 3-byte character is about a token), so
/// no script is undercounted; high is the safe side for a reservation, a charge or a bound.
pub fn estimate_text_tokens(text: &str) -> i64 {
    (text.len() as i64 + 2) / 3
}

/// Prompt tokens of a call's input text: the text plus the call's framing.
pub fn estimate_prompt_tokens(text: &str) -> i64 {
    estimate_text_tokens(text) + FRAMING_TOKENS
}

/// The most one attempt of `req` can have cost: its whole body as input, uncached, and every
/// output token it allowed, plus every web search it allowed. Failed attempts that may have been
/// billed are charged this, so spend never hides below the ceiling.
pub fn worst_case_ticks(req: &CompletionRequest, price: &Price) -> i64 {
    let usage = Usage {
        input_tokens: req.estimated_input_tokens(),
        output_tokens: i64::from(req.max_output_tokens),
        web_search_calls: i64::from(req.web_search_turns.unwrap_or(0)),
        ..Usage::default()
    };
    compute_cost_ticks(&usage, price)
}

/// What a streamed call tells its listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamUpdate {
    /// A failed attempt is retried: forget its text.
    Restart,
    /// More text of the answer.
    Delta(String),
}

/// `incomplete_reason` of an answer whose stream broke after text arrived.
pub const STREAM_BROKEN: &str = "stream_broken";

/// The result of a call with retries, and the failed attempts that may have been billed.
#[derive(Debug)]
pub struct Called {
    pub result: Result<Completion, ProviderError>,
    /// Attempts that failed after reaching xAI ([`ProviderError::may_have_been_billed`]).
    pub unconfirmed: u32,
}

/// A model's price in integer ticks per token (and per web-search call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input: i64,
    pub cached_input: i64,
    pub output: i64,
    pub web_search_call: i64,
}

impl From<&PriceConfig> for Price {
    fn from(p: &PriceConfig) -> Self {
        let per_token = |usd_per_m: f64| usd_to_ticks(usd_per_m) / 1_000_000;
        Price {
            input: per_token(p.input_per_m),
            cached_input: per_token(p.cached_input_per_m),
            output: per_token(p.output_per_m),
            web_search_call: usd_to_ticks(p.web_search_call),
        }
    }
}

/// Cost of a call from the price table. Cached tokens are a subset of the input tokens;
/// reasoning tokens are billed at the output price and, on the Responses API, are already
/// part of `output_tokens`.
pub fn compute_cost_ticks(usage: &Usage, price: &Price) -> i64 {
    let uncached = (usage.input_tokens - usage.cached_tokens).max(0);
    uncached * price.input
        + usage.cached_tokens.min(usage.input_tokens) * price.cached_input
        + usage.output_tokens * price.output
        + usage.web_search_calls * price.web_search_call
}

/// The settled cost: the reported figure when present, else computed from the price table.
pub fn settle_cost(usage: &Usage, price: Option<&Price>) -> (i64, CostSource) {
    match (usage.reported_cost_ticks, price) {
        (Some(ticks), _) => (ticks, CostSource::Reported),
        (None, Some(p)) => (compute_cost_ticks(usage, p), CostSource::Computed),
        (None, None) => (0, CostSource::Unknown),
    }
}

/// One request to the model.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub model: String,
    pub instructions: String,
    /// Earlier turns of the conversation, oldest first, sent before `input`.
    pub turns: Vec<Turn>,
    pub input: String,
    /// Images sent with `input`, in the same user turn.
    pub images: Vec<ImageInput>,
    pub max_output_tokens: u32,
    /// Keeps a room's calls on one provider cache (`prompt_cache_key`).
    pub cache_key: Option<String>,
    /// An opaque, hashed end-user id (`user`).
    pub user: Option<String>,
    /// `reasoning.effort`, only for models that accept it.
    pub reasoning_effort: Option<String>,
    /// Turn on the server-side `web_search` tool, bounded to this many tool turns.
    pub web_search_turns: Option<u32>,
    /// Ask for server-sent events (set by [`Provider::complete_streaming`]).
    pub stream: bool,
}

impl CompletionRequest {
    /// A plain request: no reasoning effort, no tools.
    pub fn new(model: &str, instructions: &str, input: &str, max_output_tokens: u32) -> Self {
        Self {
            model: model.to_string(),
            instructions: instructions.to_string(),
            turns: Vec::new(),
            input: input.to_string(),
            images: Vec::new(),
            max_output_tokens,
            cache_key: None,
            user: None,
            reasoning_effort: None,
            web_search_turns: None,
            stream: false,
        }
    }

    /// The JSON body for `POST /responses`: the turns then the message, oldest first, so a
    /// conversation's next request starts with this one's input (xAI's prompt cache).
    pub fn body(&self) -> Value {
        self.body_with(true)
    }

    /// Estimated input tokens: the body's text, and [`IMAGE_TOKENS`] per image rather than
    /// its base64 (which is not what xAI bills).
    pub fn estimated_input_tokens(&self) -> i64 {
        estimate_prompt_tokens(&self.body_with(false).to_string())
            + IMAGE_TOKENS * self.images.len() as i64
    }

    fn body_with(&self, images: bool) -> Value {
        // A message with images is a list of content parts: the images, then its text.
        let current = if images && !self.images.is_empty() {
            let parts: Vec<Value> = self
                .images
                .iter()
                .map(|i| json!({"type": "input_image", "image_url": &*i.data_url}))
                .chain([json!({"type": "input_text", "text": self.input})])
                .collect();
            json!(parts)
        } else {
            json!(self.input)
        };
        let input: Vec<Value> = self
            .turns
            .iter()
            .map(|t| json!({"role": t.role.as_str(), "content": t.text}))
            .chain([json!({"role": "user", "content": current})])
            .collect();
        let mut body = json!({
            "model": self.model,
            "instructions": self.instructions,
            "input": input,
            "max_output_tokens": self.max_output_tokens,
            "store": false,
        });
        if let Some(k) = &self.cache_key {
            body["prompt_cache_key"] = json!(k);
        }
        if let Some(u) = &self.user {
            body["user"] = json!(u);
        }
        if let Some(effort) = &self.reasoning_effort {
            body["reasoning"] = json!({"effort": effort});
        }
        if let Some(turns) = self.web_search_turns {
            body["tools"] = json!([{"type": "web_search"}]);
            body["max_turns"] = json!(turns);
        }
        if self.stream {
            body["stream"] = json!(true);
        }
        body
    }
}

impl Completion {
    /// The answer of `req` from its parsed response (streamed or not).
    fn from_parsed(
        parsed: ParsedResponse,
        req: &CompletionRequest,
        request_id: Option<String>,
        started: Instant,
    ) -> Self {
        Self {
            text: parsed.text,
            model: req.model.clone(),
            status: parsed.status,
            incomplete_reason: parsed.incomplete_reason,
            usage: parsed.usage,
            citations: parsed.citations,
            response_id: parsed.id,
            request_id,
            latency: started.elapsed(),
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub model: String,
    /// `status` of the response: `completed`, or `incomplete` when cut short.
    pub status: String,
    /// `incomplete_details.reason`, e.g. `max_output_tokens`.
    pub incomplete_reason: Option<String>,
    pub usage: Usage,
    /// Source URLs the answer used (web search), in order, without duplicates.
    pub citations: Vec<String>,
    /// The response `id` (on xAI's billing records).
    pub response_id: String,
    /// The `x-request-id` header, for support requests.
    pub request_id: Option<String>,
    pub latency: Duration,
}

#[derive(Deserialize)]
struct ResponseBody {
    #[serde(default)]
    id: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    incomplete_details: Option<Value>,
    #[serde(default)]
    output: Vec<Value>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    citations: Vec<Value>,
}

fn parse_usage(u: &Value) -> Usage {
    let int = |ptr: &str| u.pointer(ptr).and_then(Value::as_i64).unwrap_or(0);
    Usage {
        input_tokens: int("/input_tokens"),
        cached_tokens: int("/input_tokens_details/cached_tokens"),
        output_tokens: int("/output_tokens"),
        reasoning_tokens: int("/output_tokens_details/reasoning_tokens"),
        web_search_calls: int("/server_side_tool_usage_details/web_search_calls"),
        reported_cost_ticks: u.get("cost_in_usd_ticks").and_then(Value::as_i64),
    }
}

/// Concatenates the `output_text` parts of the assistant's message items.
fn output_text(output: &[Value]) -> String {
    let mut text = String::new();
    for item in output.iter().filter(|i| i["type"] == "message") {
        for part in item["content"].as_array().into_iter().flatten() {
            if part["type"] == "output_text" {
                if let Some(t) = part["text"].as_str() {
                    text.push_str(t);
                }
            }
        }
    }
    text
}

/// The parts of a Responses API body the bot uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedResponse {
    pub text: String,
    pub id: String,
    pub status: String,
    pub incomplete_reason: Option<String>,
    pub usage: Usage,
    pub citations: Vec<String>,
}

/// Source URLs: the response's `citations` plus `url_citation` annotations, deduplicated.
fn citations(parsed: &ResponseBody) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    let annotated = parsed
        .output
        .iter()
        .flat_map(|item| item["content"].as_array().into_iter().flatten())
        .flat_map(|part| part["annotations"].as_array().into_iter().flatten())
        .filter(|a| a["type"] == "url_citation")
        .filter_map(|a| a["url"].as_str());
    let listed = parsed
        .citations
        .iter()
        .filter_map(|c| c.as_str().or_else(|| c["url"].as_str()));
    for url in listed.chain(annotated) {
        if (url.starts_with("https://") || url.starts_with("http://"))
            && !urls.iter().any(|u| u == url)
        {
            urls.push(url.to_string());
        }
    }
    urls
}

/// Parses a Responses API body. A `failed` status is a retryable error.
pub fn parse_response(body: &[u8]) -> Result<ParsedResponse, ProviderError> {
    let parsed: ResponseBody =
        serde_json::from_slice(body).map_err(|e| ProviderError::Retryable {
            status: None,
            message: format!("unreadable response body: {e}"),
            retry_after: None,
            maybe_billed: true,
        })?;
    if parsed.status == "failed" {
        return Err(ProviderError::Retryable {
            status: None,
            message: "response status failed".into(),
            retry_after: None,
            maybe_billed: true,
        });
    }
    Ok(ParsedResponse {
        citations: citations(&parsed),
        text: output_text(&parsed.output),
        id: parsed.id,
        status: parsed.status,
        incomplete_reason: parsed
            .incomplete_details
            .as_ref()
            .and_then(|d| d.get("reason"))
            .and_then(Value::as_str)
            .map(str::to_string),
        usage: parsed.usage.as_ref().map(parse_usage).unwrap_or_default(),
    })
}

/// The xAI client.
#[derive(Clone)]
pub struct Provider {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
    max_retries: u32,
    prices: BTreeMap<String, Price>,
}

impl Provider {
    /// Builds the client from the validated config.
    pub fn new(config: &ProviderConfig, prices: &BTreeMap<String, PriceConfig>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(config.timeout_secs))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("the TLS backend initialises");
        Self {
            http,
            base_url: config.base_url.clone(),
            api_key: config.api_key.clone(),
            max_retries: config.max_retries,
            prices: prices
                .iter()
                .map(|(m, p)| (m.clone(), Price::from(p)))
                .collect(),
        }
    }

    /// The price of a model, if configured.
    pub fn price(&self, model: &str) -> Option<&Price> {
        self.prices.get(model)
    }

    /// Calls the model, retrying retryable failures with jittered exponential backoff, and
    /// counts the failed attempts that may have been billed.
    pub async fn complete(&self, req: &CompletionRequest) -> Called {
        let mut attempt = 0;
        let mut unconfirmed = 0;
        loop {
            let result = self.complete_once(req).await;
            if let Err(e) = &result {
                unconfirmed += u32::from(e.may_have_been_billed());
            }
            match result {
                Err(ProviderError::Retryable {
                    retry_after,
                    status,
                    message,
                    ..
                }) if attempt < self.max_retries => {
                    attempt += 1;
                    let wait = retry_after
                        .unwrap_or_else(|| crate::backoff::jittered(attempt))
                        .min(Duration::from_secs(30));
                    tracing::warn!(model = %req.model, ?status, %message, attempt, ?wait,
                        "provider call failed, retrying");
                    tokio::time::sleep(wait).await;
                }
                result => {
                    return Called {
                        result,
                        unconfirmed,
                    }
                }
            }
        }
    }

    /// Like [`Provider::complete`], but streamed: text goes to `updates` as it arrives
    /// ([`StreamUpdate::Restart`] before a retry, so a listener drops what a failed attempt
    /// wrote). A stream that breaks after text arrived is not retried (the user may already
    /// read it): it returns what came, marked incomplete (`stream_broken`), and counts as an
    /// unconfirmed attempt, charged at its worst case like any failure that may be billed.
    pub async fn complete_streaming(
        &self,
        req: &CompletionRequest,
        updates: &tokio::sync::mpsc::UnboundedSender<StreamUpdate>,
    ) -> Called {
        let mut req = req.clone();
        req.stream = true;
        let mut attempt = 0;
        let mut unconfirmed = 0;
        loop {
            if attempt > 0 {
                let _ = updates.send(StreamUpdate::Restart);
            }
            let started = Instant::now();
            let mut partial = String::new();
            let result = self.stream_once(&req, updates, &mut partial).await;
            match result {
                Ok(c) => {
                    return Called {
                        result: Ok(c),
                        unconfirmed,
                    }
                }
                Err(e) if !partial.is_empty() => {
                    tracing::warn!(model = %req.model, error = %e, "the answer's stream broke");
                    return Called {
                        result: Ok(Completion {
                            text: partial,
                            model: req.model.clone(),
                            status: "incomplete".into(),
                            incomplete_reason: Some(STREAM_BROKEN.into()),
                            usage: Usage::default(),
                            citations: Vec::new(),
                            response_id: String::new(),
                            request_id: None,
                            latency: started.elapsed(),
                        }),
                        unconfirmed: unconfirmed + 1,
                    };
                }
                Err(e) => {
                    unconfirmed += u32::from(e.may_have_been_billed());
                    if !e.is_retryable() || attempt >= self.max_retries {
                        return Called {
                            result: Err(e),
                            unconfirmed,
                        };
                    }
                    attempt += 1;
                    let wait = e
                        .retry_after()
                        .unwrap_or_else(|| crate::backoff::jittered(attempt))
                        .min(Duration::from_secs(30));
                    tracing::warn!(model = %req.model, error = %e, attempt, ?wait,
                        "provider stream failed, retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// One streamed call; `partial` collects the text sent to `updates`.
    async fn stream_once(
        &self,
        req: &CompletionRequest,
        updates: &tokio::sync::mpsc::UnboundedSender<StreamUpdate>,
        partial: &mut String,
    ) -> Result<Completion, ProviderError> {
        let (mut response, started, request_id) = self.send(req).await?;
        let mut parser = stream::SseParser::default();
        let broken = |message: String| ProviderError::Retryable {
            status: None,
            message,
            retry_after: None,
            maybe_billed: true,
        };
        loop {
            let chunk = response
                .chunk()
                .await
                .map_err(|e| broken(transport_message(e)))?;
            let Some(chunk) = chunk else {
                return Err(broken("the stream ended before the response did".into()));
            };
            for event in parser.push(&chunk) {
                match stream::step(&event) {
                    stream::Step::Delta(text) => {
                        partial.push_str(&text);
                        let _ = updates.send(StreamUpdate::Delta(text));
                    }
                    stream::Step::Done(parsed) => {
                        let parsed = parsed?;
                        return Ok(Completion::from_parsed(parsed, req, request_id, started));
                    }
                    stream::Step::Skip => {}
                }
            }
        }
    }

    /// One call, no retries.
    pub async fn complete_once(
        &self,
        req: &CompletionRequest,
    ) -> Result<Completion, ProviderError> {
        let (response, started, request_id) = self.send(req).await?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ProviderError::Retryable {
                status: Some(status),
                message: transport_message(e),
                retry_after: None,
                maybe_billed: true,
            })?;
        let parsed = parse_response(&bytes)?;
        Ok(Completion::from_parsed(parsed, req, request_id, started))
    }

    /// Posts the request; returns a 2xx response (its body unread), when it was sent and its
    /// `x-request-id`, or the typed error of any other answer.
    async fn send(
        &self,
        req: &CompletionRequest,
    ) -> Result<(reqwest::Response, Instant, Option<String>), ProviderError> {
        let Some(key) = &self.api_key else {
            return Err(ProviderError::Fatal {
                status: None,
                message: "XAI_API_KEY is not set".into(),
            });
        };
        let started = Instant::now();
        let response = self
            .http
            .post(format!("{}/responses", self.base_url))
            .bearer_auth(key)
            .json(&req.body())
            .send()
            .await
            .map_err(|e| ProviderError::Retryable {
                status: None,
                // A request that never connected cannot have been billed.
                maybe_billed: !e.is_connect(),
                message: transport_message(e),
                retry_after: None,
            })?;
        let status = response.status().as_u16();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if (200..300).contains(&status) {
            return Ok((response, started, request_id));
        }
        let retry_after = crate::backoff::retry_after(response.headers());
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ProviderError::Retryable {
                status: Some(status),
                message: transport_message(e),
                retry_after: None,
                // The body of a refusal costs nothing; any other answer may have.
                maybe_billed: status == 408 || !(400..500).contains(&status),
            })?;
        Err(classify_http_error(
            status,
            &String::from_utf8_lossy(&bytes),
            retry_after,
        ))
    }
}

fn transport_message(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        // Without the URL: it is ours and adds nothing.
        e.without_url().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_errors_are_typed() {
        let retry = |s, b: &str| classify_http_error(s, b, None).is_retryable();
        assert!(retry(
            429,
            r#"{"error": "Too many tokens for team: Tokens per Minute 65605/16000"}"#
        ));
        assert!(!retry(
            429,
            r#"{"error": "Your team has either used all available credits or reached its monthly spending limit"}"#
        ));
        for s in [500, 502, 503, 504, 408] {
            assert!(retry(s, "oops"), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 415, 422] {
            assert!(!retry(s, "{}"), "{s}");
        }
        let e = classify_http_error(401, r#"{"code": "x", "error": "Incorrect API key"}"#, None);
        assert!(e.to_string().contains("Incorrect API key"));
    }

    #[test]
    fn failures_are_sorted_for_the_operator() {
        let kind = |s, b: &str| classify_http_error(s, b, None).kind();
        let credits = r#"{"error": "Your team has either used all available credits"}"#;
        let table = [
            (401, "{}", FailureKind::ApiKey),
            (403, "{}", FailureKind::ApiKey),
            (
                400,
                r#"{"error": "Incorrect API key provided: xai-***"}"#,
                FailureKind::ApiKey,
            ),
            (
                400,
                r#"{"error": "Invalid request: max_output_tokens"}"#,
                FailureKind::Rejected,
            ),
            (429, credits, FailureKind::Credits),
            (
                429,
                r#"{"error": "Too many requests"}"#,
                FailureKind::RateLimited,
            ),
            (409, "{}", FailureKind::RateLimited),
            (500, "{}", FailureKind::Server),
            (503, "{}", FailureKind::Server),
            (408, "{}", FailureKind::Transport),
            (410, "{}", FailureKind::Gone),
            (404, "{}", FailureKind::Rejected),
        ];
        for (status, body, expected) in table {
            assert_eq!(kind(status, body), expected, "{status} {body}");
        }
        for (status, body, account) in [(401, "{}", true), (429, credits, true), (500, "{}", false)]
        {
            assert_eq!(
                classify_http_error(status, body, None).is_account_problem(),
                account
            );
        }
        assert_eq!(
            parse_response(b"not json").unwrap_err().kind(),
            FailureKind::Transport
        );
    }

    #[test]
    fn only_attempts_that_may_have_run_count_as_billed() {
        let billed = |s| classify_http_error(s, "{}", None).may_have_been_billed();
        for s in [500, 502, 503, 504, 408] {
            assert!(billed(s), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 429] {
            assert!(!billed(s), "{s}");
        }
        assert!(parse_response(b"not json")
            .unwrap_err()
            .may_have_been_billed());
        assert!(!ProviderError::ClaimLost.may_have_been_billed());
    }

    #[test]
    fn the_worst_case_covers_the_whole_body_and_every_allowed_token() {
        let price = Price {
            input: 2,
            cached_input: 1,
            output: 10,
            web_search_call: 1_000,
        };
        let mut req = CompletionRequest::new("m", "be brief", "hello", 100);
        let input = estimate_prompt_tokens(&req.body().to_string());
        assert_eq!(worst_case_ticks(&req, &price), input * 2 + 100 * 10);
        req.web_search_turns = Some(3);
        let input = estimate_prompt_tokens(&req.body().to_string());
        assert_eq!(
            worst_case_ticks(&req, &price),
            input * 2 + 100 * 10 + 3 * 1_000
        );
    }

    #[test]
    fn reported_cost_wins_and_computed_is_exact() {
        let price = Price::from(&PriceConfig {
            input_per_m: 1.25,
            cached_input_per_m: 0.20,
            output_per_m: 2.50,
            web_search_call: 0.005,
        });
        let mut usage = Usage {
            input_tokens: 1000,
            cached_tokens: 200,
            output_tokens: 500,
            reasoning_tokens: 100,
            web_search_calls: 2,
            reported_cost_ticks: None,
        };
        // 800*12500 + 200*2000 + 500*25000 + 2*50_000_000
        assert_eq!(
            settle_cost(&usage, Some(&price)),
            (
                10_000_000 + 400_000 + 12_500_000 + 100_000_000,
                CostSource::Computed
            )
        );
        usage.reported_cost_ticks = Some(37_756_000);
        assert_eq!(
            settle_cost(&usage, Some(&price)),
            (37_756_000, CostSource::Reported)
        );
        usage.reported_cost_ticks = None;
        assert_eq!(settle_cost(&usage, None), (0, CostSource::Unknown));
    }

    #[test]
    fn request_bodies_carry_tools_and_effort_only_when_asked() {
        let mut req = CompletionRequest::new("grok-4.3", "be brief", "hi", 64);
        let plain = req.body();
        assert!(plain.get("tools").is_none() && plain.get("reasoning").is_none());
        assert_eq!(plain["store"], false);
        req.web_search_turns = Some(2);
        req.reasoning_effort = Some("medium".into());
        let b = req.body();
        assert_eq!(b["tools"], json!([{"type": "web_search"}]));
        assert_eq!(b["max_turns"], 2);
        assert_eq!(b["reasoning"]["effort"], "medium");
    }

    #[test]
    fn images_are_content_parts_of_the_message_and_estimated_per_image() {
        let mut req = CompletionRequest::new("grok-4.3", "be brief", "what is this?", 64);
        let text_only = req.estimated_input_tokens();
        let big = vec![7u8; 300_000];
        req.images = vec![ImageInput::new("image/png", &big)];
        let b = req.body();
        let content = &b["input"][0]["content"];
        assert_eq!(content[0]["type"], "input_image");
        assert!(content[0]["image_url"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,"));
        assert_eq!(
            content[1],
            json!({"type": "input_text", "text": "what is this?"})
        );
        // The base64 is not counted as text: each image costs its documented worst case.
        assert_eq!(req.estimated_input_tokens(), text_only + IMAGE_TOKENS);
    }

    #[test]
    fn turns_are_laid_out_oldest_first_before_the_message() {
        use crate::context::Role;
        let mut req = CompletionRequest::new("grok-4.3", "be brief", "Alice: and now?", 64);
        req.cache_key = Some("!room:x $root".into());
        req.turns = vec![
            Turn {
                role: Role::User,
                text: "Alice: my cat is Zorblax".into(),
            },
            Turn {
                role: Role::Assistant,
                text: "Nice name!".into(),
            },
        ];
        let b = req.body();
        assert_eq!(b["instructions"], "be brief");
        assert_eq!(
            b["input"],
            json!([
                {"role": "user", "content": "Alice: my cat is Zorblax"},
                {"role": "assistant", "content": "Nice name!"},
                {"role": "user", "content": "Alice: and now?"},
            ])
        );
        assert_eq!(b["prompt_cache_key"], "!room:x $root");
        // Append-only: the next request's input starts with this one's.
        let mut next = req.clone();
        next.turns.push(Turn {
            role: Role::User,
            text: req.input.clone(),
        });
        next.turns.push(Turn {
            role: Role::Assistant,
            text: "Zorblax.".into(),
        });
        next.input = "Alice: thanks".into();
        let (a, b) = (req.body()["input"].clone(), next.body()["input"].clone());
        assert_eq!(b.as_array().unwrap()[..3], a.as_array().unwrap()[..]);
    }

    #[test]
    fn citations_are_collected_once() {
        let body = br#"{"status": "completed", "citations": ["https://a.example/x", "https://b.example/y"],
            "output": [{"type": "message", "content": [{"type": "output_text", "text": "t",
              "annotations": [{"type": "url_citation", "url": "https://a.example/x"},
                              {"type": "url_citation", "url": "https://c.example/z"}]}]}]}"#;
        let r = parse_response(body).unwrap();
        assert_eq!(
            r.citations,
            vec![
                "https://a.example/x",
                "https://b.example/y",
                "https://c.example/z"
            ]
        );
    }

    #[test]
    fn responses_body_is_read() {
        let body =
            br#"{"id": "resp_1", "object": "response", "model": "grok-4.3", "status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"},
            "output": [{"type": "reasoning", "summary": []},
                       {"type": "message", "role": "assistant", "content": [
                          {"type": "output_text", "text": "Hello ", "annotations": []},
                          {"type": "output_text", "text": "world", "annotations": []}]}],
            "usage": {"input_tokens": 7583, "input_tokens_details": {"cached_tokens": 3072},
                      "output_tokens": 3192, "output_tokens_details": {"reasoning_tokens": 10},
                      "total_tokens": 10775, "cost_in_usd_ticks": 292331500,
                      "server_side_tool_usage_details": {"web_search_calls": 1}}}"#;
        let r = parse_response(body).unwrap();
        let usage = r.usage;
        assert_eq!(r.text, "Hello world");
        assert_eq!(r.id, "resp_1");
        assert_eq!(r.status, "incomplete");
        assert_eq!(r.incomplete_reason.as_deref(), Some("max_output_tokens"));
        assert_eq!(usage.input_tokens, 7583);
        assert_eq!(usage.cached_tokens, 3072);
        assert_eq!(usage.output_tokens, 3192);
        assert_eq!(usage.reasoning_tokens, 10);
        assert_eq!(usage.web_search_calls, 1);
        assert_eq!(usage.reported_cost_ticks, Some(292331500));
    }
}
