//! The route cascade: the router picks a route, the route's stages call the provider, and
//! failures escalate or fall back at most once. Every decision lands in [`Outcome`], which the
//! bot turns into the reply and the `request_log` row.

pub mod router;

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use regex::Regex;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::UnboundedSender;

use crate::claims::Gate;
use crate::config::{CacheConfig, CascadeConfig, Config, ModelsConfig};
use crate::context::Conversation;
use crate::provider::{
    settle_cost, worst_case_ticks, Completion, CompletionRequest, CostSource, Provider,
    ProviderError, StreamUpdate, STREAM_BROKEN,
};
use crate::store::Store;
use crate::telemetry::StageUsage;
use crate::vision::ImageInput;
use router::{Decision, RouterOptions};

/// A route (the stable `request_log.route` tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Route {
    /// No model ran.
    None,
    GrokDirect,
    TrivialDirect,
    WebThenGrok,
    ReasonThenGrok,
}

impl Route {
    /// The stored token.
    pub fn as_str(self) -> &'static str {
        match self {
            Route::None => "none",
            Route::GrokDirect => "grok_direct",
            Route::TrivialDirect => "trivial_direct",
            Route::WebThenGrok => "web_then_grok",
            Route::ReasonThenGrok => "reason_then_grok",
        }
    }

    /// Parses a stored token.
    pub fn parse(token: &str) -> Option<Route> {
        [
            Route::None,
            Route::GrokDirect,
            Route::TrivialDirect,
            Route::WebThenGrok,
            Route::ReasonThenGrok,
        ]
        .into_iter()
        .find(|r| r.as_str() == token)
    }
}

/// Who chose the route (the stable `request_log.router_source` tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterSource {
    Heuristic,
    Classifier,
    Default,
    Forced,
    Degraded,
}

impl RouterSource {
    /// The stored token.
    pub fn as_str(self) -> &'static str {
        match self {
            RouterSource::Heuristic => "heuristic",
            RouterSource::Classifier => "classifier",
            RouterSource::Default => "default",
            RouterSource::Forced => "forced",
            RouterSource::Degraded => "degraded",
        }
    }
}

/// A step of the cascade that may call a model: the keys of the per-stage maps, the
/// `request_log.cost_<stage>_ticks` columns and the `models`/`stage_ms`/`stage_usage` JSON keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Router,
    Trivial,
    Web,
    Reason,
    Final,
}

impl Stage {
    /// Every stage, in the order the cascade runs them.
    pub const ALL: [Stage; 5] = [
        Stage::Router,
        Stage::Trivial,
        Stage::Web,
        Stage::Reason,
        Stage::Final,
    ];

    /// The stored token.
    pub const fn as_str(self) -> &'static str {
        match self {
            Stage::Router => "router",
            Stage::Trivial => "trivial",
            Stage::Web => "web",
            Stage::Reason => "reason",
            Stage::Final => "final",
        }
    }

    /// Whether the user reads this stage's output (so it is streamed when streaming is on):
    /// not the router, the cheap model (it may still escalate) or the reasoning notes.
    pub fn answers(self) -> bool {
        matches!(self, Stage::Web | Stage::Final)
    }
}

/// Why an answer is not the normal one (the stable `request_log.degraded` tokens, besides the
/// skip reasons of [`crate::classify::SkipReason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Degrade {
    /// The model answered nothing.
    EmptyCompletion,
    /// The classifier failed; the default route answered.
    RouterFailed,
    /// The cheap model's answer was unusable; it escalated once.
    TrivialFailed,
    /// The day's web searches ran out; answered without searching.
    GroundingCap,
    /// The web stage failed; answered without searching.
    WebFailed,
    /// The reasoning stage failed; answered directly.
    ReasoningFailed,
    /// The answer's stream broke after text arrived: the answer is incomplete.
    StreamBroken,
    /// The homeserver refused the reply for good.
    SendFailed,
    /// The budget store was unreachable: no model was called.
    ReserveError,
    /// The room's reply limit was reached.
    RoomRateLimited,
    /// An image was refused (type, size, or vision turned off) before any model call.
    ImageRejected,
}

