//! Spend limits: a daily ceiling for everyone and per-user caps, enforced by reserving an
//! estimate before any model call and settling with the provider's reported cost after it.
//!
//! The arithmetic (estimates, refusal text) is pure; the counters live in the store, so every
//! replica sees the same budget.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::cascade::Route;
use crate::config::{usd_to_ticks, Config, TICKS_PER_USD};
use crate::provider::Price;
use crate::store::budget::{self, Finish, ReserveRequest, ReserveResult};
use crate::store::{Store, StoreError};

/// The time source; tests inject a fixed or moving clock.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(Utc::now)
}

/// Extra input per web-search turn: search results come back into the context.
const WEB_TURN_INPUT_TOKENS: i64 = 4_000;

pub use crate::provider::estimate_prompt_tokens;
use crate::provider::FRAMING_TOKENS;
use crate::vision::IMAGE_TOKENS;

/// The models, prices and caps the estimates need.
#[derive(Debug, Clone)]
pub struct CostModel {
    pub final_price: Price,
    pub trivial_price: Price,
    pub reason_price: Price,
    pub router_price: Price,
    pub max_output_tokens: i64,
    pub trivial_output_tokens: i64,
    pub reason_output_tokens: i64,
    pub web_turns: i64,
    pub system_prompt_tokens: i64,
}

/// The price table has no entry for a model: estimate with the dearest known price, so an
/// unknown model is never treated as free.
fn price_or_dearest(config: &Config, model: &str) -> Price {
    let prices: Vec<Price> = config.prices.values().map(Price::from).collect();
    config.prices.get(model).map(Price::from).unwrap_or(Price {
        input: prices.iter().map(|p| p.input).max().unwrap_or(0),
        cached_input: prices.iter().map(|p| p.cached_input).max().unwrap_or(0),
        output: prices.iter().map(|p| p.output).max().unwrap_or(0),
        web_search_call: prices.iter().map(|p| p.web_search_call).max().unwrap_or(0),
    })
}

impl CostModel {
    /// Reads prices and caps from the config.
    pub fn from_config(config: &Config) -> Self {
        let m = &config.models;
        // A fallback or the vision model may answer instead of the final one: budget for the
        // dearest.
        let mut final_price = price_or_dearest(config, &m.final_model);
        for other in m.fallback.iter().chain(&m.vision) {
            let f = price_or_dearest(config, other);
            final_price.input = final_price.input.max(f.input);
            final_price.output = final_price.output.max(f.output);
        }
        Self {
            final_price,
            trivial_price: price_or_dearest(config, &m.trivial),
            reason_price: price_or_dearest(config, &m.reason),
            router_price: price_or_dearest(config, &m.router),
            max_output_tokens: i64::from(m.max_output_tokens),
            trivial_output_tokens: i64::from(config.cascade.trivial_max_output_tokens),
            reason_output_tokens: i64::from(config.cascade.reason_max_output_tokens),
            web_turns: i64::from(config.cascade.web_max_turns),
            system_prompt_tokens: estimate_prompt_tokens(&config.bot.system_prompt),
        }
    }

    fn call(price: &Price, input: i64, output: i64) -> i64 {
        input * price.input + output * price.output
    }

    /// The most a route can cost for a prompt of `prompt_tokens`, with `output_cap` replacing
    /// the final answer's cap when given. Covers the route's worst path: the trivial route's
    /// one escalation, the web route's searches, the reasoning route's two stages.
    pub fn worst_case(&self, route: Route, prompt_tokens: i64, output_cap: Option<i64>) -> i64 {
        let input = prompt_tokens + self.system_prompt_tokens;
        let out = output_cap.unwrap_or(self.max_output_tokens);
        let direct = Self::call(&self.final_price, input, out);
        match route {
            Route::None => 0,
            Route::GrokDirect => direct,
            Route::TrivialDirect => {
                Self::call(&self.trivial_price, input, self.trivial_output_tokens) + direct
            }
            Route::WebThenGrok => {
                let searched = input + self.web_turns * WEB_TURN_INPUT_TOKENS;
                Self::call(&self.final_price, searched, out)
                    + self.web_turns * self.final_price.web_search_call
            }
            Route::ReasonThenGrok => {
                let reason = Self::call(&self.reason_price, input, self.reason_output_tokens);
                let write = Self::call(&self.final_price, input + self.reason_output_tokens, out);
                reason + write
            }
        }
    }

