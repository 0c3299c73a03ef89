//! `otlp-relay sink`: the counting OTLP sink of tests and benchmarks (`crate::sink`).
use std::process::ExitCode;

use super::logging::{self, LogFormat};
use crate::sink::SinkArgs;

pub(super) fn main(args: SinkArgs, rt: tokio::runtime::Runtime) -> ExitCode {
    logging::init(LogFormat::Text, None);
    crate::sink::main(args, rt)
}
