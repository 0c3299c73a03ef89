//! `otlp-relay run`: load and prepare the config, start logging, run the relay until SIGTERM.
use std::path::PathBuf;
use std::process::ExitCode;

use super::Exit;
use super::logging::{self, LogFormat};
use crate::config;
use crate::topology::StartError;

#[derive(Debug, clap::Args)]
pub(super) struct RunArgs {
    #[arg(long, default_value = "config.yaml")]
    config: PathBuf,
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "OTLP_RELAY_LOG_FORMAT")]
    log_format: LogFormat,
}

pub(super) fn main(args: RunArgs, rt: tokio::runtime::Runtime) -> ExitCode {
    let path = &args.config;
    let (config, prepared) = match config::load_file(path).and_then(|c| crate::topology::prepare(&c).map(|p| (c, p))) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!(
                "otlp-relay: refusing to start, {} has {} problem(s):",
                path.display(),
                errors.0.len()
            );
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            return Exit::BadConfig.into();
        }
    };
    logging::init(args.log_format, config.service.telemetry.logs.level.as_deref());
    for w in config::warnings(&config) {
        tracing::warn!(path = %w.path, "{}", w.message);
    }
    crate::supervise::install_panic_hook();
    match rt.block_on(crate::app::run(config, prepared, super::signal::wait_for_signal())) {
        Ok(()) => Exit::Success.into(),
        Err(e) => {
            tracing::error!(error = %e, "relay failed to start");
            exit_for(&e).into()
        }
    }
}

fn exit_for(e: &StartError) -> Exit {
    match e {
        // A spool directory that cannot be made or is in use: fix the config, nothing was bound.
        StartError::Config(_) | StartError::Spool { .. } => Exit::BadConfig,
        StartError::Bind(_) => Exit::Failure,
    }
}
