//! s3::bandwidth: the byte rate of streamed bodies (`--max-bandwidth`, `--bandwidth-schedule`).
//!
//! Rates and timetables read as rclone's `--bwlimit` reads them ([`parse_rate`],
//! [`Schedule::parse`]), and [`Bandwidth`]: one token bucket per direction, shared by every
//! request of a run. The clients take from it where body bytes cross this machine's link:
//! `Down` for GET bodies, `Up` for the whole body of a `PutObject` or `UploadPart`: it waits
//! for its turn (the bodies ahead of it paid), then goes at the link's speed, and the next
//! body's turn comes once the rate has paid it (a body is in memory already, under the
//! memory budget: waiting holds nothing new). Over any span, a direction carries at most the
//! rate's bytes and one body more.
//! A GET takes a [`Place`] in line for its bytes (a range before it is sent, a whole object
//! once its length is known) and reads its body chunk by chunk as the rate pays them (the
//! server is slowed by TCP's own flow control; nothing more is held than the chunk read).
//! Server-side copies move no bytes through this machine and take nothing.
//!
//! The bucket lends: a request takes its bytes at once (its place in line) and waits until
//! the rate has paid them, so a body larger than a second's worth is never refused, and
//! requests are served in the order they came, each at the whole rate in turn (bodies
//! sharing the rate would all be complete late: a part would wait longer for its upload).
//! The rate is read from the timetable each time the bucket is refilled, segment by
//! segment, and waits end at the timetable's next switch to read the new rate: a schedule
//! takes effect while the run goes on. The bucket starts empty and holds at most [`BURST`]
//! of the rate's bytes after an idle spell, and pays at most that much ahead of the bytes
//! really read or sent: a body that stalls holds back the bodies after it (no catch-up
//! burst). A request that fails leaves its place: the line moves past its unread bytes at
//! the rate (a short lull, no excess).
//! A process may take only a share of the timetable's rates ([`Bandwidth::set_share`]: its
//! part of a job-wide limit shared by several processes); the share may change at any time.
//!
//! May call: nothing else of the crate (tokio's clock, the C library's local time).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// Nanoseconds in a day (the timetable's period).
const DAY_NS: u64 = 86_400 * NS;
const NS: u64 = 1_000_000_000;

/// What the bucket holds at most after an idle spell: this long at the rate in force.
pub const BURST: Duration = Duration::from_millis(100);

/// The longest single nap of a waiting request: it then reads the clock and the timetable
/// again (a wall clock moved by hand or by daylight saving is caught within this).
const LONGEST_NAP: Duration = Duration::from_secs(1);

/// Which way bytes cross this machine's link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Sent: PutObject and UploadPart bodies.
    Up,
    /// Received: GetObject bodies.
    Down,
}

/// A limit per direction, in bytes per second (`None`: no limit that way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Rate {
    /// Bytes sent per second at most.
    pub up: Option<u64>,
    /// Bytes received per second at most.
    pub down: Option<u64>,
}

impl Rate {
    /// No limit either way.
    pub const OFF: Rate = Rate {
        up: None,
        down: None,
    };

    /// The limit of one direction.
    pub fn of(self, d: Direction) -> Option<u64> {
        match d {
            Direction::Up => self.up,
            Direction::Down => self.down,
        }
        .filter(|r| *r > 0)
    }
}

/// One rate as rclone prints it back: `20Mi`, `512Ki`, `1000B`, `off`.
fn show_one(r: Option<u64>) -> String {
    let Some(n) = r else {
        return "off".into();
    };
    for (unit, m) in [
        ("Ti", 1u64 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ] {
        if n >= m && n.is_multiple_of(m) {
            return format!("{}{unit}", n / m);
        }
    }
    format!("{n}B")
}

impl fmt::Display for Rate {
    /// `off`, `20Mi` (both ways), or `UP:DOWN` (`10Mi:off`), bytes per second.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.up == self.down {
            f.write_str(&show_one(self.up))
        } else {
            write!(f, "{}:{}", show_one(self.up), show_one(self.down))
        }
    }
}

