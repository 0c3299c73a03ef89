//! `otlp-relay check`: validate a config as `run` would, without binding anything.
use std::path::PathBuf;
use std::process::ExitCode;

use super::Exit;
use crate::config;

#[derive(Debug, clap::Args)]
pub(super) struct CheckArgs {
    #[arg(long, default_value = "config.yaml")]
    config: PathBuf,
}

pub(super) fn main(args: CheckArgs) -> ExitCode {
    let path = &args.config;
    match config::load_file(path).and_then(|c| crate::topology::prepare(&c).map(|_| c)) {
        Ok(c) => {
            let pipelines: Vec<&String> = c.service.pipelines.keys().collect();
            println!(
                "{}: valid ({} receivers, {} exporters, pipelines {:?})",
                path.display(),
                c.receivers.len(),
                c.exporters.len(),
                pipelines
            );
            // Warnings do not fail the check: the config runs, but does less than it says.
            let warnings = config::warnings(&c);
            if !warnings.is_empty() {
                println!("{} warning(s):", warnings.len());
                for w in &warnings {
                    println!("  warning: {w}");
                }
            }
            Exit::Success.into()
        }
        Err(errors) => {
            eprintln!("{}: {} problem(s):", path.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            Exit::Failure.into()
        }
    }
}
