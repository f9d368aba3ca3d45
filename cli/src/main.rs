//! `shardpress`: compress LLM checkpoints locally, and (with the service) submit and watch jobs.

mod commands;
#[cfg(feature = "otel")]
mod otel;
mod service;
mod size;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Compress large language model checkpoints: prune, quantize and cast safetensors weights
/// into a checkpoint vLLM and Transformers load.
#[derive(Debug, Parser)]
#[command(name = "shardpress", version, propagate_version = true)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing filter expression).
    #[arg(long, global = true, env = "SHARDPRESS_LOG", default_value = "warn")]
    log: String,

    /// Log line format on stderr: `text` for people, `json` (one object per line, with the
    /// job, task and tensor of the enclosing spans) for log collectors.
    #[arg(
        long,
        global = true,
        env = "SHARDPRESS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    Compress(commands::compress::Args),
    Decompress(commands::decompress::Args),
    Recipes(commands::recipes::Args),
    Inspect(commands::inspect::Args),
    Estimate(commands::estimate::Args),
    Report(commands::report::Args),
    Submit(commands::submit::Args),
    Status(commands::status::Args),
    Watch(commands::watch::Args),
    List(commands::list::Args),
    Cancel(commands::cancel::Args),
    Worker(commands::worker::Args),
    Coordinator(commands::coordinator::Args),
    Bench(commands::bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logging = match init_logging(&cli) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Compress(a) => commands::compress::run(a),
        Command::Decompress(a) => commands::decompress::run(a),
        Command::Recipes(a) => commands::recipes::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Estimate(a) => commands::estimate::run(a),
        Command::Report(a) => commands::report::run(a),
        Command::Submit(a) => commands::submit::run(a),
        Command::Status(a) => commands::status::run(a),
        Command::Watch(a) => commands::watch::run(a),
        Command::List(a) => commands::list::run(a),
        Command::Cancel(a) => commands::cancel::run(a),
        Command::Worker(a) => commands::worker::run(a),
        Command::Coordinator(a) => commands::coordinator::run(a),
        Command::Bench(a) => commands::bench::run(a),
    };
    if let Some(exporter) = logging {
        exporter.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`| head`): nothing more to say.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// What must live until the work is done for every log record to leave the process.
type LogGuard = Option<otel::Exporter>;

/// Without the `otel` feature there is never an exporter.
#[cfg(not(feature = "otel"))]
mod otel {
    /// Stands in for the trace exporter.
    pub enum Exporter {}

    impl Exporter {
        pub fn shutdown(self) {}
    }
}

/// Log records go to stderr as text or JSON lines, filtered by `--log`; with the `otel`
/// feature and an OTLP endpoint in the environment, spans are exported as traces too.
fn init_logging(cli: &Cli) -> anyhow::Result<LogGuard> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match cli.log_format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otel")]
    {
        let (layer, exporter) = otel::layer()?.unzip();
        registry.with(layer).init();
        Ok(exporter)
    }
    #[cfg(not(feature = "otel"))]
    {
        registry.init();
        Ok(None)
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || c.downcast_ref::<serde_json::Error>()
                .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
    })
}

/// The error and its causes on one line, without repeating a cause already in the message.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use clap::{CommandFactory, Parser};

    use super::Cli;

    /// `(environment variable, flag)` → (commands, default, first sentence of the help).
    type Settings = BTreeMap<(String, String), (Vec<String>, String, String)>;

    fn collect(cmd: &clap::Command, path: &str, out: &mut Settings, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if arg.is_positional() || id == "help" || id == "version" {
                continue;
            }
            let flag = format!("--{}", arg.get_long().unwrap_or(id));
            let Some(env) = arg.get_env() else {
                missing.push(format!("{path} {flag}"));
                continue;
            };
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let sentence = first_sentence(&help).replace('|', "\\|");
            let default = arg
                .get_default_values()
                .iter()
                .map(|v| format!("`{}`", v.to_string_lossy()))
                .collect::<Vec<_>>()
                .join(", ");
            let key = (env.to_string_lossy().into_owned(), flag);
            let entry = out.entry(key).or_insert((Vec::new(), default, sentence));
            let name = if arg.is_global_set() { "all" } else { path };
            if !entry.0.iter().any(|c| c == name) {
                entry.0.push(name.to_string());
            }
        }
        for sub in cmd.get_subcommands() {
            collect(sub, sub.get_name(), out, missing);
        }
    }

    /// Up to the first full stop that ends a sentence (not the one of "e.g.").
    fn first_sentence(help: &str) -> &str {
        let mut from = 0;
        while let Some(at) = help[from..].find(". ").map(|i| i + from) {
            if !help[..at].ends_with("e.g") && !help[..at].ends_with("i.e") {
                return &help[..at];
            }
            from = at + 2;
        }
        help.trim_end_matches('.')
    }

    /// The README's table of settings, as this command line defines them.
    fn table() -> (String, Vec<String>) {
        let mut settings = Settings::new();
        let mut missing = Vec::new();
        collect(&Cli::command(), "all", &mut settings, &mut missing);
        let mut out = String::from(
            "| environment | flag | commands | default | meaning |\n|---|---|---|---|---|\n",
        );
        for ((env, flag), (commands, default, help)) in &settings {
            let commands = if commands.iter().any(|c| c == "all") {
                "all".to_string()
            } else {
                commands.join(", ")
            };
            out.push_str(&format!(
                "| `{env}` | `{flag}` | {commands} | {default} | {help} |\n"
            ));
        }
        (out, missing)
    }

    #[test]
    fn every_flag_has_an_environment_variable_and_the_readme_lists_them() {
        let (table, missing) = table();
        assert!(
            missing.is_empty(),
            "flags without SHARDPRESS_*: {missing:?}"
        );
        assert!(table.lines().count() > 40, "{table}");
        let readme = include_str!("../../README.md");
        let start = "<!-- settings table: generated from the command line, checked by a test -->\n";
        let listed = readme
            .split_once(start)
            .and_then(|(_, rest)| rest.split_once("\n\n"))
            .map(|(t, _)| format!("{t}\n"));
        assert_eq!(
            listed.as_deref(),
            Some(table.as_str()),
            "README.md's settings table differs; it should read:\n{start}{table}"
        );
    }

    #[test]
    fn the_log_format_is_text_or_json() {
        let cli = Cli::try_parse_from(["shardpress", "--log-format", "json", "recipes"]);
        assert!(matches!(
            cli.map(|c| c.log_format),
            Ok(super::LogFormat::Json)
        ));
        let bad = Cli::try_parse_from(["shardpress", "--log-format", "xml", "recipes"]);
        assert!(bad.is_err());
    }
}
