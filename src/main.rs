//! The s3-backfill command: parses arguments, runs one command, and exits with the status
//! `job::exit` decides (0 all done, 1 some tasks failed, blocked or mismatched, 2 bad input
//! or configuration, 3 other errors, 4 a hard limit reached, 130 interrupted); errors print
//! as one line. The only place the process exits.

#![warn(clippy::print_stderr)]

use clap::Parser;
use s3_backfill::cli::{Cli, Command, LogFormat};
use s3_backfill::copier::RunSummary;
use s3_backfill::events;
use s3_backfill::job::exit::{Ended, Exit};
use s3_backfill::job::{self, JobError};
use s3_backfill::ui;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => std::process::exit(usage_error(e).code()),
    };
    let format = cli.command.log().map(|l| l.log_format).unwrap_or_default();
    events::set_format(format);
    // The SDK's own warnings (e.g. every credential provider it tried) are noise next to the
    // one-line errors this tool prints: only its errors show.
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("S3_BACKFILL_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,s3_backfill=warn"))
    };
    if format == LogFormat::Json {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        tracing_subscriber::registry()
            .with(filter())
            .with(events::JsonLayer)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            // Colours only on a terminal: a log file or a collector gets plain lines.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .with_env_filter(filter())
            .init();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            events::say(format!("error: cannot start the runtime: {e}"));
            std::process::exit(Exit::of(Ended::NotStarted).code());
        }
    };
    let exit = rt.block_on(dispatch(cli.command));
    // Tasks a stopped run abandoned are not waited for.
    rt.shutdown_background();
    std::process::exit(exit.code());
}

/// A clap error: help and version print as clap prints them (exit 0); every usage error is
/// one line on stderr (exit 2), without clap's usage block and its "try --help" tip.
fn usage_error(e: clap::Error) -> Exit {
    use clap::error::ErrorKind;
    // The arguments did not parse, but a `--log-format json` among them is honoured.
    let args: Vec<String> = std::env::args().collect();
    let json = args
        .windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json")
        || args.iter().any(|a| a == "--log-format=json");
    if json {
        events::set_format(LogFormat::Json);
    }
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            Exit::of(Ended::Done)
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            events::say("error: a command is needed: plan, run, replicate, follow, status, report or verify (s3-backfill --help lists them)".into());
            Exit::of(Ended::Usage)
        }
        _ => {
            events::say(one_line(&e.to_string()));
            Exit::of(Ended::Usage)
        }
    }
}

/// clap's rendering of an error folded into one line: its message lines joined, the usage
/// block and the tip left out.
fn one_line(rendered: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for line in rendered.lines().map(str::trim) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line.trim_end_matches(':'));
        }
    }
    let out = parts.join(": ");
    if out.starts_with("error:") {
        out
    } else {
        format!("error: {out}")
    }
}

/// The exit status of a command's result: an error is printed as its one line; `ok` prints
/// a success and says how it ended.
fn exit<'a, T>(r: &'a Result<T, JobError>, ok: impl FnOnce(&'a T) -> Ended<'a>) -> Exit {
    match r {
        Ok(v) => Exit::of(ok(v)),
        Err(e) => {
            events::say(e.line());
            Exit::of(Ended::Error(e))
        }
    }
}

/// Runs one command. Each command's future is boxed: nested in one, their layouts exceed
/// the compiler's query depth in release builds.
async fn dispatch(cmd: Command) -> Exit {
    match cmd {
        Command::Plan(a) => exit(&Box::pin(job::plan(&a)).await, |_| Ended::Done),
        Command::Run(a) => {
            let r = Box::pin(job::run(&a, job::signals())).await;
            ran(r, &a.manifest)
        }
        // A dry run plans nothing and copies nothing.
        Command::Replicate(a) if a.plan.dry_run => {
            exit(&Box::pin(job::plan(&a.plan)).await, |_| Ended::Done)
        }
        Command::Replicate(a) => {
            let r = Box::pin(job::replicate(&a, job::signals())).await;
            ran(r, &a.plan.manifest)
        }
        Command::Follow(a) => {
            let r = Box::pin(job::follow(&a, job::signals())).await;
            ran(r.map(|f| f.summary), &a.run.manifest)
        }
        Command::Status(a) => exit(&job::status(&a), |_| Ended::Done),
        Command::Report(a) => exit(&Box::pin(job::report(&a)).await, |_| Ended::Done),
        Command::Verify(a) => exit(&Box::pin(job::verify(&a)).await, |r| {
            ui::print_verify(r, a.json);
            Ended::Verified(r)
        }),
    }
}

/// A run's end: its summary printed (with the job's counts after it, read only when the run
/// returned one) and its exit status.
fn ran(r: Result<RunSummary, JobError>, manifest: &std::path::Path) -> Exit {
    let counts = std::cell::OnceCell::new();
    exit(&r, |s| {
        let counts = counts.get_or_init(|| job::counts_after(manifest)).as_ref();
        let ended = Ended::Run(s, counts);
        ui::finish_run(s, counts, Exit::of(ended).code());
        ended
    })
}
