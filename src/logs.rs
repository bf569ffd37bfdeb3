//! Log set-up: the default filter, text or JSON lines on stderr, and a limit on openraft's
//! repeats.
//!
//! openraft logs a warning or an error for each failed call it makes, and some of its calls
//! repeat for as long as a peer is down: every linearizable read's leadership check logs
//! "timeout while confirming leadership" per unreachable voter, every election round "while
//! requesting vote". With a dead peer under read load that was dozens of lines a second.
//! The peer layer already says once when a peer goes and once when it comes back
//! (`raft::network`), so openraft's warnings and errors pass at most once per source line
//! every [`REPEAT_EVERY`]; everything else (raftchat's own lines, every level below WARN)
//! is untouched.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::callsite::Identifier;
use tracing::subscriber::Interest;
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The filter when `RUST_LOG` is unset: openraft's replication modules log several lines
/// per shard each time replication to an unreachable peer is retried, so they are off.
pub const DEFAULT_FILTER: &str =
    "info,openraft=warn,openraft::replication=off,openraft::engine::handler::replication_handler=off,sled=warn";

/// At most one openraft warning or error per source line this often.
pub const REPEAT_EVERY: Duration = Duration::from_secs(10);

/// Lets one event per callsite through per period, for openraft's warnings and errors.
pub struct RepeatLimit {
    every: Duration,
    last: Mutex<HashMap<Identifier, Instant>>,
}

impl RepeatLimit {
    pub fn new(every: Duration) -> Self {
        Self { every, last: Mutex::new(HashMap::new()) }
    }

    /// Whether this event may be written now.
    pub fn allow(&self, meta: &tracing::Metadata<'_>) -> bool {
        // More verbose levels compare greater: INFO, DEBUG and TRACE pass as they are.
        if !meta.is_event() || *meta.level() > tracing::Level::WARN || !meta.target().starts_with("openraft") {
            return true;
        }
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get(&meta.callsite()) {
            Some(t) if now.duration_since(*t) < self.every => false,
            _ => {
                last.insert(meta.callsite(), now);
                true
            }
        }
    }
}

/// `layer` behind the two filters: `env` outside (a callsite it disables stays disabled
/// for good, and its level is the process's maximum, so disabled `debug!`/`trace!` calls
/// in hot code cost nothing), the repeat limit inside, consulted on every call only for
/// openraft's WARN and ERROR callsites.
pub fn filtered<L>(layer: L, env: EnvFilter, every: Duration) -> impl Layer<Registry> + Send + Sync
where
    L: Layer<Registry> + Send + Sync + 'static,
{
    let limit = RepeatLimit::new(every);
    let limit =
        tracing_subscriber::filter::dynamic_filter_fn(move |meta, _| limit.allow(meta)).with_callsite_filter(|meta| {
            if meta.is_event() && *meta.level() <= tracing::Level::WARN && meta.target().starts_with("openraft") {
                Interest::sometimes()
            } else {
                Interest::always()
            }
        });
    layer.with_filter(limit).with_filter(env)
}

/// Installs the process's log subscriber (`RUST_LOG` overrides [`DEFAULT_FILTER`]).
pub fn init(json: bool) {
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_FILTER.into());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        tracing_subscriber::registry().with(filtered(fmt.json(), env, REPEAT_EVERY)).init();
    } else {
        // Colour only on a terminal: log files (`raftchat local`, systemd, the harness) stay plain text.
        let fmt = fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        tracing_subscriber::registry().with(filtered(fmt, env, REPEAT_EVERY)).init();
    }
}

#[cfg(test)]
mod tests {
    use super::filtered;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::layer::{Context, Layer};
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;

    struct Count(Arc<AtomicUsize>);
    impl<S: tracing::Subscriber> Layer<S> for Count {
        fn on_event(&self, _: &tracing::Event<'_>, _: Context<'_, S>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn count(every: Duration, emit: impl FnOnce()) -> usize {
        let n = Arc::new(AtomicUsize::new(0));
        let sub = tracing_subscriber::registry().with(filtered(Count(n.clone()), EnvFilter::new("info"), every));
        tracing::subscriber::with_default(sub, emit);
        n.load(Ordering::SeqCst)
    }

    #[test]
    fn the_process_filter_keeps_its_level_so_disabled_calls_stay_free() {
        let sub = tracing_subscriber::registry().with(filtered(
            tracing_subscriber::fmt::layer().with_writer(std::io::sink),
            EnvFilter::new(super::DEFAULT_FILTER),
            super::REPEAT_EVERY,
        ));
        assert_eq!(tracing::Subscriber::max_level_hint(&sub), Some(LevelFilter::INFO));
    }

    #[test]
    fn openraft_repeats_pass_once_per_source_line_and_our_lines_all_pass() {
        let n = count(Duration::from_secs(60), || {
            for _ in 0..50 {
                tracing::error!(target: "openraft::core::raft_core", "timeout while confirming leadership");
            }
            for _ in 0..3 {
                tracing::warn!(target: "raftchat::raft::network", "peer unreachable");
            }
            for _ in 0..4 {
                tracing::info!(target: "openraft::core::raft_core", "an info line");
            }
            tracing::warn!(target: "openraft::core::raft_core", "another source line");
        });
        assert_eq!(n, 1 + 3 + 4 + 1);
    }

    #[test]
    fn an_openraft_line_passes_again_after_the_period() {
        let n = count(Duration::from_millis(50), || {
            for _ in 0..3 {
                for _ in 0..10 {
                    tracing::error!(target: "openraft::core::raft_core", "while requesting vote");
                }
                std::thread::sleep(Duration::from_millis(80));
            }
        });
        assert_eq!(n, 3);
    }
}
