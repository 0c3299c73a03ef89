//! `otlp-relay loadgen`: OTLP trace load; the generator and its exit codes are in `crate::loadgen`.
use std::process::ExitCode;

use crate::loadgen::LoadgenArgs;

pub(super) fn main(args: LoadgenArgs, rt: tokio::runtime::Runtime) -> ExitCode {
    crate::loadgen::main(args, rt)
}
