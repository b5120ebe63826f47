//! The DR Lambda: set up tracing, settings and clients, then serve the handler.
//! Invoked with a DR request (`{"action": "start" | "status" | "cleanup", ...}`), or by
//! an EventBridge schedule, which advances every unfinished run.

// The handler's future (plans over runs over the SDK clients) is deep.
#![recursion_limit = "256"]

use clap::Parser;
use lambda_runtime::{run, service_fn, Error, LambdaEvent};
use pilotlight_dr::config::DrSettings;
use serde_json::Value;

#[derive(Debug, Parser)]
struct Lambda {
    #[command(flatten)]
    settings: DrSettings,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing_subscriber::fmt()
        .json()
        .with_target(false)
        .without_time()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // Settings come from the function's environment variables.
    let settings = Lambda::try_parse_from(["pilotlight-dr-lambda"])?.settings;
    let env = settings.env().await?;
    let (dns, cmd, witness) = pilotlight_dr::config::plan_clients(&settings.aws().await).await;
    let plans = pilotlight_dr::plans::run::PlanEnv {
        dr: &env,
        dns: &dns,
        cmd: &cmd,
        witness: &witness,
    };
    let plans = &plans;
    run(service_fn(move |event: LambdaEvent<Value>| async move {
        pilotlight_dr::plans::handle(plans, event.payload)
            .await
            .map_err(Error::from)
    }))
    .await
}