impl Degrade {
    /// The stored token.
    pub fn as_str(self) -> &'static str {
        match self {
            Degrade::EmptyCompletion => "empty_completion",
            Degrade::RouterFailed => "router_failed",
            Degrade::TrivialFailed => "trivial_failed",
            Degrade::GroundingCap => "grounding_cap",
            Degrade::WebFailed => "web_failed",
            Degrade::ReasoningFailed => "reasoning_failed",
            Degrade::StreamBroken => "stream_broken",
            Degrade::SendFailed => "send_failed",
            Degrade::ReserveError => "reserve_error",
            Degrade::RoomRateLimited => "room_rate_limited",
            Degrade::ImageRejected => "image_rejected",
        }
    }
}

/// Everything the cascade learned while answering.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The answer text (sources appended on the web route); empty when the cascade failed.
    pub text: String,
    pub route: Route,
    pub router_source: RouterSource,
    pub router_confidence: f64,
    /// The router's matched rule ids.
    pub rules: Vec<&'static str>,
    /// Stage -> model id (`{"router": .., "final": ..}` in `request_log.models`).
    pub models: BTreeMap<Stage, String>,
    /// Stage -> milliseconds.
    pub stage_ms: BTreeMap<Stage, u64>,
    /// Stage -> cost in ticks.
    pub stage_cost: BTreeMap<Stage, i64>,
    /// Stage -> tokens, for the `grok_direct` counterfactual of `stats`.
    pub stage_usage: BTreeMap<Stage, StageUsage>,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    /// `reported` when every stage reported its cost, `computed` when any was computed.
    pub cost_source: Option<CostSource>,
    pub escalated: bool,
    pub fallback_fired: bool,
    pub cache_hit: bool,
    /// Failed attempts that may have been billed, charged at their worst case.
    pub unconfirmed_attempts: u32,
    /// A call stopped at its output cap (the answer may be cut short).
    pub truncated: bool,
    /// A degrade token (DESIGN section 5), if the answer is not the normal one.
    pub degraded: Option<Degrade>,
    pub provider_request_id: String,
    /// The provider error that ended the cascade, if any.
    pub error: Option<ProviderError>,
}

impl Outcome {
    fn new(decision: &Decision) -> Self {
        Self {
            text: String::new(),
            route: decision.route,
            router_source: decision.source,
            router_confidence: decision.confidence,
            rules: decision.rules.clone(),
            models: BTreeMap::new(),
            stage_ms: BTreeMap::new(),
            stage_cost: BTreeMap::new(),
            stage_usage: BTreeMap::new(),
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            reasoning_tokens: 0,
            cost_source: None,
            escalated: false,
            fallback_fired: false,
            cache_hit: false,
            unconfirmed_attempts: 0,
            truncated: false,
            degraded: None,
            provider_request_id: String::new(),
            error: None,
        }
    }

    /// Whether the user got a real answer.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.degraded != Some(Degrade::EmptyCompletion)
    }

    /// The total cost in ticks over all stages.
    pub fn cost_total(&self) -> i64 {
        self.stage_cost.values().sum()
    }

    /// Adds one stage's usage, cost and timing.
    fn absorb(&mut self, stage: Stage, c: &Completion, provider: &Provider) {
        let (ticks, source) = settle_cost(&c.usage, provider.price(&c.model));
        *self.stage_cost.entry(stage).or_default() += ticks;
        self.stage_usage.entry(stage).or_default().add(&c.usage);
        *self.stage_ms.entry(stage).or_default() += c.latency.as_millis() as u64;
        self.models.insert(stage, c.model.clone());
        self.truncated |= c.status == "incomplete" || c.incomplete_reason.is_some();
        if c.incomplete_reason.as_deref() == Some(STREAM_BROKEN) {
            self.degraded = Some(Degrade::StreamBroken);
        }
        self.prompt_tokens += c.usage.input_tokens;
        self.cached_tokens += c.usage.cached_tokens;
        self.completion_tokens += c.usage.output_tokens;
        self.reasoning_tokens += c.usage.reasoning_tokens;
        self.note_source(source);
        self.provider_request_id = c
            .request_id
            .clone()
            .unwrap_or_else(|| c.response_id.clone());
    }

    /// Keeps the least exact cost source seen.
    fn note_source(&mut self, source: CostSource) {
        self.cost_source = Some(self.cost_source.map_or(source, |prev| prev.max(source)));
    }

    /// Charges `attempts` failed attempts of `req` that may have been billed at their worst
    /// case: xAI sent no usage, and the ceiling must not hide what it may have cost.
    fn charge_unconfirmed(
        &mut self,
        stage: Stage,
        req: &CompletionRequest,
        attempts: u32,
        provider: &Provider,
    ) {
        if attempts == 0 {
            return;
        }
        let (ticks, source) = match provider.price(&req.model) {
            Some(price) => (worst_case_ticks(req, price), CostSource::Estimated),
            None => (0, CostSource::Unknown),
        };
        *self.stage_cost.entry(stage).or_default() += ticks * i64::from(attempts);
        self.unconfirmed_attempts += attempts;
        self.note_source(source);
    }

    /// Notes a failed stage's model and time.
    fn failed(&mut self, stage: Stage, model: &str, started: Instant) {
        self.models.insert(stage, model.to_string());
        *self.stage_ms.entry(stage).or_default() += started.elapsed().as_millis() as u64;
    }
}

