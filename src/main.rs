//! The s3-backfill command: parses arguments, runs one command, maps the result to an exit
//! code (0 all done, 1 some tasks failed or mismatched, 2 bad input or configuration,
//! 3 other errors, 130 interrupted) and prints errors as one line.

use clap::Parser;
use s3_backfill::cli::{Cli, Command};
use s3_backfill::job::{self, error_line, JobError};

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

fn fail(e: JobError) -> i32 {
    eprintln!("{}", error_line(&e));
    e.exit_code()
}

async fn dispatch(cmd: Command) -> i32 {
    match cmd {
        Command::Plan(a) => match job::plan(&a).await {
            Ok(_) => 0,
            Err(e) => fail(e),
        },
        Command::Run(a) => match job::run(&a).await {
            Ok(s) => job::finish_run(&s, &a.manifest),
            Err(e) => fail(e),
        },
        Command::Replicate(a) => {
            if let Err(e) = job::plan(&a.plan).await {
                return fail(e);
            }
            let r = a.run();
            match job::run(&r).await {
                Ok(s) => job::finish_run(&s, &r.manifest),
                Err(e) => fail(e),
            }
        }
        Command::Status(a) => match job::status(&a) {
            Ok(()) => 0,
            Err(e) => fail(e),
        },
        Command::Report(a) => match job::report(&a) {
            Ok(()) => 0,
            Err(e) => fail(e),
        },
        Command::Verify(a) => match job::verify_cmd(&a).await {
            Ok(r) => {
                if a.json {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                } else {
                    for m in &r.mismatches {
                        println!("mismatch: {:?}: {}", m.key, m.detail);
                    }
                    println!(
                        "verified {} keys, {} versions: {}",
                        r.keys,
                        r.versions,
                        if r.ok() {
                            "destination matches source".to_string()
                        } else {
                            format!("{} keys differ", r.mismatched_keys)
                        }
                    );
                }
                if r.ok() {
                    0
                } else {
                    1
                }
            }
            Err(e) => fail(e),
        },
    }
}
