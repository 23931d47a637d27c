//! The YAML config, environment overrides and start-up validation.
//!
//! Everything is validated once in [`Config::load`]; every error names the offending key so an
//! operator can fix the file without reading code.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// One USD in xAI's billing unit (`cost_in_usd_ticks`).
pub const TICKS_PER_USD: i64 = 10_000_000_000;

/// A config error; the message always names the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub homeserver: HomeserverConfig,
    #[serde(default)]
    pub appservice: AppserviceConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub provider: ProviderConfig,
    #[serde(default)]
    pub models: ModelsConfig,
    /// Prices per model id, used only when a response lacks `cost_in_usd_ticks`. Entries in
    /// the file are merged with the defaults ([`Config::parse`] fills in the models not
    /// named), so pricing one new model does not silently unprice the others.
    #[serde(default)]
    pub prices: BTreeMap<String, PriceConfig>,
    #[serde(default)]
    pub cascade: CascadeConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub rooms: RoomsConfig,
    #[serde(default)]
    pub bot: BotConfig,
    #[serde(default)]
    pub reply: ReplyConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub context: ContextConfig,
    #[serde(default)]
    pub vision: VisionConfig,
    #[serde(default)]
    pub encryption: EncryptionConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub log: LogConfig,
}

/// `homeserver.*`: where the client-server API is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeserverConfig {
    pub url: String,
    pub server_name: String,
}

/// `appservice.*`: the registration file and the address the webhook listens on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppserviceConfig {
    #[serde(default = "default_registration")]
    pub registration: PathBuf,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// How long a replica owns a claimed message before another may take it over (the owner
    /// renews it while the answer runs).
    #[serde(default = "default_claim_lease", deserialize_with = "de_duration")]
    pub claim_lease: Duration,
    /// How often each replica looks for claims whose owner died.
    #[serde(
        default = "default_recovery_interval",
        deserialize_with = "de_duration"
    )]
    pub recovery_interval: Duration,
    /// A message older than this when handled is dropped (with a WARN and a row), not answered.
    #[serde(default = "default_max_message_age", deserialize_with = "de_duration")]
    pub max_message_age: Duration,
    /// When set, `GET /metrics` requires `Authorization: Bearer <this>`.
    #[serde(default)]
    pub metrics_token: Option<String>,
    /// On SIGTERM, how long in-flight answers may run on before they are cancelled and their
    /// claims handed to other replicas.
    #[serde(default = "default_shutdown_grace", deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// A connection is closed when a whole request head has not arrived this long after the
    /// server began waiting for it (a slow client, or a keep-alive connection idle that long).
    #[serde(
        default = "default_header_read_timeout",
        deserialize_with = "de_duration"
    )]
    pub header_read_timeout: Duration,
    /// An appservice request whose body has not fully arrived this long after its head gets a
    /// 408 and its connection is closed.
    #[serde(
        default = "default_body_read_timeout",
        deserialize_with = "de_duration"
    )]
    pub body_read_timeout: Duration,
}

impl Default for AppserviceConfig {
    fn default() -> Self {
        Self {
            registration: default_registration(),
            listen: default_listen(),
            claim_lease: default_claim_lease(),
            recovery_interval: default_recovery_interval(),
            max_message_age: default_max_message_age(),
            metrics_token: None,
            shutdown_grace: default_shutdown_grace(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
        }
    }
}

/// `database.*`: SQLite (`sqlite://path`) or PostgreSQL (`postgres://...`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    #[serde(default = "default_database_url")]
    pub url: String,
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: default_database_url(),
            pool_size: default_pool_size(),
        }
    }
}

/// `provider.*`: the xAI endpoint. The API key comes only from env `XAI_API_KEY`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    #[serde(default = "default_provider_url")]
    pub base_url: String,
    /// Per-call timeout in seconds (reasoning models can be slow).
    #[serde(default = "default_provider_timeout")]
    pub timeout_secs: u64,
    /// Retries of a retryable failure before giving up (jittered backoff).
    #[serde(default = "default_provider_retries")]
    pub max_retries: u32,
    /// Check the key and the model ids with xAI at start (`serve` refuses a wrong one).
    #[serde(default = "yes")]
    pub check_at_start: bool,
    /// Never read from the file: filled from env `XAI_API_KEY`.
    #[serde(skip)]
    pub api_key: Option<String>,
}

impl std::fmt::Debug for ProviderConfig {
    // Hand-written so the API key can never reach a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("base_url", &self.base_url)
            .field("timeout_secs", &self.timeout_secs)
            .field("max_retries", &self.max_retries)
            .field("check_at_start", &self.check_at_start)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            base_url: default_provider_url(),
            timeout_secs: default_provider_timeout(),
            max_retries: default_provider_retries(),
            check_at_start: true,
            api_key: None,
        }
    }
}

/// `encryption.*`: end-to-end encryption through one cross-signed bot device. The crypto
/// store's passphrase comes only from env `GROK_CRYPTO_PASSPHRASE`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionConfig {
    #[serde(default)]
    pub enabled: bool,
    /// The directory of the crypto store (Olm account, sessions, cross-signing keys).
    #[serde(default = "default_crypto_store")]
    pub store_path: PathBuf,
    /// How long an encrypted message waits for its room key before the bot gives up on it.
    #[serde(default = "default_key_wait", deserialize_with = "de_duration")]
    pub key_wait: Duration,
    /// How long one replica owns the crypto machine before another may take it over.
    #[serde(default = "default_crypto_lease", deserialize_with = "de_duration")]
    pub lease: Duration,
    /// Never read from the file: filled from env `GROK_CRYPTO_PASSPHRASE`.
    #[serde(skip)]
    pub passphrase: Option<String>,
}

impl std::fmt::Debug for EncryptionConfig {
    // Hand-written so the passphrase can never reach a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptionConfig")
            .field("enabled", &self.enabled)
            .field("store_path", &self.store_path)
            .field("key_wait", &self.key_wait)
            .field("lease", &self.lease)
            .field(
                "passphrase",
                &self.passphrase.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            store_path: default_crypto_store(),
            key_wait: default_key_wait(),
            lease: default_crypto_lease(),
            passphrase: None,
        }
    }
}

fn default_crypto_store() -> PathBuf {
    PathBuf::from("crypto-store")
}
fn default_key_wait() -> Duration {
    Duration::from_secs(60)
}
fn default_crypto_lease() -> Duration {
    Duration::from_secs(30)
}

/// `models.*`: model ids per role; nothing about a model is hard-coded elsewhere.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    #[serde(rename = "final", default = "default_final_model")]
    pub final_model: String,
    #[serde(default = "default_cheap_model")]
    pub trivial: String,
    #[serde(default = "default_reason_model")]
    pub reason: String,
    #[serde(default = "default_cheap_model")]
    pub router: String,
    /// Tried once when the final model fails with a retryable error; none by default.
    #[serde(default)]
    pub fallback: Option<String>,
    /// Answers questions about images; `final` when absent (see [`ModelsConfig::vision_model`]).
    #[serde(default)]
    pub vision: Option<String>,
    /// Output cap of the final answer, in tokens.
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u32,
}

