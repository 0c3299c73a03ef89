//! A fast counting OTLP sink (`otlp-relay sink`) that plays MLflow in tests and benchmarks.
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct SinkArgs {}

pub fn main(_args: SinkArgs, _rt: tokio::runtime::Runtime) -> ExitCode {
    eprintln!("otlp-relay sink: not implemented yet");
    ExitCode::from(2)
}