    /// The classifier call's cost.
    pub fn classifier(&self, prompt_tokens: i64) -> i64 {
        Self::call(&self.router_price, prompt_tokens + FRAMING_TOKENS, 64)
    }
}

/// What the bot may do for one request, cheapest last: the normal plan, then shrunk ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub route: Route,
    /// A lower output cap than configured, when shrunk.
    pub output_cap: Option<u32>,
    pub estimate_ticks: i64,
    /// The plan is a shrunk one (the budget forced it).
    pub shrunk: bool,
}

/// Builds the plans for a decided route: the normal one, then `grok_direct` with a quarter of
/// the output cap (at least 256 tokens), so a nearly spent budget still gets short answers.
/// `images` sent with the text count [`IMAGE_TOKENS`] each (xAI's documented worst case).
pub fn plans(
    model: &CostModel,
    route: Route,
    text: &str,
    images: usize,
    classifier: bool,
    safety: f64,
) -> Vec<Plan> {
    let prompt = estimate_prompt_tokens(text) + IMAGE_TOKENS * images as i64;
    let scale = |ticks: i64| (ticks as f64 * safety).ceil() as i64;
    let normal = if classifier {
        // The classifier may pick any route: budget for the dearest.
        [
            Route::GrokDirect,
            Route::TrivialDirect,
            Route::WebThenGrok,
            Route::ReasonThenGrok,
        ]
        .into_iter()
        .map(|r| model.worst_case(r, prompt, None))
        .max()
        .unwrap_or(0)
            + model.classifier(prompt)
    } else {
        model.worst_case(route, prompt, None)
    };
    let mut out = vec![Plan {
        route,
        output_cap: None,
        estimate_ticks: scale(normal),
        shrunk: false,
    }];
    let small_cap = (model.max_output_tokens / 4).max(256);
    let small = scale(model.worst_case(Route::GrokDirect, prompt, Some(small_cap)));
    if small < out[0].estimate_ticks {
        out.push(Plan {
            route: Route::GrokDirect,
            output_cap: Some(small_cap as u32),
            estimate_ticks: small,
            shrunk: true,
        });
    }
    out
}

/// Which limit refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The daily ceiling for everyone.
    Ceiling { resets_at: DateTime<Utc> },
    /// The user's daily spend cap; `left_ticks` is what remains of it.
    UserDaily {
        resets_at: DateTime<Utc>,
        left_ticks: i64,
        cap_ticks: i64,
    },
    /// The user's requests-per-hour cap.
    UserHourly { per_hour: u32 },
}

/// The outcome of an admission.
#[derive(Debug)]
pub enum Admission {
    /// Go ahead with this plan; settle or release `reservation_id` afterwards.
    Granted {
        reservation_id: String,
        plan: Plan,
    },
    Refused(Refusal),
    /// The budget store cannot be reached: fail closed.
    Unavailable(StoreError),
}

fn fmt_usd(ticks: i64) -> String {
    let cents = (ticks.max(0) + TICKS_PER_USD / 200) / (TICKS_PER_USD / 100);
    format!("${}.{:02}", cents / 100, cents % 100)
}

fn fmt_wait(now: DateTime<Utc>, at: DateTime<Utc>) -> String {
    let mins = (at - now).num_minutes().max(1);
    if mins >= 60 {
        format!("{} h {} min", mins / 60, mins % 60)
    } else {
        format!("{mins} min")
    }
}

/// The one-line reply a refused user sees.
pub fn refusal_text(refusal: &Refusal, now: DateTime<Utc>) -> String {
    match refusal {
        Refusal::Ceiling { resets_at } => format!(
            "I've reached today's spending limit for everyone, so I can't answer right now. \
             It resets at 00:00 UTC (in {}).",
            fmt_wait(now, *resets_at)
        ),
        Refusal::UserDaily {
            resets_at,
            left_ticks,
            cap_ticks,
        } => format!(
            "You've reached your daily limit of {} ({} left, not enough for this question). \
             It resets at 00:00 UTC (in {}).",
            fmt_usd(*cap_ticks),
            fmt_usd(*left_ticks),
            fmt_wait(now, *resets_at)
        ),
        Refusal::UserHourly { per_hour } => format!(
            "You've reached your limit of {per_hour} questions per hour. Please try again later."
        ),
    }
}