impl ModelsConfig {
    /// The model that answers questions about images.
    pub fn vision_model(&self) -> &str {
        self.vision.as_deref().unwrap_or(&self.final_model)
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            final_model: default_final_model(),
            trivial: default_cheap_model(),
            reason: default_reason_model(),
            router: default_cheap_model(),
            fallback: None,
            vision: None,
            max_output_tokens: default_max_output_tokens(),
        }
    }
}

/// `prices.<model>`: USD per 1M tokens; converted to integer ticks per token at load.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub input_per_m: f64,
    pub cached_input_per_m: f64,
    pub output_per_m: f64,
    /// USD per successful web-search call.
    #[serde(default)]
    pub web_search_call: f64,
}

/// `cascade.*`: how the router and the routes behave.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CascadeConfig {
    /// Ask the router model when the heuristic is ambiguous.
    #[serde(default)]
    pub classifier: bool,
    #[serde(default = "default_classifier_timeout")]
    pub classifier_timeout_ms: u64,
    /// A year at or after this one in a message is a cue for fresh facts (the model's cutoff).
    #[serde(default = "default_cutoff_year")]
    pub cutoff_year: i32,
    /// Messages longer than this many characters count as hard (reasoning).
    #[serde(default = "default_long_input")]
    pub long_input_chars: usize,
    #[serde(default = "default_trivial_tokens")]
    pub trivial_max_output_tokens: u32,
    /// Cap on tool turns (web searches) of one web stage.
    #[serde(default = "default_web_turns")]
    pub web_max_turns: u32,
    /// Web-search calls allowed per UTC day across all replicas; over it, web questions go
    /// to `grok_direct`.
    #[serde(default = "default_grounding_cap")]
    pub grounding_cap_per_day: i64,
    /// `reasoning.effort` of the reasoning stage (`low`, `medium`, `high`).
    #[serde(default = "default_reason_effort")]
    pub reason_effort: String,
    #[serde(default = "default_reason_tokens")]
    pub reason_max_output_tokens: u32,
    /// Room id -> route token, forcing every message of that room onto one route.
    #[serde(default)]
    pub room_routes: BTreeMap<String, String>,
}

impl Default for CascadeConfig {
    fn default() -> Self {
        Self {
            classifier: false,
            classifier_timeout_ms: default_classifier_timeout(),
            cutoff_year: default_cutoff_year(),
            long_input_chars: default_long_input(),
            trivial_max_output_tokens: default_trivial_tokens(),
            web_max_turns: default_web_turns(),
            grounding_cap_per_day: default_grounding_cap(),
            reason_effort: default_reason_effort(),
            reason_max_output_tokens: default_reason_tokens(),
            room_routes: BTreeMap::new(),
        }
    }
}

/// `cache.*`: the shared response cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Route token -> time to live; a route without an entry is not cached (the web route
    /// never is).
    #[serde(default = "default_cache_ttl", deserialize_with = "de_duration_map")]
    pub ttl: BTreeMap<String, Duration>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl: default_cache_ttl(),
        }
    }
}

/// `rooms.*`: which servers may invite the bot and talk to it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomsConfig {
    /// Empty in the file means "the bot's own server" (filled in by validation).
    #[serde(default)]
    pub allowed_servers: Vec<String>,
    /// Senders never answered (regexes over the full user id), e.g. other bots.
    #[serde(default)]
    pub ignore_senders: Vec<String>,
    /// Users who may use the bot (globs, or `/regex/`); empty: everyone of `allowed_servers`.
    #[serde(default)]
    pub allowed_users: Vec<String>,
    /// Users who may not (globs, or `/regex/`); wins over `allowed_users`.
    #[serde(default)]
    pub denied_users: Vec<String>,
    /// Room ids the bot serves; empty: every room it is invited to.
    #[serde(default)]
    pub allowed_rooms: Vec<String>,
    /// The three lists above, compiled by validation.
    #[serde(skip)]
    pub access: crate::access::Access,
}

/// The msgtype of the bot's replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyMsgtype {
    /// `m.notice`: other bots never answer it, so no reply loops.
    Notice,
    /// `m.text`: notifies like a person's message.
    Text,
}

/// `bot.*`: how the bot presents itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BotConfig {
    /// Display name; a message starting with it followed by `:` or `,` addresses the bot.
    #[serde(default = "default_display_name")]
    pub display_name: String,
    #[serde(default = "default_msgtype")]
    pub reply_msgtype: ReplyMsgtype,
    #[serde(default = "default_system_prompt")]
    pub system_prompt: String,
    /// Answers one replica runs at once; further claims wait in the database. The work is
    /// waiting on the network, so this bounds memory and the database pool, not the CPU.
    #[serde(default = "default_max_concurrent_answers")]
    pub max_concurrent_answers: usize,
    /// An `mxc://` URI set as the bot's avatar at start.
    #[serde(default)]
    pub avatar_url: Option<String>,
    /// Room commands start with this word (`!grok help`).
    #[serde(default = "default_command_prefix")]
    pub command_prefix: String,
    /// Replies per room per minute; past it one notice, then silence until the minute ends.
    #[serde(default = "default_room_answers_per_minute")]
    pub room_answers_per_minute: u32,
}

impl Default for BotConfig {
    fn default() -> Self {
        Self {
            display_name: default_display_name(),
            reply_msgtype: default_msgtype(),
            system_prompt: default_system_prompt(),
            max_concurrent_answers: default_max_concurrent_answers(),
            avatar_url: None,
            command_prefix: default_command_prefix(),
            room_answers_per_minute: default_room_answers_per_minute(),
        }
    }
}

/// `reply.*`: progress while an answer is written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyConfig {
    /// Post the answer after its first words and edit it as more arrives.
    #[serde(default)]
    pub streaming: bool,
    /// At most one edit per this interval.
    #[serde(default = "default_edit_interval", deserialize_with = "de_duration")]
    pub edit_interval: Duration,
    /// At most this many edits per answer, the last one the complete answer.
    #[serde(default = "default_max_edits")]
    pub max_edits: u32,
    /// When a non-streamed answer takes longer, post "Thinking..." and edit the answer into
    /// it; `off` (the default) never does.
    #[serde(default, deserialize_with = "de_optional_duration")]
    pub placeholder_after: Option<Duration>,
}

impl Default for ReplyConfig {
    fn default() -> Self {
        Self {
            streaming: false,
            edit_interval: default_edit_interval(),
            max_edits: default_max_edits(),
            placeholder_after: None,
        }
    }
}

