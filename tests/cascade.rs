//! The route cascade against a fake xAI server: which model each route calls, escalation,
//! fallbacks, degrade tokens, the grounding cap across replicas, the response cache and cost.

mod common;

use serde_json::json;

use common::*;
use grok_appservice::cascade::{
    router, Ask, Cascade, Degrade, Outcome, Route, RouterSource, Stage,
};
use grok_appservice::config::Config;
use grok_appservice::provider::{CostSource, Provider};
use grok_appservice::store::Store;

const DIRECT_Q: &str = "tell me about otters";
const TRIVIAL_Q: &str = "thanks!";
const WEB_Q: &str = "what's the weather in Paris today?";
const REASON_Q: &str = "solve 3x + 5 = 20 step by step";

struct Fixture {
    xai: FakeXai,
    db: db::TestDb,
}

impl Fixture {
    async fn new() -> Self {
        Self {
            xai: FakeXai::start().await,
            db: db::sqlite(),
        }
    }

    async fn cascade(&self, tweak: impl FnOnce(&mut Config)) -> Cascade {
        let mut config = Config::parse(&config_yaml(
            "http://127.0.0.1:1",
            &self.xai.url,
            &self.db.url,
        ))
        .unwrap();
        config
            .apply_env(|k| (k == "XAI_API_KEY").then(|| "k".to_string()))
            .unwrap();
        tweak(&mut config);
        config.validate().unwrap();
        let store = Store::connect(&config.database.url, 2).unwrap();
        store.migrate().await.unwrap();
        Cascade::new(
            &config,
            Provider::new(&config.provider, &config.prices),
            store,
        )
    }

    fn models(&self) -> Vec<String> {
        self.xai
            .seen()
            .iter()
            .map(|s| s.body["model"].as_str().unwrap().to_string())
            .collect()
    }
}

async fn ask(c: &Cascade, text: &str) -> Outcome {
    c.run(&Ask {
        text,
        room_id: Some("!room:example.org"),
        user: Some("u1"),
        output_cap: None,
        gate: None,
        stream: None,
        context: None,
        images: &[],
        private: false,
    })
    .await
}

fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_route_calls_its_models() {
    let f = Fixture::new().await;
    let c = f.cascade(|_| {}).await;

    let o = ask(&c, DIRECT_Q).await;
    assert_eq!(
        (o.route, o.router_source),
        (Route::GrokDirect, RouterSource::Default)
    );
    assert_eq!(f.models(), vec!["grok-4.3"]);
    assert_eq!(o.stage_cost.get(&Stage::Final), Some(&FAKE_COST_TICKS));

    let o = ask(&c, TRIVIAL_Q).await;
    assert_eq!(
        (o.route, o.router_source),
        (Route::TrivialDirect, RouterSource::Heuristic)
    );
    let last = f.xai.seen().pop().unwrap();
    assert_eq!(last.body["model"], "grok-4.20-non-reasoning");
    assert_eq!(last.body["max_output_tokens"], 256);
    assert!(last.body.get("tools").is_none());
    assert!(!o.rules.is_empty());
    assert!(o.ok() && !o.escalated);

    let o = ask(&c, WEB_Q).await;
    assert_eq!(o.route, Route::WebThenGrok);
    let last = f.xai.seen().pop().unwrap();
    assert_eq!(last.body["model"], "grok-4.3");
    assert_eq!(last.body["tools"], json!([{"type": "web_search"}]));
    assert_eq!(last.body["max_turns"], 2);
    assert!(
        o.text
            .contains("Sources:\n1. <https://news.example.org/story>"),
        "{}",
        o.text
    );
    assert_eq!(o.stage_cost.get(&Stage::Web), Some(&FAKE_COST_TICKS));
    // The stage's tokens are kept for the stats counterfactual, searches included.
    let web = o.stage_usage[&Stage::Web];
    assert_eq!(
        (web.input, web.cached, web.output, web.web_search_calls),
        (120, 20, 30, 1)
    );
    // Two turns were reserved, one search was made: the counter settles at the truth.
    assert_eq!(c_grounding(&f).await, 1);

    let before = f.xai.seen().len();
    let o = ask(&c, REASON_Q).await;
    assert_eq!(o.route, Route::ReasonThenGrok);
    let calls = f.xai.seen().split_off(before);
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].body["model"], "grok-4.5");
    assert_eq!(calls[0].body["reasoning"]["effort"], "medium");
    assert_eq!(calls[1].body["model"], "grok-4.3");
    let final_input = calls[1].body["input"][0]["content"].as_str().unwrap();
    assert!(
        final_input.contains("answer to: solve 3x"),
        "the final model sees the analysis"
    );
    assert_eq!(o.cost_total(), 2 * FAKE_COST_TICKS);
    assert_eq!(
        o.models.get(&Stage::Reason).map(String::as_str),
        Some("grok-4.5")
    );
    assert_eq!(o.cost_source, Some(CostSource::Reported));
}

