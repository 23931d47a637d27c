//! The `grok-appservice` binary: CLI parsing, start-up and graceful shutdown only.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use grok_appservice::cascade::{router, Ask, Cascade};
use grok_appservice::config::{Config, LogFormat, TICKS_PER_USD};
use grok_appservice::matrix::MatrixClient;
use grok_appservice::provider::{AccountCheck, Provider};
use grok_appservice::state::{AppState, Timings};
use grok_appservice::store::{redact_url, Store};
use grok_appservice::{answer, registration, server, webhook};

#[derive(Parser)]
#[command(
    name = "grok-appservice",
    version,
    about = "A Matrix appservice that answers with xAI Grok"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `-c FILE`, shared by every command that reads the config.
#[derive(Args)]
struct ConfigArg {
    /// The config file.
    #[arg(
        short = 'c',
        long = "config",
        env = "GROK_APPSERVICE_CONFIG",
        default_value = "config.yaml"
    )]
    path: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Write a registration with fresh tokens for the homeserver to load.
    GenerateRegistration {
        /// The homeserver's server name (the part after `:` in user ids).
        #[arg(long)]
        server_name: String,
        /// The URL the homeserver uses to reach this appservice.
        #[arg(long)]
        url: String,
        /// The bot user's localpart.
        #[arg(long, default_value = registration::DEFAULT_LOCALPART)]
        localpart: String,
        /// Where to write it.
        #[arg(short, long, default_value = "registration.yaml")]
        output: PathBuf,
    },
    /// Run the appservice (migrations first).
    Serve {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run the database migrations and exit.
    Migrate {
        /// Only list applied and pending migrations; change nothing.
        #[arg(long)]
        status: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Write a consistent copy of the SQLite database, safe while the bot runs.
    Backup {
        /// The new file to write.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Copy every table of the SQLite database into an empty PostgreSQL database.
    MigrateTo {
        /// The target, `postgres://user@host/db`; migrated first, it must have no rows.
        target: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the monthly cost to expect at 100, 1,000 and 10,000 messages a day for a route
    /// mix, against sending everything to grok_direct.
    Estimate {
        /// Route shares, e.g. `trivial=0.4,web=0.1,reason=0.1` (the rest goes to grok_direct).
        #[arg(long)]
        mix: Option<String>,
        /// Window of request_log whose averages replace the typical token counts.
        #[arg(long, default_value = "30d")]
        since: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Leave and forget every room the bot is in, and clear them from the database (uninstall).
    LeaveAll {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the router's decision for a message; no model is called.
    Route {
        /// The message.
        text: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Apply this room's override from the config.
        #[arg(long)]
        room: Option<String>,
        /// Router settings come from the config file when it exists.
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Answer one message through the cascade and print the answer, route, cost and latency.
    Ask {
        /// The message.
        text: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Report route mix, spend, the grok_direct-only counterfactual and latency from request_log.
    Stats {
        /// How far back to look: 7d, 12h, 30m, or seconds.
        #[arg(long, default_value = "7d")]
        since: String,
        /// Print the stable JSON document instead of the table.
        #[arg(long)]
        json: bool,
        /// Also write a self-contained HTML report with charts to this file.
        #[arg(long)]
        html: Option<PathBuf>,
        /// Show hashed user ids instead of Matrix ids.
        #[arg(long)]
        anonymize: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn init_logging(config: &Config) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    // The crypto crates' debug and trace lines name sessions, keys and decrypted events:
    // whatever RUST_LOG says, they log warnings and errors only.
    for quiet in [
        "matrix_sdk_crypto=warn",
        "matrix_sdk_sqlite=warn",
        "vodozemac=warn",
    ] {
        filter = filter.add_directive(quiet.parse().expect("a valid directive"));
    }
    // Colour codes only on a terminal, never in log files or pipes.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::GenerateRegistration {
            server_name,
            url,
            localpart,
            output,
        } => {
            ruma::ServerName::parse(&server_name)
                .with_context(|| format!("`{server_name}` is not a server name"))?;
            let reg = registration::generate(&server_name, &url, &localpart);
            registration::write(&reg, &output)?;
            println!(
                "wrote {} for @{localpart}:{server_name}; add it to app_service_config_files in homeserver.yaml",
                output.display()
            );
            Ok(())
        }
        Command::Migrate {
            status: true,
            config: ConfigArg { path: config },
        } => migrate_status(&Config::load(&config)?).await,
        Command::Migrate {
            status: false,
            config: ConfigArg { path: config },
        } => {
            let config = Config::load(&config)?;
            init_logging(&config);
            let store = Store::connect(&config.database.url, config.database.pool_size)?;
            let applied = store.migrate().await?;
            println!(
                "{applied} migration(s) applied to {}",
                redact_url(&config.database.url)
            );
            Ok(())
        }
        Command::Serve {
            config: ConfigArg { path: config },
        } => serve(Config::load(&config)?).await,
        Command::Backup {
            output,
            config: ConfigArg { path: config },
        } => backup(&Config::load(&config)?, output).await,
        Command::MigrateTo {
            target,
            config: ConfigArg { path: config },
        } => migrate_to(&Config::load(&config)?, &target).await,
        Command::Estimate {
            mix,
            since,
            config: ConfigArg { path: config },
        } => estimate(&Config::load(&config)?, mix.as_deref(), &since).await,
        Command::LeaveAll {
            config: ConfigArg { path: config },
        } => leave_all(&Config::load(&config)?).await,
        Command::Route {
            text,
            json,
            room,
            config: ConfigArg { path: config },
        } => {
            let decision = if config.exists() {
                let config = Config::load(&config)?;
                let store = open_current(&config, 1).await?;
                let provider = Provider::new(&config.provider, &config.prices);
                Cascade::new(&config, provider, store).decide(&text, room.as_deref(), None)
            } else if room.is_some() {
                anyhow::bail!(
                    "--room needs the config file ({} not found)",
                    config.display()
                );
            } else {
                router::decide(&text, &router::RouterOptions::default())
            };
            if json {
                let out = serde_json::json!({
                    "route": decision.route.as_str(),
                    "source": decision.source.as_str(),
                    "confidence": decision.confidence,
                    "rules": decision.rules,
                    "ambiguous": decision.ambiguous,
                });
                println!("{out}");
            } else {
                println!(
                    "{} ({}, confidence {:.2}) rules: {}",
                    decision.route.as_str(),
                    decision.source.as_str(),
                    decision.confidence,
                    decision.rules.join(", ")
                );
            }
            Ok(())
        }
        Command::Ask {
            text,
            config: ConfigArg { path: config },
        } => {
            let config = Config::load(&config)?;
            init_logging(&config);
            let store = open_current(&config, 2).await?;
            let provider = Provider::new(&config.provider, &config.prices);
            let cascade = Cascade::new(&config, provider, store);
            let outcome = cascade
                .run(&Ask {
                    text: &text,
                    ..Ask::default()
                })
                .await;
            if let Some(e) = &outcome.error {
                anyhow::bail!("the cascade failed: {e}");
            }
            println!("{}\n", outcome.text);
            println!(
                "route:    {} ({}, confidence {:.2}; rules: {})",
                outcome.route.as_str(),
                outcome.router_source.as_str(),
                outcome.router_confidence,
                outcome.rules.join(", ")
            );
            if let Some(d) = outcome.degraded {
                println!("degraded: {}", d.as_str());
            }
            println!("models:   {:?}", outcome.models);
            println!(
                "cost:     ${:.6} ({}) by stage in ticks: {:?}",
                outcome.cost_total() as f64 / TICKS_PER_USD as f64,
                outcome.cost_source.map(|s| s.as_str()).unwrap_or("none"),
                outcome.stage_cost
            );
            println!("latency:  {:?} ms by stage", outcome.stage_ms);
            if outcome.cache_hit {
                println!("cache:    hit");
            }
            Ok(())
        }
        Command::Stats {
            since,
            json,
            html,
            anonymize,
            config: ConfigArg { path: config },
        } => {
            use grok_appservice::stats;
            let config = Config::load(&config)?;
            let store = open_current(&config, 2).await?;
            let report = load_report(&store, &config, &since, anonymize).await?;
            if let Some(path) = &html {
                std::fs::write(path, stats::render_html(&report))
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
            if json {
                println!("{:#}", stats::render_json(&report));
            } else {
                print!("{}", stats::render_text(&report));
            }
            Ok(())
        }
    }
}

/// `migrate --status`: applied, pending and unknown migrations; changes nothing.
async fn migrate_status(config: &Config) -> anyhow::Result<()> {
    let store = Store::connect_existing(&config.database.url, 1)?;
    let status = store.migration_status().await?;
    for name in &status.applied {
        println!("applied  {name}");
    }
    for name in &status.pending {
        println!("pending  {name}");
    }
    for version in &status.unknown {
        println!("unknown  {version} (applied by a newer grok-appservice)");
    }
    let hint = if status.pending.is_empty() {
        ""
    } else {
        "; `grok-appservice migrate` applies them"
    };
    println!(
        "{}: {} applied, {} pending{hint}",
        redact_url(&config.database.url),
        status.applied.len(),
        status.pending.len()
    );
    Ok(())
}

/// `backup -o FILE`: a consistent copy of the SQLite database.
async fn backup(config: &Config, output: PathBuf) -> anyhow::Result<()> {
    let store = Store::connect_existing(&config.database.url, 1)?;
    let report = store.backup_to(output).await?;
    println!(
        "wrote {} ({} bytes, integrity ok); restore: stop the bot and put it in place of {}",
        report.path.display(),
        report.bytes,
        redact_url(&config.database.url)
    );
    Ok(())
}

/// `migrate-to postgres://...`: every table of the SQLite database into PostgreSQL.
async fn migrate_to(config: &Config, target: &str) -> anyhow::Result<()> {
    let store = Store::connect_existing(&config.database.url, 1)?;
    let report = store.copy_to_postgres(&config.database.url, target).await?;
    println!("{:<26} {:>10}", "table", "rows");
    for t in &report.tables {
        println!("{:<26} {:>10}", t.table, t.rows);
    }
    println!(
        "copied {} tables into {} (row counts verified, {} sequence(s) reset); \
         set database.url to it and start the bot",
        report.tables.len(),
        redact_url(target),
        report.sequences_reset
    );
    Ok(())
}

/// `estimate`: the monthly cost table for a route mix.
async fn estimate(config: &Config, mix: Option<&str>, since: &str) -> anyhow::Result<()> {
    use grok_appservice::estimate;
    let mix = match mix {
        Some(text) => estimate::parse_mix(text)?,
        None => estimate::DEFAULT_MIX.to_vec(),
    };
    let mut costs = estimate::typical_costs(config)?;
    match open_current(config, 2).await {
        Ok(store) => {
            let report = load_report(&store, config, since, false).await?;
            costs = estimate::with_observed(costs, &report.counterfactual.by_route);
        }
        Err(e) => eprintln!("request_log not read ({e}); typical token counts only"),
    }
    let result = estimate::estimate(&mix, &costs);
    print!(
        "{}",
        estimate::render_text(&result, &estimate::models_line(config))
    );
    if mix.as_slice() == estimate::DEFAULT_MIX.as_slice() {
        println!("\nThe mix is the default; --mix trivial=0.4,web=0.1,... changes it.");
    }
    println!("\n{}", estimate::assumptions(config));
    Ok(())
}

/// `leave-all`: the bot leaves every room; exits non-zero if a leave failed.
async fn leave_all(config: &Config) -> anyhow::Result<()> {
    let reg = registration::load(&config.appservice.registration)?;
    let store = open_current(config, 1).await?;
    let bot = registration::bot_user_id(&reg, &config.homeserver.server_name);
    let matrix = MatrixClient::new(&config.homeserver.url, &reg.as_token, &bot);
    let report = grok_appservice::leave_all::leave_all(&matrix, &store).await?;
    for (room, error) in &report.failed {
        eprintln!("could not leave {room}: {error}");
    }
    println!(
        "{bot} was in {} room(s): left {}, failed {}; {} room(s) cleared from the database",
        report.joined,
        report.left,
        report.failed.len(),
        report.cleared
    );
    if !report.failed.is_empty() {
        anyhow::bail!("some rooms could not be left; run leave-all again");
    }
    Ok(())
}

/// The `stats` report over `request_log` of the last `since` (`7d`, `12h`, ...).
async fn load_report(
    store: &Store,
    config: &Config,
    since: &str,
    anonymize: bool,
) -> anyhow::Result<grok_appservice::stats::Report> {
    use grok_appservice::stats;
    let window = grok_appservice::config::parse_duration(since)
        .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
    let until = grok_appservice::store::now();
    let since = until - chrono::Duration::from_std(window).context("--since")?;
    let rows = store.request_log_since(since).await?;
    let day = |t: chrono::NaiveDateTime| t.format("%Y-%m-%d").to_string();
    let budget = store.budget_global_days(day(since), day(until)).await?;
    let opts = stats::Options::from_config(config, since, until, anonymize);
    Ok(stats::summarize(&rows, &budget, &opts))
}

/// Opens the configured database for a command that never migrates: a missing database or
/// pending migrations are refused with a message naming `grok-appservice migrate`.
async fn open_current(config: &Config, pool_size: u32) -> anyhow::Result<Store> {
    let store = Store::connect_existing(&config.database.url, pool_size)?;
    store.migration_status().await?.require_current()?;
    Ok(store)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    init_logging(&config);
    let registration = registration::load(&config.appservice.registration)?;
    if config.encryption.enabled {
        check_encryption(&config, &registration).await?;
    }
    let store = Store::connect(&config.database.url, config.database.pool_size)?;
    let _single_process = store.lock_single_process(&config.database.url)?;
    let applied = store.migrate().await.context("running migrations")?;
    tracing::info!(applied, backend = store.backend_name(), "database ready");
    if grok_appservice::config::sends_in_clear(&config.homeserver.url) {
        tracing::warn!(url = %config.homeserver.url,
            "homeserver.url is plain http to a public host: the as_token travels in clear text; use https");
    }
    if config.provider.api_key.is_none() {
        tracing::warn!("XAI_API_KEY is not set: every answer will be an apology");
    } else if config.provider.check_at_start {
        check_account(&config).await?;
    }
    let listen = config.appservice.listen;
    let timings = Timings::from_config(&config);
    let state = AppState::new(config, registration, store, timings)?;

    tokio::spawn(announce(state.clone()));
    tokio::spawn(answer::recover::recovery_loop(state.clone()));
    tokio::spawn(grok_appservice::housekeeping::housekeeping_loop(
        state.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(%listen, bot = %state.identity.user_id, version = env!("CARGO_PKG_VERSION"),
        "serving the appservice API");
    let shutdown_state = state.clone();
    let header_read_timeout = state.config.appservice.header_read_timeout;
    server::serve(
        listener,
        webhook::router(state.clone()),
        header_read_timeout,
        async move {
            shutdown_signal().await;
            // /ready fails from now on, so a load balancer stops sending transactions here.
            shutdown_state.accepting.store(false, Ordering::SeqCst);
            tracing::info!("shutting down: finishing in-flight answers");
        },
    )
    .await?;
    grok_appservice::shutdown::drain(&state, state.config.appservice.shutdown_grace).await;
    Ok(())
}

/// Refuses to start with encryption on when the registration cannot serve it, the passphrase
/// is missing, or the crypto store does not open with it.
async fn check_encryption(
    config: &Config,
    registration: &ruma::api::appservice::Registration,
) -> anyhow::Result<()> {
    registration::check_for_encryption(registration, &config.homeserver.server_name)
        .map_err(|why| anyhow::anyhow!("{why}"))?;
    let Some(passphrase) = config.encryption.passphrase.as_deref() else {
        anyhow::bail!(
            "encryption.enabled is true but GROK_CRYPTO_PASSPHRASE is not set: set it to a long \
             random secret and keep it (the crypto store cannot be read without it)"
        );
    };
    grok_appservice::crypto::device::check_store(&config.encryption.store_path, passphrase)
        .await
        .with_context(|| {
            format!(
                "encryption.store_path {}",
                config.encryption.store_path.display()
            )
        })?;
    Ok(())
}

/// Refuses to start on a key xAI refuses or a model id it does not know; starts with a
/// warning when xAI cannot be asked.
async fn check_account(config: &Config) -> anyhow::Result<()> {
    let provider = Provider::new(&config.provider, &config.prices);
    let m = &config.models;
    let mut models = vec![&*m.final_model, &*m.trivial, &*m.reason, &*m.router];
    models.extend(m.fallback.as_deref());
    models.extend(m.vision.as_deref());
    match provider.check_account(&models).await {
        AccountCheck::Ok => tracing::info!("xAI accepted the key and knows every model"),
        AccountCheck::Unchecked(why) => {
            tracing::warn!(%why, "could not check the xAI key and models; starting anyway")
        }
        AccountCheck::KeyRefused(why) => anyhow::bail!(
            "xAI refused XAI_API_KEY ({why}): set a valid key (console.x.ai, API Keys); \
             provider.check_at_start: false skips this check"
        ),
        AccountCheck::UnknownModels(ids) => anyhow::bail!(
            "xAI does not know the model id(s) {}: fix models.* in the config; \
             provider.check_at_start: false skips this check",
            ids.join(", ")
        ),
    }
    Ok(())
}

/// Registers the bot user and pings the homeserver, retrying while it starts up.
async fn announce(state: std::sync::Arc<AppState>) {
    let localpart =
        registration::bot_localpart(&state.registration, &state.config.homeserver.server_name);
    for attempt in 1..=10 {
        match state.matrix.register(&localpart).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(attempt, error = %e, "registering the bot user failed");
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }
    }
    // The device belongs to the bot user: it is made once the user exists.
    if state.config.encryption.enabled {
        tokio::spawn(grok_appservice::crypto::owner::run(state.clone()));
    }
    if let Err(e) = state
        .matrix
        .set_display_name(&state.config.bot.display_name)
        .await
    {
        tracing::warn!(error = %e, "setting the display name failed");
    }
    if let Some(avatar) = &state.config.bot.avatar_url {
        if let Err(e) = state.matrix.set_avatar_url(avatar).await {
            tracing::warn!(error = %e, "setting the avatar failed");
        }
    }
    for attempt in 1..=6 {
        match state.matrix.ping(&state.registration.id).await {
            Ok(ms) => {
                tracing::info!(duration_ms = ms, "homeserver can reach the appservice");
                return;
            }
            Err(e) => {
                tracing::warn!(attempt, error = %e, "homeserver ping failed");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
