//! Checks of the deployment examples, with no server: every container command line in
//! `deploy/k8s/*.yaml` parses with the CLI, once Kubernetes' `$(VAR)` references are
//! replaced by plausible values (each one must be an env var the same file declares), and the
//! manifest is a PostgreSQL URL. Command lines are written as one-line JSON-style flow
//! sequences (`args: ["run", "--manifest", "$(S3_BACKFILL_MANIFEST)"]`), so no YAML parser is
//! needed; a block-style sequence is refused rather than skipped.

use std::path::{Path, PathBuf};

use clap::Parser;
use s3_backfill::cli::Cli;

/// A stand-in for the DSN that the Secret gives.
const SAMPLE_DSN: &str = "postgres://s3backfill:secret@postgres.example.internal:5432/s3backfill";
/// Its host: what the parsed arguments must name, however the CLI holds a manifest's DSN.
const SAMPLE_HOST: &str = "postgres.example.internal";

fn k8s_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s")
}

/// One container's command line, and where it was found.
#[derive(Debug)]
struct CommandLine {
    at: String,
    argv: Vec<String>,
}

/// The value after `key:` on a line (`- name: X`, `command: [...]`), if the line has that key.
fn value_of<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let t = line.trim_start().trim_start_matches("- ");
    t.strip_prefix(key)?.strip_prefix(':').map(str::trim)
}

/// The command lines of one YAML file: a `command:` line, then the `args:` line of the same
/// container (the image's entrypoint is taken as `s3-backfill` when there is no `command:`).
fn command_lines(file: &str, yaml: &str) -> Result<Vec<CommandLine>, String> {
    let mut out = Vec::new();
    let mut pending: Option<(String, Vec<String>)> = None;
    let flow = |n: usize, key: &str, v: &str| -> Result<Vec<String>, String> {
        if !v.starts_with('[') {
            return Err(format!(
                "{file}:{n}: `{key}:` must be a one-line flow sequence like [\"run\", ...], not {v:?}"
            ));
        }
        serde_json::from_str(v).map_err(|e| format!("{file}:{n}: `{key}:` {v}: {e}"))
    };
    for (i, line) in yaml.lines().enumerate() {
        let n = i + 1;
        if line.trim_start().starts_with('#') {
            continue;
        }
        if let Some(v) = value_of(line, "command") {
            if let Some((at, argv)) = pending.take() {
                out.push(CommandLine { at, argv });
            }
            pending = Some((format!("{file}:{n}"), flow(n, "command", v)?));
        } else if let Some(v) = value_of(line, "args") {
            let args = flow(n, "args", v)?;
            let (at, mut argv) = pending
                .take()
                .unwrap_or_else(|| (format!("{file}:{n}"), vec!["s3-backfill".to_string()]));
            argv.extend(args);
            out.push(CommandLine { at, argv });
        }
    }
    if let Some((at, argv)) = pending {
        out.push(CommandLine { at, argv });
    }
    Ok(out)
}

/// The env var names a YAML file declares (`- name: X` followed by `value:`/`valueFrom:`).
fn declared_env(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    lines
        .windows(2)
        .filter_map(|w| {
            let name = value_of(w[0], "name")?;
            let next = w[1].trim_start();
            (next.starts_with("value:") || next.starts_with("valueFrom:"))
                .then(|| name.trim_matches('"').to_string())
        })
        .collect()
}

/// `arg` with each `$(VAR)` replaced: the manifest's DSN for `S3_BACKFILL_MANIFEST`, a word
/// for any other declared variable; an undeclared one is an error (Kubernetes would pass it
/// on verbatim).
fn substitute(arg: &str, declared: &[String]) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find(')')
            .ok_or_else(|| format!("unclosed $( in {arg:?}"))?;
        let var = &rest[start + 2..start + end];
        if !declared.iter().any(|d| d == var) {
            return Err(format!(
                "$({var}) in {arg:?} is not an env var of this file"
            ));
        }
        out.push_str(match var {
            "S3_BACKFILL_MANIFEST" => SAMPLE_DSN,
            _ => "value",
        });
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Parses one command line with the CLI, as the container would run it.
fn check(line: &CommandLine, declared: &[String]) -> Result<Cli, String> {
    let prog = line.argv.first().ok_or(format!("{}: empty", line.at))?;
    if Path::new(prog).file_name().and_then(|f| f.to_str()) != Some("s3-backfill") {
        return Err(format!("{}: runs {prog:?}, not s3-backfill", line.at));
    }
    let argv = line
        .argv
        .iter()
        .map(|a| substitute(a, declared))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", line.at))?;
    Cli::try_parse_from(&argv).map_err(|e| format!("{}: {argv:?}: {e}", line.at))
}

