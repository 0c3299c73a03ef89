//! Command line: one binary, one subcommand per job, each a thin entry in its own file that
//! parses what it needs, starts logging and the runtime, and maps the outcome to an [`Exit`].
mod check;
pub(crate) mod exit;
mod gate;
mod loadgen;
pub(crate) mod logging;
mod replay;
mod run;
pub(crate) mod signal;
mod sink;
mod token;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub(crate) use exit::Exit;

#[derive(Debug, Parser)]
#[command(name = "otlp-relay", version, about = "OTLP trace relay for MLflow")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads of the async runtime (default: the CPUs this process may use, which
    /// honours a cgroup CPU limit). Set it to the pod's CPU request when there is no limit: on a
    /// big node the default would start one thread per node core.
    #[arg(long, global = true, env = "OTLP_RELAY_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the relay.
    Run(run::RunArgs),
    /// Validate a configuration file: print every problem with its YAML path.
    Check(check::CheckArgs),
    /// Run the OIDC auth front end in front of an mlflow server.
    Gate(gate::GateArgs),
    /// Generate OTLP trace load.
    Loadgen(crate::loadgen::LoadgenArgs),
    /// A counting OTLP sink for tests and benchmarks.
    Sink(crate::sink::SinkArgs),
    /// Send dead-lettered (or spooled) records again, through an exporter of a config.
    Replay(replay::ReplayArgs),
    /// Fetch an oauth2client token as the relay would; print its header and claims, never the token.
    Token(token::TokenArgs),
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
            std::process::exit(Exit::Failure.code().into());
        }
    }
}

pub fn main(cli: Cli) -> ExitCode {
    let runtime = || build_runtime(cli.threads);
    match cli.command {
        Command::Run(args) => run::main(args, runtime()),
        Command::Check(args) => check::main(args),
        Command::Gate(args) => gate::main(args, runtime()),
        Command::Loadgen(args) => loadgen::main(args, runtime()),
        Command::Token(args) => token::main(args, runtime()),
        Command::Sink(args) => sink::main(args, runtime()),
        Command::Replay(args) => replay::main(args, runtime()),
    }
}
