//! `cilia service`: services (a frontend `[VIP]:PORT/PROTO` balanced over
//! backends) and `cilia bpf lb list`'s printer.

use std::time::Duration;

use cilia_api::{
    ApiClient, BpfLb, Service, ServiceAffinity, ServiceBackendSpec, ServiceImport, ServiceSpec,
};
use clap::{Args, Subcommand, ValueEnum};

use crate::output::{cells, print_one, print_rows, print_table, Output};

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Create a service, or replace one (the one with --id, else the one
    /// with this frontend).
    ///
    /// Example: cilia service update --frontend '[2001:db8::10]:80/tcp' --backends '[fd00::5]:8080,[fd00::6]:8080'
    ///
    /// Example: cilia service update --id 7 --frontend 192.0.2.10:53/udp --backends 10.200.0.5:53,10.200.0.6:53 --weights 1,3 --algorithm maglev
    ///
    /// Example: cilia service update --frontend 192.0.2.10:80/tcp --backends 10.200.0.5:80 --affinity client-ip --affinity-timeout 3h
    Update(UpdateArgs),
    /// Create or replace many services from a YAML or JSON file: a list of
    /// specs (the fields of POST /v1/services: id, frontend, backends,
    /// algorithm, affinity, external_traffic_policy). All are checked
    /// first; if one is refused, nothing is applied and each refused entry
    /// is named by its index and field. One store commit for the whole file.
    ///
    /// Example: cilia service import services.yaml
    ///
    /// Example: cilia service import --prune - < services.json
    Import(ImportArgs),
    /// The services, with their backends and backend ids.
    ///
    /// Example: cilia service list -o json
    List,
    /// One service.
    ///
    /// Example: cilia service get 7
    Get { id: u16 },
    /// Delete a service (backends no other service uses are removed; their
    /// flows are re-selected on their next packet).
    ///
    /// Example: cilia service delete 7
    Delete { id: u16 },
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Affinity {
    /// A client address's new flows go to the backend of its last flow.
    ClientIp,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// External clients may reach any backend (another node's by SNAT or
    /// DSR, as the agent's --lb-mode says).
    Cluster,
    /// External clients reach this node's backends only (their address is
    /// kept); a node without one drops them.
    Local,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum AlgorithmArg {
    /// A random active backend per new flow.
    Random,
    /// The service's Maglev table (consistent hashing, weights respected).
    Maglev,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// `[VIP]:PORT/PROTO` (PROTO tcp or udp; IPv6 in brackets). A NodePort
    /// service has the address 0.0.0.0 or [::]: it is served at every
    /// address of the node (multi-node mode).
    #[arg(long)]
    frontend: String,
    /// Backends, comma-separated `ADDR:PORT` (`[IPv6]:PORT`); empty: new
    /// flows are dropped.
    #[arg(long, default_value = "")]
    backends: String,
    /// Service id (1-65535); default: the frontend's, or the lowest free.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    id: Option<u16>,
    /// Weights, comma-separated, one per backend (Maglev; 0: no new flows).
    #[arg(long)]
    weights: Option<String>,
    /// Session affinity.
    #[arg(long, value_enum)]
    affinity: Option<Affinity>,
    /// How long a client stays with its backend after its last new flow
    /// (e.g. 30s, 10m, 3h); default 3h.
    #[arg(long, requires = "affinity", value_parser = humantime::parse_duration)]
    affinity_timeout: Option<Duration>,
    /// How a backend is chosen for a new flow.
    #[arg(long, value_enum, default_value = "random")]
    algorithm: AlgorithmArg,
    /// NodePort services: externalTrafficPolicy.
    #[arg(long, value_enum)]
    external_traffic_policy: Option<TrafficPolicy>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// YAML or JSON file (a list of service specs), or - for standard input.
    file: String,
    /// Also delete the services the file does not name: the file becomes
    /// the whole set of services.
    #[arg(long)]
    prune: bool,
}

impl ImportArgs {
    /// The request, from the file's text.
    fn import(&self, text: &str) -> anyhow::Result<ServiceImport> {
        let services: Vec<ServiceSpec> = serde_norway::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a list of service specs (id, frontend, backends, algorithm, affinity, external_traffic_policy): {e}",
                self.source()
            )
        })?;
        Ok(ServiceImport {
            services,
            prune: self.prune,
        })
    }

    fn source(&self) -> &str {
        if self.file == "-" {
            "stdin"
        } else {
            &self.file
        }
    }

    fn read(&self) -> anyhow::Result<String> {
        use std::io::Read;
        if self.file == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            Ok(s)
        } else {
            std::fs::read_to_string(&self.file).map_err(|e| anyhow::anyhow!("{}: {e}", self.file))
        }
    }
}