/// Parses a rate as rclone's `--bwlimit`: bytes per second, a number with an optional
/// binary suffix (`B` bytes, `K`/`Ki`/`KiB` = 1024, `M` = 1024², `G`, `T`; no suffix means
/// KiB, as in rclone), `off` or `0` for no limit; one value limits each direction, `UP:DOWN`
/// gives two (`10M:off`).
///
/// ```
/// use s3_backfill::s3::bandwidth::{parse_rate, Rate};
/// assert_eq!(parse_rate("20M"), Ok(Rate { up: Some(20 << 20), down: Some(20 << 20) }));
/// assert_eq!(parse_rate("512k:off"), Ok(Rate { up: Some(512 << 10), down: None }));
/// assert!(parse_rate("fast").is_err());
/// ```
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let t = s.trim();
    let (up, down) = match t.split_once(':') {
        Some((u, d)) => (one_rate(u, s)?, one_rate(d, s)?),
        None => {
            let r = one_rate(t, s)?;
            (r, r)
        }
    };
    Ok(Rate { up, down })
}

/// One side of a rate (see [`parse_rate`]); `whole` is the value given, for the message.
fn one_rate(t: &str, whole: &str) -> Result<Option<u64>, String> {
    let bad = || {
        format!(
            "{whole:?} is not a rate (bytes per second as rclone's --bwlimit: 20M, 512k, 1G, a bare number is KiB; UP:DOWN for two; off)"
        )
    };
    let t = t.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.strip_suffix("/s").unwrap_or(&unit);
    let mult: u64 = match unit {
        "" => 1 << 10,
        "b" => 1,
        "k" | "ki" | "kib" | "kb" => 1 << 10,
        "m" | "mi" | "mib" | "mb" => 1 << 20,
        "g" | "gi" | "gib" | "gb" => 1 << 30,
        "t" | "ti" | "tib" | "tb" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{whole:?} is too large a rate"));
    }
    let bytes = bytes.round() as u64;
    Ok((bytes > 0).then_some(bytes))
}

/// A timetable of rates by local time of day: the entry in force is the last one at or
/// before the time of day, or the day's last entry before the first one (it wraps around
/// midnight). One entry is a constant rate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// (seconds after midnight, rate), sorted, at least one, times distinct.
    slots: Vec<(u32, Rate)>,
}

impl Schedule {
    /// The same rate at all times (`--max-bandwidth`).
    pub fn constant(rate: Rate) -> Schedule {
        Schedule {
            slots: vec![(0, rate)],
        }
    }

    /// Parses a timetable as rclone's `--bwlimit`: entries `HH:MM,RATE` separated by spaces
    /// or semicolons (`"08:00,10M 12:00,off 13:00,10M 18:00,off"`), each rate as
    /// [`parse_rate`] reads it (`UP:DOWN` too).
    ///
    /// ```
    /// use s3_backfill::s3::bandwidth::{Schedule, Rate};
    /// let s = Schedule::parse("08:00,10M 18:00,off").unwrap();
    /// assert_eq!(s.rate_at(9 * 3600), Rate { up: Some(10 << 20), down: Some(10 << 20) });
    /// assert_eq!(s.rate_at(3 * 3600), Rate::OFF); // before 08:00: yesterday's 18:00 entry
    /// ```
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let mut slots: Vec<(u32, Rate)> = Vec::new();
        for entry in s.split([' ', ';', '\t']).filter(|e| !e.is_empty()) {
            let (at, rate) = entry.split_once(',').ok_or_else(|| {
                format!(
                    "{entry:?} in {s:?} is not an entry HH:MM,RATE (e.g. \"08:00,10M 18:00,off\")"
                )
            })?;
            if at.contains('-') {
                return Err(format!(
                    "{entry:?}: weekday entries (Mon-08:00) are not supported, only times of day HH:MM"
                ));
            }
            let at = time_of_day(at).ok_or_else(|| {
                format!("{at:?} in {s:?} is not a time of day HH:MM (00:00 to 23:59)")
            })?;
            if slots.iter().any(|(t, _)| *t == at) {
                return Err(format!("{s:?} names {} twice", show_time(at)));
            }
            slots.push((at, parse_rate(rate)?));
        }
        if slots.is_empty() {
            return Err(format!(
                "{s:?} has no entry (a timetable is HH:MM,RATE entries: \"08:00,10M 18:00,off\")"
            ));
        }
        slots.sort_by_key(|(t, _)| *t);
        Ok(Schedule { slots })
    }

    /// The rate in force at `secs` seconds after local midnight.
    pub fn rate_at(&self, secs: u32) -> Rate {
        self.rate_at_ns(secs as u64 * NS)
    }

    /// Whether no entry limits anything (no limiter is needed).
    pub fn is_off(&self) -> bool {
        self.slots.iter().all(|(_, r)| *r == Rate::OFF)
    }

    /// The entries, (seconds after midnight, rate), in order of time.
    pub fn entries(&self) -> &[(u32, Rate)] {
        &self.slots
    }

    fn rate_at_ns(&self, tod: u64) -> Rate {
        self.slots
            .iter()
            .rev()
            .find(|(t, _)| *t as u64 * NS <= tod)
            .or(self.slots.last())
            .map(|(_, r)| *r)
            .unwrap_or(Rate::OFF)
    }

    /// Nanoseconds from `tod` (after midnight) to the next entry's time (strictly after,
    /// wrapping around midnight); None for a constant rate.
    fn until_switch_ns(&self, tod: u64) -> Option<u64> {
        if self.slots.len() < 2 {
            return None;
        }
        let next = self
            .slots
            .iter()
            .map(|(t, _)| *t as u64 * NS)
            .find(|t| *t > tod)
            .unwrap_or(self.slots[0].0 as u64 * NS + DAY_NS);
        Some(next - tod)
    }
}

