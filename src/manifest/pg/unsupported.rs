//! manifest::pg::unsupported: what a PostgreSQL job does not do in this version: `follow`
//! (its pending events and scoped refreshes), each method answering one clear error
//! ([`ManifestError::Unsupported`]) instead of doing it partly. What `status` and
//! `--metrics` read of `follow` answers as for a job never followed (true: `follow` is
//! refused on PostgreSQL); the per-bucket counts of `--metrics` are here too.
//!
//! May call: the types of `manifest`.

use super::PgManifest;
use crate::manifest::{
    BucketStateCount, FollowFacts, LagHistogram, LagStats, ManifestError, PendingChange,
    PendingKeys, RefreshKind, Result, State,
};

/// Defines methods of [`PgManifest`] that answer [`ManifestError::Unsupported`].
macro_rules! unsupported {
    ($what:literal: $($f:tt)*) => {
        impl PgManifest {
            unsupported!(@fns $what; $($f)*);
        }
    };
    (@fns $what:literal; ) => {};
    (@fns $what:literal; fn $name:ident(&self $(, $a:ident : $t:ty)*) -> $r:ty; $($rest:tt)*) => {
        #[doc = concat!("Not supported on PostgreSQL (", $what, ").")]
        pub fn $name(&self $(, $a: $t)*) -> crate::manifest::Result<$r> {
            $( let _ = $a; )*
            Err(crate::manifest::ManifestError::Unsupported(self.path().to_string(), $what))
        }
        unsupported!(@fns $what; $($rest)*);
    };
    (@fns $what:literal; fn $name:ident(&mut self $(, $a:ident : $t:ty)*) -> $r:ty; $($rest:tt)*) => {
        #[doc = concat!("Not supported on PostgreSQL (", $what, ").")]
        pub fn $name(&mut self $(, $a: $t)*) -> crate::manifest::Result<$r> {
            $( let _ = $a; )*
            Err(crate::manifest::ManifestError::Unsupported(self.path().to_string(), $what))
        }
        unsupported!(@fns $what; $($rest)*);
    };
}

unsupported! { "follow":
    fn start_following(&self) -> ();
    fn add_pending(&self, changes: &[PendingChange]) -> ();
    fn pending_keys(&self, limit: usize) -> PendingKeys;
    fn start_follow_refresh(&mut self, kind: RefreshKind, pending: &PendingKeys, source_versioned: bool) -> Option<i64>;
}

impl PgManifest {
    /// A PostgreSQL job is never followed (`follow` is refused on it).
    pub fn follow_facts(&self) -> Result<FollowFacts> {
        Ok(FollowFacts::default())
    }

    /// No generation of `follow`'s (see [`PgManifest::follow_facts`]).
    pub fn follow_generations(&self) -> Result<Vec<(i64, String, u64)>> {
        Ok(Vec::new())
    }

    /// No lag recorded (see [`PgManifest::follow_facts`]).
    pub fn lag_stats(&self, since_ms: Option<i64>) -> Result<LagStats> {
        let _ = since_ms;
        Ok(LagStats::default())
    }

    /// No lag recorded (see [`PgManifest::follow_facts`]).
    pub fn lag_histogram(&self, bounds_secs: &[f64]) -> Result<LagHistogram> {
        Ok(LagHistogram {
            cumulative: vec![0; bounds_secs.len()],
            ..LagHistogram::default()
        })
    }

    /// Tasks and bytes by destination bucket and state, every state of every bucket present
    /// (zeros included), buckets in name order (a scan, as SQLite's with several buckets).
    pub fn counts_by_bucket(&self) -> Result<Vec<BucketStateCount>> {
        let rows: Vec<(String, i16, i64, i64)> = self.db.call(|c| {
            let buckets = c.query(
                "SELECT DISTINCT bucket FROM destinations ORDER BY bucket",
                &[],
            )?;
            let mut out: Vec<(String, i16, i64, i64)> = Vec::new();
            for b in &buckets {
                let b: String = b.get(0);
                for code in 0..5i16 {
                    out.push((b.clone(), code, 0, 0));
                }
            }
            for r in c.query(
                "SELECT d.bucket, t.state, count(*), coalesce(sum(t.size), 0)::bigint
                 FROM task t JOIN destinations d ON d.id = t.dest GROUP BY 1, 2",
                &[],
            )? {
                let (b, st): (String, i16) = (r.get(0), r.get(1));
                if let Some(row) = out.iter_mut().find(|o| o.0 == b && o.1 == st) {
                    row.2 += r.get::<_, i64>(2);
                    row.3 += r.get::<_, i64>(3);
                }
            }
            Ok(out)
        })?;
        rows.into_iter()
            .map(|(bucket, code, tasks, bytes)| {
                let state = State::of_code(i64::from(code)).ok_or_else(|| {
                    ManifestError::BadState(self.path().to_string(), format!("task state {code}"))
                })?;
                Ok(BucketStateCount {
                    bucket,
                    state,
                    tasks: tasks.max(0) as u64,
                    bytes: bytes.max(0) as u64,
                })
            })
            .collect()
    }
}