/// The inputs of one cascade run.
#[derive(Debug, Clone, Default)]
pub struct Ask<'a> {
    pub text: &'a str,
    /// The room id: per-room route overrides, and sent as `prompt_cache_key` (without context).
    pub room_id: Option<&'a str>,
    /// A hashed user id, sent as `user`.
    pub user: Option<&'a str>,
    /// A lower cap on the answer's length than configured (the budget shrank the request).
    pub output_cap: Option<u32>,
    /// The worker's claim: every provider call waits until it is confirmed held.
    pub gate: Option<&'a Gate>,
    /// Where the user-facing answer's text is streamed as it is written (`reply.streaming`).
    pub stream: Option<&'a UnboundedSender<StreamUpdate>>,
    /// The conversation's earlier turns, sent with every answering call (not the classifier).
    pub context: Option<&'a Conversation>,
    /// Images sent with the message to every answering call; the final answer is then
    /// written by `models.vision`.
    pub images: &'a [ImageInput],
    /// An end-to-end encrypted message: its answer is kept out of the response cache, which
    /// would store it in the database in plaintext.
    pub private: bool,
}

/// A model answer that declines or admits it cannot help: escalate off the cheap model.
static REFUSAL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(i can(no|')t (help|answer|assist|do that)|i('m| am) (unable|not able)|i don'?t (know|have (access|real-time))|as an ai\b)",
    )
    .expect("valid regex")
});

const REASON_INSTRUCTIONS: &str = "Work the problem carefully and check your result. Give the \
     final result first, then the key steps. Another model will write the reply to the user.";

const CLASSIFIER_INSTRUCTIONS: &str = "Route a chat message to the cheapest model that can answer \
     it well. Reply with JSON only: {\"route\": R, \"confidence\": C}, R one of trivial_direct \
     (greetings, thanks, small talk), web_then_grok (needs current facts or sources), \
     reason_then_grok (math, code, multi-step reasoning), grok_direct (everything else); C in [0,1].";

/// How long a provider call waits for an unconfirmed claim (database unreachable) before
/// giving up on it.
const CLAIM_PATIENCE: Duration = Duration::from_secs(30);

/// The cascade with its settings; cheap to share.
#[derive(Clone)]
pub struct Cascade {
    provider: Provider,
    store: Store,
    models: ModelsConfig,
    settings: CascadeConfig,
    cache: CacheConfig,
    system_prompt: String,
    prompt_version: String,
    router: RouterOptions,
}

/// A short hash of everything that shapes an answer besides the question: system prompts and
/// model settings. Cached answers from another version are never served.
pub fn prompt_version(config: &Config) -> String {
    let m = &config.models;
    let c = &config.cascade;
    let material = format!(
        "{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
        config.bot.system_prompt,
        REASON_INSTRUCTIONS,
        m.final_model,
        m.trivial,
        m.reason,
        m.fallback.as_deref().unwrap_or(""),
        m.max_output_tokens,
        c.trivial_max_output_tokens,
        c.reason_effort,
        c.reason_max_output_tokens,
        c.web_max_turns,
    );
    hex::encode(&Sha256::digest(material.as_bytes())[..6])
}