/// The next UTC midnight after `now`.
pub fn next_reset(now: DateTime<Utc>) -> DateTime<Utc> {
    let tomorrow = now.date_naive() + chrono::Days::new(1);
    tomorrow
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc()
}

fn utc_day(now: DateTime<Utc>) -> String {
    now.format("%Y-%m-%d").to_string()
}

/// A user's figures for today (`!usage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub spent_ticks: i64,
    pub reserved_ticks: i64,
    pub requests: i64,
    /// `None` for admins (no per-user cap).
    pub cap_ticks: Option<i64>,
    pub per_hour: Option<u32>,
    /// Everyone's spend and the ceiling, for admins only.
    pub global: Option<(i64, i64)>,
}

/// The `!usage` reply.
pub fn usage_text(u: &Usage) -> String {
    let mut text = format!(
        "Today (UTC) you have used {} over {} request(s)",
        fmt_usd(u.spent_ticks + u.reserved_ticks),
        u.requests
    );
    match u.cap_ticks {
        Some(cap) => text.push_str(&format!(" of your {} daily limit", fmt_usd(cap))),
        None => text.push_str(" (no personal limit)"),
    }
    if let Some(h) = u.per_hour {
        text.push_str(&format!("; at most {h} questions per hour"));
    }
    text.push('.');
    if let Some((spent, ceiling)) = u.global {
        text.push_str(&format!(
            " Everyone together: {} of the {} daily ceiling.",
            fmt_usd(spent),
            fmt_usd(ceiling)
        ));
    }
    text
}

/// The limiter of one process.
#[derive(Clone)]
pub struct Limiter {
    store: Store,
    model: CostModel,
    ceiling_ticks: i64,
    user_cap_ticks: i64,
    per_hour: u32,
    admins: Vec<String>,
    overrides: std::collections::BTreeMap<String, (Option<i64>, Option<u32>)>,
    safety: f64,
    ttl: Duration,
    classifier: bool,
    clock: Clock,
}

impl Limiter {
    /// Builds the limiter from the validated config.
    pub fn new(config: &Config, store: Store, clock: Clock) -> Self {
        let l = &config.limits;
        Self {
            store,
            model: CostModel::from_config(config),
            ceiling_ticks: usd_to_ticks(l.daily_ceiling_usd),
            user_cap_ticks: usd_to_ticks(l.per_user_daily_usd),
            per_hour: l.per_user_requests_per_hour,
            admins: l.admins.clone(),
            overrides: l
                .per_user_overrides
                .iter()
                .map(|(u, o)| {
                    (
                        u.clone(),
                        (o.daily_usd.map(usd_to_ticks), o.requests_per_hour),
                    )
                })
                .collect(),
            safety: l.safety_factor,
            ttl: l.reservation_ttl,
            classifier: config.cascade.classifier,
            clock,
        }
    }

    /// The current time of this limiter's clock.
    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    /// Whether the user is an admin (exempt from per-user caps).
    pub fn is_admin(&self, user: &str) -> bool {
        self.admins.iter().any(|a| a == user)
    }

    /// Whether a per-user cap of 0 (daily spend or requests per hour) shuts this user out:
    /// they are told so once, and never reach a reservation or a model.
    pub fn blocks(&self, user: &str) -> bool {
        matches!(self.user_caps(user), (Some(0), _) | (_, Some(0)))
    }

    /// The user's `(daily cap, requests per hour)`; `None` means exempt.
    fn user_caps(&self, user: &str) -> (Option<i64>, Option<u32>) {
        if self.is_admin(user) {
            return (None, None);
        }
        let (cap, hour) = self.overrides.get(user).copied().unwrap_or((None, None));
        (
            Some(cap.unwrap_or(self.user_cap_ticks)),
            Some(hour.unwrap_or(self.per_hour)),
        )
    }

    /// The plans for a routed message and the images sent with it, normal first.
    pub fn plans(&self, route: Route, text: &str, images: usize, ambiguous: bool) -> Vec<Plan> {
        plans(
            &self.model,
            route,
            text,
            images,
            self.classifier && ambiguous,
            self.safety,
        )
    }