impl fmt::Display for Schedule {
    /// `08:00,10Mi 18:00,off`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = self
            .slots
            .iter()
            .map(|(t, r)| format!("{},{r}", show_time(*t)))
            .collect();
        f.write_str(&entries.join(" "))
    }
}

/// `HH:MM` as seconds after midnight.
fn time_of_day(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let ok = |p: &str| p.len() == 2 && p.bytes().all(|b| b.is_ascii_digit());
    if !ok(h) || !ok(m) {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 3600 + m * 60)
}

fn show_time(secs: u32) -> String {
    format!("{:02}:{:02}", secs / 3600, secs / 60 % 60)
}

/// Where the time of day comes from.
#[derive(Debug)]
enum Clock {
    /// This machine's local time (the C library's, with its time zone and daylight saving).
    Local,
    /// A day that starts at `tod` nanoseconds after midnight at `at`, and runs with tokio's
    /// clock (tests, with the clock paused).
    Fixed { at: Instant, tod: u64 },
}

impl Clock {
    /// Nanoseconds after midnight at `now` (tokio's clock).
    fn time_of_day(&self, now: Instant) -> u64 {
        match self {
            Clock::Local => local_time_of_day(),
            Clock::Fixed { at, tod } => {
                (tod + now.saturating_duration_since(*at).as_nanos() as u64) % DAY_NS
            }
        }
    }
}

/// Nanoseconds since local midnight, by the C library's `localtime_r` (the `time` crate
/// refuses the local offset in a program with several threads).
fn local_time_of_day() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs() as libc::time_t;
    // SAFETY: `localtime_r` writes only into `tm`, which lives for the call; a null return
    // (an unrepresentable time) is checked. It reads the time zone, which this program never
    // changes while running.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = !unsafe { libc::localtime_r(&secs, &mut tm) }.is_null();
    let day_secs = if ok {
        (tm.tm_hour as u64 * 3600 + tm.tm_min as u64 * 60 + tm.tm_sec.min(59) as u64) % 86_400
    } else {
        since.as_secs() % 86_400
    };
    day_secs * NS + since.subsec_nanos() as u64
}

/// One direction's bucket, in nanobytes (bytes × 10⁹: a rate in bytes per second credits
/// whole nanobytes per nanosecond, so no rounding piles up).
#[derive(Debug)]
struct Level {
    /// Bytes taken so far (each request's place in line is a span of them, in order).
    taken: u128,
    /// Bytes read or sent so far (places count their bytes as they go; see [`Place`]).
    used: u128,
    /// Bytes the rate has paid so far: at most [`BURST`]'s worth above `used`, so a body
    /// that stalls (a slow server) holds the line back instead of the bodies after it
    /// catching up at the link's speed once it goes on.
    paid: u128,
    /// When `paid` was last brought up to date.
    at: Instant,
}

