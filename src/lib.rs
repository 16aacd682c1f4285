//! s3-backfill: batch replication and backfill of every S3 object version.
//!
//! The pipeline, one module per stage: [`cli`] (arguments validated into settings) →
//! [`config`] (the job's settings) → [`lister`] (ListObjectVersions into the manifest) →
//! [`manifest`] (the SQLite job file, the only SQL) → [`copier`] (scheduler, reconciliation,
//! copy strategies) → [`report`] / [`verify`]. [`s3`] is the S3 access layer (the client
//! trait, error classification, the one retry loop); [`ui`] is what a person sees; [`job`]
//! wires the stages into commands. S3 Batch Replication's own inputs and outputs: [`rules`]
//! (replication configurations) and [`filters`] (manifest filters), applied per listed
//! version by [`select`]; [`inputs`] reads supplied manifests (CSV, S3 Inventory), which
//! `lister::supplied` plans from (`plan --from-csv`, `--from-inventory`), and [`aws_report`]
//! writes the completion report in AWS's shape for `report --format aws`.
//! [`events`] is what `plan`, `run` and `replicate` write to stderr: text for a person or
//! JSON lines for a machine (`--log-format`), with the periodic progress line and its ETA.
//! [`estimate`] counts the requests and dollars a run will cost before it runs; [`pricing`]
//! holds the price tables and server profiles it and `--max-cost` use.
//! [`follow`] is where `follow` hears of changes (SQS, an HTTP push endpoint; S3 event records).
//! [`metrics`] is the `--metrics` endpoint of `run`, `replicate` and `follow` (OpenMetrics
//! text read from the manifest at each scrape, with the run's live request counters).
//!
//! Imports point down, from the top: `main`; [`job`]; [`cli`] and [`ui`]; the stages
//! ([`copier`], [`lister`], [`verify`], [`report`], [`estimate`], [`metrics`]); [`events`];
//! [`manifest`] and [`select`]; [`config`]; [`inputs`], [`filters`], [`aws_report`], [`rules`]
//! and [`pricing`]; and [`s3`], which calls nothing of the crate (its retry loop tells an
//! observer that `events` sets). No two modules import each other, directly or around a
//! circle. One arrow still runs up without closing a circle: `estimate` reads
//! `cli::EstimateArgs` (its flags).

#![warn(missing_docs)]
// Every line on stderr goes through `events` (`say!`), so that `--log-format json` holds.
#![warn(clippy::print_stderr)]

pub mod aws_report;
pub mod cli;
pub mod config;
pub mod copier;
pub mod estimate;
pub mod events;
pub mod filters;
pub mod follow;
pub mod inputs;
pub mod job;
pub mod lister;
pub mod manifest;
pub mod metrics;
pub mod pricing;
pub mod report;
pub mod rules;
pub mod s3;
pub mod select;
pub mod ui;
pub mod verify;
