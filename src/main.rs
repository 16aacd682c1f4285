//! The s3-backfill command: parses arguments, runs one command, and decides the exit code in
//! one place (0 all done, 1 some tasks failed, blocked or mismatched, 2 bad input or
//! configuration, 3 other errors, 130 interrupted); errors print as one line.

#![warn(clippy::print_stderr)]

use clap::Parser;
use s3_backfill::cli::{Cli, Command, LogFormat};
use s3_backfill::events;
use s3_backfill::job::{self, JobError};
use s3_backfill::ui;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => std::process::exit(usage_error(e)),
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
            std::process::exit(3);
        }
    };
    let code = rt.block_on(dispatch(cli.command));
    drop(rt);
    std::process::exit(code);
}

/// A clap error: help and version print as clap prints them (exit 0); every usage error is
/// one line on stderr (exit 2), without clap's usage block and its "try --help" tip.
fn usage_error(e: clap::Error) -> i32 {
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
            0
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            events::say("error: a command is needed: plan, run, replicate, status, report or verify (s3-backfill --help lists them)".into());
            2
        }
        _ => {
            events::say(one_line(&e.to_string()));
            2
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

fn code<T>(r: Result<T, JobError>, ok: impl FnOnce(T) -> i32) -> i32 {
    match r {
        Ok(v) => ok(v),
        Err(e) => {
            events::say(e.line());
            e.exit_code()
        }
    }
}

async fn dispatch(cmd: Command) -> i32 {
    match cmd {
        Command::Plan(a) => code(job::plan(&a).await, |_| 0),
        Command::Run(a) => code(job::run(&a).await, |s| {
            ui::finish_run(&s, job::counts_after(&a.manifest).as_ref())
        }),
        // A dry run plans nothing and copies nothing.
        Command::Replicate(a) if a.plan.dry_run => code(job::plan(&a.plan).await, |_| 0),
        Command::Replicate(a) => code(job::replicate(&a).await, |s| {
            ui::finish_run(&s, job::counts_after(&a.plan.manifest).as_ref())
        }),
        Command::Status(a) => code(job::status(&a), |_| 0),
        Command::Report(a) => code(job::report(&a), |_| 0),
        Command::Verify(a) => code(job::verify(&a).await, |r| ui::print_verify(&r, a.json)),
    }
}
