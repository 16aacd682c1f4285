//! The engine benches' corpus and measures, shared by `benches/engine.rs` and
//! `benches/many_machines.rs`: the keys and versions seeded into the in-process S3 server
//! (`tests/support/mem_s3.rs`, declared as `mod mem_s3` by each bench), the machine's CPU
//! model, this process's own CPU time, and the environment of the `s3-backfill` children.

use bytes::Bytes;
use std::process::Command;
use std::time::Duration;

use crate::mem_s3::{MemS3, Seed};

pub const KEY_LEN: usize = 40;

/// A 40-byte key for key number `i`.
pub fn key(i: usize) -> String {
    let k = format!("data/{:08x}/{i:026}", splitmix(i as u64) as u32);
    debug_assert_eq!(k.len(), KEY_LEN);
    k
}

pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// What seeding put in the source.
pub struct Seeded {
    pub keys: usize,
    pub markers: usize,
}

/// Seeds exactly `n` entries into `bucket`: 1-3 versions per key, a delete marker on top of
/// every tenth.
pub fn seed(mem: &MemS3, bucket: &str, n: usize) -> Seeded {
    let (mut left, mut keys, mut markers) = (n, 0usize, 0usize);
    while left > 0 {
        let i = keys;
        let versions = 1 + (splitmix(i as u64 ^ 0xABCD) % 3) as usize;
        let mut history: Vec<Seed> = (0..versions)
            .map(|v| Seed::Put(Bytes::from(format!("v{v} of {i}"))))
            .collect();
        if i % 10 == 9 {
            history.push(Seed::DeleteMarker);
        }
        history.truncate(left);
        markers += history
            .iter()
            .filter(|s| matches!(s, Seed::DeleteMarker))
            .count();
        left -= history.len();
        mem.seed(bucket, &key(i), history);
        keys += 1;
    }
    Seeded { keys, markers }
}

/// The CPU's model name from `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// CPU time used so far by this process (the in-process server and the bench).
pub fn own_cpu() -> Duration {
    // SAFETY: plain FFI call filling a zeroed struct on the stack.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if r != 0 {
        return Duration::ZERO;
    }
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

pub fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// The environment of a child `s3-backfill`: the in-process server's credentials and region,
/// nothing from the host's AWS profile or instance metadata.
pub fn bench_env(cmd: &mut Command) -> &mut Command {
    cmd.env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench-secret")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
}