#[test]
fn every_command_line_of_the_k8s_examples_parses_with_the_cli() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(k8s_dir())
        .expect("deploy/k8s")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let mut checked = Vec::new();
    let mut errors = Vec::new();
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let yaml = std::fs::read_to_string(f).unwrap();
        let declared = declared_env(&yaml);
        match command_lines(&name, &yaml) {
            Err(e) => errors.push(e),
            Ok(lines) => {
                for line in lines {
                    match check(&line, &declared) {
                        Ok(cli) => {
                            let parsed = format!("{:?}", cli.command);
                            if !parsed.contains(SAMPLE_HOST) {
                                errors.push(format!(
                                    "{}: the manifest is not the Secret's DSN: {parsed}",
                                    line.at
                                ));
                            }
                            let sub = line.argv.get(1).cloned().unwrap_or_default();
                            checked.push(format!("{} {sub}", line.at));
                        }
                        Err(e) => errors.push(e),
                    }
                }
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    println!("checked: {checked:#?}");
    // The examples: a plan Job, the worker Deployment, the Indexed Job of workers.
    for (file, sub) in [
        ("plan-job.yaml", "plan"),
        ("workers-deployment.yaml", "run"),
        ("workers-indexed-job.yaml", "run"),
    ] {
        assert!(
            checked
                .iter()
                .any(|c| c.starts_with(&format!("{file}:")) && c.ends_with(&format!(" {sub}"))),
            "no `{sub}` command line found in {file}: {checked:?}"
        );
    }
}

#[test]
fn the_checker_refuses_a_misspelled_flag_an_unknown_variable_and_a_block_sequence() {
    let yaml = r#"
      containers:
        - name: run
          command: ["s3-backfill"]
          args: ["run", "--manifest", "$(S3_BACKFILL_MANIFEST)", "--concurency", "64"]
          env:
            - name: S3_BACKFILL_MANIFEST
              valueFrom:
                secretKeyRef: {name: s, key: k}
"#;
    let declared = declared_env(yaml);
    assert_eq!(declared, ["S3_BACKFILL_MANIFEST"]);
    let lines = command_lines("t.yaml", yaml).unwrap();
    assert_eq!(lines.len(), 1);
    let err = check(&lines[0], &declared).unwrap_err();
    assert!(err.contains("--concurency"), "{err}");

    // Spelled right, the same line parses, with the DSN as the manifest.
    let good = yaml.replace("--concurency", "--concurrency");
    let lines = command_lines("t.yaml", &good).unwrap();
    let cli = check(&lines[0], &declared).unwrap();
    assert!(format!("{:?}", cli.command).contains(SAMPLE_HOST));

    // A $(VAR) the container does not declare would reach the program verbatim.
    let undeclared = good.replace("$(S3_BACKFILL_MANIFEST)", "$(S3_BACKFILL_MANIFST)");
    let lines = command_lines("t.yaml", &undeclared).unwrap();
    let err = check(&lines[0], &declared).unwrap_err();
    assert!(err.contains("S3_BACKFILL_MANIFST"), "{err}");

    // Another program, and a block-style sequence the checker cannot read.
    let other = good.replace("[\"s3-backfill\"]", "[\"sh\", \"-c\"]");
    let lines = command_lines("t.yaml", &other).unwrap();
    assert!(check(&lines[0], &declared)
        .unwrap_err()
        .contains("not s3-backfill"));
    let block = "      args:\n        - run\n";
    let err = command_lines("t.yaml", block).unwrap_err();
    assert!(err.contains("flow sequence"), "{err}");
}