    /// Reserves the first plan that fits; refuses with the limit that stopped the normal plan.
    pub async fn reserve(&self, request_id: &str, user: &str, plans: &[Plan]) -> Admission {
        let now = self.now();
        let (user_cap, per_hour) = self.user_caps(user);
        let mut first_refusal = None;
        for plan in plans {
            let reservation_id = format!(
                "{request_id}#{}",
                crate::registration::random_token().get(..10).unwrap_or("0")
            );
            let request = ReserveRequest {
                id: reservation_id.clone(),
                day: utc_day(now),
                user_id: user.to_string(),
                amount_ticks: plan.estimate_ticks,
                global_cap_ticks: self.ceiling_ticks,
                user_cap_ticks: user_cap,
                requests_per_hour: per_hour,
                now: now.naive_utc(),
                expires_at: now.naive_utc()
                    + chrono::Duration::from_std(self.ttl).unwrap_or(chrono::Duration::hours(1)),
            };
            let refusal = match self.store.budget_reserve(request).await {
                Ok(ReserveResult::Granted) => {
                    return Admission::Granted {
                        reservation_id,
                        plan: *plan,
                    }
                }
                Err(e) => return Admission::Unavailable(e),
                // More plans cannot help against a request count.
                Ok(ReserveResult::HourlyFull) => {
                    return Admission::Refused(Refusal::UserHourly {
                        per_hour: per_hour.unwrap_or(0),
                    })
                }
                Ok(ReserveResult::GlobalFull) => Refusal::Ceiling {
                    resets_at: next_reset(now),
                },
                Ok(ReserveResult::UserFull) => {
                    let cap = user_cap.unwrap_or(0);
                    let spent = self.spent(user, now).await.unwrap_or(cap);
                    Refusal::UserDaily {
                        resets_at: next_reset(now),
                        left_ticks: (cap - spent).max(0),
                        cap_ticks: cap,
                    }
                }
            };
            first_refusal.get_or_insert(refusal);
        }
        match first_refusal {
            Some(r) => Admission::Refused(r),
            None => Admission::Refused(Refusal::Ceiling {
                resets_at: next_reset(now),
            }),
        }
    }

    async fn spent(&self, user: &str, now: DateTime<Utc>) -> Result<i64, StoreError> {
        let counters = self
            .store
            .budget_counters(utc_day(now), vec![budget::user_scope(user)])
            .await?;
        Ok(counters
            .first()
            .map(|c| c.settled_ticks + c.reserved_ticks)
            .unwrap_or(0))
    }

    /// Marks the reservation's call as gone out.
    pub async fn dispatched(&self, reservation_id: &str) -> Result<(), StoreError> {
        self.store
            .budget_mark_dispatched(reservation_id.to_string())
            .await
    }

    /// Settles with the real cost. Idempotent.
    pub async fn settle(
        &self,
        reservation_id: &str,
        actual_ticks: i64,
    ) -> Result<bool, StoreError> {
        self.store
            .budget_finish(
                reservation_id.to_string(),
                Finish::Settled,
                actual_ticks,
                self.now().naive_utc(),
            )
            .await
    }

    /// Releases a reservation whose call never went out. Idempotent.
    pub async fn release(&self, reservation_id: &str) -> Result<bool, StoreError> {
        self.store
            .budget_finish(
                reservation_id.to_string(),
                Finish::Released,
                0,
                self.now().naive_utc(),
            )
            .await
    }

