//! How long a message lives: kept invisible while its generation waits or applies,
//! deleted (ten per request) once handled.

use pilotlight_cloud::{Message, Queue};
use std::time::{Duration, Instant};

/// A message the engine holds until its work is done.
#[derive(Debug)]
pub struct Held {
    /// The SQS message id: a re-delivered message replaces its older receipt handle,
    /// since only the newest one can delete it or change its visibility.
    pub id: String,
    pub receipt: String,
    /// When its visibility was last extended.
    pub extended: Instant,
}

impl Held {
    pub fn new(m: &Message) -> Self {
        Held {
            id: m.id.clone(),
            receipt: m.receipt.clone(),
            extended: Instant::now(),
        }
    }
}

/// Adds `m` to `list`, replacing an older delivery of the same message.
pub fn hold(list: &mut Vec<Held>, m: &Message) {
    list.retain(|w| w.id != m.id);
    list.push(Held::new(m));
}

/// Keeps messages invisible while long work runs (an apply, an export); stops when
/// dropped.
#[derive(Debug)]
pub struct KeepAlive(tokio::task::JoinHandle<()>);

impl KeepAlive {
    pub fn start<Q: Queue + Clone + 'static>(queue: &Q, receipts: Vec<String>, secs: i32) -> Self {
        let q = queue.clone();
        KeepAlive(tokio::spawn(async move {
            // The first tick is immediate: the work may start long after the last extension.
            let mut tick = tokio::time::interval(Duration::from_secs((secs / 2).max(1) as u64));
            loop {
                tick.tick().await;
                for r in &receipts {
                    if let Err(e) = q.change_visibility(r, secs).await {
                        tracing::debug!("keeping a message invisible: {e}");
                    }
                }
            }
        }))
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Extends every held message whose last extension is older than half the timeout.
pub async fn extend_due<'a, Q: Queue>(
    queue: &Q,
    held: impl Iterator<Item = &'a mut Held>,
    secs: i32,
) {
    let half = Duration::from_secs((secs / 2).max(1) as u64);
    let mut due = Vec::new();
    for w in held {
        if w.extended.elapsed() >= half {
            w.extended = Instant::now();
            due.push(w.receipt.clone());
        }
    }
    for r in due {
        if let Err(e) = queue.change_visibility(&r, secs).await {
            tracing::warn!("{e}");
        }
    }
}

/// Deletes handled messages, ten per request. One that cannot be deleted comes back and
/// is handled again (every handling is idempotent).
pub async fn delete_messages<Q: Queue>(queue: &Q, receipts: &[String]) {
    for batch in receipts.chunks(10) {
        match queue.delete_batch(batch).await {
            Ok(failed) => {
                for why in failed {
                    tracing::warn!(
                        "cannot delete a message ({why}); it will come back and be handled again"
                    );
                }
            }
            Err(e) => tracing::warn!("{e}; the messages will come back and be handled again"),
        }
    }
}