/// `context.*`: which earlier messages an answer sees, and how many.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextConfig {
    /// Direct chats: recent history, so a follow-up works without using reply.
    #[serde(default = "default_dm_mode")]
    pub dm_mode: crate::context::Mode,
    /// Group rooms: only the reply chain or thread, so chatter never reaches the model.
    #[serde(default = "default_group_mode")]
    pub group_mode: crate::context::Mode,
    /// Earlier turns sent at most (a split answer of the bot is one turn).
    #[serde(default = "default_context_messages")]
    pub max_messages: usize,
    /// Estimated tokens of the earlier turns and the current message together.
    #[serde(default = "default_context_tokens")]
    pub max_tokens: i64,
    /// In `history` mode, how far back before the current message the room is read.
    #[serde(default = "default_history_window", deserialize_with = "de_duration")]
    pub history_window: Duration,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            dm_mode: default_dm_mode(),
            group_mode: default_group_mode(),
            max_messages: default_context_messages(),
            max_tokens: default_context_tokens(),
            history_window: default_history_window(),
        }
    }
}

/// `vision.*`: which images the bot reads (see [`crate::vision`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    /// Off: every image gets the media notice.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Largest image read, in bytes: checked against `info.size` and during the download.
    #[serde(default = "default_vision_max_bytes")]
    pub max_bytes: u64,
    /// Most images one request sends, the context's included.
    #[serde(default = "default_vision_max_images")]
    pub max_images: usize,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_bytes: default_vision_max_bytes(),
            max_images: default_vision_max_images(),
        }
    }
}

fn default_vision_max_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_vision_max_images() -> usize {
    4
}

fn default_edit_interval() -> Duration {
    Duration::from_millis(1_500)
}
fn default_max_edits() -> u32 {
    20
}

/// `off` (or nothing) for none, else a duration.
fn de_optional_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Num(n)) => Ok(Some(Duration::from_secs(n))),
        Some(Raw::Text(s)) if s.trim() == "off" => Ok(None),
        Some(Raw::Text(s)) => parse_duration(&s)
            .map(Some)
            .map_err(|m| serde::de::Error::custom(format!("{m}, or `off`"))),
    }
}

/// `limits.*`: spend ceilings (USD) and request caps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// All users together, per UTC day.
    #[serde(default = "default_daily_ceiling")]
    pub daily_ceiling_usd: f64,
    #[serde(default = "default_per_user_daily")]
    pub per_user_daily_usd: f64,
    #[serde(default = "default_per_user_hourly")]
    pub per_user_requests_per_hour: u32,
    /// Users exempt from the per-user caps (not from the daily ceiling).
    #[serde(default)]
    pub admins: Vec<String>,
    /// Per-user caps that replace the defaults for the named users.
    #[serde(default)]
    pub per_user_overrides: BTreeMap<String, UserLimitConfig>,
    /// Reservations are the estimate times this factor.
    #[serde(default = "default_safety_factor")]
    pub safety_factor: f64,
    /// A reservation not settled within this time is expired by the sweeper.
    #[serde(default = "default_reservation_ttl", deserialize_with = "de_duration")]
    pub reservation_ttl: Duration,
    /// The command that shows a user their spend.
    #[serde(default = "default_usage_command")]
    pub usage_command: String,
}

/// `limits.per_user_overrides.<user>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserLimitConfig {
    pub daily_usd: Option<f64>,
    pub requests_per_hour: Option<u32>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            daily_ceiling_usd: default_daily_ceiling(),
            per_user_daily_usd: default_per_user_daily(),
            per_user_requests_per_hour: default_per_user_hourly(),
            admins: Vec::new(),
            per_user_overrides: BTreeMap::new(),
            safety_factor: default_safety_factor(),
            reservation_ttl: default_reservation_ttl(),
            usage_command: default_usage_command(),
        }
    }
}

/// `telemetry.*`: the `request_log` analytics table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub store_text: bool,
    /// How long rows are kept, e.g. `30d`, `12h`; `0` keeps them forever.
    #[serde(default = "default_retention", deserialize_with = "de_duration")]
    pub retention: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            store_text: false,
            retention: default_retention(),
        }
    }
}