fn utc_day() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

impl Cascade {
    /// Builds the cascade from the validated config.
    pub fn new(config: &Config, provider: Provider, store: Store) -> Self {
        Self {
            provider,
            store,
            models: config.models.clone(),
            settings: config.cascade.clone(),
            cache: config.cache.clone(),
            system_prompt: config.bot.system_prompt.clone(),
            prompt_version: prompt_version(config),
            router: RouterOptions {
                cutoff_year: config.cascade.cutoff_year,
                long_input_chars: config.cascade.long_input_chars,
            },
        }
    }

    /// The prompt version stored with each row.
    pub fn prompt_version(&self) -> &str {
        &self.prompt_version
    }

    /// The system prompt every user-facing answer is written under.
    pub fn system_prompt(&self) -> &str {
        &self.system_prompt
    }

    /// The pure routing decision: a forced prefix, else the room's route (a moderator's
    /// `room_route`, else `cascade.room_routes`), else the heuristic router.
    pub fn decide(&self, text: &str, room_id: Option<&str>, room_route: Option<Route>) -> Decision {
        let mut decision = router::decide(text, &self.router);
        let forced_by_room = room_route.or_else(|| {
            room_id
                .and_then(|r| self.settings.room_routes.get(r))
                .and_then(|t| Route::parse(t))
        });
        if let (Some(route), false) = (forced_by_room, decision.source == RouterSource::Forced) {
            decision.route = route;
            decision.source = RouterSource::Forced;
            decision.confidence = 1.0;
            decision.rules = vec!["forced:room"];
            decision.ambiguous = false;
        }
        decision
    }

    /// Answers one message.
    pub async fn run(&self, ask: &Ask<'_>) -> Outcome {
        self.run_decided(self.decide(ask.text, ask.room_id, None), ask)
            .await
    }

    /// Answers one message on a route already decided (the limiter may have changed it).
    pub async fn run_decided(&self, decision: Decision, ask: &Ask<'_>) -> Outcome {
        let mut out = Outcome::new(&decision);
        let text = decision.text.clone();
        if decision.ambiguous && self.settings.classifier && decision.source != RouterSource::Forced
        {
            self.classify(&classifier_input(&text, ask.context), &mut out)
                .await;
            if out.error.is_some() {
                // The key or the credits failed: every other call would fail the same way.
                return out;
            }
        }

        // An answer that read earlier turns or an image belongs to them, and one to an
        // encrypted message stays out of the database: never shared.
        let cache_key = match ask.context {
            Some(c) if c.has_turns() => None,
            _ if !ask.images.is_empty() || ask.private => None,
            _ => self.cache_key(&text, out.route, self.answer_cap(ask)),
        };
        if let Some(answer) = self.cache_lookup(cache_key.as_deref()).await {
            out.text = answer;
            out.cache_hit = true;
            return out;
        }

        match out.route {
            Route::TrivialDirect => self.trivial(&text, ask, &mut out).await,
            Route::WebThenGrok => self.web(&text, ask, &mut out).await,
            Route::ReasonThenGrok => self.reason(&text, ask, &mut out).await,
            Route::GrokDirect | Route::None => self.direct(&text, ask, &mut out).await,
        }
        out.text = out.text.trim().to_string();
        if out.error.is_none() && out.text.is_empty() {
            out.degraded = Some(Degrade::EmptyCompletion);
        }

        // Only a full, normal answer is shared: not one the budget shrank, cut short, degraded
        // or written by the fallback model.
        let full = out.ok()
            && out.degraded.is_none()
            && !out.truncated
            && !out.fallback_fired
            && ask.output_cap.is_none();
        if let (Some(key), true) = (cache_key, full) {
            let ttl = self.cache.ttl.get(out.route.as_str()).copied();
            if let Some(ttl) = ttl {
                let put = self
                    .store
                    .cache_put(key, out.route.as_str().into(), out.text.clone(), ttl)
                    .await;
                if let Err(e) = put {
                    tracing::warn!(error = %e, "could not cache the answer");
                }
            }
        }
        out
    }