/// The affinity timeout when none is given.
const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(3 * 3600);

impl UpdateArgs {
    /// The request; refuses what is wrong before asking the agent.
    fn spec(&self) -> anyhow::Result<ServiceSpec> {
        let backends = cilia_lb::model::parse_backends(&self.backends)?;
        let weights = match &self.weights {
            Some(w) => Some(cilia_lb::model::parse_weights(w, backends.len())?),
            None => None,
        };
        let affinity = match self.affinity {
            Some(Affinity::ClientIp) => {
                let timeout = self.affinity_timeout.unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
                let secs = u32::try_from(timeout.as_secs())
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "--affinity-timeout {}: give 1s to {}s",
                            humantime::format_duration(timeout),
                            u32::MAX
                        )
                    })?;
                Some(ServiceAffinity { timeout_secs: secs })
            }
            None => None,
        };
        Ok(ServiceSpec {
            external_traffic_policy: self.external_traffic_policy.map(|p| {
                match p {
                    TrafficPolicy::Cluster => "Cluster",
                    TrafficPolicy::Local => "Local",
                }
                .to_string()
            }),
            id: self.id,
            frontend: self.frontend.clone(),
            backends: backends
                .iter()
                .enumerate()
                .map(|(i, b)| ServiceBackendSpec {
                    address: b.addr.to_string(),
                    weight: weights.as_ref().map(|w| w[i]),
                    state: None,
                })
                .collect(),
            algorithm: Some(
                match self.algorithm {
                    AlgorithmArg::Random => "random",
                    AlgorithmArg::Maglev => "maglev",
                }
                .into(),
            ),
            affinity,
        })
    }
}

pub async fn run(cmd: ServiceCmd, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Update(args) => {
            let service = client.update_service(&args.spec()?).await?;
            print_one(output, &service, |s| {
                print_services(std::slice::from_ref(s))
            })
        }
        ServiceCmd::Import(args) => {
            let import = args.import(&args.read()?)?;
            let r = client.import_services(&import).await?;
            print_one(output, &r, |r| {
                outln!(
                    "{}: {} services: {} created, {} updated, {} unchanged; {} deleted",
                    args.source(),
                    r.ids.len(),
                    r.created,
                    r.updated,
                    r.unchanged,
                    r.deleted.len()
                )
            })
        }
        ServiceCmd::List => {
            let services = client.services().await?;
            print_one(output, &services, |s| print_services(s))
        }
        ServiceCmd::Get { id } => {
            let service = client.service(id).await?;
            print_one(output, &service, |s| {
                print_services(std::slice::from_ref(s))
            })
        }
        ServiceCmd::Delete { id } => {
            client.delete_service(id).await?;
            if !output.json() {
                outln!("Deleted service {id}");
            }
            Ok(())
        }
    }
}

/// One row per backend; the service's columns on its first row only.
fn print_services(services: &[Service]) {
    let mut rows = Vec::new();
    for s in services {
        let lb = match &s.affinity {
            Some(a) => format!(
                "{} (affinity {})",
                s.algorithm,
                humantime::format_duration(Duration::from_secs(u64::from(a.timeout_secs)))
            ),
            None => s.algorithm.clone(),
        };
        if s.backends.is_empty() {
            rows.push(cells(&[&s.id, &s.frontend, &lb, &"-", &"", &"", &""]));
        }
        for (i, b) in s.backends.iter().enumerate() {
            let (id, frontend, lb): (
                &dyn std::fmt::Display,
                &dyn std::fmt::Display,
                &dyn std::fmt::Display,
            ) = if i == 0 {
                (&s.id, &s.frontend, &lb)
            } else {
                (&"", &"", &"")
            };
            rows.push(cells(&[
                id, frontend, lb, &b.address, &b.id, &b.weight, &b.state,
            ]));
        }
    }
    print_table(
        &[
            "ID",
            "FRONTEND",
            "ALGORITHM",
            "BACKEND",
            "BACKEND ID",
            "WEIGHT",
            "STATE",
        ],
        rows,
    )
}

