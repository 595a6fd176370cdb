//! A durable local spool for the audit client: every accepted item is appended to an
//! append-only file before `submit` returns, and a background task sends the file's
//! items in order, in batches, acknowledging what the destination accepted. When the
//! destination is down the items wait on disk (retried with backoff, never dropped);
//! when the sending process crashes they are sent when it starts again with the same
//! directory. The destination deduplicates by item id, so an item sent twice (sent,
//! then the process died before the acknowledgement was recorded) is stored once.
//!
//! ## Files
//!
//! The directory holds numbered segment files `<n>.spool` (n = 1, 2, ...; a writer
//! always starts a new segment) and `ack`, the text `"<segment> <offset>"` of the first
//! item not yet acknowledged. A segment is a sequence of records:
//!
//! ```text
//! length: u32 little-endian | crc32: u32 little-endian | payload: length bytes
//! ```
//!
//! where the CRC-32 (IEEE 802.3, the zlib one) covers the payload and the payload is
//! one protobuf-encoded item. A torn or corrupt record (a crash in the middle of a
//! write) ends the replay of its segment with a warning. Segments are deleted once
//! every item in them has been acknowledged.
//!
//! ## Durability
//!
//! Each record is written with one `write` call before `submit` returns, so a crash
//! of the process (even `kill -9`) loses nothing: the data is in the operating
//! system's page cache. The file is `fdatasync`ed every `fsync_interval` (default 1
//! s; `None`: never), which bounds what a power loss or kernel crash can lose.
//! [`SpoolBatcher::submit_durable`] also forces the record to stable storage before
//! it returns (concurrent callers share one `fdatasync`), for callers that must not
//! act before their record would survive even a power loss.
//! One directory must be used by one process at a time.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crewmesh_proto::prost::Message;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, watch};

use crate::batch::{BatchConfig, BatchStats, is_transient};
use crate::observe::MetricsRegistry;

/// Where and how a spool keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Start a new segment file beyond this size.
    pub segment_bytes: u64,
    /// Refuse new items (counted as dropped) while this much is waiting on disk.
    pub max_bytes: u64,
    /// How often written records are forced to stable storage; `None`: never.
    pub fsync_interval: Option<Duration>,
}

impl SpoolConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 8 * 1024 * 1024,
            max_bytes: 1024 * 1024 * 1024,
            fsync_interval: Some(Duration::from_secs(1)),
        }
    }
}

/// Bytes of a record beyond its payload.
const HEADER: u64 = 8;

/// Longest payload accepted when reading (a larger length is corruption).
const MAX_RECORD: u32 = 16 * 1024 * 1024;

/// A position in the spool: segment number and byte offset.
type Pos = (u64, u64);

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zlib computes it; with
/// the CPU's carry-less multiply where it has one.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}.spool"))
}

/// Segment numbers present in `dir`, ascending.
fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name.strip_suffix(".spool").and_then(|n| n.parse().ok()) {
            found.push(n);
        }
    }
    found.sort_unstable();
    Ok(found)
}

