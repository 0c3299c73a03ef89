//! `otlp-relay loadgen`: OTLP trace load (`crate::loadgen`); its verdict mapped to an [`Exit`].
use std::process::ExitCode;

use super::Exit;
use crate::loadgen::{LoadgenArgs, Verdict};

pub(super) fn main(args: LoadgenArgs, rt: tokio::runtime::Runtime) -> ExitCode {
    match rt.block_on(crate::loadgen::run(args)) {
        Ok(Verdict::Passed) => Exit::Success.into(),
        Ok(Verdict::Failed) => Exit::Failure.into(),
        Err(e) => {
            eprintln!("otlp-relay loadgen: {e:#}");
            Exit::Usage.into()
        }
    }
}
