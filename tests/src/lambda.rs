//! A Lambda function binary run as Lambda runs it, offline: `cargo lambda watch`'s runtime
//! emulator on a free loopback port, the function started against it (the variables the
//! Lambda runtime sets), invocations through `cargo lambda invoke`.

use crate::cli::Running;
use crate::{bin, poll_until, repo_root};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[derive(Debug)]
pub struct LambdaEmulator {
    pub port: String,
    cargo_lambda: PathBuf,
    _watch: Running,
}

impl LambdaEmulator {
    /// Starts the emulator (logs in `dir`) and waits until it listens.
    pub async fn start(dir: &Path) -> LambdaEmulator {
        let cargo_lambda = repo_root().join(".venv/lambda/bin/cargo-lambda");
        assert!(
            cargo_lambda.exists(),
            "cargo-lambda missing: run scripts/setup"
        );
        let port = crate::stack::free_port().to_string();
        // Not under `timeout`: killing the wrapper would leave the emulator running.
        let watch = Running(
            Command::new(&cargo_lambda)
                .args([
                    "lambda",
                    "watch",
                    "--only-lambda-apis",
                    "-A",
                    "127.0.0.1",
                    "-P",
                    &port,
                ])
                .current_dir(repo_root())
                .stdout(std::fs::File::create(dir.join("watch.log")).expect("watch.log"))
                .stderr(std::fs::File::create(dir.join("watch.err")).expect("watch.err"))
                .spawn()
                .expect("start cargo lambda watch"),
        );
        // The function's runtime client gives up if the emulator is not listening yet.
        poll_until(
            "the Lambda emulator listens",
            Duration::from_secs(60),
            || {
                let up = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok();
                async move { up.then_some(()) }
            },
        )
        .await;
        LambdaEmulator {
            port,
            cargo_lambda,
            _watch: watch,
        }
    }

    /// The function binary `name`, started against the emulator with `env` (its log in
    /// `dir/function.log` and `.err`); `_` is the function name the emulator serves when
    /// it does not start the function itself.
    pub fn function(&self, name: &str, env: &[(String, String)], dir: &Path) -> Running {
        Running(
            Command::new(bin(name))
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .env("AWS_LAMBDA_FUNCTION_NAME", "_")
                .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
                .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
                .env(
                    "AWS_LAMBDA_RUNTIME_API",
                    format!("http://127.0.0.1:{}/.rt", self.port),
                )
                .stdout(std::fs::File::create(dir.join("function.log")).expect("function.log"))
                .stderr(std::fs::File::create(dir.join("function.err")).expect("function.err"))
                .spawn()
                .expect("start the function"),
        )
    }

    /// `cargo lambda invoke` with `data` (JSON text, or a file's path), under a deadline:
    /// an invoke nobody serves waits forever. Whether it succeeded, and what it printed.
    pub fn invoke(&self, data: &str) -> (bool, String) {
        let how = if data.trim_start().starts_with('{') {
            "--data-ascii"
        } else {
            "--data-file"
        };
        let out = Command::new("timeout")
            .arg("60")
            .arg(&self.cargo_lambda)
            .args([
                "lambda",
                "invoke",
                how,
                data,
                "-A",
                "127.0.0.1",
                "-P",
                &self.port,
            ])
            .current_dir(repo_root())
            .output()
            .expect("run cargo lambda invoke");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}
