//! The `otlp-relay` binary: parse the command line and hand over to the library.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = otlp_relay::cmd::Cli::parse();
    otlp_relay::cmd::main(cli)
}
