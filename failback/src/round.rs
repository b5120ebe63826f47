//! One failback round: make the target equal a snapshot, writing only what differs from
//! the round's base, in pages, with a durable mark of how far it got.
//!
//! The rule that keeps every block right across crashes: a round that started is
//! finished against *its own* snapshot before any newer one is applied. Within a round
//! every write is the snapshot's block (or zeroes where the snapshot has none), so
//! writing a block twice is harmless and a resumed round only redoes the blocks after
//! the last durable mark; and every round's base is a snapshot the whole target equals
//! (outside the site's changes), so the next round's delta is exact. (Starting the
//! newer round from the interrupted round's snapshot would be wrong: a block that round
//! had not reached yet would be left at the older bytes.)

use crate::state::{self, Counters, FailbackState, Mode, Phase, RoundState, RoundSummary};
use crate::{FailbackError, Target};
use bytes::Bytes;
use futures::StreamExt;
use pilotlight_cloud::ebs::{
    BlockPage, BlockRef, EbsApi, PageStart, BLOCK_SIZE, UNRELATED_SNAPSHOTS,
};
use pilotlight_cloud::error::CloudError;
use pilotlight_protocol::extent::coalesce;
use pilotlight_protocol::{DiskId, Extent};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What to fail back.
#[derive(Debug, Clone)]
pub struct RoundRequest {
    pub disk: DiskId,
    /// The recovery point the instance was launched from (the target equals it, apart
    /// from `site_changes`, before the first round).
    pub point: String,
    /// The return snapshot the target must equal at the end.
    pub snapshot: String,
    /// Byte extents `(offset, length)` the site wrote after the point (its change
    /// tracking since the point's change id); first round only.
    pub site_changes: Vec<(u64, u64)>,
    /// The site ran after the point and has no change tracking to say where it wrote:
    /// the first round compares every block ([`Mode::Compared`]) instead.
    pub compare: bool,
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// GetSnapshotBlock calls in flight.
    pub concurrency: usize,
    /// Read every written block back after each flush and compare its SHA-256.
    pub verify: bool,
    /// Blocks between durable marks (flush, read back, state saved).
    pub checkpoint_blocks: usize,
    /// Attempts per EBS call when it fails transiently (throttled, e.g.
    /// ConcurrentLimitExceededException, which the SDK does not retry itself; 5xx),
    /// with exponential back-off from `retry_base`.
    pub call_attempts: u32,
    pub retry_base: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: 16,
            verify: true,
            checkpoint_blocks: 64,
            call_attempts: 5,
            retry_base: Duration::from_millis(200),
        }
    }
}

/// Progress of a round, for a bar or a log.
pub trait Progress: Send + Sync {
    /// `bytes` more were written or zeroed.
    fn advance(&self, bytes: u64);
    /// A round starts: what it goes from and to.
    fn round(&self, _base: &str, _snapshot: &str, _mode: Mode) {}
}

impl Progress for () {
    fn advance(&self, _: u64) {}
}

/// Brings the target to `req.snapshot`: first finishes a round left unfinished (by a
/// crash or a failed call) against its own snapshot, then runs the requested one.
/// Returns the rounds finished by this call (none when the target already equals the
/// snapshot).
pub async fn apply<E: EbsApi>(
    ebs: &E,
    target: &Target,
    state_dir: &Path,
    req: &RoundRequest,
    opts: &Options,
    progress: &dyn Progress,
) -> Result<Vec<RoundSummary>, FailbackError> {
    let path = state::path(state_dir, &req.disk);
    // One round of a disk at a time: two would write the same target from different
    // snapshots (a round still running when the final one starts, say).
    let _lock = state::lock(&path)?;
    let mut st = match state::load(&path)? {
        Some(st) => {
            if st.point != req.point || st.target != target.name() {
                return Err(FailbackError::OtherFailback {
                    path: path.display().to_string(),
                    what: format!("the failback of point {} into {}", st.point, st.target),
                });
            }
            st
        }
        None => FailbackState::new(req.disk.clone(), target.name(), req.point.clone()),
    };
    let mut finished = Vec::new();
    loop {
        if let Some(round) = st.round.clone() {
            let summary = Runner {
                ebs,
                target,
                path: path.clone(),
                opts,
                progress,
            }
            .run(&mut st, round)
            .await?;
            finished.push(summary);
            continue;
        }
        if st.applied.as_deref() == Some(req.snapshot.as_str()) {
            return Ok(finished);
        }
        let first = st.applied.is_none();
        if !first && !req.site_changes.is_empty() {
            tracing::warn!(
                "the site's changes count only in the first round (the target already equals {}): ignored",
                st.applied.as_deref().unwrap_or_default()
            );
        }
        let site = if first {
            block_ranges(&req.site_changes, target.size())?
        } else {
            Vec::new()
        };
        let compare = first && req.compare;
        st.round = Some(RoundState {
            snapshot: req.snapshot.clone(),
            base: st.applied.clone().unwrap_or_else(|| st.point.clone()),
            // Compared rounds cover every block: the site's changes are among them.
            mode: compare.then_some(Mode::Compared),
            phase: if site.is_empty() || compare {
                Phase::Delta
            } else {
                Phase::Site
            },
            next_index: 0,
            site,
            done: Counters::default(),
            started: chrono::Utc::now(),
        });
        state::save(&path, &st)?;
    }
}

