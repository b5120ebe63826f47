//! What pilotlight's binaries share: log setup, the async runtime, one-line errors and
//! stop signals, so every binary behaves the same way.

use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;

/// Log format on stderr.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Plain,
    Json,
}

/// The global `--log-format` flag every binary takes (flatten it into the CLI).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct LogArgs {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "plain",
        env = "PILOTLIGHT_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

/// Sets up logging (level from `RUST_LOG`, default info; colours only on a terminal),
/// runs `main` on a multi-threaded runtime, and turns an error into one line on stderr,
/// `NAME: error: what failed, on which input, and what to do`, and a failure exit code.
pub fn run_main<F>(name: &str, format: LogFormat, main: F) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // The SDK's own warnings (an instance-metadata lookup refused off EC2, with a dump
        // of the HTTP answer) are noise: pilotlight says what it needs in one line.
        tracing_subscriber::EnvFilter::new("info,aws_config=error,aws_smithy_runtime=error")
    });
    let sub = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Plain => sub.init(),
        LogFormat::Json => sub.json().init(),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause named once: many errors already
/// print their source in their own message (`cannot open disk X: No such file ...`), so
/// a cause whose text is already there is not repeated.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out.replace('\n', " ")
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open disk /x: {source}")]
    struct Open {
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_named_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let e = anyhow::Error::new(Open { source: io }).context("send failed");
        assert_eq!(
            error_line(&e),
            "send failed: cannot open disk /x: No such file or directory"
        );
        let plain = anyhow::anyhow!("first\nline").context("outer");
        assert_eq!(error_line(&plain), "outer: first line");
    }
}