fn read_ack(dir: &Path) -> Pos {
    std::fs::read_to_string(dir.join("ack"))
        .ok()
        .and_then(|s| {
            let (a, b) = s.trim().split_once(' ')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or((0, 0))
}

fn write_ack(dir: &Path, pos: Pos) -> std::io::Result<()> {
    let tmp = dir.join("ack.tmp");
    std::fs::write(&tmp, format!("{} {}", pos.0, pos.1))?;
    std::fs::rename(tmp, dir.join("ack"))
}

struct Writer {
    file: File,
    segment: u64,
    offset: u64,
    dirty: bool,
}

/// The spool gauge family, shared by every client of the process.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpoolLabels {
    client: String,
}

fn spool_gauge(registry: Option<&MetricsRegistry>, client: &'static str) -> Gauge {
    // One family per client kind (`crewmesh_<client>_spool_bytes`), shared by every
    // spool of the process; several services of one process share a registry.
    static FAMILIES: Mutex<Vec<(&'static str, Family<SpoolLabels, Gauge>)>> =
        Mutex::new(Vec::new());
    let families = &mut *FAMILIES.lock().unwrap_or_else(|p| p.into_inner());
    let family = match families.iter().find(|(name, _)| *name == client) {
        Some((_, f)) => f.clone(),
        None => {
            let f = Family::default();
            families.push((client, f.clone()));
            f
        }
    };
    if let Some(registry) = registry {
        let metric = format!("{client}_spool_bytes");
        if !registry
            .encode()
            .contains(&format!("# TYPE crewmesh_{metric} "))
        {
            registry.register(
                &metric,
                "Bytes of accepted items waiting in the local spool for delivery",
                family.clone(),
            );
        }
    }
    family
        .get_or_create(&SpoolLabels {
            client: client.to_owned(),
        })
        .clone()
}

struct Shared {
    dir: PathBuf,
    config: SpoolConfig,
    writer: Mutex<Writer>,
    /// Bytes written and not yet acknowledged.
    pending: AtomicU64,
    gauge: Gauge,
    wake: Notify,
    /// The first position not yet acknowledged.
    acked: watch::Sender<Pos>,
    closed: AtomicBool,
    stats: Arc<BatchStats>,
    /// Serialises fsyncs, so concurrent durable submits share one.
    sync_lock: Mutex<()>,
    /// The segment known durable and the offset it is durable through.
    synced: Mutex<Pos>,
}

impl Shared {
    fn set_pending(&self, delta_add: u64, delta_sub: u64) {
        let now = if delta_add > 0 {
            self.pending.fetch_add(delta_add, Ordering::Relaxed) + delta_add
        } else {
            self.pending
                .fetch_sub(delta_sub, Ordering::Relaxed)
                .saturating_sub(delta_sub)
        };
        self.gauge.set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    fn write_pos(&self) -> Pos {
        let w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        (w.segment, w.offset)
    }

    /// Makes what was written durable. The fsync runs on a second handle of the
    /// segment, outside the writer's lock, so `submit` on request tasks never waits
    /// for the disk.
    fn sync(&self) {
        if let Err(e) = self.sync_current(false) {
            tracing::warn!(error = %e, "cannot sync the spool");
        }
    }

    /// Syncs the current segment through everything written so far (`force`: even
    /// when nothing new was written since the last sync).
    fn sync_current(&self, force: bool) -> std::io::Result<()> {
        let _one_at_a_time = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (file, upto) = {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            if !w.dirty && !force {
                return Ok(());
            }
            w.dirty = false;
            (w.file.try_clone(), (w.segment, w.offset))
        };
        let result = file.and_then(|f| f.sync_data());
        match &result {
            Ok(()) => *self.synced.lock().unwrap_or_else(|p| p.into_inner()) = upto,
            Err(_) => {
                // Try again on the next sync.
                self.writer.lock().unwrap_or_else(|p| p.into_inner()).dirty = true;
            }
        }
        result
    }

    /// Blocks until the record ending at `end` is on stable storage.
    fn sync_through(&self, end: Pos) -> std::io::Result<()> {
        {
            let synced = *self.synced.lock().unwrap_or_else(|p| p.into_inner());
            if synced.0 == end.0 && synced.1 >= end.1 {
                return Ok(());
            }
        }
        let current = self.write_pos().0;
        if end.0 < current {
            // A full segment: sync it by name (gone means delivered and removed).
            return match File::open(segment_path(&self.dir, end.0)) {
                Ok(f) => f.sync_data(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            };
        }
        {
            // Another caller's fsync may have covered this record meanwhile.
            let _wait = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
            let synced = *self.synced.lock().unwrap_or_else(|p| p.into_inner());
            if synced.0 == end.0 && synced.1 >= end.1 {
                return Ok(());
            }
        }
        self.sync_current(true)
    }
}

/// Stops the sending task when the last handle is dropped.
struct Guard(Arc<Shared>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Relaxed);
        self.0.wake.notify_one();
    }
}

/// The sending half of a spool; cheap to clone.
pub struct SpoolBatcher<T> {
    shared: Arc<Shared>,
    _guard: Arc<Guard>,
    _item: std::marker::PhantomData<fn(T)>,
}

impl<T> Clone for SpoolBatcher<T> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            _guard: self._guard.clone(),
            _item: std::marker::PhantomData,
        }
    }
}