/// Byte extents as sorted, merged block ranges `[start, end)`.
pub fn block_ranges(extents: &[(u64, u64)], size: u64) -> Result<Vec<(u64, u64)>, FailbackError> {
    let mut blocks = Vec::with_capacity(extents.len());
    for &(offset, length) in extents {
        match offset.checked_add(length) {
            Some(end) if end <= size => {}
            _ => {
                return Err(FailbackError::SiteExtent {
                    offset,
                    length,
                    size,
                })
            }
        }
        let (s, e) = (offset / BLOCK_SIZE, (offset + length).div_ceil(BLOCK_SIZE));
        blocks.push(Extent::new(s, if length == 0 { 0 } else { e - s }));
    }
    blocks.sort_unstable();
    Ok(coalesce(blocks)
        .into_iter()
        .map(|b| (b.offset, b.end()))
        .collect())
}

/// One thing to do to the target.
#[derive(Debug, Clone)]
enum Action {
    /// Write the snapshot's block.
    Write { index: u64, token: String },
    /// Blocks `[start, end)` read as zeroes in the snapshot.
    Zero { start: u64, end: u64 },
}

impl Action {
    fn end(&self) -> u64 {
        match self {
            Action::Write { index, .. } => index + 1,
            Action::Zero { end, .. } => *end,
        }
    }
}

/// One page of work: the actions, and the block index every block below which is
/// covered once they are done (`None`: the phase is over).
struct Work {
    actions: Vec<Action>,
    covered: Option<u64>,
    next_token: Option<String>,
}

/// What one action did.
struct Did {
    end: u64,
    counters: Counters,
    /// The block written: where, how long, its SHA-256 (for the read-back).
    written: Option<(u64, usize, [u8; 32])>,
}

struct Runner<'a, E> {
    ebs: &'a E,
    target: &'a Target,
    path: PathBuf,
    opts: &'a Options,
    progress: &'a dyn Progress,
}