    /// The cached answer of a decided message, when its route is final before any model runs
    /// (no classifier call pending). Lets the caller skip the budget for a free answer.
    pub async fn cached(&self, decision: &Decision) -> Option<Outcome> {
        if decision.ambiguous && self.settings.classifier && decision.source != RouterSource::Forced
        {
            return None;
        }
        let key = self.cache_key(
            &decision.text,
            decision.route,
            self.models.max_output_tokens,
        );
        let answer = self.cache_lookup(key.as_deref()).await?;
        let mut out = Outcome::new(decision);
        out.text = answer;
        out.cache_hit = true;
        Some(out)
    }

    async fn cache_lookup(&self, key: Option<&str>) -> Option<String> {
        match self.store.cache_get(key?.to_string()).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(error = %e, "response cache unavailable");
                None
            }
        }
    }

    /// The cache key for a question on a route with an output cap, or `None` when the route is
    /// not cached. The key holds everything that changes the answer: the normalised text, the
    /// route, its models, the cap and the prompt version.
    pub fn cache_key(&self, text: &str, route: Route, output_cap: u32) -> Option<String> {
        if !self.cache.enabled || !self.cache.ttl.contains_key(route.as_str()) {
            return None;
        }
        let model = match route {
            Route::TrivialDirect => self.models.trivial.clone(),
            Route::ReasonThenGrok => format!("{}+{}", self.models.reason, self.models.final_model),
            _ => self.models.final_model.clone(),
        };
        let material = format!(
            "{}\u{0}{}\u{0}{}\u{0}{}\u{0}{}",
            router::normalise(text),
            route.as_str(),
            model,
            output_cap,
            self.prompt_version
        );
        Some(hex::encode(Sha256::digest(material.as_bytes())))
    }

    /// The model that writes the user-facing answer: `models.vision` when images are sent.
    fn answer_model(&self, ask: &Ask<'_>) -> &str {
        if ask.images.is_empty() {
            &self.models.final_model
        } else {
            self.models.vision_model()
        }
    }

    /// The output cap of a user-facing answer.
    fn answer_cap(&self, ask: &Ask<'_>) -> u32 {
        ask.output_cap.map_or(self.models.max_output_tokens, |c| {
            c.min(self.models.max_output_tokens)
        })
    }

    fn request(
        &self,
        model: &str,
        instructions: &str,
        input: &str,
        max: u32,
        ask: &Ask<'_>,
    ) -> CompletionRequest {
        let mut req = CompletionRequest::new(model, instructions, input, max);
        req.images = ask.images.to_vec();
        req.cache_key = ask.room_id.map(str::to_string);
        req.user = ask.user.map(str::to_string);
        if let Some(c) = ask.context {
            req.cache_key = Some(c.key.clone());
            req.turns = c.turns.clone();
            req.input = c.current_input(input);
        }
        req
    }

    /// One provider call for `stage` (with the provider's retries), made only while the
    /// worker's claim is confirmed held: a worker that lost its claim never pays for another
    /// call. Failed attempts that may have been billed are charged to the stage.
    async fn call(
        &self,
        stage: Stage,
        req: &CompletionRequest,
        ask: &Ask<'_>,
        out: &mut Outcome,
    ) -> Result<Completion, ProviderError> {
        if let Some(gate) = ask.gate {
            gate.ready(CLAIM_PATIENCE)
                .await
                .map_err(|_| ProviderError::ClaimLost)?;
        }
        let called = match ask.stream {
            Some(updates) if stage.answers() => {
                self.provider.complete_streaming(req, updates).await
            }
            _ => self.provider.complete(req).await,
        };
        out.charge_unconfirmed(stage, req, called.unconfirmed, &self.provider);
        called.result
    }

    /// Asks the router model; a failure or timeout degrades to the default route.
    async fn classify(&self, text: &str, out: &mut Outcome) {
        let req = CompletionRequest::new(&self.models.router, CLASSIFIER_INSTRUCTIONS, text, 64);
        let started = Instant::now();
        let timeout = Duration::from_millis(self.settings.classifier_timeout_ms);
        let result = tokio::time::timeout(timeout, self.provider.complete_once(&req)).await;
        let parsed = match result {
            Ok(Ok(c)) => {
                out.absorb(Stage::Router, &c, &self.provider);
                parse_classifier(&c.text)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "router classifier failed");
                let attempts = u32::from(e.may_have_been_billed());
                out.charge_unconfirmed(Stage::Router, &req, attempts, &self.provider);
                if e.is_account_problem() {
                    out.error = Some(e);
                }
                None
            }
            Err(_) => {
                // The request went out and may still be billed after we stopped waiting.
                tracing::warn!(?timeout, "router classifier timed out");
                out.charge_unconfirmed(Stage::Router, &req, 1, &self.provider);
                None
            }
        };
        *out.stage_ms.entry(Stage::Router).or_default() = started.elapsed().as_millis() as u64;
        out.models.insert(Stage::Router, self.models.router.clone());
        match parsed {
            Some((route, confidence)) => {
                out.route = route;
                out.router_source = RouterSource::Classifier;
                out.router_confidence = confidence;
            }
            None => {
                out.route = Route::GrokDirect;
                out.router_source = RouterSource::Degraded;
                out.degraded = Some(Degrade::RouterFailed);
            }
        }
    }

    /// `grok_direct`: the final model, then the fallback model once on a retryable failure.
    async fn direct(&self, text: &str, ask: &Ask<'_>, out: &mut Outcome) {
        let mut req = self.request(
            self.answer_model(ask),
            &self.system_prompt,
            text,
            self.answer_cap(ask),
            ask,
        );
        let started = Instant::now();
        let mut result = self.call(Stage::Final, &req, ask, out).await;
        if let (Err(e), Some(fallback)) = (&result, &self.models.fallback) {
            if e.is_retryable() {
                tracing::warn!(model = %req.model, %fallback, error = %e, "final model failed, trying the fallback");
                req.model = fallback.clone();
                out.fallback_fired = true;
                result = self.call(Stage::Final, &req, ask, out).await;
            }
        }
        match result {
            Ok(c) => {
                out.absorb(Stage::Final, &c, &self.provider);
                out.text = c.text;
            }
            Err(e) => {
                out.failed(Stage::Final, &req.model, started);
                out.error = Some(e);
            }
        }
    }

    /// `trivial_direct`: the cheap model with a small output cap; an empty, refusing or
    /// truncated answer escalates once to `grok_direct`.
    async fn trivial(&self, text: &str, ask: &Ask<'_>, out: &mut Outcome) {
        let req = self.request(
            &self.models.trivial,
            &self.system_prompt,
            text,
            self.settings.trivial_max_output_tokens,
            ask,
        );
        let started = Instant::now();
        match self.call(Stage::Trivial, &req, ask, out).await {
            Ok(c) => {
                out.absorb(Stage::Trivial, &c, &self.provider);
                let truncated = c.status == "incomplete" || c.incomplete_reason.is_some();
                if !c.text.trim().is_empty() && !truncated && !REFUSAL.is_match(&c.text) {
                    out.text = c.text;
                    return;
                }
            }
            Err(e) if e.is_account_problem() => {
                out.failed(Stage::Trivial, &req.model, started);
                out.error = Some(e);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "trivial model failed, escalating");
                out.failed(Stage::Trivial, &req.model, started);
            }
        }
        out.escalated = true;
        out.degraded = Some(Degrade::TrivialFailed);
        self.direct(text, ask, out).await;
    }

    /// `web_then_grok`: the final model with the server-side `web_search` tool (bounded tool
    /// turns, within the daily grounding cap), sources appended as links. A failure falls back
    /// to `grok_direct`.
    async fn web(&self, text: &str, ask: &Ask<'_>, out: &mut Outcome) {
        let day = utc_day();
        let turns = i64::from(self.settings.web_max_turns);
        let cap = self.settings.grounding_cap_per_day;
        let reserved = match self.store.grounding_reserve(day.clone(), turns, cap).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "grounding cap unavailable; not searching");
                false
            }
        };
        if !reserved {
            out.route = Route::GrokDirect;
            out.degraded = Some(Degrade::GroundingCap);
            self.direct(text, ask, out).await;
            return;
        }
        let mut req = self.request(
            &self.models.final_model,
            &self.system_prompt,
            text,
            self.answer_cap(ask),
            ask,
        );
        req.web_search_turns = Some(self.settings.web_max_turns);
        let started = Instant::now();
        let result = self.call(Stage::Web, &req, ask, out).await;
        let used = result
            .as_ref()
            .map(|c| c.usage.web_search_calls)
            .unwrap_or(0);
        if let Err(e) = self.store.grounding_adjust(day, used - turns).await {
            tracing::warn!(error = %e, "could not settle the grounding reservation");
        }
        match result {
            Ok(c) => {
                out.absorb(Stage::Web, &c, &self.provider);
                out.text = with_sources(&c.text, &c.citations);
            }
            Err(e) if e.is_account_problem() => {
                out.failed(Stage::Web, &req.model, started);
                out.error = Some(e);
            }
            Err(e) => {
                tracing::warn!(error = %e, "web stage failed, falling back to grok_direct");
                out.failed(Stage::Web, &req.model, started);
                out.fallback_fired = true;
                out.degraded = Some(Degrade::WebFailed);
                self.direct(text, ask, out).await;
            }
        }
    }

    /// `reason_then_grok`: the reasoning model works the problem, the final model writes the
    /// reply from its analysis. A reasoning failure falls back to `grok_direct`.
    async fn reason(&self, text: &str, ask: &Ask<'_>, out: &mut Outcome) {
        let mut req = self.request(
            &self.models.reason,
            REASON_INSTRUCTIONS,
            text,
            self.settings.reason_max_output_tokens,
            ask,
        );
        req.reasoning_effort = Some(self.settings.reason_effort.clone());
        let started = Instant::now();
        let analysis = match self.call(Stage::Reason, &req, ask, out).await {
            Ok(c) if !c.text.trim().is_empty() => {
                out.absorb(Stage::Reason, &c, &self.provider);
                c.text
            }
            other => {
                match other {
                    Ok(c) => out.absorb(Stage::Reason, &c, &self.provider),
                    Err(e) if e.is_account_problem() => {
                        out.failed(Stage::Reason, &req.model, started);
                        out.error = Some(e);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reasoning stage failed, falling back");
                        out.failed(Stage::Reason, &req.model, started);
                    }
                }
                out.degraded = Some(Degrade::ReasoningFailed);
                out.fallback_fired = true;
                self.direct(text, ask, out).await;
                return;
            }
        };
        let input = format!(
            "{text}\n\n---\nA reasoning model analysed this question:\n{analysis}\n---\n\
             Write the reply to the user, relying on the analysis where it is right."
        );
        let final_req = self.request(
            self.answer_model(ask),
            &self.system_prompt,
            &input,
            self.answer_cap(ask),
            ask,
        );
        let started = Instant::now();
        match self.call(Stage::Final, &final_req, ask, out).await {
            Ok(c) => {
                out.absorb(Stage::Final, &c, &self.provider);
                out.text = c.text;
            }
            Err(e) => {
                // The analysis already answers the question: send it rather than nothing.
                tracing::warn!(error = %e, "final stage failed after reasoning; sending the analysis");
                out.failed(Stage::Final, &final_req.model, started);
                out.fallback_fired = true;
                out.text = analysis;
            }
        }
    }
}

