//! `otlp-relay gate`: the OIDC auth front end, configured from the environment (`crate::gate`).
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::Exit;
use super::logging::{self, LogFormat};

#[derive(Debug, clap::Args)]
pub(super) struct GateArgs {}

pub(super) fn main(_args: GateArgs, rt: tokio::runtime::Runtime) -> ExitCode {
    logging::init(LogFormat::Text, None);
    let cfg = match crate::gate::config::from_env(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("otlp-relay gate: invalid configuration:");
            for p in problems {
                eprintln!("  - {p}");
            }
            return Exit::BadConfig.into();
        }
    };
    let cancel = CancellationToken::new();
    let result = rt.block_on(async {
        let c = cancel.clone();
        tokio::spawn(async move {
            super::signal::wait_for_signal().await;
            tracing::info!("shutting down");
            c.cancel();
        });
        crate::gate::run(cfg, cancel).await
    });
    match result {
        Ok(()) => Exit::Success.into(),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "gate failed");
            Exit::Failure.into()
        }
    }
}
