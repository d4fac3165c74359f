//! `cilia-proxy`: parses flags, sets up logging, runs [`cilia_proxy::run`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// cilia's L7 HTTP proxy. Started and supervised by cilia-agent; it listens
/// transparently on --port once the agent pushed a policy on the control
/// socket, and keeps enforcing it when the agent goes away.
///
/// Example: cilia-proxy --control-socket /var/run/cilia/proxy.sock --port 15080
#[derive(Debug, Parser)]
#[command(name = "cilia-proxy", version)]
struct Args {
    /// Unix socket the agent connects to (created mode 0600; a stale file is replaced).
    #[arg(long, value_name = "PATH")]
    control_socket: PathBuf,
    /// Port of the transparent listeners (IPv4 and IPv6).
    #[arg(long, value_name = "N", default_value_t = cilia_proxy::control::DEFAULT_PROXY_PORT)]
    port: u16,
    /// Connections one client address may hold open at once; more are closed
    /// at accept, so that one client cannot exhaust the proxy for all.
    #[arg(long, value_name = "N", default_value_t = cilia_proxy::MAX_CONNECTIONS_PER_CLIENT)]
    max_connections_per_client: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let mut config = cilia_proxy::Config::new(args.control_socket);
    config.port = args.port;
    config.max_connections_per_client = args.max_connections_per_client;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    // The error's message already carries its cause: print it once.
    runtime
        .block_on(cilia_proxy::run(config))
        .map_err(|e| anyhow::anyhow!("{e}"))
}
