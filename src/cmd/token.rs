//! `otlp-relay token`: fetches a token exactly as the relay would and prints its JOSE header and
//! claims (`crate::export::oauth::inspect`), never the token itself.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use super::Exit;
use super::logging::{self, LogFormat};
use crate::config::{self, Extension};
use crate::export::oauth::OAuth2Client;
use crate::export::oauth::inspect::describe;

#[derive(Debug, Clone, clap::Args)]
pub(super) struct TokenArgs {
    /// The relay configuration holding the oauth2client extension.
    #[arg(long, default_value = "config.yaml")]
    config: PathBuf,
    /// Which extension (e.g. oauth2client/mlflow); needed only when there are several.
    #[arg(long)]
    extension: Option<String>,
}

pub(super) fn main(args: TokenArgs, rt: tokio::runtime::Runtime) -> ExitCode {
    logging::init(LogFormat::Text, Some("warn"));
    let cfg = match config::load_file(&args.config) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{}: {} problem(s):", args.config.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            return Exit::BadConfig.into();
        }
    };
    let candidates: Vec<(&String, &crate::config::OAuth2ClientConfig)> = cfg
        .extensions
        .iter()
        .filter_map(|(id, e)| match e {
            Extension::OAuth2Client(o) => Some((id, o.as_ref())),
            _ => None,
        })
        .collect();
    let chosen = match &args.extension {
        Some(want) => candidates.iter().find(|(id, _)| *id == want),
        None if candidates.len() == 1 => candidates.first(),
        None => None,
    };
    let Some((id, ext)) = chosen else {
        let ids: Vec<&String> = candidates.iter().map(|(id, _)| *id).collect();
        if ids.is_empty() {
            eprintln!(
                "{}: no oauth2client extension is defined (the exporters send without a token)",
                args.config.display()
            );
            return Exit::BadConfig.into();
        }
        eprintln!(
            "{}: choose an oauth2client extension with --extension (defined: {ids:?})",
            args.config.display()
        );
        return Exit::BadConfig.into();
    };
    rt.block_on(async move {
        let client = match OAuth2Client::new(id, ext) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("extensions.{id}: {e}");
                return Exit::BadConfig.into();
            }
        };
        match client.fetch().await {
            Ok(f) => {
                println!("extension: {id}");
                println!("token endpoint: {}", f.token_url);
                println!(
                    "token_type: {}, expires_in: {}",
                    f.token_type,
                    f.expires_in
                        .map_or("(not given)".into(), |d| format!("{} s", d.as_secs()))
                );
                if let Some(s) = &f.scopes {
                    println!("granted scopes: {}", s.join(" "));
                }
                print!("{}", describe(&f.access_token, SystemTime::now()));
                Exit::Success.into()
            }
            Err(failure) => {
                eprintln!("{id}: token request failed: {}", failure.message);
                Exit::Failure.into()
            }
        }
    })
}
