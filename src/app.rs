//! app
use std::path::Path;
use std::process::ExitCode;

pub fn run_main(_config: &Path, _rt: tokio::runtime::Runtime) -> ExitCode {
    ExitCode::from(2)
}

pub fn check_main(_config: &Path) -> ExitCode {
    ExitCode::from(2)
}
