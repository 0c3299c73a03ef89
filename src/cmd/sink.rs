//! `otlp-relay sink`: the counting OTLP sink of tests and benchmarks (`crate::sink`).
use std::process::ExitCode;

use super::Exit;
use super::logging::{self, LogFormat};
use crate::sink::{SinkArgs, StartError};

pub(super) fn main(args: SinkArgs, rt: tokio::runtime::Runtime) -> ExitCode {
    logging::init(LogFormat::Text, None);
    match rt.block_on(crate::sink::run(args)) {
        Ok(()) => Exit::Success.into(),
        Err(e) => {
            tracing::error!(error = %e, "sink failed to start");
            exit_for(&e).into()
        }
    }
}

fn exit_for(e: &StartError) -> Exit {
    match e {
        // Files or URLs given on the command line that cannot be used: fix the arguments.
        StartError::Args(_) => Exit::Usage,
        StartError::Bind { .. } | StartError::Signal(_) => Exit::Failure,
    }
}
