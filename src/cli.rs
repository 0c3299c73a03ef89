//! Command line: one binary, one subcommand per job (relay, config check, gate, loadgen, sink, token).
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit code for a configuration the relay refuses to start with (sysexits EX_CONFIG-ish: EX_USAGE).
pub const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "otlp-relay", version, about = "OTLP trace relay for MLflow")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Worker threads of the async runtime (default: the CPUs this process may use, which
    /// honours a cgroup CPU limit). Set it to the pod's CPU request when there is no limit: on a
    /// big node the default would start one thread per node core.
    #[arg(long, global = true, env = "OTLP_RELAY_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay.
    Run {
        #[arg(long, default_value = "config.yaml")]
        config: PathBuf,
        #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "OTLP_RELAY_LOG_FORMAT")]
        log_format: LogFormat,
    },
    /// Validate a configuration file: print every problem with its YAML path.
    Check {
        #[arg(long, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Run the OIDC auth front end in front of an mlflow server.
    Gate(crate::gate::GateArgs),
    /// Generate OTLP trace load.
    Loadgen(crate::loadgen::LoadgenArgs),
    /// A counting OTLP sink for tests and benchmarks.
    Sink(crate::sink::SinkArgs),
    /// Send dead-lettered (or spooled) records again, through an exporter of a config.
    Replay(crate::spool::replay::ReplayArgs),
    /// Fetch an oauth2client token as the relay would; print its header and claims, never the token.
    Token(crate::export::oauth::inspect::TokenArgs),
}

/// Logs to stderr; OTLP_RELAY_LOG (an EnvFilter directive) overrides `level`.
pub fn init_logging(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let level = level.unwrap_or("info").to_ascii_lowercase();
    let filter = EnvFilter::try_from_env("OTLP_RELAY_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    // Plain text when stderr is not a terminal, so logs stay greppable in files and pods.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn build_runtime(threads: Option<u16>) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n.into());
    }
    match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("otlp-relay: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    }
}

pub fn main(cli: Cli) -> ExitCode {
    let runtime = || build_runtime(cli.threads);
    match cli.command {
        Command::Run { config, log_format } => crate::app::run_main(&config, log_format, runtime()),
        Command::Check { config } => crate::app::check_main(&config),
        Command::Gate(args) => {
            init_logging(LogFormat::Text, None);
            crate::gate::main(args, runtime())
        }
        Command::Loadgen(args) => crate::loadgen::main(args, runtime()),
        Command::Token(args) => {
            init_logging(LogFormat::Text, Some("warn"));
            crate::export::oauth::inspect::main(args, runtime())
        }
        Command::Sink(args) => {
            init_logging(LogFormat::Text, None);
            crate::sink::main(args, runtime())
        }
        Command::Replay(args) => {
            init_logging(LogFormat::Text, None);
            crate::spool::replay::main(args, runtime())
        }
    }
}
