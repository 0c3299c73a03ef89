//! The auth front end (`otlp-relay gate`): an OIDC reverse proxy in front of a stock mlflow server.
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct GateArgs {}

pub fn main(_args: GateArgs, _rt: tokio::runtime::Runtime) -> ExitCode {
    eprintln!("otlp-relay gate: not implemented yet");
    ExitCode::from(2)
}