impl<E: EbsApi> Runner<'_, E> {
    async fn run(
        &self,
        st: &mut FailbackState,
        mut r: RoundState,
    ) -> Result<RoundSummary, FailbackError> {
        if r.mode.is_none() {
            let probe = self
                .retrying(|| {
                    self.ebs
                        .list_changed_blocks_page(&r.base, &r.snapshot, PageStart::Index(0))
                })
                .await;
            let mode = match probe {
                Ok(_) => Mode::Changed,
                Err(e) if e.code.as_deref() == Some(UNRELATED_SNAPSHOTS) => {
                    tracing::warn!(
                        "{} and {} are not of one lineage: every block of {} is written, zeroes elsewhere",
                        r.base, r.snapshot, r.snapshot
                    );
                    Mode::Full
                }
                Err(e) => return Err(e.into()),
            };
            r.mode = Some(mode);
            // A full round rewrites every block: the site's changes are among them.
            if mode == Mode::Full {
                r.phase = Phase::Delta;
                r.next_index = 0;
            }
            st.round = Some(r.clone());
            state::save(&self.path, st)?;
        }
        let mode = r.mode.unwrap_or(Mode::Full);
        self.progress.round(&r.base, &r.snapshot, mode);
        let site_blocks: u64 = r.site.iter().map(|(s, e)| e - s).sum();
        if r.phase == Phase::Site {
            self.phase(st, &mut r).await?;
            r.phase = Phase::Delta;
            r.next_index = 0;
            st.round = Some(r.clone());
            state::save(&self.path, st)?;
        }
        self.phase(st, &mut r).await?;
        let summary = RoundSummary {
            snapshot: r.snapshot.clone(),
            base: r.base.clone(),
            mode,
            counters: r.done,
            site_blocks,
            site: r.site.clone(),
            started: r.started,
            finished: chrono::Utc::now(),
        };
        st.applied = Some(r.snapshot.clone());
        st.round = None;
        st.rounds.push(summary.clone());
        state::save(&self.path, st)?;
        Ok(summary)
    }

    /// Runs the round's current phase from its mark to its end, page by page.
    async fn phase(&self, st: &mut FailbackState, r: &mut RoundState) -> Result<(), FailbackError> {
        let blocks = self.target.size().div_ceil(BLOCK_SIZE);
        let mut token: Option<String> = None;
        loop {
            let work = self.page(r, blocks, token.as_deref()).await?;
            self.execute(st, r, &work).await?;
            match (work.covered, work.next_token) {
                (None, _) => return Ok(()),
                (Some(_), None) => return Ok(()),
                (Some(_), Some(t)) => token = Some(t),
            }
        }
    }

    /// The next page of actions of the round's phase, from `token` or the mark.
    async fn page(
        &self,
        r: &RoundState,
        blocks: u64,
        token: Option<&str>,
    ) -> Result<Work, FailbackError> {
        let start = |from: u64| token.map_or(PageStart::Index(from), PageStart::Token);
        let cursor = r.next_index;
        match (r.phase, r.mode.unwrap_or(Mode::Full)) {
            (Phase::Delta, Mode::Changed) => {
                let page = self
                    .retrying(|| {
                        self.ebs
                            .list_changed_blocks_page(&r.base, &r.snapshot, start(cursor))
                    })
                    .await?;
                let actions = page
                    .blocks
                    .iter()
                    .filter(|c| c.index >= cursor)
                    .map(|c| match &c.second {
                        Some(t) => Action::Write {
                            index: c.index,
                            token: t.clone(),
                        },
                        // Not in the snapshot: zeroes there.
                        None => Action::Zero {
                            start: c.index,
                            end: c.index + 1,
                        },
                    })
                    .collect();
                Ok(work(actions, page.next_token, cursor))
            }
            (Phase::Delta, Mode::Full | Mode::Compared) => {
                let page = self.snapshot_page(&r.snapshot, start(cursor)).await?;
                let mut actions = Vec::new();
                let mut at = cursor;
                for b in page.blocks.iter().filter(|b| b.index >= cursor) {
                    if b.index > at {
                        actions.push(Action::Zero {
                            start: at,
                            end: b.index,
                        });
                    }
                    actions.push(Action::Write {
                        index: b.index,
                        token: b.token.clone(),
                    });
                    at = b.index + 1;
                }
                if page.next_token.is_none() && at < blocks {
                    actions.push(Action::Zero {
                        start: at,
                        end: blocks,
                    });
                }
                Ok(work(actions, page.next_token, cursor))
            }
            (Phase::Site, _) => {
                // The snapshot's blocks at the site's changed indices: its block where it
                // has one, zeroes where it has none.
                let from = r
                    .site
                    .iter()
                    .find(|(_, e)| *e > cursor)
                    .map_or(blocks, |(s, _)| (*s).max(cursor));
                if from >= blocks {
                    return Ok(Work {
                        actions: Vec::new(),
                        covered: None,
                        next_token: None,
                    });
                }
                let page = self.snapshot_page(&r.snapshot, start(from)).await?;
                let listed: std::collections::BTreeMap<u64, &str> = page
                    .blocks
                    .iter()
                    .map(|b| (b.index, b.token.as_str()))
                    .collect();
                let end = match (&page.next_token, page.blocks.last()) {
                    (None, _) => blocks,
                    (Some(_), Some(last)) => last.index + 1,
                    (Some(_), None) => from,
                };
                let mut actions: Vec<Action> = Vec::new();
                for &(s, e) in &r.site {
                    for i in s.max(from)..e.min(end) {
                        match listed.get(&i) {
                            Some(t) => actions.push(Action::Write {
                                index: i,
                                token: (*t).to_string(),
                            }),
                            None => match actions.last_mut() {
                                Some(Action::Zero { end, .. }) if *end == i => *end = i + 1,
                                _ => actions.push(Action::Zero {
                                    start: i,
                                    end: i + 1,
                                }),
                            },
                        }
                    }
                }
                let mut w = work(actions, page.next_token, from);
                if w.next_token.is_some() {
                    w.covered = Some(end);
                }
                Ok(w)
            }
        }
    }

    async fn snapshot_page(
        &self,
        snapshot: &str,
        start: PageStart<'_>,
    ) -> Result<BlockPage<BlockRef>, FailbackError> {
        Ok(self
            .retrying(|| self.ebs.list_snapshot_blocks_page(snapshot, start))
            .await?)
    }

    /// `f` until it succeeds, fails for good, or `call_attempts` attempts failed.
    async fn retrying<T, F, Fut>(&self, f: F) -> Result<T, CloudError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, CloudError>>,
    {
        let mut attempt = 0u32;
        loop {
            match f().await {
                Err(e) if e.is_transient() && attempt + 1 < self.opts.call_attempts.max(1) => {
                    let wait = (self.opts.retry_base * 2u32.saturating_pow(attempt.min(10)))
                        .min(Duration::from_secs(20));
                    tracing::debug!("{e}; retrying in {wait:?}");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Does a page's actions, `concurrency` at a time, completing in order; a durable
    /// mark every `checkpoint_blocks` and at the end of the page.
    async fn execute(
        &self,
        st: &mut FailbackState,
        r: &mut RoundState,
        w: &Work,
    ) -> Result<(), FailbackError> {
        let snapshot = r.snapshot.clone();
        let compare = r.mode == Some(Mode::Compared);
        // Fetching and writing run ahead while a mark is taken (flush, read back, save):
        // the producer keeps `concurrency` blocks in flight, the consumer takes what they
        // did in order and marks. The channel holds only those small records (the bytes
        // are written already), so it can hold a few marks' worth.
        let ahead = 4 * self
            .opts
            .checkpoint_blocks
            .max(self.opts.concurrency)
            .max(1);
        let (tx, mut rx) = tokio::sync::mpsc::channel(ahead);
        let produce = async {
            let mut results = futures::stream::iter(w.actions.iter().cloned())
                .map(|a| self.act(&snapshot, a, compare))
                .buffered(self.opts.concurrency.max(1));
            while let Some(did) = results.next().await {
                if tx.send(did).await.is_err() {
                    break; // the consumer stopped on an error
                }
            }
            drop(tx);
        };
        let snapshot = &snapshot;
        let consume = async move {
            let mut since = Counters::default();
            let mut written = Vec::new();
            let mut mark = r.next_index;
            while let Some(did) = rx.recv().await {
                let did = did?;
                since.blocks_written += did.counters.blocks_written;
                since.bytes_written += did.counters.bytes_written;
                since.bytes_zeroed += did.counters.bytes_zeroed;
                since.blocks_same += did.counters.blocks_same;
                written.extend(did.written);
                mark = mark.max(did.end);
                if written.len() >= self.opts.checkpoint_blocks.max(1) {
                    self.checkpoint(st, r, mark, &mut since, &mut written, snapshot)
                        .await?;
                }
            }
            let covered = w.covered.unwrap_or(mark).max(mark);
            self.checkpoint(st, r, covered, &mut since, &mut written, snapshot)
                .await
        };
        let ((), result) = futures::join!(produce, consume);
        result
    }

    /// Flushes the target, reads back what was written since the last mark, then saves
    /// the mark: the state never claims a block the target does not hold.
    async fn checkpoint(
        &self,
        st: &mut FailbackState,
        r: &mut RoundState,
        mark: u64,
        since: &mut Counters,
        written: &mut Vec<(u64, usize, [u8; 32])>,
        snapshot: &str,
    ) -> Result<(), FailbackError> {
        self.target.flush().await?;
        if self.opts.verify {
            for &(index, len, digest) in written.iter() {
                let back = self.target.read(index * BLOCK_SIZE, len).await?;
                if <[u8; 32]>::from(Sha256::digest(&back)) != digest {
                    return Err(FailbackError::ReadBack {
                        target: self.target.name(),
                        snapshot: snapshot.into(),
                        index,
                    });
                }
                since.blocks_verified += 1;
            }
        }
        written.clear();
        r.next_index = r.next_index.max(mark);
        r.done.blocks_written += since.blocks_written;
        r.done.bytes_written += since.bytes_written;
        r.done.bytes_zeroed += since.bytes_zeroed;
        r.done.blocks_verified += since.blocks_verified;
        r.done.blocks_same += since.blocks_same;
        *since = Counters::default();
        st.round = Some(r.clone());
        state::save(&self.path, st)?;
        Ok(())
    }

    /// Writes (or zeroes) one action's blocks; with `compare`, only where the target's
    /// bytes differ from the snapshot's (a Compared round).
    async fn act(&self, snapshot: &str, a: Action, compare: bool) -> Result<Did, FailbackError> {
        let size = self.target.size();
        let end = a.end();
        match a {
            Action::Write { index, token } => {
                let block = BlockRef { index, token };
                let (data, whole) = self
                    .retrying(|| self.ebs.get_snapshot_block_checked(snapshot, &block))
                    .await?;
                if data.len() as u64 != BLOCK_SIZE {
                    return Err(FailbackError::BadBlock {
                        snapshot: snapshot.into(),
                        index,
                        len: data.len(),
                    });
                }
                let offset = index * BLOCK_SIZE;
                // A snapshot is whole GiB, the disk need not be: what lies past the disk's
                // end must be zeroes, or the target is too small.
                let len = size.saturating_sub(offset).min(BLOCK_SIZE) as usize;
                if data[len..].iter().any(|b| *b != 0) {
                    return Err(FailbackError::TooSmall {
                        target: self.target.name(),
                        size,
                        snapshot: snapshot.into(),
                        offset: offset + len as u64,
                    });
                }
                if len == 0 {
                    return Ok(Did {
                        end,
                        counters: Counters::default(),
                        written: None,
                    });
                }
                let part: Bytes = data.slice(..len);
                // The service's checksum covers the whole block: hashed again only when
                // the disk ends inside it.
                let digest: [u8; 32] = if len == data.len() {
                    whole
                } else {
                    Sha256::digest(&part).into()
                };
                if compare {
                    let have = self.target.read(offset, len).await?;
                    if <[u8; 32]>::from(Sha256::digest(&have)) == digest {
                        self.progress.advance(len as u64);
                        return Ok(Did {
                            end,
                            counters: Counters {
                                blocks_same: 1,
                                ..Counters::default()
                            },
                            written: None,
                        });
                    }
                }
                self.target.write(offset, part).await?;
                self.progress.advance(len as u64);
                Ok(Did {
                    end,
                    counters: Counters {
                        blocks_written: 1,
                        bytes_written: len as u64,
                        ..Counters::default()
                    },
                    written: Some((index, len, digest)),
                })
            }
            Action::Zero { start, end } => {
                let from = (start * BLOCK_SIZE).min(size);
                let to = (end * BLOCK_SIZE).min(size);
                if !compare {
                    self.target.write_zeroes(from, to - from).await?;
                    self.progress.advance(to - from);
                    return Ok(Did {
                        end,
                        counters: Counters {
                            bytes_zeroed: to - from,
                            ..Counters::default()
                        },
                        written: None,
                    });
                }
                // Block by block: zeroed only where the target holds something else.
                let mut counters = Counters::default();
                let mut at = from;
                while at < to {
                    let n = (to - at).min(BLOCK_SIZE);
                    let have = self.target.read(at, n as usize).await?;
                    if have.iter().any(|b| *b != 0) {
                        self.target.write_zeroes(at, n).await?;
                        counters.bytes_zeroed += n;
                    } else {
                        counters.blocks_same += 1;
                    }
                    self.progress.advance(n);
                    at += n;
                }
                Ok(Did {
                    end,
                    counters,
                    written: None,
                })
            }
        }
    }
}

/// A page's work: `covered` is where the listing stands after it (the phase is over
/// when there is no next page).
fn work(actions: Vec<Action>, next_token: Option<String>, cursor: u64) -> Work {
    let covered = next_token
        .as_ref()
        .map(|_| actions.last().map_or(cursor, Action::end));
    Work {
        actions,
        covered,
        next_token,
    }
}
