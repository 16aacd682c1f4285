//! The limiter's tests: parsing as rclone's `--bwlimit`, and the buckets on tokio's paused
//! clock (simulated time: exact and quick, no wall clock involved).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep, sleep_until, Instant};

use super::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn both(n: u64) -> Rate {
    Rate {
        up: Some(n),
        down: Some(n),
    }
}

fn hm(h: u32, m: u32) -> u32 {
    h * 3600 + m * 60
}

/// `d` within `tolerance` of `want` (the timer's millisecond ticks).
fn near(d: Duration, want: Duration) -> bool {
    let tolerance = Duration::from_millis(5);
    d + tolerance >= want && d <= want + tolerance
}

#[test]
fn rates_read_as_rclone_reads_them() {
    assert_eq!(parse_rate("20M"), Ok(both(20 * MIB)));
    assert_eq!(parse_rate("20MiB"), Ok(both(20 * MIB)));
    assert_eq!(parse_rate("20Mi"), Ok(both(20 * MIB)));
    assert_eq!(parse_rate("512k"), Ok(both(512 * KIB)));
    assert_eq!(parse_rate("1G"), Ok(both(1 << 30)));
    assert_eq!(parse_rate("1.5M"), Ok(both(3 * MIB / 2)));
    assert_eq!(parse_rate("100B"), Ok(both(100)));
    // A bare number is KiB per second, as in rclone.
    assert_eq!(parse_rate("666"), Ok(both(666 * KIB)));
    assert_eq!(parse_rate("off"), Ok(Rate::OFF));
    assert_eq!(parse_rate("0"), Ok(Rate::OFF));
    assert_eq!(
        parse_rate("10M:512k"),
        Ok(Rate {
            up: Some(10 * MIB),
            down: Some(512 * KIB)
        })
    );
    assert_eq!(
        parse_rate("off:1M"),
        Ok(Rate {
            up: None,
            down: Some(MIB)
        })
    );
    for bad in ["", "fast", "10X", "-1M", "10M:", "1:2:3", "M", "1e3M"] {
        let e = parse_rate(bad).unwrap_err();
        assert!(e.contains("not a rate"), "{bad:?}: {e}");
    }
    assert!(parse_rate("99999999999T")
        .unwrap_err()
        .contains("too large"));
}

#[test]
fn rates_print_back_as_they_read() {
    for s in ["20Mi", "512Ki", "off", "10Mi:off", "100B", "1Gi:2Mi"] {
        assert_eq!(parse_rate(s).unwrap().to_string(), s);
    }
}

#[test]
fn timetables_read_as_rclone_reads_them() {
    let s = Schedule::parse("18:00,off 08:00,10M;12:00,512k:1M").unwrap();
    assert_eq!(s.to_string(), "08:00,10Mi 12:00,512Ki:1Mi 18:00,off");
    assert_eq!(s.rate_at(hm(8, 0)), both(10 * MIB));
    assert_eq!(s.rate_at(hm(11, 59)), both(10 * MIB));
    assert_eq!(
        s.rate_at(hm(12, 0)),
        Rate {
            up: Some(512 * KIB),
            down: Some(MIB)
        }
    );
    assert_eq!(s.rate_at(hm(18, 0)), Rate::OFF);
    assert_eq!(s.rate_at(hm(23, 59)), Rate::OFF);
    // Before the day's first entry: the last one, from the day before.
    assert_eq!(s.rate_at(0), Rate::OFF);
    assert_eq!(s.rate_at(hm(7, 59)), Rate::OFF);
    assert!(!s.is_off());
    assert!(Schedule::parse("08:00,off 09:00,0").unwrap().is_off());
}

#[test]
fn bad_timetables_are_refused_with_the_entry_named() {
    for (bad, says) in [
        ("", "no entry"),
        ("10M", "not an entry"),
        ("08:00", "not an entry"),
        ("25:00,1M", "not a time of day"),
        ("08:60,1M", "not a time of day"),
        ("8:00,1M", "not a time of day"),
        ("0800,1M", "not a time of day"),
        ("08:00,fast", "not a rate"),
        ("08:00,1M 08:00,2M", "08:00 twice"),
        ("Mon-08:00,1M", "weekday"),
    ] {
        let e = Schedule::parse(bad).unwrap_err();
        assert!(e.contains(says), "{bad:?}: {e}");
    }
}