impl<T: Message + Default + Clone + Send + 'static> SpoolBatcher<T> {
    /// Opens (creating it) the spool directory, queues what an earlier process left
    /// unacknowledged, and starts the sending task. `send` delivers one batch.
    pub fn open<F, Fut>(
        name: &'static str,
        batch: BatchConfig,
        spool: SpoolConfig,
        metrics: Option<&MetricsRegistry>,
        send: F,
    ) -> std::io::Result<Self>
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), tonic::Status>> + Send + 'static,
    {
        let dir = spool.dir.clone();
        std::fs::create_dir_all(&dir)?;
        let existing = segments(&dir)?;
        let ack = read_ack(&dir);
        // Replay from the acknowledged position, or from the first segment after it.
        let start: Pos = if existing.contains(&ack.0) {
            ack
        } else {
            (
                existing.iter().copied().find(|&n| n > ack.0).unwrap_or(0),
                0,
            )
        };
        let mut pending = 0;
        for &n in &existing {
            if n < start.0 {
                std::fs::remove_file(segment_path(&dir, n))?;
            } else {
                let len = std::fs::metadata(segment_path(&dir, n))?.len();
                pending += if n == start.0 {
                    len.saturating_sub(start.1)
                } else {
                    len
                };
            }
        }
        let segment = existing.last().copied().unwrap_or(0) + 1;
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(segment_path(&dir, segment))?;
        let start = if start.0 == 0 { (segment, 0) } else { start };
        if pending > 0 {
            tracing::info!(
                client = name,
                bytes = pending,
                "replaying the spool of an earlier run"
            );
        }
        let gauge = spool_gauge(metrics, name);
        gauge.set(i64::try_from(pending).unwrap_or(i64::MAX));
        let (acked, _) = watch::channel(start);
        let shared = Arc::new(Shared {
            dir,
            config: spool,
            writer: Mutex::new(Writer {
                file,
                segment,
                offset: 0,
                dirty: false,
            }),
            pending: AtomicU64::new(pending),
            gauge,
            wake: Notify::new(),
            acked,
            closed: AtomicBool::new(false),
            stats: Arc::new(BatchStats::default()),
            sync_lock: Mutex::new(()),
            synced: Mutex::new((segment, 0)),
        });
        let reader = Reader {
            dir: shared.dir.clone(),
            pos: start,
            file: None,
            _item: std::marker::PhantomData::<fn() -> T>,
        };
        tokio::spawn(run(name, batch, shared.clone(), reader, send));
        Ok(Self {
            _guard: Arc::new(Guard(shared.clone())),
            shared,
            _item: std::marker::PhantomData,
        })
    }

    /// Appends `item` to the spool. Returns false (and counts a drop) only when the
    /// spool is full (`max_bytes`) or the disk refuses the write.
    pub fn submit(&self, item: &T) -> bool {
        self.write(item).is_some()
    }

    /// Appends `item` to the spool and waits until it is on stable storage (the
    /// `fdatasync` runs on the blocking pool; concurrent callers share one). Returns
    /// false when the spool is full, the disk refuses the write, or the sync fails:
    /// the item may then still be delivered, but it was not made durable.
    pub async fn submit_durable(&self, item: &T) -> bool {
        let Some(end) = self.write(item) else {
            return false;
        };
        let shared = self.shared.clone();
        match tokio::task::spawn_blocking(move || shared.sync_through(end)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot sync the spool: the item is not durable");
                false
            }
            Err(_) => false,
        }
    }

    /// Writes one record; the position just after it, or `None` when refused.
    fn write(&self, item: &T) -> Option<Pos> {
        let len = item.encoded_len();
        let size = HEADER + len as u64;
        if self.shared.pending.load(Ordering::Relaxed) + size > self.shared.config.max_bytes {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!("the spool is full: item dropped");
            return None;
        }
        // The header (length, CRC of the payload), then the payload encoded in place.
        let mut record = Vec::with_capacity(size as usize);
        record.extend_from_slice(&(len as u32).to_le_bytes());
        record.extend_from_slice(&[0; 4]);
        if let Err(e) = item.encode(&mut record) {
            // Unreachable in practice: a `Vec` grows as needed.
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "cannot encode a spool record: item dropped");
            return None;
        }
        let crc = crc32(&record[HEADER as usize..]);
        record[4..8].copy_from_slice(&crc.to_le_bytes());
        let written = {
            let mut w = self.shared.writer.lock().unwrap_or_else(|p| p.into_inner());
            if w.offset > 0 && w.offset + size > self.shared.config.segment_bytes {
                let next = w.segment + 1;
                match OpenOptions::new()
                    .create_new(true)
                    .append(true)
                    .open(segment_path(&self.shared.dir, next))
                {
                    Ok(file) => {
                        let full = std::mem::replace(
                            &mut *w,
                            Writer {
                                file,
                                segment: next,
                                offset: 0,
                                dirty: false,
                            },
                        );
                        sync_off_path(full.file);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot start a new spool segment"),
                }
            }
            match w.file.write_all(&record) {
                Ok(()) => {
                    w.offset += size;
                    w.dirty = true;
                    Some((w.segment, w.offset))
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot write to the spool: item dropped");
                    // A partial write would corrupt the segment: seal it.
                    let _ = w.file.set_len(w.offset);
                    None
                }
            }
        };
        let Some(end) = written else {
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        self.shared.set_pending(size, 0);
        self.shared.wake.notify_one();
        Some(end)
    }

    /// Waits until everything submitted before this call has been acknowledged by the
    /// destination (or `timeout`). What is not delivered stays in the spool.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let target = self.shared.write_pos();
        let mut rx = self.shared.acked.subscribe();
        self.shared.wake.notify_one();
        let reached = tokio::time::timeout(timeout, rx.wait_for(|&acked| acked >= target)).await;
        self.shared.sync();
        matches!(reached, Ok(Ok(_)))
    }

    /// Bytes waiting in the spool.
    pub fn pending_bytes(&self) -> u64 {
        self.shared.pending.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> &BatchStats {
        &self.shared.stats
    }
}