/// `retention.*`: how long housekeeping keeps the rows of each table (`request_log` is
/// `telemetry.retention`). A duration of `0` keeps that table's rows forever.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// `appservice_transactions`: txnIds handled, kept so a retried PUT is recognised.
    #[serde(
        default = "default_keep_transactions",
        deserialize_with = "de_duration"
    )]
    pub transactions: Duration,
    /// `processed_events`: claims in a final state (answered, failed, done), counted from their
    /// last update. Unfinished claims are never deleted.
    #[serde(default = "default_keep_claims", deserialize_with = "de_duration")]
    pub claims: Duration,
    /// `bot_events`: the bot's own messages. A reply to a bot message older than this no
    /// longer addresses the bot by being a reply (a mention still does).
    #[serde(default = "default_keep_bot_events", deserialize_with = "de_duration")]
    pub bot_events: Duration,
    /// `response_cache`: how long past its `expires_at` a cached answer is kept; `expired`
    /// (the same as `0`) deletes it as soon as it expired.
    #[serde(default, deserialize_with = "de_cache_retention")]
    pub cache: Duration,
    /// `budget_reservations`: finished reservations (settled, released, expired), counted from
    /// when they finished. Held ones are never deleted.
    #[serde(
        default = "default_keep_reservations",
        deserialize_with = "de_duration"
    )]
    pub reservations: Duration,
    /// `room_notices`: when a skip notice was last posted in a room.
    #[serde(default = "default_keep_notices", deserialize_with = "de_duration")]
    pub notices: Duration,
    /// `budget_counters`: rows of UTC days older than this.
    #[serde(default = "default_keep_budget_days", deserialize_with = "de_duration")]
    pub budget_days: Duration,
    /// How often housekeeping runs (on one replica at a time).
    #[serde(
        default = "default_housekeeping_interval",
        deserialize_with = "de_duration"
    )]
    pub interval: Duration,
    /// Most rows one delete statement removes.
    #[serde(default = "default_housekeeping_batch")]
    pub batch: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            transactions: default_keep_transactions(),
            claims: default_keep_claims(),
            bot_events: default_keep_bot_events(),
            cache: Duration::ZERO,
            reservations: default_keep_reservations(),
            notices: default_keep_notices(),
            budget_days: default_keep_budget_days(),
            interval: default_housekeeping_interval(),
            batch: default_housekeeping_batch(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `log.*`: format and default filter (`RUST_LOG` overrides the filter).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: default_log_level(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_registration() -> PathBuf {
    PathBuf::from("registration.yaml")
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9000))
}
/// Short, renewed every quarter: a dead replica's claims are taken over within seconds.
fn default_claim_lease() -> Duration {
    Duration::from_secs(10)
}
/// Within the 30 s most orchestrators wait after SIGTERM before they kill.
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(20)
}
/// Synapse sends a transaction's head at once; only a stuck or hostile client takes longer.
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(30)
}
/// A full 32 MiB transaction within it needs about 4.5 Mbit/s: any link to a homeserver.
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_recovery_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_command_prefix() -> String {
    "!grok".into()
}
fn default_room_answers_per_minute() -> u32 {
    20
}
fn default_max_concurrent_answers() -> usize {
    64
}
fn default_max_message_age() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_database_url() -> String {
    "sqlite://grok-appservice.db".into()
}
fn default_pool_size() -> u32 {
    8
}
fn default_provider_url() -> String {
    "https://api.x.ai/v1".into()
}
fn default_provider_timeout() -> u64 {
    300
}
fn default_provider_retries() -> u32 {
    2
}
fn default_final_model() -> String {
    "grok-4.3".into()
}
fn default_cheap_model() -> String {
    "grok-4.20-non-reasoning".into()
}
fn default_reason_model() -> String {
    "grok-4.5".into()
}
fn default_max_output_tokens() -> u32 {
    2048
}
fn default_dm_mode() -> crate::context::Mode {
    crate::context::Mode::History
}
fn default_group_mode() -> crate::context::Mode {
    crate::context::Mode::Chain
}
fn default_context_messages() -> usize {
    20
}
fn default_context_tokens() -> i64 {
    6_000
}
fn default_history_window() -> Duration {
    Duration::from_secs(2 * 3_600)
}
fn default_display_name() -> String {
    "Grok".into()
}
fn default_msgtype() -> ReplyMsgtype {
    ReplyMsgtype::Notice
}
fn default_system_prompt() -> String {
    "You are Grok, a helpful assistant in a Matrix chat room. Answer concisely and accurately; \
     use Markdown only where it helps (lists, code blocks). If you do not know, say so."
        .into()
}
fn default_classifier_timeout() -> u64 {
    2000
}
fn default_cutoff_year() -> i32 {
    2025
}
fn default_long_input() -> usize {
    800
}
fn default_trivial_tokens() -> u32 {
    256
}
fn default_web_turns() -> u32 {
    2
}
fn default_grounding_cap() -> i64 {
    1000
}
fn default_reason_effort() -> String {
    "medium".into()
}
fn default_reason_tokens() -> u32 {
    8192
}
fn default_cache_ttl() -> BTreeMap<String, Duration> {
    BTreeMap::from([
        ("trivial_direct".to_string(), Duration::from_secs(24 * 3600)),
        ("grok_direct".to_string(), Duration::from_secs(3600)),
        (
            "reason_then_grok".to_string(),
            Duration::from_secs(6 * 3600),
        ),
    ])
}
fn default_daily_ceiling() -> f64 {
    10.0
}
fn default_per_user_daily() -> f64 {
    1.0
}
fn default_per_user_hourly() -> u32 {
    30
}
fn default_safety_factor() -> f64 {
    1.25
}
/// Covers the longest run the default provider settings allow (see `Config::longest_run`).
fn default_reservation_ttl() -> Duration {
    Duration::from_secs(60 * 60)
}
fn default_usage_command() -> String {
    "!usage".into()
}
fn default_retention() -> Duration {
    Duration::from_secs(30 * 86_400)
}
const DAY: u64 = 86_400;
/// Largest `vision.max_bytes`: one request holds its images in memory (bytes and base64).
const MAX_IMAGE_BYTES: u64 = 20 * 1024 * 1024;
/// Most `vision.max_images`: each may cost a download and up to 1,792 input tokens.
const MAX_IMAGES: usize = 10;

/// Most earlier turns `context.max_messages` allows: each may cost a homeserver fetch.
const MAX_CONTEXT_MESSAGES: usize = 100;
fn default_keep_transactions() -> Duration {
    Duration::from_secs(7 * DAY)
}
fn default_keep_claims() -> Duration {
    Duration::from_secs(30 * DAY)
}
fn default_keep_bot_events() -> Duration {
    Duration::from_secs(90 * DAY)
}
fn default_keep_reservations() -> Duration {
    Duration::from_secs(30 * DAY)
}
fn default_keep_notices() -> Duration {
    Duration::from_secs(7 * DAY)
}
fn default_keep_budget_days() -> Duration {
    Duration::from_secs(400 * DAY)
}
fn default_housekeeping_interval() -> Duration {
    Duration::from_secs(10 * 60)
}
fn default_housekeeping_batch() -> u32 {
    500
}
fn default_log_level() -> String {
    "info".into()
}

/// xAI's published prices (docs.x.ai pricing, late 2026); override under `prices:`.
fn default_prices() -> BTreeMap<String, PriceConfig> {
    let p = |i, c, o| PriceConfig {
        input_per_m: i,
        cached_input_per_m: c,
        output_per_m: o,
        web_search_call: 0.005,
    };
    BTreeMap::from([
        ("grok-4.3".to_string(), p(1.25, 0.20, 2.50)),
        ("grok-4.20-non-reasoning".to_string(), p(1.25, 0.20, 2.50)),
        ("grok-4.5".to_string(), p(2.00, 0.30, 6.00)),
    ])
}

fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Num(n) => Ok(Duration::from_secs(n)),
        Raw::Text(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

/// `expired` (delete as soon as expired) or a duration past expiry.
fn de_cache_retention<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Num(n) => Ok(Duration::from_secs(n)),
        Raw::Text(s) if s.trim() == "expired" => Ok(Duration::ZERO),
        Raw::Text(s) => {
            parse_duration(&s).map_err(|m| serde::de::Error::custom(format!("{m}, or `expired`")))
        }
    }
}

fn de_duration_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, Duration>, D::Error> {
    let raw: BTreeMap<String, String> = BTreeMap::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            parse_duration(&v)
                .map(|d| (k, d))
                .map_err(serde::de::Error::custom)
        })
        .collect()
}