/// Takes `chunk` bytes of `d` over and over from `tasks` tasks until stopped, counting the
/// bytes that were let through.
fn hammer(bw: &Arc<Bandwidth>, d: Direction, tasks: usize, chunk: u64) -> Arc<AtomicU64> {
    let passed = Arc::new(AtomicU64::new(0));
    for i in 0..tasks {
        let (bw, passed) = (bw.clone(), passed.clone());
        // Chunks of varying sizes, as a GET body's frames are.
        let size = chunk / 2 + (i as u64 * 7919 % chunk);
        tokio::spawn(async move {
            loop {
                bw.take(d, size).await;
                passed.fetch_add(size, Ordering::SeqCst);
            }
        });
    }
    passed
}

#[tokio::test(start_paused = true)]
async fn the_rate_holds_over_a_simulated_half_minute() {
    let bw = Arc::new(Bandwidth::starting_at(
        Schedule::constant(parse_rate("20M").unwrap()),
        hm(12, 0),
    ));
    let chunk = 64 * KIB;
    let passed = hammer(&bw, Direction::Down, 16, chunk);
    let start = Instant::now();
    for s in [1u64, 10, 30] {
        sleep_until(start + Duration::from_secs(s)).await;
        let got = passed.load(Ordering::SeqCst);
        let want = 20 * MIB * s;
        // The bucket starts empty: never more than the rate paid; short by at most the
        // chunks in line at that instant.
        assert!(got <= want, "{s} s: {got} > {want}");
        assert!(got + 16 * chunk * 2 >= want, "{s} s: {got} < {want}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_body_larger_than_the_bucket_waits_its_turn() {
    let bw = Arc::new(Bandwidth::starting_at(
        Schedule::constant(parse_rate("1M").unwrap()),
        0,
    ));
    // Two 5 MiB parts at 1 MiB/s: the first paid after 5 s, the second after 10 s.
    let first = tokio::spawn({
        let bw = bw.clone();
        async move { bw.take(Direction::Up, 5 * MIB).await }
    });
    tokio::task::yield_now().await;
    let second = bw.take(Direction::Up, 5 * MIB).await;
    let first = first.await.unwrap();
    assert!(near(first, Duration::from_secs(5)), "{first:?}");
    assert!(near(second, Duration::from_secs(10)), "{second:?}");
}

#[tokio::test(start_paused = true)]
async fn each_direction_has_its_own_bucket() {
    let bw = Arc::new(Bandwidth::starting_at(
        Schedule::constant(parse_rate("1M:2M").unwrap()),
        0,
    ));
    let up = tokio::spawn({
        let bw = bw.clone();
        async move { bw.take(Direction::Up, 4 * MIB).await }
    });
    let down = bw.take(Direction::Down, 4 * MIB).await;
    assert!(near(down, Duration::from_secs(2)), "{down:?}");
    let up = up.await.unwrap();
    assert!(near(up, Duration::from_secs(4)), "{up:?}");
}

#[tokio::test(start_paused = true)]
async fn off_never_waits() {
    let bw = Bandwidth::starting_at(Schedule::constant(parse_rate("off").unwrap()), 0);
    for _ in 0..3 {
        assert_eq!(bw.take(Direction::Up, 1 << 40).await, Duration::ZERO);
        assert_eq!(bw.take(Direction::Down, 1 << 40).await, Duration::ZERO);
    }
    // One direction off, the other limited.
    let bw = Bandwidth::starting_at(Schedule::constant(parse_rate("off:1M").unwrap()), 0);
    assert_eq!(bw.take(Direction::Up, 1 << 40).await, Duration::ZERO);
    let down = bw.take(Direction::Down, 3 * MIB).await;
    assert!(near(down, Duration::from_secs(3)), "{down:?}");
}

#[tokio::test(start_paused = true)]
async fn an_idle_bucket_lends_a_tenth_of_a_second_at_most() {
    let bw = Bandwidth::starting_at(Schedule::constant(parse_rate("1M").unwrap()), 0);
    sleep(Duration::from_secs(60)).await;
    // 100 ms of the rate were kept, not 60 s.
    let waited = bw.take(Direction::Up, MIB).await;
    assert!(near(waited, Duration::from_millis(900)), "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn the_schedule_switches_at_its_times() {
    // From 07:59: off (the 08:02 entry, from the day before), then 1 MiB/s from 08:00,
    // 4 MiB/s from 08:01, off again from 08:02.
    let schedule = Schedule::parse("08:00,1M 08:01,4M 08:02,off").unwrap();
    let bw = Arc::new(Bandwidth::starting_at(schedule, hm(7, 59)));
    let start = Instant::now();
    assert_eq!(bw.take(Direction::Down, 1 << 30).await, Duration::ZERO);
    sleep_until(start + Duration::from_secs(60)).await;
    let chunk = 64 * KIB;
    let passed = hammer(&bw, Direction::Down, 4, chunk);
    let slack = 4 * chunk * 2;
    sleep_until(start + Duration::from_secs(120)).await;
    let at_0801 = passed.load(Ordering::SeqCst);
    assert!(
        at_0801 <= 60 * MIB && at_0801 + slack >= 60 * MIB,
        "{at_0801}"
    );
    sleep_until(start + Duration::from_secs(150)).await;
    let at_080130 = passed.load(Ordering::SeqCst);
    let want = 60 * MIB + 30 * 4 * MIB;
    assert!(
        at_080130 <= want && at_080130 + slack >= want,
        "{at_080130}"
    );
    // From 08:02 nothing waits.
    sleep_until(start + Duration::from_secs(180)).await;
    assert_eq!(bw.take(Direction::Down, 1 << 30).await, Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_switch_to_off_lets_waiting_bodies_go_at_once() {
    let schedule = Schedule::parse("08:00,1M 08:01,off").unwrap();
    let bw = Bandwidth::starting_at(schedule, hm(8, 0));
    // 100 MiB at 1 MiB/s would take 100 s; the limit ends after 60.
    let waited = bw.take(Direction::Up, 100 * MIB).await;
    assert!(near(waited, Duration::from_secs(60)), "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn the_timetable_wraps_around_midnight() {
    let schedule = Schedule::parse("00:01,off 23:59,1M").unwrap();
    let bw = Bandwidth::starting_at(schedule, hm(23, 59));
    let start = Instant::now();
    let waited = bw.take(Direction::Down, 3 * MIB).await;
    assert!(near(waited, Duration::from_secs(3)), "{waited:?}");
    // Past midnight the 23:59 entry still holds, until 00:01.
    sleep_until(start + Duration::from_secs(90)).await;
    let waited = bw.take(Direction::Down, 100 * MIB).await;
    assert!(near(waited, Duration::from_secs(30)), "{waited:?}");
    assert_eq!(bw.take(Direction::Down, 1 << 30).await, Duration::ZERO);
}

/// Reads a body of `len` bytes in `chunk`s against its place, as the client does; returns
/// when it took its turn and when it was read, from `t0`.
async fn read_body(mut place: Place, chunk: u64, t0: Instant) -> (Duration, Duration) {
    place.wait(0).await;
    let turn = t0.elapsed();
    let mut read = 0;
    while read < place.bytes() {
        read = (read + chunk).min(place.bytes());
        place.wait(read).await;
    }
    (turn, t0.elapsed())
}

#[tokio::test(start_paused = true)]
async fn bodies_are_served_in_the_order_they_took_their_places() {
    let bw = Arc::new(Bandwidth::starting_at(
        Schedule::constant(parse_rate("1M").unwrap()),
        0,
    ));
    let t0 = Instant::now();
    // Three 4 MiB ranges at 1 MiB/s: each goes at the whole rate in turn, the next one's turn
    // coming as the one before is paid, instead of all three sharing it for 12 s.
    let places: Vec<Place> = (0..3).map(|_| bw.place(Direction::Down, 4 * MIB)).collect();
    let tasks: Vec<_> = places
        .into_iter()
        .map(|p| tokio::spawn(read_body(p, 64 * KIB, t0)))
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let (turn, done) = t.await.unwrap();
        let i = i as u64;
        assert!(
            near(turn, Duration::from_secs(4 * i)),
            "{i}: turn at {turn:?}"
        );
        assert!(
            near(done, Duration::from_secs(4 * i + 4)),
            "{i}: read by {done:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_body_holds_the_line_back_instead_of_a_burst_after() {
    let bw = Arc::new(Bandwidth::starting_at(
        Schedule::constant(parse_rate("1M").unwrap()),
        0,
    ));
    let t0 = Instant::now();
    let mut a = bw.place(Direction::Down, 4 * MIB);
    let b = bw.place(Direction::Down, 4 * MIB);
    let b = tokio::spawn(read_body(b, 64 * KIB, t0));
    // A reads 1 MiB, then its server stalls for 10 s.
    a.wait(0).await;
    a.wait(MIB).await;
    sleep_until(t0 + Duration::from_secs(11)).await;
    // The 10 s were not paid ahead: A reads its other 3 MiB at the rate (less the tenth of
    // a second the bucket kept), and B's turn comes only after them.
    a.wait(4 * MIB).await;
    let a_done = t0.elapsed();
    let (b_turn, b_done) = b.await.unwrap();
    assert!(
        near(a_done, Duration::from_millis(13_900)),
        "A read by {a_done:?}"
    );
    assert!(
        near(b_turn, Duration::from_millis(13_900)),
        "B's turn at {b_turn:?}"
    );
    assert!(
        near(b_done, Duration::from_millis(17_900)),
        "B read by {b_done:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_place_lets_the_line_move_past_it() {
    let bw = Arc::new(Bandwidth::starting_at(
        Schedule::constant(parse_rate("1M").unwrap()),
        0,
    ));
    let t0 = Instant::now();
    // A failed request: its place is given up before anything was read.
    drop(bw.place(Direction::Down, 2 * MIB));
    let (turn, done) = read_body(bw.place(Direction::Down, MIB), 64 * KIB, t0).await;
    assert!(near(turn, Duration::from_secs(2)), "turn at {turn:?}");
    assert!(near(done, Duration::from_secs(3)), "read by {done:?}");
}

#[tokio::test(start_paused = true)]
async fn a_share_takes_its_part_of_the_rate_from_when_it_is_set() {
    let bw = Bandwidth::starting_at(Schedule::constant(parse_rate("1M").unwrap()), 0);
    assert_eq!(bw.share(), 1.0);
    // The whole rate: 1 MiB in a second.
    let whole = bw.take(Direction::Up, MIB).await;
    assert!(near(whole, Duration::from_secs(1)), "{whole:?}");
    // A quarter of it: 1 MiB in four seconds, each way.
    bw.set_share(0.25);
    let quarter = bw.take(Direction::Up, MIB).await;
    assert!(near(quarter, Duration::from_secs(4)), "{quarter:?}");
    // (The idle down bucket lends a tenth of a second, at the share.)
    let down = bw.take(Direction::Down, MIB).await;
    assert!(near(down, Duration::from_millis(3900)), "{down:?}");
    // Set back while a body waits: what is left goes at the new share, read at the end of
    // the body's current nap (a second at most).
    let bw = Arc::new(bw);
    let waiting = tokio::spawn({
        let bw = bw.clone();
        async move { bw.take(Direction::Up, MIB).await }
    });
    sleep(Duration::from_millis(2500)).await;
    // 640 KiB paid at a quarter in 2.5 s; the rest at the whole rate is paid by 2.875 s,
    // read when the nap that started at 2 s ends (at a quarter: 3 s more).
    bw.set_share(1.0);
    let waited = waiting.await.unwrap();
    assert!(near(waited, Duration::from_secs(3)), "{waited:?}");
    // Out of range: clamped.
    bw.set_share(7.0);
    assert_eq!(bw.share(), 1.0);
    bw.set_share(0.0);
    assert_eq!(bw.share(), 0.001);
}
