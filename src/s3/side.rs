//! s3::side: how one side (source or destination) is reached: its endpoint, region,
//! profile, addressing and request checksums. The client's own configuration, stored with
//! the job (no secrets in here: credentials come from the standard AWS chain of each side).
//!
//! May call: nothing else of the crate.

use serde::{Deserialize, Serialize};

/// When the SDK computes request checksums (many S3-compatible servers reject the default
/// aws-chunked uploads with trailing checksums; `when-required` avoids them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChecksumCalculation {
    /// The SDK default: compute a checksum whenever the operation supports one.
    #[default]
    WhenSupported,
    /// Only when the operation requires one.
    WhenRequired,
}

/// How one side is reached. Stored in the manifest (no secrets in here).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideConfig {
    /// Custom endpoint URL (S3-compatible stores, local emulators).
    pub endpoint: Option<String>,
    /// Region; falls back to the profile's or the environment's, then `us-east-1`.
    pub region: Option<String>,
    /// AWS config profile name.
    pub profile: Option<String>,
    /// Path-style addressing.
    pub path_style: bool,
    /// Request checksum calculation.
    #[serde(default)]
    pub checksum_calculation: ChecksumCalculation,
}
