//! Log setup shared by the subcommands: one format flag, one level, stderr only.

#[derive(Debug, Clone, Copy, clap::ValueEnum, Default)]
pub(crate) enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logs to stderr; OTLP_RELAY_LOG (an EnvFilter directive) overrides `level`.
pub(crate) fn init(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let level = level.unwrap_or("info").to_ascii_lowercase();
    let filter = EnvFilter::try_from_env("OTLP_RELAY_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    // Plain text when stderr is not a terminal, so logs stay greppable in files and pods.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