/// Reads records in order; owned by the sending task.
struct Reader<T> {
    dir: PathBuf,
    pos: Pos,
    file: Option<File>,
    _item: std::marker::PhantomData<fn() -> T>,
}

impl<T: Message + Default> Reader<T> {
    /// Up to `max` items from the current position, and the position after them.
    fn read(&mut self, max: usize, write_pos: Pos) -> (Vec<T>, Pos, u64) {
        let mut items = Vec::new();
        let mut pos = self.pos;
        let mut consumed = 0;
        while items.len() < max {
            if pos >= write_pos {
                break;
            }
            if self.file.is_none() {
                match File::open(segment_path(&self.dir, pos.0)) {
                    Ok(mut f) => {
                        if f.seek(SeekFrom::Start(pos.1)).is_err() {
                            break;
                        }
                        self.file = Some(f);
                    }
                    Err(_) => {
                        // A segment that is gone: move on to the next one.
                        pos = self.next_segment(pos.0, write_pos);
                        continue;
                    }
                }
            }
            let limit = if pos.0 == write_pos.0 {
                write_pos.1
            } else {
                self.file
                    .as_ref()
                    .and_then(|f| f.metadata().ok())
                    .map_or(0, |m| m.len())
            };
            if pos.1 >= limit {
                if pos.0 == write_pos.0 {
                    break;
                }
                pos = self.next_segment(pos.0, write_pos);
                continue;
            }
            match self.read_record(limit - pos.1) {
                Some((payload, size)) => {
                    pos.1 += size;
                    consumed += size;
                    match T::decode(payload.as_slice()) {
                        Ok(item) => items.push(item),
                        Err(e) => {
                            tracing::warn!(segment = pos.0, error = %e, "undecodable spool record skipped")
                        }
                    }
                }
                None => {
                    tracing::warn!(
                        segment = pos.0,
                        offset = pos.1,
                        "torn or corrupt spool record: the rest of the segment is skipped"
                    );
                    consumed += limit - pos.1;
                    pos = self.next_segment(pos.0, write_pos);
                }
            }
        }
        self.pos = pos;
        (items, pos, consumed)
    }