async fn c_grounding(f: &Fixture) -> i64 {
    Store::connect(&f.db.url, 1)
        .unwrap()
        .grounding_used(today())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn forced_prefixes_and_room_overrides_win() {
    let f = Fixture::new().await;
    let c = f
        .cascade(|cfg| {
            cfg.cascade
                .room_routes
                .insert("!hard:example.org".into(), "reason_then_grok".into());
        })
        .await;
    let o = ask(&c, &format!("!fast {DIRECT_Q}")).await;
    assert_eq!(
        (o.route, o.router_source),
        (Route::TrivialDirect, RouterSource::Forced)
    );
    assert_eq!(
        f.xai.seen()[0].body["input"][0]["content"],
        DIRECT_Q,
        "the prefix is stripped"
    );

    let o = c
        .run(&Ask {
            text: DIRECT_Q,
            room_id: Some("!hard:example.org"),
            user: None,
            output_cap: None,
            gate: None,
            stream: None,
            context: None,
            images: &[],
            private: false,
        })
        .await;
    assert_eq!(
        (o.route, o.router_source),
        (Route::ReasonThenGrok, RouterSource::Forced)
    );
    assert_eq!(o.rules, vec!["forced:room"]);
    // A user's own prefix beats the room's override.
    let o = c
        .run(&Ask {
            text: &format!("!web {DIRECT_Q}"),
            room_id: Some("!hard:example.org"),
            user: None,
            output_cap: None,
            gate: None,
            stream: None,
            context: None,
            images: &[],
            private: false,
        })
        .await;
    assert_eq!(o.route, Route::WebThenGrok);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_weak_trivial_answer_escalates_once() {
    for bad in [
        response_body("grok-4.20-non-reasoning", "", Some(5)),
        response_body(
            "grok-4.20-non-reasoning",
            "I'm unable to help with that.",
            Some(5),
        ),
        {
            let mut b = response_body("grok-4.20-non-reasoning", "You're wel", Some(5));
            b["status"] = json!("incomplete");
            b["incomplete_details"] = json!({"reason": "max_output_tokens"});
            b
        },
    ] {
        let f = Fixture::new().await;
        let c = f.cascade(|_| {}).await;
        f.xai.script(200, bad.clone());
        let o = ask(&c, TRIVIAL_Q).await;
        assert_eq!(
            f.models(),
            vec!["grok-4.20-non-reasoning", "grok-4.3"],
            "{bad}"
        );
        assert!(o.escalated && o.ok());
        assert_eq!(o.degraded, Some(Degrade::TrivialFailed));
        assert_eq!(o.route, Route::TrivialDirect);
        assert_eq!(o.cost_total(), 5 + FAKE_COST_TICKS, "both stages are paid");
        assert_eq!(o.text, format!("answer to: {TRIVIAL_Q}"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_web_stage_falls_back_and_releases_its_searches() {
    let f = Fixture::new().await;
    let c = f.cascade(|_| {}).await;
    f.xai.script(400, json!({"error": "tool unavailable"}));
    let o = ask(&c, WEB_Q).await;
    assert_eq!(o.route, Route::WebThenGrok);
    assert_eq!(
        (o.degraded, o.fallback_fired, o.ok()),
        (Some(Degrade::WebFailed), true, true)
    );
    let seen = f.xai.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen[1].body.get("tools").is_none(),
        "the fallback does not search"
    );
    assert_eq!(c_grounding(&f).await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_reasoning_stage_falls_back_to_direct() {
    let f = Fixture::new().await;
    let c = f.cascade(|_| {}).await;
    f.xai.script(404, json!({"error": "model not found"}));
    let o = ask(&c, REASON_Q).await;
    assert_eq!(f.models(), vec!["grok-4.5", "grok-4.3"]);
    assert_eq!(
        (o.degraded, o.fallback_fired, o.ok()),
        (Some(Degrade::ReasoningFailed), true, true)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_grounding_cap_holds_across_replicas() {
    let f = Fixture::new().await;
    let tweak = |cfg: &mut Config| {
        cfg.cascade.grounding_cap_per_day = 3;
        cfg.cascade.web_max_turns = 1;
    };
    let a = f.cascade(tweak).await;
    let b = f.cascade(tweak).await;
    let outcomes = tokio::join!(
        ask(&a, WEB_Q),
        ask(&b, WEB_Q),
        ask(&a, WEB_Q),
        ask(&b, WEB_Q),
        ask(&a, WEB_Q)
    );
    let outcomes = [outcomes.0, outcomes.1, outcomes.2, outcomes.3, outcomes.4];
    let capped = outcomes
        .iter()
        .filter(|o| o.degraded == Some(Degrade::GroundingCap))
        .count();
    assert_eq!(capped, 2, "three searches fit under the cap, two do not");
    for o in outcomes
        .iter()
        .filter(|o| o.degraded == Some(Degrade::GroundingCap))
    {
        assert_eq!(o.route, Route::GrokDirect);
        assert!(o.ok());
    }
    let searched = f
        .xai
        .seen()
        .iter()
        .filter(|s| s.body.get("tools").is_some())
        .count();
    assert_eq!(searched, 3);
    assert_eq!(c_grounding(&f).await, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_are_cached_except_web_ones() {
    let f = Fixture::new().await;
    let c = f.cascade(|_| {}).await;
    let first = ask(&c, DIRECT_Q).await;
    let again = ask(&c, "  Tell me about OTTERS ").await;
    assert!(!first.cache_hit && again.cache_hit);
    assert_eq!(again.text, first.text);
    assert_eq!(again.cost_total(), 0);
    assert_eq!(f.xai.seen().len(), 1);

    // Another replica shares the cache; another prompt version does not.
    let other = f.cascade(|_| {}).await;
    assert!(ask(&other, DIRECT_Q).await.cache_hit);
    let changed = f
        .cascade(|cfg| cfg.bot.system_prompt = "Be terse.".into())
        .await;
    assert!(!ask(&changed, DIRECT_Q).await.cache_hit);
    assert_ne!(changed.prompt_version(), c.prompt_version());

    ask(&c, WEB_Q).await;
    assert!(
        !ask(&c, WEB_Q).await.cache_hit,
        "web answers are never cached"
    );

    let off = f.cascade(|cfg| cfg.cache.enabled = false).await;
    assert!(!ask(&off, DIRECT_Q).await.cache_hit);
}

/// An answer to an end-to-end encrypted message is neither stored in the shared cache (the
/// database would hold it in plaintext) nor served from it.
#[tokio::test(flavor = "multi_thread")]
async fn private_answers_stay_out_of_the_cache() {
    let f = Fixture::new().await;
    let c = f.cascade(|_| {}).await;
    let private = |text| Ask {
        text,
        room_id: Some("!e2ee:example.org"),
        private: true,
        ..Ask::default()
    };
    let first = c.run(&private(DIRECT_Q)).await;
    assert!(first.ok() && !first.cache_hit);
    assert!(!ask(&c, DIRECT_Q).await.cache_hit, "nothing was stored");
    assert!(ask(&c, DIRECT_Q).await.cache_hit, "a plain answer is");
    assert!(
        !c.run(&private(DIRECT_Q)).await.cache_hit,
        "and not served privately"
    );
    assert_eq!(f.xai.seen().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_are_not_cached() {
    let f = Fixture::new().await;
    let c = f.cascade(|_| {}).await;
    f.xai.script(200, response_body("grok-4.3", "", Some(1)));
    let empty = ask(&c, DIRECT_Q).await;
    assert_eq!(
        (empty.degraded, empty.ok()),
        (Some(Degrade::EmptyCompletion), false)
    );
    let next = ask(&c, DIRECT_Q).await;
    assert!(!next.cache_hit && next.ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn costs_are_computed_when_not_reported() {
    let f = Fixture::new().await;
    f.xai.omit_cost();
    let c = f.cascade(|_| {}).await;
    let o = ask(&c, REASON_Q).await;
    assert_eq!(o.cost_source, Some(CostSource::Computed));
    // grok-4.5: 100*20,000 + 20*3,000 + 30*60,000; grok-4.3: 100*12,500 + 20*2,000 + 30*25,000.
    assert_eq!(o.stage_cost[&Stage::Reason], 2_000_000 + 60_000 + 1_800_000);
    assert_eq!(o.stage_cost[&Stage::Final], 1_250_000 + 40_000 + 750_000);
}

/// A message the heuristic router finds ambiguous, from a few candidates.
fn ambiguous_message() -> &'static str {
    let candidates = [
        "is rust faster than go",
        "what happened with the merger",
        "how does this compare",
        "can you check this for me",
        "which one should I pick for my project",
        "how much does it cost",
        "is it true that the API changed",
        "why is my build slow",
    ];
    candidates
        .into_iter()
        .find(|c| router::decide(c, &router::RouterOptions::default()).ambiguous)
        .expect("the router flags some everyday questions as ambiguous")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_classifier_decides_ambiguous_messages_and_degrades_on_failure() {
    let text = ambiguous_message();
    let f = Fixture::new().await;
    let c = f.cascade(|cfg| cfg.cascade.classifier = true).await;
    f.xai.script(
        200,
        response_body(
            "grok-4.20-non-reasoning",
            r#"{"route": "web_then_grok", "confidence": 0.7}"#,
            Some(3),
        ),
    );
    let o = ask(&c, text).await;
    assert_eq!(
        (o.route, o.router_source, o.router_confidence),
        (Route::WebThenGrok, RouterSource::Classifier, 0.7)
    );
    assert_eq!(o.stage_cost.get(&Stage::Router), Some(&3));
    let seen = f.xai.seen();
    assert_eq!(seen[0].body["model"], "grok-4.20-non-reasoning");
    assert_eq!(seen[1].body["tools"][0]["type"], "web_search");

    f.xai.script(500, json!({"error": "down"}));
    let o = ask(&c, text).await;
    assert_eq!(
        (o.route, o.router_source, o.degraded),
        (
            Route::GrokDirect,
            RouterSource::Degraded,
            Some(Degrade::RouterFailed)
        )
    );
    assert!(o.ok(), "the user still gets an answer");

    // Off by default: no classifier call.
    let f = Fixture::new().await;
    let plain = f.cascade(|_| {}).await;
    ask(&plain, text).await;
    assert!(f
        .xai
        .seen()
        .iter()
        .all(|s| s.body["max_output_tokens"] != 64));
}

#[tokio::test(flavor = "multi_thread")]
async fn unparseable_classifier_output_degrades() {
    let text = ambiguous_message();
    let f = Fixture::new().await;
    let c = f.cascade(|cfg| cfg.cascade.classifier = true).await;
    f.xai.script(
        200,
        response_body("grok-4.20-non-reasoning", "probably the web one", Some(3)),
    );
    let o = ask(&c, text).await;
    assert_eq!(o.degraded, Some(Degrade::RouterFailed));
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_with_context_send_the_turns_and_are_never_cached() {
    use grok_appservice::context::{Conversation, Role, Turn};
    let f = Fixture::new().await;
    let c = f.cascade(|_| {}).await;
    let conversation = Conversation {
        key: "!room:example.org $root".into(),
        turns: vec![
            Turn {
                role: Role::User,
                text: "Alice: my otter is called Zorblax".into(),
            },
            Turn {
                role: Role::Assistant,
                text: "A fine name.".into(),
            },
        ],
        speaker: "Alice".into(),
        images: vec![],
    };
    let with_context = |text| Ask {
        text,
        room_id: Some("!room:example.org"),
        context: Some(&conversation),
        ..Ask::default()
    };
    // Cached without context first: the answer with context must not be served from it.
    assert!(!ask(&c, DIRECT_Q).await.cache_hit);
    assert!(ask(&c, DIRECT_Q).await.cache_hit);
    let before = f.xai.seen().len();
    for _ in 0..2 {
        let o = c.run(&with_context(DIRECT_Q)).await;
        assert!(o.ok() && !o.cache_hit);
    }
    let seen = f.xai.seen();
    assert_eq!(
        seen.len(),
        before + 2,
        "every answer with context calls the model"
    );
    let body = &seen[before].body;
    assert_eq!(
        body["input"],
        json!([
            {"role": "user", "content": "Alice: my otter is called Zorblax"},
            {"role": "assistant", "content": "A fine name."},
            {"role": "user", "content": format!("Alice: {DIRECT_Q}")},
        ])
    );
    assert_eq!(body["prompt_cache_key"], "!room:example.org $root");

    // Both stages of the reasoning route read the conversation.
    let before = f.xai.seen().len();
    c.run(&with_context(REASON_Q)).await;
    let seen = f.xai.seen();
    assert_eq!(seen.len(), before + 2);
    for s in &seen[before..] {
        let input = s.body["input"].as_array().unwrap();
        assert_eq!(input.len(), 3, "{input:?}");
        assert_eq!(input[1]["role"], "assistant");
    }
}

/// What one failed attempt with this request body is charged: its worst case.
fn worst_case_of(body: &serde_json::Value, model: &str) -> i64 {
    let config =
        Config::parse("homeserver: {url: 'http://h', server_name: example.org}\n").unwrap();
    let price = grok_appservice::provider::Price::from(&config.prices[model]);
    let usage = grok_appservice::provider::Usage {
        input_tokens: grok_appservice::provider::estimate_prompt_tokens(&body.to_string()),
        output_tokens: body["max_output_tokens"].as_i64().unwrap(),
        ..Default::default()
    };
    grok_appservice::provider::compute_cost_ticks(&usage, &price)
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_attempts_that_may_have_been_billed_are_charged() {
    let f = Fixture::new().await;
    let c = f.cascade(|_| {}).await;
    // A 429 is refused before the model runs; a 500 may come after it ran.
    f.xai.script(429, json!({"error": "slow down"}));
    f.xai.script(500, json!({"error": "down"}));
    let o = ask(&c, DIRECT_Q).await;
    let seen = f.xai.seen();
    assert!(o.ok());
    assert_eq!(seen.len(), 3, "two failures, then the answer");
    assert_eq!(o.unconfirmed_attempts, 1);
    let worst = worst_case_of(&seen[1].body, "grok-4.3");
    assert!(worst > FAKE_COST_TICKS);
    assert_eq!(
        o.stage_cost.get(&Stage::Final),
        Some(&(FAKE_COST_TICKS + worst))
    );
    assert_eq!(o.cost_total(), FAKE_COST_TICKS + worst);
    assert_eq!(o.cost_source, Some(CostSource::Estimated));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_primary_before_a_fallback_is_charged() {
    let f = Fixture::new().await;
    let c = f.cascade(|_| {}).await;
    // max_retries 2: three failed attempts of the final model, then the fallback answers.
    for _ in 0..3 {
        f.xai.script(503, json!({"error": "overloaded"}));
    }
    let o = ask(&c, DIRECT_Q).await;
    assert!(o.ok() && o.fallback_fired);
    assert_eq!(
        f.models(),
        vec![
            "grok-4.3",
            "grok-4.3",
            "grok-4.3",
            "grok-4.20-non-reasoning"
        ]
    );
    let worst = worst_case_of(&f.xai.seen()[0].body, "grok-4.3");
    assert_eq!(o.unconfirmed_attempts, 3);
    assert_eq!(
        o.stage_cost.get(&Stage::Final),
        Some(&(3 * worst + FAKE_COST_TICKS))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_and_unsent_attempts_cost_nothing() {
    let f = Fixture::new().await;
    let c = f.cascade(|_| {}).await;
    f.xai.script(400, json!({"error": "bad request"}));
    let o = ask(&c, DIRECT_Q).await;
    assert!(!o.ok());
    assert_eq!((o.unconfirmed_attempts, o.cost_total()), (0, 0));
    assert!(
        o.stage_cost.is_empty(),
        "nothing to settle: the reservation is released"
    );

    // Nothing listens on the port: no request reached xAI.
    let f = Fixture::new().await;
    let c = f
        .cascade(|cfg| {
            cfg.provider.base_url = "http://127.0.0.1:1/v1".into();
            cfg.provider.max_retries = 0;
            cfg.models.fallback = None;
        })
        .await;
    let o = ask(&c, DIRECT_Q).await;
    assert!(o.error.is_some());
    assert_eq!((o.unconfirmed_attempts, o.cost_total()), (0, 0));
}
