//! copier::learn: destination version ids that a write's answer did not name (RGW 16.2's
//! CopyObject answer has none), learned from listings instead of one HEAD after each write.
//!
//! - Which: a key's last open object version to a destination (see
//!   `Copier::may_learn_later`). Nothing writes the key after it in this run, so its version
//!   is the key's newest entry at the destination, of the task's size. The manifest flags the
//!   task (`VERSION_TO_LEARN`) until the id is learned, so a stopped run's leftovers are
//!   learned by the next one.
//! - In batches: the pending tasks are ordered by key id and cut where the keys stop rising
//!   (a key id run is a run of neighbouring keys); each run is read with one paged
//!   `ListObjectVersions` from just before its first key. A key that walk does not settle is
//!   read alone (its own history). An id that cannot be told (the newest entry is not a
//!   version of that size) is said in one line and left unknown; the task stays done.
//! - Before a key's later task starts (a refresh, the sweep after a listing), its flagged
//!   tasks are learned from the key's history first: reconciliation needs every recorded id,
//!   and the newest entry is still the flagged task's only while nothing later has started.
//!
//! May call: the s3 layer, the manifest's writer (through the copier).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use super::task::TaskCtx;
use super::Copier;
use crate::manifest::{KeyGroup, State, Task, Update};
use crate::s3::{show_key, ListFrom, S3Client, S3Error, VersionEntry, Versions};

/// Pending ids learned together.
const BATCH: usize = 1000;

/// A batch walk reads at most this many entries per key it looks for (plus one page), then
/// reads the keys left alone: a destination dense with other keys is not walked in full.
const SLACK: usize = 4;

/// A done task whose destination version id is to be learned.
#[derive(Clone, Debug)]
pub(super) struct Pending {
    task: i64,
    /// Orders a batch (ids rise with keys within one listing page).
    key_id: i64,
    bucket: String,
    key: String,
    size: u64,
}

/// The pending ids of a run and the batches being learned.
#[derive(Default)]
pub(super) struct Learner {
    pending: Mutex<Vec<Pending>>,
    /// Held while ids are learned: a key's own learning waits for a batch in flight.
    busy: tokio::sync::Mutex<()>,
    batches: Mutex<Vec<JoinHandle<()>>>,
}

impl Pending {
    /// The pending id of `task`, written to `bucket`/`key`.
    pub(super) fn of(task: &Task, bucket: &str, key: String) -> Pending {
        Pending {
            task: task.id,
            key_id: crate::manifest::key_id_of_task(task.id),
            bucket: bucket.to_string(),
            key,
            size: task.entry.size,
        }
    }
}

impl<C: S3Client> Copier<C> {
    /// Whether this task's new version id may be learned later instead of by a HEAD now
    /// (see the module header).
    pub(super) fn may_learn_later(&self, ctx: &TaskCtx<'_>) -> bool {
        self.facts(&ctx.dest.bucket).versioned && ctx.last_open && !ctx.task.entry.is_delete_marker
    }

    /// Queues a flagged task; a full batch is learned in the background.
    pub(super) fn learn_later(self: &Arc<Self>, p: Pending) {
        let full = {
            let mut pending = self.learner.pending.lock().expect("learner lock");
            pending.push(p);
            (pending.len() >= BATCH).then(|| std::mem::take(&mut *pending))
        };
        if let Some(batch) = full {
            let me = Arc::clone(self);
            let h = tokio::spawn(async move { me.learn_batch(batch).await });
            self.learner.batches.lock().expect("learner lock").push(h);
        }
    }

    /// Flagged tasks a stopped run left (read from the manifest before the run).
    pub fn learn_leftovers(self: &Arc<Self>, tasks: Vec<Task>) {
        for t in tasks {
            let d = self.settings.destination(t.dest);
            self.learn_later(Pending::of(&t, d.bucket, d.key(&t.entry.key)));
        }
    }

    /// Learns every id still pending (the end of a run).
    pub(super) async fn learn_rest(&self) {
        let handles = std::mem::take(&mut *self.learner.batches.lock().expect("learner lock"));
        for h in handles {
            let _ = h.await;
        }
        let rest = std::mem::take(&mut *self.learner.pending.lock().expect("learner lock"));
        if !rest.is_empty() {
            self.learn_batch(rest).await;
        }
    }

    async fn learn_batch(&self, mut batch: Vec<Pending>) {
        let _busy = self.learner.busy.lock().await;
        batch.sort_by(|a, b| (&a.bucket, a.key_id).cmp(&(&b.bucket, b.key_id)));
        let mut start = 0;
        for i in 1..=batch.len() {
            let cut = i == batch.len()
                || batch[i].bucket != batch[i - 1].bucket
                || batch[i].key <= batch[i - 1].key;
            if cut {
                self.learn_run(&batch[start..i]).await;
                start = i;
            }
        }
    }

