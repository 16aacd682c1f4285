//! manifest::pg::unsupported: what a PostgreSQL job does not do in this version, each
//! method answering one clear error ([`ManifestError::Unsupported`]) instead of doing it
//! partly: `follow` (its pending events, scoped refreshes and lag) and the per-bucket
//! counts of `--metrics`.
//!
//! May call: the types of `manifest`.

use super::PgManifest;
use crate::manifest::{
    BucketStateCount, FollowFacts, LagHistogram, LagStats, PendingChange, PendingKeys, RefreshKind,
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
pub(super) use unsupported;

unsupported! { "follow":
    fn start_following(&self) -> ();
    fn add_pending(&self, changes: &[PendingChange]) -> ();
    fn pending_keys(&self, limit: usize) -> PendingKeys;
    fn start_follow_refresh(&mut self, kind: RefreshKind, pending: &PendingKeys, source_versioned: bool) -> Option<i64>;
    fn follow_facts(&self) -> FollowFacts;
    fn follow_generations(&self) -> Vec<(i64, String, u64)>;
    fn lag_stats(&self, since_ms: Option<i64>) -> LagStats;
    fn lag_histogram(&self, bounds_secs: &[f64]) -> LagHistogram;
}

unsupported! { "per-bucket metrics":
    fn counts_by_bucket(&self) -> Vec<BucketStateCount>;
}