    /// Expires reservations whose worker died; returns how many.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        self.store.budget_sweep(self.now().naive_utc(), 100).await
    }

    /// Today's figures for a user (and the global ones for admins).
    pub async fn usage(&self, user: &str) -> Result<Usage, StoreError> {
        let now = self.now();
        let scope = budget::user_scope(user);
        let counters = self
            .store
            .budget_counters(
                utc_day(now),
                vec![budget::GLOBAL_SCOPE.into(), scope.clone()],
            )
            .await?;
        let mine = counters.iter().find(|c| c.scope == scope);
        let global = counters.iter().find(|c| c.scope == budget::GLOBAL_SCOPE);
        let (cap, per_hour) = self.user_caps(user);
        Ok(Usage {
            spent_ticks: mine.map(|c| c.settled_ticks).unwrap_or(0),
            reserved_ticks: mine.map(|c| c.reserved_ticks).unwrap_or(0),
            requests: mine.map(|c| c.requests).unwrap_or(0),
            cap_ticks: cap,
            per_hour,
            global: self.is_admin(user).then(|| {
                (
                    global
                        .map(|c| c.settled_ticks + c.reserved_ticks)
                        .unwrap_or(0),
                    self.ceiling_ticks,
                )
            }),
        })
    }

    /// The UTC day of the limiter's clock (`YYYY-MM-DD`).
    pub fn today(&self) -> String {
        utc_day(self.now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> CostModel {
        let config =
            Config::parse("homeserver: {url: 'http://h', server_name: example.org}\n").unwrap();
        CostModel::from_config(&config)
    }

    #[test]
    fn estimates_cover_each_routes_worst_path() {
        let m = model();
        let p = 1_000;
        let direct = m.worst_case(Route::GrokDirect, p, None);
        // grok-4.3: 12,500 in and 25,000 out per token.
        assert_eq!(
            direct,
            (p + m.system_prompt_tokens) * 12_500 + 2_048 * 25_000
        );
        assert!(
            m.worst_case(Route::TrivialDirect, p, None) > direct,
            "includes the escalation"
        );
        let web = m.worst_case(Route::WebThenGrok, p, None);
        assert!(
            web >= direct + 2 * 50_000_000,
            "includes two searches at $0.005"
        );
        assert!(m.worst_case(Route::ReasonThenGrok, p, None) > direct);
        assert!(m.worst_case(Route::GrokDirect, p, Some(256)) < direct);
        assert_eq!(m.worst_case(Route::None, p, None), 0);
    }

    #[test]
    fn plans_shrink_to_a_short_direct_answer() {
        let m = model();
        let ps = plans(&m, Route::ReasonThenGrok, "prove it", 0, false, 1.25);
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].route, Route::ReasonThenGrok);
        assert!(!ps[0].shrunk && ps[1].shrunk);
        assert_eq!(
            (ps[1].route, ps[1].output_cap),
            (Route::GrokDirect, Some(512))
        );
        assert!(ps[1].estimate_ticks < ps[0].estimate_ticks);
        let safe = plans(&m, Route::GrokDirect, "hi", 0, false, 2.0);
        assert_eq!(
            safe[0].estimate_ticks,
            2 * m.worst_case(Route::GrokDirect, estimate_prompt_tokens("hi"), None)
        );
        let two_images = plans(&m, Route::GrokDirect, "hi", 2, false, 1.0);
        let prompt = estimate_prompt_tokens("hi") + 2 * IMAGE_TOKENS;
        assert_eq!(
            two_images[0].estimate_ticks,
            m.worst_case(Route::GrokDirect, prompt, None),
            "each image is reserved at xAI's documented worst case"
        );
        let ambiguous = plans(&m, Route::GrokDirect, "hmm", 0, true, 1.0);
        assert!(
            ambiguous[0].estimate_ticks
                >= m.worst_case(Route::WebThenGrok, estimate_prompt_tokens("hmm"), None)
        );
    }

    #[test]
    fn refusals_say_which_limit_and_when_it_resets() {
        let now = DateTime::parse_from_rfc3339("2026-11-28T21:30:00Z")
            .unwrap()
            .to_utc();
        let reset = next_reset(now);
        assert_eq!(reset.to_rfc3339(), "2026-11-29T00:00:00+00:00");
        let c = refusal_text(&Refusal::Ceiling { resets_at: reset }, now);
        assert!(
            c.contains("everyone") && c.contains("00:00 UTC") && c.contains("2 h 30 min"),
            "{c}"
        );
        let u = refusal_text(
            &Refusal::UserDaily {
                resets_at: reset,
                left_ticks: 123_000_000,
                cap_ticks: TICKS_PER_USD,
            },
            now,
        );
        assert!(u.contains("$1.00") && u.contains("$0.01 left"), "{u}");
        let h = refusal_text(&Refusal::UserHourly { per_hour: 30 }, now);
        assert!(h.contains("30 questions per hour"), "{h}");
        assert!(
            !c.contains('\n') && !u.contains('\n') && !h.contains('\n'),
            "one line"
        );
    }

    #[test]
    fn usage_text_shows_admins_the_global_figure() {
        let mut u = Usage {
            spent_ticks: TICKS_PER_USD / 4,
            reserved_ticks: 0,
            requests: 3,
            cap_ticks: Some(TICKS_PER_USD),
            per_hour: Some(30),
            global: None,
        };
        let t = usage_text(&u);
        assert!(
            t.contains("$0.25") && t.contains("3 request") && t.contains("$1.00"),
            "{t}"
        );
        assert!(!t.contains("Everyone"));
        u.global = Some((5 * TICKS_PER_USD, 10 * TICKS_PER_USD));
        assert!(usage_text(&u).contains("Everyone together: $5.00 of the $10.00"));
    }
}