/// Earlier turns the classifier sees at most, and how much of each: enough to route a
/// follow-up ("and tomorrow?") like its question, little enough to stay a cheap call.
const CLASSIFIER_TURNS: usize = 2;
const CLASSIFIER_TURN_CHARS: usize = 300;

/// What the classifier is asked to route: the message, after the conversation's last turns
/// (cut short) when there are any.
fn classifier_input(text: &str, context: Option<&Conversation>) -> String {
    let turns = context.map_or(&[][..], |c| &c.turns[..]);
    if turns.is_empty() {
        return text.to_string();
    }
    let recent = &turns[turns.len().saturating_sub(CLASSIFIER_TURNS)..];
    let mut input = String::from("Earlier in the conversation:\n");
    for turn in recent {
        let short: String = turn.text.chars().take(CLASSIFIER_TURN_CHARS).collect();
        input.push_str(&format!("{}: {short}\n", turn.role.as_str()));
    }
    input.push_str("\nThe message to route:\n");
    input.push_str(text);
    input
}

/// Parses the classifier's `{"route": .., "confidence": ..}` (tolerating text around it).
fn parse_classifier(text: &str) -> Option<(Route, f64)> {
    let start = text.find('{')?;
    let end = text.rfind('}')?;
    let v: Value = serde_json::from_str(text.get(start..=end)?).ok()?;
    let route = Route::parse(v["route"].as_str()?).filter(|r| *r != Route::None)?;
    let confidence = v["confidence"].as_f64().unwrap_or(0.5).clamp(0.0, 1.0);
    Some((route, confidence))
}

