//! The change feed's wake-up on PostgreSQL: every transaction that appends an audit row also
//! runs `SELECT pg_notify('ward_feed', seq)` ([`notify_feed`]), which PostgreSQL delivers at
//! commit (never for a rolled-back write). Each replica keeps one dedicated connection, not
//! from the pool, that `LISTEN`s on [`CHANNEL`] on a plain thread and calls the wake-up for
//! every notification ([`FeedListener`]).
//!
//! A notification carries no data the replica relies on: the wake-up only makes the feed read
//! the version counter now instead of at its next poll. So a notification lost while the
//! connection was down is harmless: after reconnecting (with backoff) and `LISTEN`ing again the
//! listener wakes the feed once, which catches up on everything committed meanwhile.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::NoTls;
use serde::{Deserialize, Serialize};

use crate::store::db::Tx;

/// The notification channel of the change feed.
pub const CHANNEL: &str = "ward_feed";
/// The listening connection's `application_name`.
pub const APPLICATION_NAME: &str = "ward-feed-listen";
/// How long one wait for a notification lasts before the stop flag is checked.
const WAIT: Duration = Duration::from_millis(250);
/// A `SELECT 1` on the listening connection this often shows a silently dead connection.
const PROBE: Duration = Duration::from_secs(15);
/// The first reconnect delay; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection up this long resets the backoff when it drops.
const STABLE: Duration = Duration::from_secs(30);

/// Sends the feed notification for audit row `seq` inside transaction `tx`; on SQLite there
/// is nothing to send (replicas on one file poll it).
pub fn notify_feed(tx: &Tx<'_>, seq: i64) -> rusqlite::Result<()> {
    if let Tx::Pg(_) = tx {
        tx.execute(
            "SELECT pg_notify('ward_feed', ?1)",
            rusqlite::params![seq.to_string()],
        )?;
    }
    Ok(())
}

/// The listener's state, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerStatus {
    /// Whether the connection is up and `LISTEN`ing now.
    pub listening: bool,
    /// Notifications received since start.
    pub notifications: u64,
    /// Times the connection was (re-)established and `LISTEN` issued.
    pub connects: u64,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    listening: AtomicBool,
    notifications: AtomicU64,
    connects: AtomicU64,
}

/// The `LISTEN` thread of one replica. Dropping the handle stops the thread within [`WAIT`]
/// (without waiting for it).
pub struct FeedListener {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FeedListener {
    /// Starts listening on its own connection made from `config`; `wake` runs on the listener
    /// thread for every notification and once after every (re)connect.
    pub fn spawn(
        config: postgres::Config,
        display_url: String,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<FeedListener> {
        let mut config = config;
        // Named, so an operator (and the tests) can find it in `pg_stat_activity`.
        config.application_name(APPLICATION_NAME);
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ward-feed-listen".into())
            .spawn(move || listen_loop(&config, &display_url, &s, &wake))?;
        Ok(FeedListener {
            shared,
            thread: Some(thread),
        })
    }

    pub fn status(&self) -> ListenerStatus {
        ListenerStatus {
            listening: self.shared.listening.load(Ordering::Relaxed),
            notifications: self.shared.notifications.load(Ordering::Relaxed),
            connects: self.shared.connects.load(Ordering::Relaxed),
        }
    }

    /// Stops the thread and waits for it (tests; the server simply drops the handle).
    pub fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FeedListener {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn listen_loop(config: &postgres::Config, url: &str, s: &Shared, wake: &dyn Fn()) {
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    while !s.stop.load(Ordering::Relaxed) {
        let mut client = match connect(config) {
            Ok(c) => c,
            Err(e) => {
                if !failing {
                    tracing::warn!(database = %url, error = %e, "the change feed's LISTEN connection failed; polling until it is back");
                }
                failing = true;
                sleep_unless_stopped(s, backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let connected_at = std::time::Instant::now();
        s.listening.store(true, Ordering::Relaxed);
        let n = s.connects.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 {
            tracing::info!(database = %url, channel = CHANNEL, "listening for change feed notifications");
        } else {
            tracing::info!(database = %url, reconnects = n - 1, "change feed LISTEN connection re-established; catching up");
        }
        failing = false;
        // Whatever committed while there was no listener is read now.
        wake();
        let why = wait_notifications(&mut client, s, wake);
        s.listening.store(false, Ordering::Relaxed);
        if let Some(why) = why {
            failing = true;
            tracing::warn!(database = %url, error = %why, "the change feed's LISTEN connection dropped; reconnecting");
            // A connection that held for a while starts the backoff over; one that keeps
            // dropping right after connecting backs off like a failed connect.
            if connected_at.elapsed() >= STABLE {
                backoff = BACKOFF_MIN;
            }
            sleep_unless_stopped(s, backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

fn connect(config: &postgres::Config) -> Result<postgres::Client, postgres::Error> {
    let mut c = config.connect(NoTls)?;
    c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    Ok(c)
}

/// Waits for notifications until the stop flag is set (`None`) or the connection fails
/// (`Some(reason)`).
fn wait_notifications(
    client: &mut postgres::Client,
    s: &Shared,
    wake: &dyn Fn(),
) -> Option<String> {
    let mut since_probe = std::time::Instant::now();
    while !s.stop.load(Ordering::Relaxed) {
        let got = {
            let mut notes = client.notifications();
            let mut it = notes.timeout_iter(WAIT);
            it.next()
        };
        match got {
            Ok(Some(_)) => {
                s.notifications.fetch_add(1, Ordering::Relaxed);
                wake();
                continue;
            }
            Ok(None) => {}
            Err(e) => return Some(e.to_string()),
        }
        if client.is_closed() {
            return Some("the server closed the connection".into());
        }
        if since_probe.elapsed() >= PROBE {
            since_probe = std::time::Instant::now();
            if let Err(e) = client.simple_query("SELECT 1") {
                return Some(e.to_string());
            }
        }
    }
    None
}

fn sleep_unless_stopped(s: &Shared, d: Duration) {
    let until = std::time::Instant::now() + d;
    while !s.stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(WAIT));
    }
}