/// Parses `30d`, `12h`, `15m`, `90s` or a bare number of seconds; `0` is zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30d, 12h, 15m, 90s or 1500ms"))?;
    let per_unit: u64 = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use ms, s, m, h or d)"
            ))
        }
    };
    n.checked_mul(per_unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{s}` is too long"))
}

/// Converts a USD amount from the config into ticks (config is the only place floats appear).
pub fn usd_to_ticks(usd: f64) -> i64 {
    (usd * TICKS_PER_USD as f64).round() as i64
}

fn parse_bool(key: &'static str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => Err(invalid(key, format!("`{other}` is not a boolean"))),
    }
}

impl Config {
    /// Reads `path`, applies environment overrides from the process env and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(path, |k| std::env::var(k).ok())
    }

    /// Like [`Config::load`] with an injectable environment, for tests.
    pub fn load_with_env(
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        config.apply_env(env)?;
        // Relative paths in the file are relative to the file, not the working directory.
        if config.appservice.registration.is_relative() {
            if let Some(dir) = path.parent() {
                config.appservice.registration = dir.join(&config.appservice.registration);
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses YAML text without env overrides or validation.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut config: Self = serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })?;
        for (model, price) in default_prices() {
            config.prices.entry(model).or_insert(price);
        }
        Ok(config)
    }

    /// Applies `DATABASE_URL`, `XAI_API_KEY`, `GROK_CRYPTO_PASSPHRASE` and the `TELEMETRY_*`
    /// overrides.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(url) = env("DATABASE_URL").filter(|v| !v.is_empty()) {
            self.database.url = url;
        }
        self.provider.api_key = env("XAI_API_KEY").filter(|v| !v.is_empty());
        self.encryption.passphrase = env("GROK_CRYPTO_PASSPHRASE").filter(|v| !v.is_empty());
        if let Some(v) = env("TELEMETRY_ENABLED") {
            self.telemetry.enabled = parse_bool("TELEMETRY_ENABLED", &v)?;
        }
        if let Some(v) = env("TELEMETRY_STORE_TEXT") {
            self.telemetry.store_text = parse_bool("TELEMETRY_STORE_TEXT", &v)?;
        }
        if let Some(v) = env("TELEMETRY_RETENTION") {
            self.telemetry.retention =
                parse_duration(&v).map_err(|m| invalid("TELEMETRY_RETENTION", m))?;
        }
        Ok(())
    }

    /// The longest an answer's provider calls can run: up to three calls (the classifier, a
    /// first stage, and the final or fallback stage), each with its retries, timeouts and
    /// backoff (at most 30 s a wait).
    pub fn longest_run(&self) -> Duration {
        let p = &self.provider;
        // Saturating: absurd settings must fail validation by name, not overflow.
        let attempts = u64::from(p.max_retries) + 1;
        let per_call = attempts
            .saturating_mul(p.timeout_secs)
            .saturating_add(u64::from(p.max_retries) * 30);
        Duration::from_secs(per_call.saturating_mul(3))
    }

    fn validate_encryption(&self) -> Result<(), ConfigError> {
        let e = &self.encryption;
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&e.key_wait) {
            return Err(invalid("encryption.key_wait", "must be between 1s and 10m"));
        }
        if e.lease < Duration::from_secs(5) {
            return Err(invalid("encryption.lease", "must be at least 5s"));
        }
        if e.store_path.as_os_str().is_empty() {
            return Err(invalid("encryption.store_path", "must not be empty"));
        }
        Ok(())
    }

    /// Checks every value once; fills `rooms.allowed_servers` with the bot's server if empty.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        check_http_url("homeserver.url", &self.homeserver.url)?;
        self.homeserver.url = self.homeserver.url.trim_end_matches('/').to_string();
        if ruma::ServerName::parse(&self.homeserver.server_name).is_err() {
            return Err(invalid(
                "homeserver.server_name",
                format!("`{}` is not a server name", self.homeserver.server_name),
            ));
        }
        if self.appservice.claim_lease < Duration::from_secs(3) {
            return Err(invalid("appservice.claim_lease", "must be at least 3s"));
        }
        if self.bot.max_concurrent_answers == 0 {
            return Err(invalid("bot.max_concurrent_answers", "must be at least 1"));
        }
        self.validate_encryption()?;
        if self.limits.reservation_ttl < self.longest_run() {
            return Err(invalid(
                "limits.reservation_ttl",
                format!(
                    "must be at least {}s: with provider.timeout_secs {} and provider.max_retries {} \
                     one answer may run that long, and a reservation that expires first is \
                     counted at its estimate while the call still runs",
                    self.longest_run().as_secs(),
                    self.provider.timeout_secs,
                    self.provider.max_retries
                ),
            ));
        }
        for (key, timeout) in [
            (
                "appservice.header_read_timeout",
                self.appservice.header_read_timeout,
            ),
            (
                "appservice.body_read_timeout",
                self.appservice.body_read_timeout,
            ),
        ] {
            if timeout.is_zero() {
                return Err(invalid(key, "must be more than 0"));
            }
        }
        if self.appservice.recovery_interval.is_zero() {
            return Err(invalid(
                "appservice.recovery_interval",
                "must be more than 0",
            ));
        }
        check_http_url("provider.base_url", &self.provider.base_url)?;
        self.provider.base_url = self.provider.base_url.trim_end_matches('/').to_string();
        if self.provider.timeout_secs == 0 {
            return Err(invalid("provider.timeout_secs", "must be at least 1"));
        }
        crate::store::DatabaseKind::from_url(&self.database.url)
            .map_err(|e| invalid("database.url", e.to_string()))?;
        if self.database.pool_size == 0 {
            return Err(invalid("database.pool_size", "must be at least 1"));
        }
        for (key, model) in [
            ("models.final", &self.models.final_model),
            ("models.trivial", &self.models.trivial),
            ("models.reason", &self.models.reason),
            ("models.router", &self.models.router),
        ] {
            if model.trim().is_empty() {
                return Err(invalid(key, "must name a model"));
            }
        }
        if self
            .models
            .vision
            .as_deref()
            .is_some_and(|m| m.trim().is_empty())
        {
            return Err(invalid("models.vision", "must name a model"));
        }
        if self.models.max_output_tokens == 0 {
            return Err(invalid("models.max_output_tokens", "must be at least 1"));
        }
        for price in self.prices.values() {
            let all = [
                price.input_per_m,
                price.cached_input_per_m,
                price.output_per_m,
                price.web_search_call,
            ];
            if all.iter().any(|p| !p.is_finite() || *p < 0.0) {
                return Err(invalid("prices", "prices must be non-negative numbers"));
            }
        }
        const ROUTES: [&str; 4] = [
            "grok_direct",
            "trivial_direct",
            "web_then_grok",
            "reason_then_grok",
        ];
        for route in self.cascade.room_routes.values() {
            if !ROUTES.contains(&route.as_str()) {
                return Err(invalid(
                    "cascade.room_routes",
                    format!("`{route}` is not a route ({})", ROUTES.join(", ")),
                ));
            }
        }
        for route in self.cache.ttl.keys() {
            if route == "web_then_grok" {
                return Err(invalid(
                    "cache.ttl",
                    "web answers go stale: web_then_grok is never cached",
                ));
            }
            if !ROUTES.contains(&route.as_str()) {
                return Err(invalid("cache.ttl", format!("`{route}` is not a route")));
            }
        }
        if !["low", "medium", "high"].contains(&self.cascade.reason_effort.as_str()) {
            return Err(invalid(
                "cascade.reason_effort",
                "must be low, medium or high",
            ));
        }
        if self.cascade.web_max_turns == 0 {
            return Err(invalid("cascade.web_max_turns", "must be at least 1"));
        }
        if self.cascade.grounding_cap_per_day < 0 {
            return Err(invalid(
                "cascade.grounding_cap_per_day",
                "must not be negative",
            ));
        }
        for pattern in &self.rooms.ignore_senders {
            if let Err(e) = regex::Regex::new(pattern) {
                return Err(invalid("rooms.ignore_senders", format!("{pattern}: {e}")));
            }
        }
        let rooms = &self.rooms;
        self.rooms.access = crate::access::Access::compile(
            &rooms.allowed_users,
            &rooms.denied_users,
            &rooms.allowed_rooms,
        )
        .map_err(|e| invalid(e.key, e.message))?;
        if let Some(url) = &self.bot.avatar_url {
            if !crate::render::is_mxc(url) {
                return Err(invalid("bot.avatar_url", "must be an mxc:// URI"));
            }
        }
        let prefix = self.bot.command_prefix.trim();
        if prefix.is_empty() || prefix.contains(char::is_whitespace) {
            return Err(invalid(
                "bot.command_prefix",
                "must be one word, e.g. !grok",
            ));
        }
        if self.reply.max_edits == 0 {
            return Err(invalid(
                "reply.max_edits",
                "must be at least 1 (the complete answer)",
            ));
        }
        if self.reply.edit_interval < Duration::from_millis(200) {
            return Err(invalid(
                "reply.edit_interval",
                "must be at least 200ms: faster edits flood the homeserver",
            ));
        }
        if self.bot.room_answers_per_minute == 0 {
            return Err(invalid("bot.room_answers_per_minute", "must be at least 1"));
        }
        if self.rooms.allowed_servers.is_empty() {
            self.rooms.allowed_servers = vec![self.homeserver.server_name.clone()];
        }
        for (key, usd) in [
            ("limits.daily_ceiling_usd", self.limits.daily_ceiling_usd),
            ("limits.per_user_daily_usd", self.limits.per_user_daily_usd),
        ] {
            if !usd.is_finite() || usd < 0.0 {
                return Err(invalid(key, "must be a non-negative amount in USD"));
            }
        }
        for (user, o) in &self.limits.per_user_overrides {
            if o.daily_usd.is_some_and(|u| !u.is_finite() || u < 0.0) {
                return Err(invalid(
                    "limits.per_user_overrides",
                    format!("{user}: daily_usd must be a non-negative amount"),
                ));
            }
        }
        if !self.limits.safety_factor.is_finite() || self.limits.safety_factor < 1.0 {
            return Err(invalid("limits.safety_factor", "must be at least 1.0"));
        }
        if self.limits.reservation_ttl < Duration::from_secs(60) {
            return Err(invalid("limits.reservation_ttl", "must be at least 1m"));
        }
        if !self.limits.usage_command.starts_with('!') {
            return Err(invalid("limits.usage_command", "must start with `!`"));
        }
        self.validate_retention()?;
        self.validate_context()?;
        self.validate_vision()?;
        if self.bot.display_name.trim().is_empty() {
            return Err(invalid("bot.display_name", "must not be empty"));
        }
        // tracing-subscriber 0.3 slices a directive at offsets of its trimmed self: space
        // around one shifts its target by a byte, and a multi-byte char there panics.
        let directives: Vec<&str> = self.log.level.split(',').map(str::trim).collect();
        self.log.level = directives.join(",");
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a log filter", self.log.level),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// The context bounds: what one answer may fetch and send stays small.
    fn validate_context(&self) -> Result<(), ConfigError> {
        let c = &self.context;
        if !(1..=MAX_CONTEXT_MESSAGES).contains(&c.max_messages) {
            return Err(invalid(
                "context.max_messages",
                format!("must be between 1 and {MAX_CONTEXT_MESSAGES}"),
            ));
        }
        if !(100..=1_000_000).contains(&c.max_tokens) {
            return Err(invalid(
                "context.max_tokens",
                "must be between 100 and 1000000",
            ));
        }
        if c.history_window.is_zero() || c.history_window > Duration::from_secs(30 * DAY) {
            return Err(invalid(
                "context.history_window",
                "must be more than 0 and at most 30d",
            ));
        }
        Ok(())
    }

    /// The image bounds: an image is held in memory (twice, as bytes and base64) while its
    /// request runs, so one request's images stay bounded.
    fn validate_vision(&self) -> Result<(), ConfigError> {
        let v = &self.vision;
        if !(1..=MAX_IMAGE_BYTES).contains(&v.max_bytes) {
            return Err(invalid(
                "vision.max_bytes",
                format!("must be between 1 and {MAX_IMAGE_BYTES}"),
            ));
        }
        if !(1..=MAX_IMAGES).contains(&v.max_images) {
            return Err(invalid(
                "vision.max_images",
                format!("must be between 1 and {MAX_IMAGES}"),
            ));
        }
        Ok(())
    }

    /// Each kept table has a floor below which deleting rows would break something that reads
    /// them; `0` (keep forever) is always allowed.
    fn validate_retention(&self) -> Result<(), ConfigError> {
        let r = &self.retention;
        let day = Duration::from_secs(DAY);
        let floors = [
            // Synapse retries a failed transaction with the same txnId (backing off to 512 s).
            (
                "retention.transactions",
                r.transactions,
                Duration::from_secs(3_600),
                "1h",
            ),
            // A claim dedupes an event delivered twice; it must outlive the age at which a
            // late redelivery is dropped anyway.
            (
                "retention.claims",
                r.claims,
                day.max(self.appservice.max_message_age),
                "1d and appservice.max_message_age",
            ),
            ("retention.bot_events", r.bot_events, day, "1d"),
            // The hourly cap counts the last hour's reservations; the audit reads today's.
            ("retention.reservations", r.reservations, day, "1d"),
            // The longest notice window is a day.
            ("retention.notices", r.notices, day, "1d"),
            // Today's and yesterday's counters hold live budgets (a reservation made before
            // midnight settles after it).
            ("retention.budget_days", r.budget_days, 2 * day, "2d"),
        ];
        for (key, keep, floor, shown) in floors {
            if !keep.is_zero() && keep < floor {
                return Err(invalid(
                    key,
                    format!("must be 0 (keep forever) or at least {shown}"),
                ));
            }
        }
        if r.interval < Duration::from_secs(1) {
            return Err(invalid("retention.interval", "must be at least 1s"));
        }
        if r.batch == 0 || r.batch > 100_000 {
            return Err(invalid("retention.batch", "must be between 1 and 100000"));
        }
        Ok(())
    }
}

fn check_http_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    let ok = (url.starts_with("http://") || url.starts_with("https://"))
        && reqwest::Url::parse(url).is_ok();
    if ok {
        Ok(())
    } else {
        Err(invalid(key, format!("`{url}` is not an http(s) URL")))
    }
}

/// Whether `url` would carry secrets in clear text over a network: `http://` to a host that
/// is not loopback or a private address (a homeserver on the same host or LAN is fine).
pub fn sends_in_clear(url: &str) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    if parsed.scheme() != "http" {
        return false;
    }
    let Some(host) = parsed.host_str() else {
        return false;
    };
    match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    {
        Ok(std::net::IpAddr::V4(ip)) => {
            !(ip.is_loopback() || ip.is_private() || ip.is_link_local())
        }
        Ok(std::net::IpAddr::V6(ip)) => {
            !(ip.is_loopback() || ip.is_unique_local() || ip.is_unicast_link_local())
        }
        // A single-label name (`synapse`, a container's) or `localhost` is not on the internet.
        Err(_) => {
            let name = host.trim_end_matches('.');
            !(name == "localhost" || name.ends_with(".localhost") || !name.contains('.'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_text_homeservers_are_recognised() {
        for url in ["http://matrix.example.org", "http://8.8.8.8:8008"] {
            assert!(sends_in_clear(url), "{url}");
        }
        for url in [
            "https://matrix.example.org",
            "http://127.0.0.1:8008",
            "http://localhost:8008",
            "http://synapse:8008",
            "http://10.0.0.5:8008",
            "http://192.168.1.2",
            "http://[::1]:8008",
        ] {
            assert!(!sends_in_clear(url), "{url}");
        }
    }

    const MINIMAL: &str = "homeserver: {url: 'http://127.0.0.1:8008', server_name: example.org}\n\
                           appservice: {listen: '127.0.0.1:9000'}\n";

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut c = Config::parse(text)?;
        c.apply_env(|k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })?;
        c.validate()?;
        Ok(c)
    }

    fn key_of(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { key, .. } => key.to_string(),
            other => panic!("expected an Invalid error, got {other}"),
        }
    }

    #[test]
    fn defaults_fill_a_minimal_file() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.database.url, "sqlite://grok-appservice.db");
        assert_eq!(c.models.final_model, "grok-4.3");
        assert_eq!(c.rooms.allowed_servers, vec!["example.org"]);
        assert_eq!(c.bot.reply_msgtype, ReplyMsgtype::Notice);
        assert!(c.telemetry.enabled && !c.telemetry.store_text);
        assert_eq!(c.telemetry.retention, Duration::from_secs(30 * 86_400));
        assert!(c.provider.api_key.is_none());
    }

    #[test]
    fn access_lists_compile_at_load_and_errors_name_the_key_and_entry() {
        let c = load(
            &format!(
                "{MINIMAL}rooms: {{allowed_users: ['@*:example.org'], \
                 denied_users: ['/^@spam/'], allowed_rooms: ['!team:example.org']}}\n"
            ),
            &[],
        )
        .unwrap();
        assert!(c.rooms.access.user_allowed("@alice:example.org"));
        assert!(!c.rooms.access.user_allowed("@spammer:example.org"));
        assert!(!c.rooms.access.room_allowed("!other:example.org"));
        let bad = load(&format!("{MINIMAL}rooms: {{denied_users: ['/[/']}}\n"), &[]).unwrap_err();
        let text = bad.to_string();
        assert!(
            text.contains("`rooms.denied_users`") && text.contains("`/[/`"),
            "{text}"
        );
        let alias = load(
            &format!("{MINIMAL}rooms: {{allowed_rooms: ['#a:b.org']}}\n"),
            &[],
        );
        assert_eq!(key_of(alias.unwrap_err()), "rooms.allowed_rooms");
    }

    #[test]
    fn read_timeouts_have_defaults_and_must_be_positive() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.appservice.header_read_timeout, Duration::from_secs(30));
        assert_eq!(c.appservice.body_read_timeout, Duration::from_secs(60));
        let hs = "homeserver: {url: 'http://127.0.0.1:8008', server_name: example.org}\n";
        let set = load(
            &format!("{hs}appservice: {{header_read_timeout: 1500ms, body_read_timeout: 2m}}\n"),
            &[],
        )
        .unwrap();
        assert_eq!(
            (
                set.appservice.header_read_timeout,
                set.appservice.body_read_timeout
            ),
            (Duration::from_millis(1500), Duration::from_secs(120))
        );
        for key in ["header_read_timeout", "body_read_timeout"] {
            let zero = format!("{hs}appservice: {{{key}: 0s}}\n");
            assert_eq!(
                key_of(load(&zero, &[]).unwrap_err()),
                format!("appservice.{key}")
            );
        }
    }

    #[test]
    fn huge_numbers_are_errors_not_overflows() {
        // Found by fuzz/config: both panicked with overflow checks on (and wrapped without).
        assert!(parse_duration("99999999999999999d")
            .unwrap_err()
            .contains("too long"));
        assert_eq!(
            parse_duration("18446744073709551615s").unwrap(),
            Duration::from_secs(u64::MAX)
        );
        let hs = "homeserver: {url: 'http://127.0.0.1:8008', server_name: example.org}\n";
        let slow = format!(
            "{hs}provider: {{timeout_secs: 18446744073709551615, max_retries: 4294967295}}\n"
        );
        assert_eq!(
            key_of(load(&slow, &[]).unwrap_err()),
            "limits.reservation_ttl"
        );
        let long = format!("{hs}appservice: {{claim_lease: 99999999999999999d}}\n");
        let err = load(&long, &[]).unwrap_err().to_string();
        assert!(err.contains("too long"), "{err}");
    }

    #[test]
    fn log_filters_with_spaces_are_trimmed_not_a_panic() {
        // Found by fuzz/config: tracing-subscriber panicked on ` é=info` (a space, then a
        // multi-byte char before the `=`).
        let hs = "homeserver: {url: 'http://127.0.0.1:8008', server_name: example.org}\n";
        let c = load(&format!("{hs}log: {{level: 'info, é=debug'}}\n"), &[]).unwrap();
        assert_eq!(c.log.level, "info,é=debug");
        let c = load(
            &format!("{hs}log: {{level: ' warn , grok_appservice=debug '}}\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.log.level, "warn,grok_appservice=debug");
    }

    #[test]
    fn env_overrides_win() {
        let c = load(
            MINIMAL,
            &[
                ("DATABASE_URL", "postgres://u@h/db"),
                ("XAI_API_KEY", "xai-secret"),
                ("TELEMETRY_ENABLED", "false"),
                ("TELEMETRY_STORE_TEXT", "1"),
                ("TELEMETRY_RETENTION", "7d"),
            ],
        )
        .unwrap();
        assert_eq!(c.database.url, "postgres://u@h/db");
        assert_eq!(c.provider.api_key.as_deref(), Some("xai-secret"));
        assert!(!c.telemetry.enabled && c.telemetry.store_text);
        assert_eq!(c.telemetry.retention, Duration::from_secs(7 * 86_400));
        assert!(
            !format!("{c:?}").contains("xai-secret"),
            "the key must not reach Debug output"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let bad_db = format!("{MINIMAL}database: {{url: 'mysql://x'}}\n");
        assert_eq!(key_of(load(&bad_db, &[]).unwrap_err()), "database.url");
        let bad_hs = "homeserver: {url: 'ftp://x', server_name: example.org}\n";
        assert_eq!(key_of(load(bad_hs, &[]).unwrap_err()), "homeserver.url");
        assert_eq!(
            key_of(load(MINIMAL, &[("TELEMETRY_ENABLED", "maybe")]).unwrap_err()),
            "TELEMETRY_ENABLED"
        );
        let bad_limit = format!("{MINIMAL}limits: {{daily_ceiling_usd: -1}}\n");
        assert_eq!(
            key_of(load(&bad_limit, &[]).unwrap_err()),
            "limits.daily_ceiling_usd"
        );
        let bad_route = format!("{MINIMAL}cascade: {{room_routes: {{'!r:x': fast}}}}\n");
        assert_eq!(
            key_of(load(&bad_route, &[]).unwrap_err()),
            "cascade.room_routes"
        );
        let web_cache = format!("{MINIMAL}cache: {{ttl: {{web_then_grok: 1h}}}}\n");
        assert_eq!(key_of(load(&web_cache, &[]).unwrap_err()), "cache.ttl");
        let unknown = format!("{MINIMAL}homeservr: {{}}\n");
        let err = load(&unknown, &[]).unwrap_err().to_string();
        assert!(err.contains("homeservr"), "{err}");
    }

    #[test]
    fn context_defaults_and_errors() {
        use crate::context::Mode;
        let c = load(MINIMAL, &[]).unwrap().context;
        assert_eq!((c.dm_mode, c.group_mode), (Mode::History, Mode::Chain));
        assert_eq!((c.max_messages, c.max_tokens), (20, 6_000));
        assert_eq!(c.history_window, Duration::from_secs(7_200));
        let c = load(
            &format!(
                "{MINIMAL}context: {{dm_mode: off, group_mode: history, history_window: 30m}}\n"
            ),
            &[],
        )
        .unwrap()
        .context;
        assert_eq!((c.dm_mode, c.group_mode), (Mode::Off, Mode::History));
        assert_eq!(c.history_window, Duration::from_secs(1_800));
        for (bad, key) in [
            ("{max_messages: 0}", "context.max_messages"),
            ("{max_tokens: 10}", "context.max_tokens"),
            ("{history_window: 0}", "context.history_window"),
        ] {
            let text = format!("{MINIMAL}context: {bad}\n");
            assert_eq!(key_of(load(&text, &[]).unwrap_err()), key, "{bad}");
        }
        let err = load(&format!("{MINIMAL}context: {{dm_mode: room}}\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("dm_mode") || err.contains("room"), "{err}");
    }

    #[test]
    fn vision_defaults_and_errors() {
        let c = load(MINIMAL, &[]).unwrap();
        assert!(c.vision.enabled);
        assert_eq!((c.vision.max_bytes, c.vision.max_images), (10_485_760, 4));
        assert_eq!(
            c.models.vision_model(),
            "grok-4.3",
            "the final model by default"
        );
        let c = load(&format!("{MINIMAL}models: {{vision: grok-v}}\n"), &[]).unwrap();
        assert_eq!(c.models.vision_model(), "grok-v");
        for (bad, key) in [
            ("vision: {max_bytes: 0}", "vision.max_bytes"),
            ("vision: {max_bytes: 999999999}", "vision.max_bytes"),
            ("vision: {max_images: 0}", "vision.max_images"),
            ("models: {vision: ' '}", "models.vision"),
        ] {
            let text = format!("{MINIMAL}{bad}\n");
            assert_eq!(key_of(load(&text, &[]).unwrap_err()), key, "{bad}");
        }
    }

    #[test]
    fn retention_defaults_and_errors() {
        let c = load(MINIMAL, &[]).unwrap();
        assert_eq!(c.retention.transactions, Duration::from_secs(7 * DAY));
        assert_eq!(c.retention.claims, Duration::from_secs(30 * DAY));
        assert_eq!(c.retention.bot_events, Duration::from_secs(90 * DAY));
        assert_eq!(c.retention.cache, Duration::ZERO);
        assert_eq!(c.retention.reservations, Duration::from_secs(30 * DAY));
        assert_eq!(c.retention.notices, Duration::from_secs(7 * DAY));
        assert_eq!(c.retention.budget_days, Duration::from_secs(400 * DAY));
        assert_eq!(c.retention.interval, Duration::from_secs(600));
        assert_eq!(c.retention.batch, 500);

        let c = load(
            &format!("{MINIMAL}retention: {{cache: 2h, claims: 0}}\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.retention.cache, Duration::from_secs(7200));
        assert!(c.retention.claims.is_zero(), "0 keeps claims forever");
        let c = load(&format!("{MINIMAL}retention: {{cache: expired}}\n"), &[]).unwrap();
        assert_eq!(c.retention.cache, Duration::ZERO);

        for (yaml, key) in [
            ("{claims: 1h}", "retention.claims"),
            ("{transactions: 5m}", "retention.transactions"),
            ("{budget_days: 1d}", "retention.budget_days"),
            ("{notices: 2h}", "retention.notices"),
            ("{interval: 0}", "retention.interval"),
            ("{batch: 0}", "retention.batch"),
        ] {
            let text = format!("{MINIMAL}retention: {yaml}\n");
            assert_eq!(key_of(load(&text, &[]).unwrap_err()), key, "{yaml}");
        }
        let err = Config::parse(&format!("{MINIMAL}retention: {{cache: soon}}\n")).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let priced = Config::parse(&format!(
            "{MINIMAL}prices: {{my-model: {{input_per_m: 1, cached_input_per_m: 0.5, output_per_m: 2, web_search_call: 0}}, grok-4.5: {{input_per_m: 9, cached_input_per_m: 1, output_per_m: 9, web_search_call: 0}}}}\n"
        ))
        .unwrap();
        assert_eq!(priced.prices["my-model"].output_per_m, 2.0);
        assert_eq!(
            priced.prices["grok-4.5"].input_per_m, 9.0,
            "a named model is overridden"
        );
        assert_eq!(
            priced.prices["grok-4.3"].output_per_m, 2.5,
            "models not named keep their default prices"
        );
        let mut c = Config::parse(include_str!("../config.example.yaml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.limits.usage_command, "!usage");
        assert_eq!(c.cache.ttl["grok_direct"], Duration::from_secs(3600));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn usd_converts_to_integer_ticks() {
        assert_eq!(usd_to_ticks(1.0), TICKS_PER_USD);
        assert_eq!(usd_to_ticks(0.005), 50_000_000);
        // $1.25 per million tokens is exactly 12,500 ticks per token.
        assert_eq!(usd_to_ticks(1.25) / 1_000_000, 12_500);
    }
}
