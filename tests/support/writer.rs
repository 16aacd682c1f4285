//! writer: a steady application writing to a source bucket while a test (or bench) runs
//! `follow`: for a given time and rate it puts new keys, overwrites existing ones (new
//! versions) and deletes them (delete markers on a versioned bucket, removals on an
//! unversioned one), one request at a time with the SDK, and says what it did. The choice of
//! each write comes from a seeded generator, so a run is reproducible up to timing.
//!
//! On moto a key is never written twice within one second of the system clock: moto's
//! listings order a key's history by 1-second last-modified only (see `history`), so two
//! writes of a key in one second could not be told apart by the replica check. RGW lists
//! true order, and the writer writes there as it comes.
//!
//! Only PutObject and DeleteObject: RGW 16.2 aborts (radosgw dies) on DeleteObjects in a
//! bucket with a push topic, so batch deletes are never sent.
//!
//! May call: the SDK client given, `server` (which kind runs).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::server::{server, Server};

/// What the writer does: how long, how fast, where.
#[derive(Clone, Debug)]
pub struct Writer {
    /// How long it writes.
    pub duration: Duration,
    /// Writes per second it aims at (one request at a time: a slow server lowers it; the
    /// rate reached is in [`Written::rate`]).
    pub rate: f64,
    /// New keys are `{prefix}w{N}`.
    pub prefix: String,
    /// Keys whose current entry is an object before it starts (overwritten and deleted like
    /// its own; on moto not before the next second). A key whose current entry is a delete
    /// marker does not belong here: RGW writes no second marker for a delete of it.
    pub existing: Vec<String>,
    /// The source is versioned (a delete leaves a marker) or not (a delete removes).
    pub versioned: bool,
    /// Seed of the choice of writes.
    pub seed: u64,
}

impl Writer {
    /// A writer on a versioned bucket for `duration` at `rate` writes per second.
    pub fn new(duration: Duration, rate: f64) -> Writer {
        Writer {
            duration,
            rate,
            prefix: String::new(),
            existing: Vec::new(),
            versioned: true,
            seed: 21,
        }
    }

    /// Overwrites and deletes these keys too.
    pub fn existing(mut self, keys: &[String]) -> Writer {
        self.existing = keys.to_vec();
        self
    }

    /// For an unversioned source (deletes remove the key).
    pub fn unversioned(mut self) -> Writer {
        self.versioned = false;
        self
    }

    /// Writes on `bucket` until the duration is over, then says what it did. A write the
    /// server refuses is counted in [`Written::errors`] (and printed), not fatal: the
    /// replica check afterwards compares what the source holds.
    pub async fn run(self, c: Client, bucket: String) -> Written {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut done = Written::default();
        // Every key written or known, with whether its current entry is an object.
        let mut live: HashMap<String, bool> =
            self.existing.iter().map(|k| (k.clone(), true)).collect();
        let mut keys: Vec<String> = self.existing.clone();
        // The second (system clock) each key was last written in (moto only); the existing
        // keys may have been written in this one.
        let mut last_second: HashMap<String, u64> = self
            .existing
            .iter()
            .map(|k| (k.clone(), unix_second()))
            .collect();
        let start = Instant::now();
        let period = Duration::from_secs_f64(1.0 / self.rate.max(0.001));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        while start.elapsed() < self.duration {
            tick.tick().await;
            n += 1;
            let now = unix_second();
            let free = |k: &String| {
                server() != Server::Moto || last_second.get(k).is_none_or(|s| *s < now)
            };
            let roll = rng.random_range(0..100);
            let candidates: Vec<&String> = keys.iter().filter(|k| free(k)).collect();
            let op = if roll < 35 || candidates.is_empty() {
                let key = format!("{}w{:05}", self.prefix, done.new_keys);
                keys.push(key.clone());
                Write::New(key)
            } else {
                let key = candidates[rng.random_range(0..candidates.len())].clone();
                if roll < 75 || !live.get(&key).copied().unwrap_or(false) {
                    Write::Overwrite(key)
                } else {
                    Write::Delete(key)
                }
            };
            let result = match &op {
                Write::New(key) | Write::Overwrite(key) => {
                    // Bodies of varying length, each naming its write.
                    let body = format!("{key} #{n} {}", "x".repeat(rng.random_range(0..200)));
                    c.put_object()
                        .bucket(&bucket)
                        .key(key)
                        .body(ByteStream::from(body.into_bytes()))
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| format!("put {key:?}: {e:?}"))
                }
                Write::Delete(key) => c
                    .delete_object()
                    .bucket(&bucket)
                    .key(key)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("delete {key:?}: {e:?}")),
            };
            if let Err(e) = result {
                println!("writer: {e}");
                done.errors += 1;
                continue;
            }
            let key = match op {
                Write::New(key) => {
                    done.new_keys += 1;
                    live.insert(key.clone(), true);
                    key
                }
                Write::Overwrite(key) => {
                    done.overwrites += 1;
                    live.insert(key.clone(), true);
                    key
                }
                Write::Delete(key) => {
                    done.deletes += 1;
                    live.insert(key.clone(), false);
                    key
                }
            };
            last_second.insert(key.clone(), unix_second());
            done.keys.insert(key);
        }
        done.elapsed = start.elapsed();
        done
    }
}

enum Write {
    New(String),
    Overwrite(String),
    Delete(String),
}

fn unix_second() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// What a writer did.
#[derive(Clone, Debug, Default)]
pub struct Written {
    /// Puts of keys that did not exist.
    pub new_keys: u64,
    /// Puts of keys that existed (a new version; a deleted key comes back).
    pub overwrites: u64,
    /// Deletes (a delete marker on a versioned bucket).
    pub deletes: u64,
    /// Writes the server refused.
    pub errors: u64,
    /// Every key written.
    pub keys: BTreeSet<String>,
    /// How long it wrote.
    pub elapsed: Duration,
}

impl Written {
    /// Writes that succeeded.
    pub fn writes(&self) -> u64 {
        self.new_keys + self.overwrites + self.deletes
    }

    /// Writes per second reached.
    pub fn rate(&self) -> f64 {
        self.writes() as f64 / self.elapsed.as_secs_f64().max(0.001)
    }
}