    /// Learns the ids of a run of rising keys in one bucket.
    async fn learn_run(&self, run: &[Pending]) {
        let mut found = match self.walk_run(run).await {
            Ok(f) => f,
            Err(e) => {
                // Left flagged for the next run.
                tracing::warn!("destination version ids not learned now: {e}");
                return;
            }
        };
        for p in run {
            let newest = match found.remove(p.key.as_str()) {
                Some(e) => Some(e),
                None => match self.dest_key_history(&p.bucket, &p.key, None).await {
                    Ok(h) => h.last().cloned(),
                    Err(e) => {
                        tracing::warn!("destination version id not learned now: {e}");
                        continue;
                    }
                },
            };
            self.record_learned(p, newest.as_ref());
        }
    }

    /// One walk over the run's keys: the newest destination entry of each key it reaches.
    async fn walk_run(&self, run: &[Pending]) -> Result<HashMap<String, VersionEntry>, S3Error> {
        let (first, last) = (&run[0].key, &run[run.len() - 1].key);
        let wanted: HashSet<&str> = run.iter().map(|p| p.key.as_str()).collect();
        let from = ListFrom {
            bucket: run[0].bucket.clone(),
            prefix: common_prefix(first, last).to_string(),
            key_marker: marker_below(first),
            version_marker: None,
            max_keys: 1000,
        };
        let mut walk = Versions::new(&self.dest, from);
        let mut found: HashMap<String, VersionEntry> = HashMap::new();
        let mut budget = SLACK * run.len() + 1000;
        'pages: while let Some(page) = walk.next_page().await? {
            for e in page.entries {
                if e.key.as_str() > last.as_str() || budget == 0 {
                    break 'pages;
                }
                budget -= 1;
                // Newest first within a key: the first entry seen is the newest.
                if wanted.contains(e.key.as_str()) && !found.contains_key(&e.key) {
                    found.insert(e.key.clone(), e);
                }
            }
        }
        Ok(found)
    }

    /// Records what the key's newest destination entry says of a pending id.
    fn record_learned(&self, p: &Pending, newest: Option<&VersionEntry>) -> Option<String> {
        let id = newest
            .filter(|e| !e.is_delete_marker && e.size == p.size)
            .map(|e| e.version_id.clone());
        if id.is_none() {
            self.progress.say(format!(
                "warning: the destination version id of {} in bucket {} cannot be told (its newest version is not the one copied: is something else writing the destination?)",
                show_key(&p.key),
                p.bucket
            ));
        }
        self.send(Update::DestVersion {
            id: p.task,
            dest_version_id: id.clone(),
        });
        id
    }

    /// Before a key's open tasks start: learns the flagged ids of its done tasks (see the
    /// module header) and adds them to `recorded`. False when one could not be read: the
    /// key is left for the next run (a later task must not start before).
    pub(super) async fn learn_before(
        &self,
        group: &KeyGroup,
        recorded: &mut HashSet<String>,
    ) -> bool {
        let flagged: Vec<&Task> = group
            .tasks
            .iter()
            .filter(|t| t.version_to_learn && t.state == State::Done)
            .collect();
        if flagged.is_empty() {
            return true;
        }
        let _busy = self.learner.busy.lock().await;
        let ids: HashSet<i64> = flagged.iter().map(|t| t.id).collect();
        self.learner
            .pending
            .lock()
            .expect("learner lock")
            .retain(|p| !ids.contains(&p.task));
        for t in flagged {
            let d = self.settings.destination(t.dest);
            let p = Pending::of(t, d.bucket, d.key(&group.key));
            match self.dest_key_history(d.bucket, &p.key, None).await {
                Ok(h) => {
                    if let Some(v) = self.record_learned(&p, h.last()) {
                        recorded.insert(v);
                    }
                }
                Err(e) => {
                    self.progress.say(format!(
                        "in doubt, left for the next run: {}: its destination version id cannot be read: {e}",
                        show_key(&group.key)
                    ));
                    return false;
                }
            }
        }
        true
    }
}

/// The longest common prefix of two keys (on a character boundary).
fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let n = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or_else(|| a.len().min(b.len()), |((i, _), _)| i);
    &a[..n]
}

/// A key marker that sorts before `key` and close to it (a listing starts after its key
/// marker): `key` less its last character, then the character before that one, then the
/// highest ASCII character.
fn marker_below(key: &str) -> Option<String> {
    let mut chars = key.chars();
    let last = chars.next_back()?;
    let mut m = chars.as_str().to_string();
    if last.is_ascii() && last > '\u{1}' {
        m.push((last as u8 - 1) as char);
        m.push('\u{7f}');
    }
    (!m.is_empty()).then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_sort_just_before_the_key() {
        for k in ["a", "ab", "data/file-00123", "x/é", "a\u{1}", "zz/"] {
            if let Some(m) = marker_below(k) {
                assert!(m.as_str() < k, "{m:?} < {k:?}");
            }
        }
        assert_eq!(marker_below("a"), Some("`\u{7f}".into()));
        assert_eq!(marker_below("x/é"), Some("x/".into()));
        assert_eq!(marker_below("é"), None);
        assert_eq!(common_prefix("logs/a1", "logs/b2"), "logs/");
        assert_eq!(common_prefix("é1", "é2"), "é");
        assert_eq!(common_prefix("ab", "abc"), "ab");
    }
}
