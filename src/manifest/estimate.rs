//! manifest::estimate: what the cost estimate reads: every task, key by key (one scan,
//! streamed, each key's tasks oldest first), and the facts `plan` stores for it (the
//! server profile, the measured request latency, the buckets' probes, the price table), in
//! a table created when first written.
//!
//! May call: `read` (task rows), the types of `manifest`.

use std::collections::BTreeMap;

use rusqlite::params;

use super::codec::SEQ_BITS;
use super::read::{task_from_row, task_select};
use super::{Result, SqliteManifest, Task};

/// The facts table (name, value).
const FACTS_TABLE: &str = "estimate_facts";

impl SqliteManifest {
    /// Calls `f` with each key and all of its tasks, oldest first, in key-id order (the
    /// order the scheduler walks keys in), reading the tasks once.
    pub fn for_each_key(&self, mut f: impl FnMut(&str, &[Task])) -> Result<()> {
        let order =
            format!("ORDER BY t.id >> {SEQ_BITS}, t.refresh, t.history_pos DESC, t.dest, t.id");
        self.read_with(|conn| {
            let mut stmt = conn.prepare(&task_select("1", &order))?;
            let mut rows = stmt.query([])?;
            let mut key_id = None;
            let mut tasks: Vec<Task> = Vec::new();
            while let Some(r) = rows.next()? {
                let t = task_from_row(r)?;
                let id = t.id >> SEQ_BITS;
                if key_id != Some(id) && !tasks.is_empty() {
                    f(&tasks[0].entry.key.clone(), &tasks);
                    tasks.clear();
                }
                key_id = Some(id);
                tasks.push(t);
            }
            if !tasks.is_empty() {
                f(&tasks[0].entry.key.clone(), &tasks);
            }
            Ok(())
        })
    }

    /// Stores one fact for the estimate (replacing an earlier value).
    pub fn store_estimate_fact(&self, name: &str, value: &str) -> Result<()> {
        self.write_tx(|tx| {
            tx.execute_batch(&format!(
                "CREATE TABLE IF NOT EXISTS {FACTS_TABLE} (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
            ))?;
            tx.execute(
                &format!(
                    "INSERT INTO {FACTS_TABLE} (name, value) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET value = excluded.value"
                ),
                params![name, value],
            )?;
            Ok(())
        })
    }

    /// The facts stored for the estimate (none before a `plan` stored them).
    pub fn estimate_facts(&self) -> Result<BTreeMap<String, String>> {
        if !self.has_schema_object(FACTS_TABLE)? {
            return Ok(BTreeMap::new());
        }
        self.read_with(|conn| {
            let mut stmt = conn.prepare(&format!("SELECT name, value FROM {FACTS_TABLE}"))?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }
}
