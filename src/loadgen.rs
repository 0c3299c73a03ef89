//! The load generator (`otlp-relay loadgen`): OTLP trace load with telemetrygen-compatible flags.
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {}

pub fn main(_args: LoadgenArgs, _rt: tokio::runtime::Runtime) -> ExitCode {
    eprintln!("otlp-relay loadgen: not implemented yet");
    ExitCode::from(2)
}
