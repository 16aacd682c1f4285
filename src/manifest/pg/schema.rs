//! manifest::pg::schema: a job's tables in PostgreSQL. Each job has a schema of its own
//! (`s3b_<job>`), so its tables are SQLite's, by the same names, plus what sharing needs:
//! units of work (`units`) with their leases, and the processes that work on the job
//! (`workers`). Columns keep SQLite's codes (states, flags, methods, classes, sides) and its
//! task ids (key id << 24 | sequence), so decoding is shared; values SQLite stores compactly
//! (ETags, timestamps, storage classes) are stored as their text. Every text compared by key
//! order uses the "C" collation: S3 lists keys in byte order.
//!
//! May call: `manifest::codec` (constants).

/// The tables of one job (inside its schema). `{CLASS_ARCHIVED}` etc. are filled in by
/// [`tables`].
const TABLES: &str = r#"
CREATE TABLE job (
    id INT PRIMARY KEY CHECK (id = 1),
    settings TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE destinations (
    id BIGINT PRIMARY KEY,
    bucket TEXT NOT NULL,
    prefix TEXT NOT NULL DEFAULT '',
    options TEXT
);
-- Listing parts: a part is also a unit of listing work, leased like `units`.
CREATE TABLE partitions (
    id BIGINT PRIMARY KEY,
    start_key TEXT COLLATE "C",
    end_key TEXT COLLATE "C",
    key_marker TEXT COLLATE "C",
    version_marker TEXT,
    complete BOOLEAN NOT NULL DEFAULT false,
    pages BIGINT NOT NULL DEFAULT 0,
    entries BIGINT NOT NULL DEFAULT 0,
    last_key TEXT COLLATE "C",
    last_key_seen BIGINT NOT NULL DEFAULT 0,
    lease BIGINT,
    lease_expires BIGINT,
    worker BIGINT
);
CREATE TABLE refreshes (
    generation BIGINT PRIMARY KEY,
    started_at BIGINT,
    tasks BIGINT NOT NULL DEFAULT 0
);
-- Every source key once. Ids come from `key_ids`; a key's tasks are one id range.
CREATE SEQUENCE key_ids;
CREATE TABLE keys (
    id BIGINT PRIMARY KEY,
    key TEXT COLLATE "C" NOT NULL UNIQUE,
    unit BIGINT NOT NULL,
    tasks BIGINT NOT NULL DEFAULT 0
);
-- Units of work: whole keys, about a listed page of versions each. state: 0 open (to be
-- claimed), 1 leased, 2 done (nothing open), 3 held back (a failed task blocks the rest;
-- reopened by --retry-failed or --skip-failed). `lease` is the epoch of the claim that
-- holds it (from `lease_epochs`); a result is written only under the unit's current epoch.
-- A run does not wait for an attempt's start to be committed: every task still open in a
-- unit claimed before (`claims` > 0) counts as in doubt, attempted since `first_claimed_at`
-- in the `modes` its owners wrote with (1 stamped, 2 unstamped), and is reconciled.
CREATE TABLE units (
    id BIGSERIAL PRIMARY KEY,
    partition BIGINT NOT NULL,
    last_key TEXT COLLATE "C" NOT NULL,
    tasks BIGINT NOT NULL DEFAULT 0,
    state SMALLINT NOT NULL DEFAULT 0,
    lease BIGINT,
    lease_expires BIGINT,
    worker BIGINT,
    claims BIGINT NOT NULL DEFAULT 0,
    first_claimed_at BIGINT,
    modes SMALLINT NOT NULL DEFAULT 0
);
CREATE INDEX units_open ON units (id) WHERE state IN (0, 1);
CREATE INDEX keys_unit ON keys (unit);
CREATE SEQUENCE lease_epochs;
CREATE TABLE task (
    id BIGINT PRIMARY KEY,
    unit BIGINT NOT NULL,
    dest BIGINT NOT NULL DEFAULT 0,
    refresh BIGINT NOT NULL DEFAULT 0,
    history_pos BIGINT NOT NULL,
    version_id TEXT NOT NULL,
    flags BIGINT NOT NULL DEFAULT 0,
    size BIGINT NOT NULL,
    etag TEXT,
    last_modified TEXT,
    storage_class TEXT,
    checksum_algorithm TEXT,
    state SMALLINT NOT NULL DEFAULT 0,
    attempts BIGINT NOT NULL DEFAULT 0,
    error_class SMALLINT,
    started_at BIGINT,
    dest_version_id TEXT,
    method SMALLINT
) WITH (fillfactor = 70);
CREATE INDEX task_unit ON task (unit);
CREATE INDEX task_problems ON task (state) WHERE state >= 3;
CREATE INDEX task_to_learn ON task (id) WHERE flags & 32 <> 0;
CREATE TABLE uploads (
    task BIGINT PRIMARY KEY,
    upload_id TEXT,
    part_size BIGINT,
    parts BIGINT
);
CREATE TABLE errors (
    task BIGINT PRIMARY KEY,
    code TEXT,
    http_status BIGINT,
    message TEXT,
    side SMALLINT,
    op TEXT
);
-- Counters in shards: each connection adds to the rows of its own shard (its backend pid
-- modulo {SHARDS}), so processes writing at once do not wait for each other's counter rows;
-- `counters` sums them (SQLite's table, as a view: readers are the same), and an UPDATE of
-- `counters` adds its change to the writer's shard.
CREATE TABLE counter_shards (
    state SMALLINT NOT NULL,
    shard SMALLINT NOT NULL,
    tasks BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    delete_markers BIGINT NOT NULL DEFAULT 0,
    attempts BIGINT NOT NULL DEFAULT 0,
    etag_preserved BIGINT NOT NULL DEFAULT 0,
    archived BIGINT NOT NULL DEFAULT 0,
    no_dest_version BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (state, shard)
);
CREATE VIEW counters AS SELECT state, sum(tasks)::bigint AS tasks, sum(bytes)::bigint AS bytes,
    sum(delete_markers)::bigint AS delete_markers, sum(attempts)::bigint AS attempts,
    sum(etag_preserved)::bigint AS etag_preserved, sum(archived)::bigint AS archived,
    sum(no_dest_version)::bigint AS no_dest_version
    FROM counter_shards GROUP BY state;
CREATE FUNCTION counters_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE counter_shards SET tasks = tasks + NEW.tasks - OLD.tasks,
        bytes = bytes + NEW.bytes - OLD.bytes,
        delete_markers = delete_markers + NEW.delete_markers - OLD.delete_markers,
        attempts = attempts + NEW.attempts - OLD.attempts,
        etag_preserved = etag_preserved + NEW.etag_preserved - OLD.etag_preserved,
        archived = archived + NEW.archived - OLD.archived,
        no_dest_version = no_dest_version + NEW.no_dest_version - OLD.no_dest_version
    WHERE state = OLD.state AND shard = pg_backend_pid() % {SHARDS};
    RETURN NEW;
END $$;
CREATE TRIGGER counters_update INSTEAD OF UPDATE ON counters
    FOR EACH ROW EXECUTE FUNCTION counters_changed();
CREATE TABLE totals (
    id INT PRIMARY KEY CHECK (id = 1),
    retries BIGINT NOT NULL DEFAULT 0,
    multi_task_keys BIGINT NOT NULL DEFAULT 0
);
-- Requests per operation, in shards as the counters (`requests` sums them).
CREATE TABLE request_shards (
    op TEXT NOT NULL,
    shard SMALLINT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (op, shard)
);
CREATE VIEW requests AS SELECT op, sum(count)::bigint AS count FROM request_shards GROUP BY op;
CREATE FUNCTION requests_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO request_shards (op, shard, count) VALUES (NEW.op, pg_backend_pid() % {SHARDS}, NEW.count)
    ON CONFLICT (op, shard) DO UPDATE SET count = request_shards.count + excluded.count;
    RETURN NEW;
END $$;
CREATE TRIGGER requests_insert INSTEAD OF INSERT ON requests
    FOR EACH ROW EXECUTE FUNCTION requests_added();
CREATE TABLE estimate_facts (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Processes working on the job: `status` shows the fleet from here.
CREATE TABLE workers (
    id BIGSERIAL PRIMARY KEY,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    command TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    stopped_at BIGINT,
    units BIGINT NOT NULL DEFAULT 0,
    tasks_done BIGINT NOT NULL DEFAULT 0,
    tasks_per_sec DOUBLE PRECISION NOT NULL DEFAULT 0,
    bytes_per_sec DOUBLE PRECISION NOT NULL DEFAULT 0
);
-- Counters kept as tasks change (inserted tasks are counted by the code that inserts): one
-- update of the writer's shard per statement (the rows it changed, summed by state), not one
-- per row.
CREATE FUNCTION tasks_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE counter_shards c SET tasks = c.tasks + d.n, bytes = c.bytes + d.b,
        delete_markers = c.delete_markers + d.dm, attempts = c.attempts + d.a,
        etag_preserved = c.etag_preserved + d.ep, archived = c.archived + d.ar,
        no_dest_version = c.no_dest_version + d.nd
    FROM (
        SELECT state, sum(n) AS n, sum(b) AS b, sum(dm) AS dm, sum(a) AS a, sum(ep) AS ep,
            sum(ar) AS ar, sum(nd) AS nd
        FROM (SELECT state, 1 AS n, size AS b, flags & 1 AS dm, attempts AS a,
                (flags & 24 = 24)::int AS ep,
                (error_class IS NOT DISTINCT FROM {ARCHIVED})::int AS ar,
                (dest_version_id IS NULL)::int AS nd
              FROM new_rows
              UNION ALL
              SELECT state, -1, -size, -(flags & 1), -attempts, -((flags & 24 = 24)::int),
                -((error_class IS NOT DISTINCT FROM {ARCHIVED})::int),
                -((dest_version_id IS NULL)::int)
              FROM old_rows) x
        GROUP BY state
    ) d
    WHERE c.state = d.state AND c.shard = pg_backend_pid() % {SHARDS}
      AND (d.n, d.b, d.dm, d.a, d.ep, d.ar, d.nd) <> (0, 0, 0, 0, 0, 0, 0);
    RETURN NULL;
END $$;
CREATE FUNCTION tasks_removed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE counter_shards c SET tasks = c.tasks - d.n, bytes = c.bytes - d.b,
        delete_markers = c.delete_markers - d.dm, attempts = c.attempts - d.a,
        etag_preserved = c.etag_preserved - d.ep, archived = c.archived - d.ar,
        no_dest_version = c.no_dest_version - d.nd
    FROM (
        SELECT state, count(*) AS n, sum(size) AS b, sum(flags & 1) AS dm,
            sum(attempts) AS a, sum((flags & 24 = 24)::int) AS ep,
            sum((error_class IS NOT DISTINCT FROM {ARCHIVED})::int) AS ar,
            sum((dest_version_id IS NULL)::int) AS nd
        FROM old_rows GROUP BY state
    ) d
    WHERE c.state = d.state AND c.shard = pg_backend_pid() % {SHARDS};
    RETURN NULL;
END $$;
CREATE TRIGGER task_changed AFTER UPDATE ON task
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tasks_changed();
CREATE TRIGGER task_removed AFTER DELETE ON task REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tasks_removed();
INSERT INTO partitions (id) VALUES (0);
INSERT INTO refreshes (generation, started_at, tasks) VALUES (0, NULL, 0);
INSERT INTO totals (id) VALUES (1);
INSERT INTO counter_shards (state, shard)
    SELECT s, h FROM generate_series(0, 4) s, generate_series(0, {SHARDS} - 1) h;
-- limits: job-wide --max-rps and --max-bandwidth (`pg::limits`). One row per process that
-- takes a share, renewed every second (`seen_at`: the database's clock, in seconds; a row
-- not renewed for a few seconds is not counted); `throttled`: the throttling answers it saw
-- so far; `rps`: the pace it last set itself; `want`: the requests per second it wants
-- (Infinity: as many as it gets). `rate_state`: the job's factor of --max-rps
-- (AIMD on throttling: halved at most once per cut period, grown back slowly), when it was
-- last cut and grown, and a revision for compare-and-set.
CREATE TABLE rate_shares (
    id BIGSERIAL PRIMARY KEY,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL,
    throttled BIGINT NOT NULL DEFAULT 0,
    rps DOUBLE PRECISION,
    want DOUBLE PRECISION NOT NULL DEFAULT 'Infinity'
);
CREATE TABLE rate_state (
    id INT PRIMARY KEY CHECK (id = 1),
    factor DOUBLE PRECISION NOT NULL,
    cut_at DOUBLE PRECISION NOT NULL,
    grown_at DOUBLE PRECISION NOT NULL,
    rev BIGINT NOT NULL
);
INSERT INTO rate_state (id, factor, cut_at, grown_at, rev) VALUES (1, 1, 0, 0, 0);
"#;

/// The tables of refreshes (later listing generations, `pg::plan`): SQLite's
/// `refresh_matched` and `refresh_outcome` as one row per refresh, the keys the refresh under
/// way listed, where each listing part stands in its last key, and the keys a refresh found
/// deleted at the source whose delete the job does not replicate. Created with the job, and
/// by the first refresh of a job made before they existed.
pub(super) const REFRESH_TABLES: &str = r#"
CREATE TABLE IF NOT EXISTS refresh_outcome (
    generation BIGINT PRIMARY KEY,
    tracks_deletions BOOLEAN NOT NULL,
    matched BIGINT NOT NULL DEFAULT 0,
    deleted BIGINT NOT NULL DEFAULT 0,
    not_deleted BIGINT NOT NULL DEFAULT 0,
    out_of_order BIGINT NOT NULL DEFAULT 0,
    finished BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS refresh_seen (key_id BIGINT PRIMARY KEY);
-- Per listing part: its last listed key, and per destination the highest place in that
-- key's history (smallest position) where the refresh met an entry an earlier listing planned.
CREATE TABLE IF NOT EXISTS refresh_open_key (
    partition BIGINT PRIMARY KEY,
    key TEXT COLLATE "C" NOT NULL,
    dests BIGINT[] NOT NULL,
    positions BIGINT[] NOT NULL
);
CREATE TABLE IF NOT EXISTS refresh_gone (
    generation BIGINT NOT NULL,
    key_id BIGINT NOT NULL,
    dest BIGINT NOT NULL,
    PRIMARY KEY (generation, key_id, dest)
);
"#;

/// Shards of the counters and request totals (see the tables).
pub(super) const COUNTER_SHARDS: i64 = 16;

/// The SQL that creates a job's tables (run inside the job's new schema).
pub(super) fn tables() -> String {
    let archived = super::super::codec::class_code(crate::s3::ErrorClass::Archived);
    let tables = TABLES
        .replace("{ARCHIVED}", &archived.to_string())
        .replace("{SHARDS}", &COUNTER_SHARDS.to_string());
    tables + REFRESH_TABLES
}

/// The schema (namespace) of job `job`, quoted for SQL.
pub(super) fn schema_of(job: &str) -> String {
    format!("\"s3b_{job}\"")
}
