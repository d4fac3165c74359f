//! `cilia`: command-line client of the cilia agent. A thin layer over the
//! typed API client ([`cilia_api::ApiClient`]): parse arguments, call, print
//! a table or JSON. One module per command group; `output` owns standard
//! output (and what a closed pipe does).

// Every line goes through `outln!`: a closed pipe must end the CLI quietly.
#![deny(clippy::print_stdout)]

#[macro_use]
mod output;
mod bpf;
mod cni;
mod datapath;
mod endpoint;
mod flows;
mod identity;
mod namespace;
mod node;
mod policy;
mod prefilter;
mod service;
mod status;

use std::path::PathBuf;

use cilia_api::ApiClient;
use clap::{Parser, Subcommand};

use output::Output;

/// Command-line client of cilia-agent.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, env = "CILIA_SOCKET", default_value = cilia_api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format of commands that print data.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Agent health, kernel features, endpoint count, IPAM usage.
    ///
    /// Example: cilia status --verbose
    ///
    /// Example: cilia status --cluster
    Status(status::StatusArgs),
    /// Manage endpoints (a network namespace connected by cilia).
    #[command(subcommand)]
    Endpoint(endpoint::EndpointCmd),
    /// Read the datapath's BPF maps back from the kernel.
    #[command(subcommand)]
    Bpf(bpf::BpfCmd),
    /// Import, inspect, delete, validate and trace network policies.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Security identities (labels -> number).
    #[command(subcommand)]
    Identity(identity::IdentityCmd),
    /// Namespaces and their labels (selected by namespaceSelector).
    #[command(subcommand)]
    Namespace(namespace::NamespaceCmd),
    /// The cluster's nodes: addresses, pod ranges, health, heartbeat.
    ///
    /// Example: cilia node list
    #[command(subcommand)]
    Node(node::NodeCmd),
    /// Services: a frontend [VIP]:PORT/PROTO load-balanced over backends.
    ///
    /// Example: cilia service update --frontend '[2001:db8::10]:80/tcp' --backends '[fd00::5]:8080,[fd00::6]:8080'
    ///
    /// Example: cilia service list
    #[command(subcommand)]
    Service(service::ServiceCmd),
    /// The XDP prefilter: source CIDRs dropped on the node's devices.
    ///
    /// Example: cilia prefilter update --cidr 203.0.113.0/24
    #[command(subcommand)]
    Prefilter(prefilter::PrefilterCmd),
    /// The agent's BPF programs: hotfix them in place.
    #[command(subcommand)]
    Datapath(datapath::DatapathCmd),
    /// Stream events live: drops, traces, policy verdicts, L7 (HTTP) requests.
    ///
    /// Example: cilia monitor --type drop --type l7 --related-to 1
    Monitor(flows::MonitorArgs),
    /// Recent flows (drops, verdicts, L7 requests, and traces while
    /// monitored), filtered.
    ///
    /// Example: cilia observe --verdict DROPPED --to-label class=deathstar --last 20
    ///
    /// Example: cilia observe --type l7 --http-method PUT --http-path '/v1/.*'
    ///
    /// Example: cilia observe --cluster --verdict DROPPED --last 50
    Observe(flows::ObserveArgs),
    /// The CNI plugin on this host: install `cilia-cni` and its conflist
    /// (needs no agent; the Kubernetes DaemonSet's init container runs it).
    ///
    /// Example: cilia cni install --bin-dir /opt/cni/bin --conf-dir /etc/cni/net.d
    #[command(subcommand)]
    Cni(cni::CniCmd),
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = ApiClient::new(&cli.socket);
    let out = cli.output;
    if out == Output::Yaml && !matches!(cli.command, Command::Policy(policy::PolicyCmd::Get)) {
        anyhow::bail!("-o yaml is only supported by `cilia policy get`; use -o json");
    }
    match cli.command {
        Command::Status(args) => status::run(args, &client, out).await,
        Command::Endpoint(cmd) => endpoint::run(cmd, &client, out).await,
        Command::Bpf(cmd) => bpf::run(cmd, &client, out).await,
        Command::Policy(cmd) => policy::run(cmd, &client, out).await,
        Command::Identity(cmd) => identity::run(cmd, &client, out).await,
        Command::Namespace(cmd) => namespace::run(cmd, &client, out).await,
        Command::Node(cmd) => node::run(cmd, &client, out).await,
        Command::Service(cmd) => service::run(cmd, &client, out).await,
        Command::Datapath(cmd) => datapath::run(cmd, &client, out).await,
        Command::Prefilter(cmd) => prefilter::run(cmd, &client, out).await,
        Command::Monitor(args) => flows::monitor(args, &client, out).await,
        Command::Observe(args) => flows::observe(args, &client, out).await,
        Command::Cni(cmd) => cni::run(cmd),
    }
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cilia: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}