/// The shared limiter of a run: one bucket per direction, the rates read from a timetable.
#[derive(Debug)]
pub struct Bandwidth {
    schedule: Schedule,
    clock: Clock,
    /// The fraction of the timetable's rates this process takes (an f64's bits; 1 unless
    /// set).
    share: AtomicU64,
    up: Mutex<Level>,
    down: Mutex<Level>,
}

impl Bandwidth {
    /// A limiter following `schedule` by this machine's local time.
    pub fn new(schedule: Schedule) -> Bandwidth {
        Bandwidth::with_clock(schedule, Clock::Local)
    }

    /// A limiter whose day starts `secs` after midnight now and runs with tokio's clock
    /// (for tests with the clock paused).
    pub fn starting_at(schedule: Schedule, secs: u32) -> Bandwidth {
        let clock = Clock::Fixed {
            at: Instant::now(),
            tod: (secs as u64 % 86_400) * NS,
        };
        Bandwidth::with_clock(schedule, clock)
    }

    fn with_clock(schedule: Schedule, clock: Clock) -> Bandwidth {
        let level = || {
            Mutex::new(Level {
                taken: 0,
                used: 0,
                paid: 0,
                at: Instant::now(),
            })
        };
        Bandwidth {
            schedule,
            clock,
            share: AtomicU64::new(1f64.to_bits()),
            up: level(),
            down: level(),
        }
    }

    /// The timetable followed.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// Takes `share` of the timetable's rates from now on (clamped to 0.001..=1; 1 unless
    /// set): this process's part of a limit shared with others. What was earned up to now
    /// is paid at the share in force until now.
    pub fn set_share(&self, share: f64) {
        let share = if share.is_finite() {
            share.clamp(0.001, 1.0)
        } else {
            1.0
        };
        let now = Instant::now();
        let (mut up, mut down) = (
            self.up.lock().expect("bandwidth lock"),
            self.down.lock().expect("bandwidth lock"),
        );
        self.refill(&mut up, Direction::Up, now);
        self.refill(&mut down, Direction::Down, now);
        self.share.store(share.to_bits(), Ordering::Relaxed);
    }

    /// The fraction of the timetable's rates taken (see [`Bandwidth::set_share`]).
    pub fn share(&self) -> f64 {
        f64::from_bits(self.share.load(Ordering::Relaxed))
    }

    /// Direction `d`'s rate in force at `tod`, at this process's share (None: not limited).
    fn rate_of(&self, tod: u64, d: Direction) -> Option<u64> {
        let rate = self.schedule.rate_at_ns(tod).of(d)?;
        Some(((rate as f64 * self.share()).round() as u64).max(1))
    }

    /// Takes `bytes` of direction `d`: returns once the rate in force has paid them (at
    /// once when that direction is not limited), with the time it waited.
    pub async fn take(&self, d: Direction, bytes: u64) -> Duration {
        if bytes == 0 {
            return Duration::ZERO;
        }
        let end = {
            let mut l = self.level(d).lock().expect("bandwidth lock");
            self.refill(&mut l, d, Instant::now());
            l.taken += bytes as u128 * NS as u128;
            l.used += bytes as u128 * NS as u128;
            l.taken
        };
        self.until_paid(d, end).await
    }

    /// A place in line for `bytes` of direction `d`, taken now: the bytes of a body read
    /// little by little (see [`Place`]). Requests are served in the order they took their
    /// places, so one body goes at the whole rate, not every body in flight at a share of it.
    pub fn place(self: &Arc<Self>, d: Direction, bytes: u64) -> Place {
        let mut l = self.level(d).lock().expect("bandwidth lock");
        // Paid up to now first: what an idle spell earned is capped before these bytes join
        // the line.
        self.refill(&mut l, d, Instant::now());
        let start = l.taken;
        l.taken += bytes as u128 * NS as u128;
        Place {
            bw: self.clone(),
            d,
            start,
            bytes,
            counted: 0,
        }
    }

    fn level(&self, d: Direction) -> &Mutex<Level> {
        match d {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
        }
    }

