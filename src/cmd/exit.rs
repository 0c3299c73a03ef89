//! The process's exit codes, one enum for every subcommand (the README's "Exit codes" table).
use std::process::ExitCode;

/// How a subcommand ends. Scripts and Kubernetes tell a bad config (fix the file, do not
/// restart) from a failure (retry may help) by these numbers, so they never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// 0: done: a clean shutdown, a valid config, a token fetched, everything delivered.
    Success,
    /// 1: the job failed: a port could not be bound, `check` found problems, the token request
    /// failed, replayed records were refused again, loadgen saw loss.
    Failure,
    /// 2: `loadgen`, `replay` or `sink` could not run at all (a bad argument, an unreadable
    /// directory, a certificate that cannot be loaded);
    /// clap uses 2 for a bad command line too.
    Usage,
    /// 64 (sysexits EX_USAGE): a configuration the relay, gate or token refuses before anything
    /// was bound or sent.
    BadConfig,
}

impl Exit {
    pub(crate) fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::BadConfig => 64,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e.code())
    }
}