    /// The start of the first segment after `current` (never beyond the writer's).
    fn next_segment(&mut self, current: u64, write_pos: Pos) -> Pos {
        self.file = None;
        if current >= write_pos.0 {
            return write_pos;
        }
        let next = segments(&self.dir)
            .ok()
            .and_then(|s| s.into_iter().find(|&n| n > current))
            .unwrap_or(write_pos.0)
            .min(write_pos.0);
        (next, 0)
    }

    /// The next record's payload and size, or `None` when it is torn or corrupt.
    fn read_record(&mut self, available: u64) -> Option<(Vec<u8>, u64)> {
        let file = self.file.as_mut()?;
        if available < HEADER {
            return None;
        }
        let mut header = [0u8; 8];
        file.read_exact(&mut header).ok()?;
        let len = u32::from_le_bytes(header[..4].try_into().ok()?);
        let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
        if len > MAX_RECORD || HEADER + u64::from(len) > available {
            return None;
        }
        let mut payload = vec![0u8; len as usize];
        file.read_exact(&mut payload).ok()?;
        (crc32(&payload) == crc).then_some((payload, HEADER + u64::from(len)))
    }
}

async fn run<T, F, Fut>(
    name: &'static str,
    config: BatchConfig,
    shared: Arc<Shared>,
    mut reader: Reader<T>,
    send: F,
) where
    T: Message + Default + Clone + Send + 'static,
    F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    let fsync_every = shared.config.fsync_interval;
    let mut last_sync = tokio::time::Instant::now();
    loop {
        if shared.closed.load(Ordering::Relaxed) {
            shared.sync();
            return;
        }
        let (mut items, mut pos, mut consumed);
        (reader, (items, pos, consumed)) =
            read_off_thread(reader, config.max_batch, shared.write_pos()).await;
        if items.is_empty() && consumed == 0 {
            // Caught up: wait for new items (or the next sync).
            let wait = fsync_every.unwrap_or(Duration::from_secs(3600));
            let _ = tokio::time::timeout(wait, shared.wake.notified()).await;
        } else if items.len() < config.max_batch {
            // Linger for a fuller batch.
            tokio::time::sleep(config.max_delay).await;
            let (more, p, c);
            (reader, (more, p, c)) =
                read_off_thread(reader, config.max_batch - items.len(), shared.write_pos()).await;
            items.extend(more);
            pos = p;
            consumed += c;
        }
        if let Some(every) = fsync_every
            && last_sync.elapsed() >= every
        {
            let s = shared.clone();
            let _ = tokio::task::spawn_blocking(move || s.sync()).await;
            last_sync = tokio::time::Instant::now();
        }
        if items.is_empty() && consumed == 0 && pos == *shared.acked.borrow() {
            continue;
        }
        let batch = items;
        let count = batch.len() as u64;
        if !batch.is_empty() && !deliver(name, batch, &send, &shared).await {
            // Closed while the destination was down: the items stay in the spool.
            shared.sync();
            return;
        }
        shared.stats.sent.fetch_add(count, Ordering::Relaxed);
        let dir = shared.dir.clone();
        let acked = tokio::task::spawn_blocking(move || {
            write_ack(&dir, pos)?;
            // Every segment before the acknowledged one is delivered.
            for n in segments(&dir)?.into_iter().filter(|&n| n < pos.0) {
                let _ = std::fs::remove_file(segment_path(&dir, n));
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        if let Ok(Err(e)) = acked {
            tracing::warn!(client = name, error = %e, "cannot record the spool acknowledgement");
        }
        shared.set_pending(0, consumed);
        shared.acked.send_replace(pos);
    }
}

/// [`Reader::read`] on the blocking pool: it reads files, which must not stall the
/// runtime's worker threads.
async fn read_off_thread<T>(
    mut reader: Reader<T>,
    max: usize,
    write_pos: Pos,
) -> (Reader<T>, (Vec<T>, Pos, u64))
where
    T: Message + Default + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let read = reader.read(max, write_pos);
        (reader, read)
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Longest wait for the destination's answer to one batch.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one batch until it is accepted (true), refused (true: dropped and counted),
/// or the spool is closed while the destination is down (false).
async fn deliver<T, F, Fut>(name: &'static str, items: Vec<T>, send: &F, shared: &Shared) -> bool
where
    T: Message + Clone,
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        // A destination that hangs must not hold the spool up forever: an attempt
        // that takes longer counts as failed (resending is safe, ids deduplicate).
        let sent = tokio::time::timeout(ATTEMPT_TIMEOUT, send(items.clone()))
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {ATTEMPT_TIMEOUT:?}"
                )))
            });
        match sent {
            Ok(()) => return true,
            Err(status) if !is_transient(status.code()) => {
                shared.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                shared
                    .stats
                    .dropped
                    .fetch_add(items.len() as u64, Ordering::Relaxed);
                tracing::error!(client = name, code = ?status.code(), message = status.message(), items = items.len(), "spooled batch refused; dropped");
                return true;
            }
            Err(status) => {
                shared.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                if attempt == 1 || attempt.is_multiple_of(20) {
                    tracing::warn!(client = name, attempt, code = ?status.code(), message = status.message(), "spooled batch not delivered; retrying");
                }
                if shared.closed.load(Ordering::Relaxed) {
                    return false;
                }
                let _ = tokio::time::timeout(backoff, shared.wake.notified()).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Syncs a full segment without holding up the caller: `submit` runs on request
/// tasks, and an fsync can take milliseconds. Outside a runtime it syncs inline.
fn sync_off_path(file: File) {
    let sync = move || {
        if let Err(e) = file.sync_data() {
            tracing::warn!(error = %e, "cannot sync a full spool segment");
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn_blocking(sync);
        }
        Err(_) => sync(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crewmesh_proto::audit::v1::EventInput;
    use std::sync::Mutex as StdMutex;

    #[test]
    fn crc32_is_the_zlib_one() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }

    fn item(n: u32) -> EventInput {
        EventInput {
            id: format!("0190a5c4-0000-7000-8000-{n:012x}"),
            action: "x".into(),
            ..Default::default()
        }
    }

    /// A destination that records ids, and can be switched down.
    #[derive(Clone, Default)]
    struct Sink {
        got: Arc<StdMutex<Vec<String>>>,
        down: Arc<AtomicBool>,
    }

    impl Sink {
        fn open(&self, dir: &Path, batch: usize) -> SpoolBatcher<EventInput> {
            let sink = self.clone();
            let mut config = SpoolConfig::new(dir);
            config.segment_bytes = 1024;
            SpoolBatcher::open(
                "test",
                BatchConfig {
                    capacity: 0,
                    max_batch: batch,
                    max_delay: Duration::from_millis(1),
                },
                config,
                None,
                move |items: Vec<EventInput>| {
                    let sink = sink.clone();
                    async move {
                        if sink.down.load(Ordering::Relaxed) {
                            return Err(tonic::Status::unavailable("down"));
                        }
                        sink.got
                            .lock()
                            .unwrap()
                            .extend(items.into_iter().map(|i| i.id));
                        Ok(())
                    }
                },
            )
            .unwrap()
        }

        fn ids(&self) -> Vec<String> {
            self.got.lock().unwrap().clone()
        }
    }

    #[tokio::test]
    async fn items_are_delivered_in_order_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::default();
        let spool = sink.open(dir.path(), 7);
        for n in 0..200 {
            assert!(spool.submit(&item(n)));
        }
        assert!(spool.flush(Duration::from_secs(10)).await);
        assert_eq!(sink.ids(), (0..200).map(|n| item(n).id).collect::<Vec<_>>());
        assert_eq!(spool.pending_bytes(), 0);
        // Delivered segments are removed; the current one stays.
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_outage_keeps_items_on_disk_until_the_destination_returns() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::default();
        sink.down.store(true, Ordering::Relaxed);
        let spool = sink.open(dir.path(), 10);
        for n in 0..50 {
            assert!(spool.submit(&item(n)));
        }
        assert!(!spool.flush(Duration::from_millis(200)).await);
        assert!(spool.pending_bytes() > 0);
        assert!(sink.ids().is_empty());
        sink.down.store(false, Ordering::Relaxed);
        assert!(spool.flush(Duration::from_secs(10)).await);
        assert_eq!(sink.ids(), (0..50).map(|n| item(n).id).collect::<Vec<_>>());
        assert_eq!(spool.stats().dropped.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_crashed_sender_is_replayed_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let first = Sink::default();
        first.down.store(true, Ordering::Relaxed);
        let spool = first.open(dir.path(), 10);
        for n in 0..30 {
            assert!(spool.submit(&item(n)));
        }
        // The process dies: nothing is flushed, the task just stops.
        drop(spool);
        // A torn record at the end of the last segment, as a crash mid-write leaves.
        let last = *segments(dir.path()).unwrap().last().unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(segment_path(dir.path(), last))
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);

        let second = Sink::default();
        let spool = second.open(dir.path(), 10);
        assert!(spool.submit(&item(30)));
        assert!(spool.flush(Duration::from_secs(10)).await);
        assert_eq!(
            second.ids(),
            (0..=30).map(|n| item(n).id).collect::<Vec<_>>()
        );
        drop(spool);

        // A third start finds nothing left to send.
        let third = Sink::default();
        let spool = third.open(dir.path(), 10);
        assert_eq!(spool.pending_bytes(), 0);
        assert!(spool.flush(Duration::from_secs(10)).await);
        assert!(third.ids().is_empty());
    }

    #[tokio::test]
    async fn a_full_spool_refuses_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::default();
        sink.down.store(true, Ordering::Relaxed);
        let mut config = SpoolConfig::new(dir.path());
        config.max_bytes = 200;
        let s = sink.clone();
        let spool = SpoolBatcher::open(
            "test",
            BatchConfig::default(),
            config,
            None,
            move |items: Vec<EventInput>| {
                let s = s.clone();
                async move {
                    if s.down.load(Ordering::Relaxed) {
                        return Err(tonic::Status::unavailable("down"));
                    }
                    s.got
                        .lock()
                        .unwrap()
                        .extend(items.into_iter().map(|i| i.id));
                    Ok(())
                }
            },
        )
        .unwrap();
        let accepted = (0..20).filter(|&n| spool.submit(&item(n))).count();
        assert!(accepted > 0 && accepted < 20, "{accepted}");
        assert_eq!(
            spool.stats().dropped.load(Ordering::Relaxed),
            20 - accepted as u64
        );
    }

    #[tokio::test]
    async fn durable_submits_are_synced_and_refused_when_the_spool_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Sink::default();
        sink.down.store(true, Ordering::Relaxed);
        let spool = sink.open(dir.path(), 10);
        // Concurrent durable submits across segment boundaries all succeed.
        let results = futures::future::join_all((0..40).map(|n| {
            let spool = spool.clone();
            async move { spool.submit_durable(&item(n)).await }
        }))
        .await;
        assert!(results.iter().all(|&ok| ok));
        let synced = *spool.shared.synced.lock().unwrap();
        assert_eq!(synced, spool.shared.write_pos());
        sink.down.store(false, Ordering::Relaxed);
        assert!(spool.flush(Duration::from_secs(10)).await);
        let mut got = sink.ids();
        got.sort();
        assert_eq!(got, (0..40).map(|n| item(n).id).collect::<Vec<_>>());

        let full = tempfile::tempdir().unwrap();
        let mut config = SpoolConfig::new(full.path());
        config.max_bytes = 60;
        let spool = SpoolBatcher::open(
            "test",
            BatchConfig::default(),
            config,
            None,
            |_: Vec<EventInput>| async { Err(tonic::Status::unavailable("down")) },
        )
        .unwrap();
        assert!(spool.submit_durable(&item(1)).await);
        assert!(!spool.submit_durable(&item(2)).await);
        assert_eq!(spool.stats().dropped.load(Ordering::Relaxed), 1);
    }
}