    /// Waits until the line is paid up to `mine`; returns the time waited.
    async fn until_paid(&self, d: Direction, mine: u128) -> Duration {
        let start = Instant::now();
        loop {
            let nap = {
                let mut l = self.level(d).lock().expect("bandwidth lock");
                // Read under the lock: `l.at` only moves forward.
                self.nap(&mut l, d, Instant::now(), mine)
            };
            match nap {
                None => return start.elapsed(),
                Some(n) => tokio::time::sleep(n).await,
            }
        }
    }

    /// Brings `l` up to `now` and says how long the request whose bytes end at `mine` must
    /// still wait (None: it may go).
    fn nap(&self, l: &mut Level, d: Direction, now: Instant, mine: u128) -> Option<Duration> {
        let tod_now = self.refill(l, d, now);
        let rate = match self.rate_of(tod_now, d) {
            None => {
                l.paid = l.paid.max(l.taken);
                return None;
            }
            Some(r) => r,
        };
        if l.paid >= mine {
            return None;
        }
        let owed_ns = (mine - l.paid).div_ceil(rate as u128);
        let mut nap = Duration::from_nanos(owed_ns.min(u64::MAX as u128) as u64);
        if let Some(s) = self.schedule.until_switch_ns(tod_now) {
            nap = nap.min(Duration::from_nanos(s));
        }
        Some(nap.min(LONGEST_NAP).max(Duration::from_nanos(1)))
    }

    /// Pays `l` what the timetable's rates earned from its last update to `now`; returns
    /// the time of day at `now`.
    fn refill(&self, l: &mut Level, d: Direction, now: Instant) -> u64 {
        // A constant rate needs no time of day (and no call for the local time).
        let tod_now = match self.schedule.slots.len() {
            1 => 0,
            _ => self.clock.time_of_day(now),
        };
        // From `l.at` to `now` (a day at most: the bucket is full long before), segment by
        // segment of the timetable, each at its own rate.
        let day = Duration::from_nanos(DAY_NS);
        let mut from = match now.saturating_duration_since(l.at) > day {
            true => now - day,
            false => l.at,
        };
        while from < now {
            let span = (now - from).as_nanos() as u64;
            let tod = (tod_now + DAY_NS - span % DAY_NS) % DAY_NS;
            let span = self
                .schedule
                .until_switch_ns(tod)
                .map_or(span, |s| s.min(span));
            match self.rate_of(tod, d) {
                // Not limited: whatever was taken is paid.
                None => l.paid = l.paid.max(l.taken),
                Some(rate) => {
                    let burst = rate as u128 * BURST.as_nanos();
                    l.paid = (l.paid + rate as u128 * span as u128).min(l.used + burst);
                }
            }
            from += Duration::from_nanos(span);
        }
        l.at = l.at.max(now);
        tod_now
    }
}

/// A body's place in one direction's line (see [`Bandwidth::place`]). Its bytes count as
/// used as they are waited for, and all of them once it is dropped (a failed request's
/// unread bytes: the line moves past them at the rate).
#[derive(Debug)]
pub struct Place {
    bw: Arc<Bandwidth>,
    d: Direction,
    /// Where its bytes start in the line (nanobytes).
    start: u128,
    /// How many bytes it holds.
    bytes: u64,
    /// How many of them were counted as used.
    counted: u64,
}

impl Place {
    /// The bytes this place holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Counts the first `done` bytes of this place as read or sent (at most its own bytes),
    /// then waits until the rate has paid them (0: until its turn comes); returns the time
    /// waited.
    pub async fn wait(&mut self, done: u64) -> Duration {
        let done = done.min(self.bytes);
        self.count(done);
        let upto = self.start + done as u128 * NS as u128;
        self.bw.until_paid(self.d, upto).await
    }

    fn count(&mut self, done: u64) {
        if done > self.counted {
            let mut l = self.bw.level(self.d).lock().expect("bandwidth lock");
            // Paid up to now first, under the cap before these bytes.
            self.bw.refill(&mut l, self.d, Instant::now());
            l.used += (done - self.counted) as u128 * NS as u128;
            self.counted = done;
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.count(self.bytes);
    }
}

#[cfg(test)]
mod tests;
