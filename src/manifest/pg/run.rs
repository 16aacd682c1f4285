//! manifest::pg::run: a run on a PostgreSQL job: claims of leased units, the writer that
//! records results under its leases, the heartbeat.
//!
//! May call: `pg::schema`, `manifest::writer` (the queue), the types of `manifest`.

use super::PgManifest;
use crate::manifest::writer::spawn;
use crate::manifest::Writer;

/// Starts the run's writer on `m`.
pub(crate) fn start(m: PgManifest) -> Writer {
    spawn("manifest-pg-writer", move |shared| {
        let _ = m;
        shared.stop("runs on a PostgreSQL manifest are not built yet");
    })
}
