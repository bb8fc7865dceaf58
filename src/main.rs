//! The `sixpn` binary: the gateway daemon and the CLI. Errors from every
//! layer end here as one line on stderr and a non-zero exit.

use std::process::ExitCode;

use clap::Parser;
use sixpn::cli::{self, Cli, Command};
use sixpn::config::Config;

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIXPN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Gateway { .. }) {
        // Before any thread exists: wireguard-control must never start a
        // wireguard-go of its own behind the supervisor's back.
        sixpn::dataplane::linux::forbid_userspace_autospawn();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = rt.block_on(async {
        match cli.command {
            Command::Gateway { config, take_over } => {
                init_logging(cli.log_json);
                let loaded = Config::load(&config)?;
                sixpn::gateway::run(loaded, &config, take_over).await?;
                Ok(())
            }
            command => Ok(cli::run(&cli.api, command).await?),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}