/// Appends up to five sources as Markdown links.
fn with_sources(text: &str, citations: &[String]) -> String {
    if citations.is_empty() || text.trim().is_empty() {
        return text.to_string();
    }
    let mut out = format!("{}\n\nSources:", text.trim_end());
    for (i, url) in citations.iter().take(5).enumerate() {
        out.push_str(&format!("\n{}. <{url}>", i + 1));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifier_answers_are_parsed_strictly() {
        assert_eq!(
            parse_classifier(r#"{"route": "web_then_grok", "confidence": 0.8}"#),
            Some((Route::WebThenGrok, 0.8))
        );
        assert_eq!(
            parse_classifier("Sure: {\"route\":\"trivial_direct\",\"confidence\":3}"),
            Some((Route::TrivialDirect, 1.0))
        );
        assert_eq!(parse_classifier(r#"{"route": "none"}"#), None);
        assert_eq!(parse_classifier(r#"{"route": "fast"}"#), None);
        assert_eq!(parse_classifier("web please"), None);
    }

    #[test]
    fn the_classifier_sees_the_last_turns_cut_short() {
        use crate::context::{Role, Turn};
        assert_eq!(classifier_input("and tomorrow?", None), "and tomorrow?");
        let turn = |role, text: &str| Turn {
            role,
            text: text.to_string(),
        };
        let c = Conversation {
            key: "!r".into(),
            turns: vec![
                turn(Role::User, "Alice: hi"),
                turn(Role::User, "Alice: what's the weather in Paris today?"),
                turn(Role::Assistant, &"Sunny. ".repeat(100)),
            ],
            speaker: "Alice".into(),
            images: Vec::new(),
        };
        let input = classifier_input("and tomorrow?", Some(&c));
        assert!(!input.contains("Alice: hi"), "only the last two turns");
        assert!(input.contains("user: Alice: what's the weather in Paris today?"));
        assert!(input.ends_with("The message to route:\nand tomorrow?"));
        assert!(input.len() < 800, "turns are cut short: {}", input.len());
    }

    #[test]
    fn sources_are_appended_as_links() {
        let urls: Vec<String> = (1..=7).map(|i| format!("https://s{i}.example/")).collect();
        let text = with_sources("Answer.", &urls);
        assert!(text.starts_with("Answer.\n\nSources:\n1. <https://s1.example/>"));
        assert!(text.contains("5. <https://s5.example/>") && !text.contains("s6"));
        assert_eq!(with_sources("Answer.", &[]), "Answer.");
    }

    #[test]
    fn refusals_are_recognised() {
        for t in [
            "I can't help with that.",
            "I'm unable to browse.",
            "I don't have real-time data",
            "As an AI, I",
        ] {
            assert!(REFUSAL.is_match(t), "{t}");
        }
        for t in [
            "Hello! How can I help?",
            "You're welcome!",
            "I can help with that.",
        ] {
            assert!(!REFUSAL.is_match(t), "{t}");
        }
    }

    #[test]
    fn route_tokens_round_trip() {
        for r in [
            Route::None,
            Route::GrokDirect,
            Route::TrivialDirect,
            Route::WebThenGrok,
            Route::ReasonThenGrok,
        ] {
            assert_eq!(Route::parse(r.as_str()), Some(r));
        }
    }
}
