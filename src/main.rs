//! The s3-backfill command: parses arguments, runs one command, and decides the exit code in
//! one place (0 all done, 1 some tasks failed, blocked or mismatched, 2 bad input or
//! configuration, 3 other errors, 130 interrupted); errors print as one line.

use clap::Parser;
use s3_backfill::cli::{Cli, Command};
use s3_backfill::job::{self, JobError};
use s3_backfill::ui;

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("S3_BACKFILL_LOG")
                // The SDK's own warnings (e.g. every credential provider it tried) are noise
                // next to the one-line errors this tool prints: only its errors show.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error,s3_backfill=warn")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(3);
        }
    };
    let code = rt.block_on(dispatch(cli.command));
    drop(rt);
    std::process::exit(code);
}

fn code<T>(r: Result<T, JobError>, ok: impl FnOnce(T) -> i32) -> i32 {
    match r {
        Ok(v) => ok(v),
        Err(e) => {
            eprintln!("{}", e.line());
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
        Command::Replicate(a) => {
            if let Err(e) = job::plan(&a.plan).await {
                return code::<()>(Err(e), |_| 0);
            }
            if a.plan.dry_run {
                return 0;
            }
            let r = a.run();
            code(job::run(&r).await, |s| {
                ui::finish_run(&s, job::counts_after(&r.manifest).as_ref())
            })
        }
        Command::Status(a) => code(job::status(&a), |_| 0),
        Command::Report(a) => code(job::report(&a), |_| 0),
        Command::Verify(a) => code(job::verify(&a).await, |r| ui::print_verify(&r, a.json)),
    }
}
