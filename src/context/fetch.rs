//! Reads a message's context from the homeserver as the bot: the thread (root and earlier
//! messages), the room's recent history, and the reply chain link by link through a bounded
//! in-memory cache of raw events. Nothing is stored: every replica reads the same room, so
//! any replica builds the same context. A failed fetch only shrinks the context.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::assemble::{self, in_thread, reply_target};
use super::{Conversation, Mode};
use crate::answer::Job;
use crate::classify::Identity;
use crate::config::ContextConfig;
use crate::matrix::{MatrixClient, MatrixError};

/// Raw events kept per replica (two generations of half this each).
const CACHE_EVENTS: usize = 4_096;
/// How long a cached event is trusted: events are immutable, but an edit or a redaction that
/// arrives later shows in a fresh fetch (bundled), so cached reply-chain links are re-read
/// after this.
const CACHE_TTL: Duration = Duration::from_secs(10 * 60);
/// Most events one `/messages` or `/relations` call asks for.
const MAX_PAGE: usize = 100;

struct Cached {
    at: Instant,
    event: Arc<Value>,
}

/// A bounded cache of raw events by (room, event id): recently used entries live in `fresh`;
/// when it is full it becomes `old`, whose entries move back to `fresh` when used again and
/// are dropped with it otherwise (an LRU approximation with O(1) work and no bookkeeping).
struct EventCache {
    fresh: HashMap<(String, String), Cached>,
    old: HashMap<(String, String), Cached>,
    generation: usize,
}

impl EventCache {
    fn new(capacity: usize) -> Self {
        Self {
            fresh: HashMap::new(),
            old: HashMap::new(),
            generation: (capacity / 2).max(1),
        }
    }

    fn get(&mut self, key: &(String, String)) -> Option<Arc<Value>> {
        let hit = match self.fresh.get(key) {
            Some(c) => Some((c.at, c.event.clone())),
            None => {
                let c = self.old.remove(key)?;
                let hit = (c.at, c.event.clone());
                self.insert(key.clone(), c);
                Some(hit)
            }
        };
        let (at, event) = hit?;
        if at.elapsed() > CACHE_TTL {
            self.fresh.remove(key);
            return None;
        }
        Some(event)
    }

    fn put(&mut self, key: (String, String), event: Arc<Value>) {
        self.insert(
            key,
            Cached {
                at: Instant::now(),
                event,
            },
        );
    }

    fn insert(&mut self, key: (String, String), c: Cached) {
        if self.fresh.len() >= self.generation {
            self.old = std::mem::take(&mut self.fresh);
        }
        self.fresh.insert(key, c);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.fresh.len() + self.old.len()
    }
}

/// Builds the context of addressed messages; one per process, shared by its workers.
pub struct Fetcher {
    config: ContextConfig,
    /// Room commands are left out of the context (`bot.command_prefix`, `limits.usage_command`).
    command_prefix: String,
    usage_command: String,
    cache: Mutex<EventCache>,
}

impl Fetcher {
    /// A fetcher with the configured bounds, the command words and an empty cache.
    pub fn new(config: &ContextConfig, command_prefix: &str, usage_command: &str) -> Self {
        Self {
            config: config.clone(),
            command_prefix: command_prefix.to_string(),
            usage_command: usage_command.to_string(),
            cache: Mutex::new(EventCache::new(CACHE_EVENTS)),
        }
    }

