//! manifest::pg::plan: what `plan` writes to a PostgreSQL job: listing parts and their
//! checkpoints, listed pages (tasks added once, replays ignored), and the units of work
//! each page makes (whole keys; a key's later versions join its unit).
//!
//! May call: `pg::schema`, `manifest::codec`, the types of `manifest`.

use super::unsupported::unsupported;
use super::PgManifest;
use crate::manifest::{ListedPage, Listing, NewTask, Partition, Refresh};

unsupported! { "plan (not built yet)":
    fn listing(&self) -> Listing;
    fn partitions(&self) -> Vec<Partition>;
    fn split_partitions(&mut self, starts: &[String]) -> bool;
    fn insert_page(&mut self, tasks: &[NewTask], checkpoint: &Listing) -> ();
    fn insert_partition_page(&mut self, partition: i64, tasks: &[NewTask], checkpoint: &Listing) -> ();
    fn insert_listed_page(&mut self, partition: i64, page: &ListedPage<'_>, checkpoint: &Listing) -> ();
    fn start_refresh(&mut self) -> Option<i64>;
    fn start_refresh_of(&mut self, source_versioned: bool) -> Option<i64>;
    fn refreshes(&self) -> Vec<Refresh>;
    fn deleted_at_source(&self, limit: usize) -> (u64, Vec<String>);
    fn count_key(&self, key: &str) -> u64;
    fn has_multi_version_key(&self) -> bool;
    fn store_estimate_fact(&self, name: &str, value: &str) -> ();
}