/// `cilia bpf lb list`: services (slots, Maglev shares) and backends as the
/// kernel holds them.
pub fn print_bpf_lb(output: Output, lb: &BpfLb) -> anyhow::Result<()> {
    if output.json() {
        return print_one(output, lb, |_| {});
    }
    outln!("Maglev table size: {}", lb.maglev_table_size);
    outln!("");
    print_table(
        &[
            "ID",
            "FRONTEND",
            "FLAGS",
            "ALGORITHM",
            "AFFINITY",
            "SLOTS",
            "MAGLEV",
        ],
        lb.services
            .iter()
            .map(|s| {
                let slots = if s.slots.is_empty() {
                    "- (drops new flows)".to_string()
                } else {
                    join(s.slots.iter())
                };
                let maglev = s.maglev.as_ref().map_or("-".to_string(), |shares| {
                    shares
                        .iter()
                        .map(|m| format!("{}:{}", m.backend, m.entries))
                        .collect::<Vec<_>>()
                        .join(",")
                });
                let affinity = s
                    .affinity_timeout
                    .map_or("-".to_string(), |t| format!("{t}s"));
                let flags = if s.flags.is_empty() {
                    "-".to_string()
                } else {
                    s.flags.join(",")
                };
                cells(&[
                    &s.id,
                    &s.frontend,
                    &flags,
                    &s.algorithm,
                    &affinity,
                    &slots,
                    &maglev,
                ])
            })
            .collect(),
    );
    outln!("");
    print_rows(
        output,
        &lb.backends,
        &["BACKEND ID", "ADDRESS", "STATE"],
        |b| cells(&[&b.id, &b.address, &b.state]),
    )
}

fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    items.map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: ServiceCmd,
    }

    fn update(args: &[&str]) -> anyhow::Result<ServiceSpec> {
        let mut argv = vec!["cilia", "update"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.cmd {
            ServiceCmd::Update(u) => u.spec(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn update_builds_the_spec_with_weights_and_affinity() {
        let spec = update(&[
            "--frontend",
            "[2001:db8::10]:80/tcp",
            "--backends",
            "[fd00::5]:8080,[fd00::6]:8080",
            "--weights",
            "1,3",
            "--id",
            "7",
            "--algorithm",
            "maglev",
            "--affinity",
            "client-ip",
            "--affinity-timeout",
            "10m",
        ])
        .expect("spec");
        assert_eq!(spec.id, Some(7));
        assert_eq!(spec.backends[1].address, "[fd00::6]:8080");
        assert_eq!(spec.backends[1].weight, Some(3));
        assert_eq!(spec.algorithm.as_deref(), Some("maglev"));
        assert_eq!(spec.affinity, Some(ServiceAffinity { timeout_secs: 600 }));
    }

    fn import_of(text: &str) -> anyhow::Result<ServiceImport> {
        match Cli::try_parse_from(["cilia", "import", "--prune", "f.yaml"])?.cmd {
            ServiceCmd::Import(a) => a.import(text),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn import_reads_a_yaml_or_json_list_of_specs() {
        let yaml = "- frontend: 192.0.2.10:80/tcp\n  backends: [{address: 10.0.0.1:80}]\n- id: 7\n  frontend: '[2001:db8::10]:53/udp'\n  backends: []\n  algorithm: maglev\n";
        let i = import_of(yaml).expect("yaml");
        assert!(i.prune);
        assert_eq!(i.services.len(), 2);
        assert_eq!(i.services[1].id, Some(7));
        assert_eq!(i.services[0].backends[0].address, "10.0.0.1:80");
        let json = r#"[{"frontend":"192.0.2.10:80/tcp","backends":[{"address":"10.0.0.1:80"}]}]"#;
        assert_eq!(import_of(json).expect("json").services.len(), 1);
        let e = import_of("- frontend: 192.0.2.10:80/tcp\n  backend: []\n").expect_err("typo");
        assert!(
            e.to_string().contains("f.yaml") && e.to_string().contains("backend"),
            "{e}"
        );
    }

    #[test]
    fn affinity_defaults_to_three_hours() {
        let spec = update(&[
            "--frontend",
            "192.0.2.10:80/tcp",
            "--backends",
            "10.0.0.1:80",
            "--affinity",
            "client-ip",
        ])
        .expect("spec");
        assert_eq!(
            spec.affinity,
            Some(ServiceAffinity {
                timeout_secs: 10_800
            })
        );
    }

    #[test]
    fn bad_input_is_refused_before_asking_the_agent() {
        let e = update(&["--frontend", "192.0.2.10:80/tcp", "--backends", "10.0.0.1"])
            .expect_err("no port");
        assert!(e.to_string().contains("backend \"10.0.0.1\""), "{e}");
        let e = update(&[
            "--frontend",
            "192.0.2.10:80/tcp",
            "--backends",
            "10.0.0.1:80",
            "--weights",
            "1,2",
        ])
        .expect_err("weights");
        assert!(e.to_string().contains("2 weights for 1 backends"), "{e}");
        let e = update(&[
            "--frontend",
            "192.0.2.10:80/tcp",
            "--affinity-timeout",
            "1h",
        ])
        .expect_err("timeout without affinity");
        assert!(e.to_string().contains("--affinity"), "{e}");
        assert!(update(&["--frontend", "x", "--id", "0"]).is_err());
    }
}
