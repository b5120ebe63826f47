//! What pilotlight's binaries share: log setup, the async runtime, one-line errors and
//! stop signals, so every binary behaves the same way; and the `points` listing the
//! receiver and DR CLIs share ([`points`]).

pub mod points;

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
    let e: &(dyn std::error::Error + 'static) = e.as_ref();
    pilotlight_cloud::error::causes(e)
}

/// Settings from a flag, else its environment variable (clap reads both), else the TOML
/// config file at `file`, else the default the caller applies to what is still unset.
/// Fills every setting the command line left unset (`None`, or `false` for a switch)
/// from the file; the file's keys are the settings' names in kebab-case, checked against
/// `T` (unknown keys and wrong types are refused, naming the file). One helper for every
/// binary: `T` is its settings struct, `Serialize + Deserialize` with
/// `rename_all = "kebab-case"` and `deny_unknown_fields`.
pub fn with_config_file<T>(given: T, file: Option<&std::path::Path>) -> anyhow::Result<T>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    use anyhow::Context;
    let Some(path) = file else {
        return Ok(given);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let bad = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!(
            "config file {}: {}",
            path.display(),
            e.to_string().replace('\n', " ")
        )
    };
    // Parsed as the settings first: that is what names an unknown key or a wrong type.
    let _: T = toml::from_str(&text).map_err(|e| bad(&e))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| bad(&e))?;
    let mut merged = serde_json::to_value(table).map_err(|e| bad(&e))?;
    let given = serde_json::to_value(&given).context("encoding the command-line settings")?;
    if let (Some(m), Some(g)) = (merged.as_object_mut(), given.as_object()) {
        for (k, v) in g {
            if !(v.is_null() || *v == serde_json::Value::Bool(false)) {
                m.insert(k.clone(), v.clone());
            }
        }
    }
    serde_json::from_value(merged).map_err(|e| bad(&e))
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

    #[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
    #[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
    struct Settings {
        #[serde(skip)]
        config: Option<String>,
        queue_url: Option<String>,
        wait_seconds: Option<u64>,
        dry_run: bool,
        json: bool,
    }

    #[test]
    fn flags_then_file_then_default() {
        let dir = std::env::temp_dir().join(format!("pl-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            "queue-url = \"from-file\"\nwait-seconds = 5\ndry-run = true\n",
        )
        .unwrap_or_default();
        let given = Settings {
            config: Some("x".into()),
            wait_seconds: Some(1),
            ..Default::default()
        };
        let s = match with_config_file(given, Some(&f)) {
            Ok(s) => s,
            Err(e) => panic!("{e:#}"),
        };
        assert_eq!(
            s.queue_url.as_deref(),
            Some("from-file"),
            "file fills what is unset"
        );
        assert_eq!(s.wait_seconds, Some(1), "a flag wins over the file");
        assert!(s.dry_run && !s.json, "switches: on from either");
        std::fs::write(&f, "queue-ur = 1\n").unwrap_or_default();
        let e = with_config_file(Settings::default(), Some(&f))
            .map(|_| ())
            .unwrap_err();
        assert!(
            e.to_string().contains("c.toml") && e.to_string().contains("queue-ur"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
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