    /// The context of `job` in `mode`, or `None` when the mode is off.
    pub async fn conversation(
        &self,
        matrix: &MatrixClient,
        me: &Identity,
        job: &Job,
        mode: Mode,
    ) -> Option<Conversation> {
        if mode == Mode::Off {
            return None;
        }
        let room = job.room_id.as_str();
        let page = (self.config.max_messages * 3).clamp(10, MAX_PAGE) as u32;
        let mut events: Vec<Arc<Value>> = Vec::new();
        let thread_root = job.request.thread_root.as_deref();
        if let Some(root) = thread_root {
            match self.event(matrix, room, root).await {
                Ok(e) => events.push(e),
                Err(e) => warn("thread root", &e),
            }
            match matrix.thread_messages(room, root, page).await {
                Ok(found) => events.extend(self.remember(room, found)),
                Err(e) => warn("thread", &e),
            }
        } else if mode == Mode::History {
            let window = i64::try_from(self.config.history_window.as_millis()).unwrap_or(i64::MAX);
            let since = job.origin_ts.saturating_sub(window);
            match matrix.recent_messages(room, page).await {
                Ok(found) => events.extend(self.remember(room, found).into_iter().filter(|e| {
                    !in_thread(e) && e["origin_server_ts"].as_i64().unwrap_or(0) >= since
                })),
                Err(e) => warn("history", &e),
            }
        }
        let chain = self
            .chain(matrix, room, job.request.reply_to.as_deref())
            .await;
        let images = chain.iter().filter_map(|e| assemble::image(e)).collect();
        events.extend(chain);

        let messages = assemble::without_commands(
            assemble::messages(&events, me, &job.event_id, job.origin_ts),
            |text| {
                crate::commands::parse(text, &self.command_prefix, &self.usage_command).is_some()
            },
        );
        let names = if messages.is_empty() {
            HashMap::new()
        } else {
            matrix.member_names(room).await.unwrap_or_else(|e| {
                warn("member names", &e);
                HashMap::new()
            })
        };
        let speaker = assemble::display_name(&job.sender, &names);
        let turns = assemble::turns(&messages, me, &names);
        let current = assemble::label(&speaker, &job.request.text);
        let turns = assemble::bound(
            turns,
            &current,
            self.config.max_messages,
            self.config.max_tokens,
        );
        let key = match thread_root {
            Some(root) => format!("{room} {root}"),
            None => room.to_string(),
        };
        Some(Conversation {
            key,
            turns,
            speaker,
            images,
        })
    }

    /// The reply chain above a message, newest first, at most `max_messages` links.
    async fn chain(
        &self,
        matrix: &MatrixClient,
        room: &str,
        first: Option<&str>,
    ) -> Vec<Arc<Value>> {
        let mut out: Vec<Arc<Value>> = Vec::new();
        let mut next = first.map(str::to_string);
        while let Some(id) = next.take() {
            if out.len() >= self.config.max_messages || out.iter().any(|e| e["event_id"] == id) {
                break;
            }
            match self.event(matrix, room, &id).await {
                Ok(e) => {
                    next = reply_target(&e).map(str::to_string);
                    out.push(e);
                }
                Err(e) => warn("reply chain", &e),
            }
        }
        out
    }

    /// One event, from the cache or the homeserver.
    async fn event(
        &self,
        matrix: &MatrixClient,
        room: &str,
        id: &str,
    ) -> Result<Arc<Value>, MatrixError> {
        let key = (room.to_string(), id.to_string());
        if let Some(hit) = self.lock().get(&key) {
            return Ok(hit);
        }
        let event = Arc::new(matrix.event(room, id).await?);
        self.lock().put(key, event.clone());
        Ok(event)
    }

    /// Caches the events of a page (later reply-chain links often point at them).
    fn remember(&self, room: &str, events: Vec<Value>) -> Vec<Arc<Value>> {
        let mut cache = self.lock();
        events
            .into_iter()
            .map(|e| {
                let e = Arc::new(e);
                if let Some(id) = e["event_id"].as_str() {
                    cache.put((room.to_string(), id.to_string()), e.clone());
                }
                e
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EventCache> {
        // A panic while holding the lock leaves only cached events behind: still usable.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn warn(source: &str, e: &MatrixError) {
    tracing::warn!(source, error = %e, "could not read the conversation context; answering with less");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(i: usize) -> (String, String) {
        ("!r".into(), format!("${i}"))
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_what_is_used() {
        let mut c = EventCache::new(8);
        for i in 0..100 {
            c.put(key(i), Arc::new(json!({"n": i})));
            // $0 is used all along, so it survives every generation change.
            assert!(c.get(&key(0)).is_some(), "after {i}");
            assert!(c.len() <= 8, "{} entries", c.len());
        }
        assert!(c.get(&key(1)).is_none(), "an unused old entry is evicted");
        assert_eq!(c.get(&key(99)).unwrap()["n"], 99);
    }
}
