//! The route cascade. This build has one route, `grok_direct` (the final model, with an
//! optional fallback model on a retryable failure); the router and the other routes build on
//! the same [`Outcome`] record.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::config::ModelsConfig;
use crate::provider::{settle_cost, CompletionRequest, CostSource, Provider, ProviderError};

/// A route (the stable `request_log.route` tokens).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Everything the cascade learned while answering; the bot turns it into the reply and the
/// `request_log` row.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The answer text; empty when the cascade failed.
    pub text: String,
    pub route: Route,
    pub router_source: RouterSource,
    pub router_confidence: f64,
    /// Role -> model id (`{"final": "grok-4.3"}`).
    pub models: BTreeMap<&'static str, String>,
    /// Stage -> milliseconds (`{"final": 2100}`).
    pub stage_ms: BTreeMap<&'static str, u64>,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_final_ticks: i64,
    pub cost_source: Option<CostSource>,
    pub fallback_fired: bool,
    /// A degrade token (DESIGN section 5), if the answer is not the normal one.
    pub degraded: Option<&'static str>,
    pub provider_request_id: String,
    /// The provider error that ended the cascade, if any.
    pub error: Option<ProviderError>,
}

impl Outcome {
    fn new(route: Route, source: RouterSource) -> Self {
        Self {
            text: String::new(),
            route,
            router_source: source,
            router_confidence: 1.0,
            models: BTreeMap::new(),
            stage_ms: BTreeMap::new(),
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            reasoning_tokens: 0,
            cost_final_ticks: 0,
            cost_source: None,
            fallback_fired: false,
            degraded: None,
            provider_request_id: String::new(),
            error: None,
        }
    }

    /// Whether the user got a real answer.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.degraded != Some("empty_completion")
    }
}

/// The inputs of one cascade run.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub text: &'a str,
    pub system_prompt: &'a str,
    /// The room id, sent as `prompt_cache_key`.
    pub cache_key: Option<&'a str>,
    /// A hashed user id, sent as `user`.
    pub user: Option<&'a str>,
}

/// Answers on the `grok_direct` route: the final model, then the fallback model once if the
/// final model failed with a retryable error.
pub async fn run(provider: &Provider, models: &ModelsConfig, ask: &Ask<'_>) -> Outcome {
    let mut outcome = Outcome::new(Route::GrokDirect, RouterSource::Default);
    let mut request = CompletionRequest {
        model: models.final_model.clone(),
        instructions: ask.system_prompt.to_string(),
        input: ask.text.to_string(),
        max_output_tokens: models.max_output_tokens,
        cache_key: ask.cache_key.map(str::to_string),
        user: ask.user.map(str::to_string),
    };
    let started = Instant::now();
    let mut result = provider.complete(&request).await;
    if let (Err(e), Some(fallback)) = (&result, &models.fallback) {
        if e.is_retryable() {
            tracing::warn!(model = %request.model, %fallback, error = %e, "final model failed, trying the fallback");
            request.model = fallback.clone();
            outcome.fallback_fired = true;
            result = provider.complete(&request).await;
        }
    }
    outcome.models.insert("final", request.model.clone());
    outcome
        .stage_ms
        .insert("final", started.elapsed().as_millis() as u64);
    match result {
        Ok(c) => {
            let (ticks, source) = settle_cost(&c.usage, provider.price(&c.model));
            outcome.prompt_tokens = c.usage.input_tokens;
            outcome.cached_tokens = c.usage.cached_tokens;
            outcome.completion_tokens = c.usage.output_tokens;
            outcome.reasoning_tokens = c.usage.reasoning_tokens;
            outcome.cost_final_ticks = ticks;
            outcome.cost_source = Some(source);
            outcome.provider_request_id = c.request_id.unwrap_or(c.response_id);
            outcome.text = c.text.trim().to_string();
            if outcome.text.is_empty() {
                outcome.degraded = Some("empty_completion");
            }
        }
        Err(e) => outcome.error = Some(e),
    }
    outcome
}
