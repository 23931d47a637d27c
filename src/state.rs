//! `AppState`: everything a request handler or worker needs, built once at start-up and
//! passed explicitly (no global mutable state).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use regex::Regex;
use ruma::api::appservice::Registration;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cascade::Cascade;
use crate::claims::Working;
use crate::classify::Identity;
use crate::config::Config;
use crate::context::fetch::Fetcher;
use crate::limiter::{system_clock, Clock, Limiter};
use crate::matrix::MatrixClient;
use crate::provider::Provider;
use crate::store::Store;
use crate::telemetry::{LogSink, Metrics, Telemetry};

/// Timings of claims and recovery, from `appservice.*` (tests shorten them).
#[derive(Debug, Clone)]
pub struct Timings {
    /// How long a claim is leased to the replica that took it before another may recover it.
    pub claim_lease: Duration,
    /// How often the recovery sweeper looks for expired claims.
    pub recovery_interval: Duration,
    /// A message older than this when (re)handled is not answered any more.
    pub max_message_age: Duration,
}

impl Timings {
    /// The timings the config asks for.
    pub fn from_config(config: &Config) -> Self {
        Self {
            claim_lease: config.appservice.claim_lease,
            recovery_interval: config.appservice.recovery_interval,
            max_message_age: config.appservice.max_message_age,
        }
    }
}

/// Parts a test may substitute when building the state.
#[derive(Default)]
pub struct Overrides {
    /// The limiter's clock (day rollover tests).
    pub clock: Option<Clock>,
    /// Where `request_log` rows go (failing or panicking sinks).
    pub log_sink: Option<Arc<dyn LogSink>>,
}

/// The shared state of one process.
pub struct AppState {
    pub config: Config,
    pub registration: Registration,
    pub identity: Identity,
    pub store: Store,
    pub matrix: MatrixClient,
    pub cascade: Cascade,
    pub limiter: Limiter,
    /// Reads conversation context from the homeserver, through its event cache.
    pub context: Fetcher,
    pub telemetry: Telemetry,
    pub metrics: Arc<Metrics>,
    /// This replica's name in claim leases.
    pub instance_id: String,
    pub timings: Timings,
    /// Answer workers in flight, awaited on shutdown.
    pub tasks: TaskTracker,
    /// The cached database probes of `/ready` and `/metrics`.
    pub probes: crate::probes::Probes,
    /// Cancelled when the shutdown grace period ends: workers stop where they are and their
    /// claims go to other replicas.
    pub cancel: CancellationToken,
    /// Cleared when shutdown starts, so `/ready` takes the replica out of the load balancer.
    pub accepting: AtomicBool,
    /// Worker slots (`bot.max_concurrent_answers`): a claim without one waits in the database.
    pub slots: Arc<Semaphore>,
    /// Claims this replica's workers hold now.
    pub working: Arc<Working>,
    /// Set when claims were queued in the database for want of a slot.
    pub queued: AtomicBool,
    /// Signalled when a worker frees its slot.
    pub slot_freed: Notify,
}

impl AppState {
    /// Builds the state from a validated config, a loaded registration and an open store.
    pub fn new(
        config: Config,
        registration: Registration,
        store: Store,
        timings: Timings,
    ) -> Result<Arc<Self>, regex::Error> {
        Self::build(config, registration, store, timings, Overrides::default())
    }

    /// Like [`AppState::new`] with parts substituted (tests).
    pub fn build(
        config: Config,
        registration: Registration,
        store: Store,
        timings: Timings,
        overrides: Overrides,
    ) -> Result<Arc<Self>, regex::Error> {
        let clock = overrides.clock.unwrap_or_else(system_clock);
        let sink: Arc<dyn LogSink> = overrides
            .log_sink
            .unwrap_or_else(|| Arc::new(store.clone()));
        let user_id =
            crate::registration::bot_user_id(&registration, &config.homeserver.server_name);
        let namespaces = registration
            .namespaces
            .users
            .iter()
            .map(|ns| Regex::new(&ns.regex))
            .collect::<Result<Vec<_>, _>>()?;
        let ignored_senders = config
            .rooms
            .ignore_senders
            .iter()
            .map(|p| Regex::new(p))
            .collect::<Result<Vec<_>, _>>()?;
        let identity = Identity {
            user_id: user_id.clone(),
            localpart: registration.sender_localpart.clone(),
            display_name: config.bot.display_name.clone(),
            namespaces,
            ignored_senders,
            allowed_servers: config.rooms.allowed_servers.clone(),
            access: config.rooms.access.clone(),
        };
        let metrics = Arc::new(Metrics::default());
        let mut matrix =
            MatrixClient::new(&config.homeserver.url, &registration.as_token, &user_id);
        if config.encryption.enabled {
            matrix = matrix.with_encryption();
        }
        let provider = Provider::new(&config.provider, &config.prices);
        let cascade = Cascade::new(&config, provider, store.clone());
        let limiter = Limiter::new(&config, store.clone(), clock);
        let context = Fetcher::new(
            &config.context,
            &config.bot.command_prefix,
            &config.limits.usage_command,
        );
        let telemetry = Telemetry::new(sink, config.telemetry.clone(), metrics.clone());
        let instance_id = format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "grok".into()),
            crate::registration::random_token().get(..8).unwrap_or("x")
        );
        let config_slots = config.bot.max_concurrent_answers;
        Ok(Arc::new(Self {
            config,
            registration,
            identity,
            store,
            matrix,
            cascade,
            limiter,
            context,
            telemetry,
            metrics,
            instance_id,
            timings,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            probes: Default::default(),
            accepting: AtomicBool::new(true),
            slots: Arc::new(Semaphore::new(config_slots)),
            working: Arc::new(Working::default()),
            queued: AtomicBool::new(false),
            slot_freed: Notify::new(),
        }))
    }
}

impl AppState {
    /// Runs a worker as a tracked task that stops at once when shutdown cancels it. A
    /// cancelled worker sends nothing more; its claim is released for another replica.
    pub fn spawn_worker<F>(&self, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = work => {}
                () = cancel.cancelled() => tracing::info!("worker cancelled by shutdown"),
            }
        });
    }
}
