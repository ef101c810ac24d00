use std::process::ExitCode;

use clap::Parser as _;
use latchkey::cli::{Cli, Command};
use latchkey::clock::Clock;
use latchkey::config::Config;
use latchkey::startup::Application;
use latchkey::{api, cli, telemetry};

/// mimalloc (without transparent huge pages), so argon2's 19 MiB blocks go back to the
/// OS; glibc's malloc kept hundreds of MiB of them (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // A missing .env is normal; a broken one is worth saying.
    if let Err(e) = dotenvy::dotenv()
        && !e.not_found()
    {
        eprintln!("error: reading .env: {e}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Openapi = command {
        print!("{}", api::spec_json());
        return ExitCode::SUCCESS;
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    telemetry::init(config.log_format);
    let result = match command {
        Command::Migrate { action } => cli::migrate(&config, action).await,
        Command::User { action } => cli::user(&config, action).await,
        Command::Keys { action } => cli::keys(&config, action).await,
        Command::Client { action } => cli::client(&config, action).await,
        _ => serve(config).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let app = Application::build(config, Clock::system()).await?;
    app.run_until_stopped(shutdown_signal()).await
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}
