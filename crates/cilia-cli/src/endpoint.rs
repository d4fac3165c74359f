//! `cilia endpoint`: create, list, show, configure and delete endpoints.

use cilia_api::{ApiClient, Endpoint, EndpointCreate, EndpointQuery, EndpointSettings};
use clap::Subcommand;

use crate::output::{cells, print_one, print_rows, Output};

#[derive(Debug, Subcommand)]
pub enum EndpointCmd {
    /// Connect a network namespace: veth, addresses, routes, BPF program.
    ///
    /// Example: cilia endpoint create --netns web1 --labels app=web,tier=front --named-port http=TCP/8080
    Create {
        /// Network namespace: a name under /run/netns or a path.
        #[arg(long)]
        netns: String,
        /// Labels: k=v[,k=v…].
        #[arg(long, default_value = "")]
        labels: String,
        /// Interface name inside the namespace.
        #[arg(long, default_value = "eth0")]
        ifname: String,
        /// Namespace the endpoint belongs to (label io.kubernetes.pod.namespace).
        #[arg(long, default_value = "default")]
        namespace: String,
        /// A port name policies may use (`port: http`): NAME=PROTO/PORT,
        /// e.g. http=TCP/8080; repeatable. Fixed for the endpoint's life.
        #[arg(long = "named-port", value_name = "NAME=PROTO/PORT")]
        named_ports: Vec<String>,
    },
    /// List endpoints.
    ///
    /// Example: cilia endpoint list
    List,
    /// Show one endpoint.
    ///
    /// Example: cilia endpoint get 1
    Get { id: u16 },
    /// Delete an endpoint and everything created for it.
    ///
    /// Example: cilia endpoint delete 1
    Delete { id: u16 },
    /// Change an endpoint's settings.
    ///
    /// Example: cilia endpoint config 1 policy-audit=enabled
    Config {
        id: u16,
        /// policy-audit=enabled|disabled: would-be drops pass, reported as AUDIT.
        setting: String,
    },
}

pub async fn run(cmd: EndpointCmd, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        EndpointCmd::Create {
            netns,
            labels,
            ifname,
            namespace,
            named_ports,
        } => {
            // Refused here, before anything reaches the agent (README, "Input limits").
            let labels = cilia_api::labels::parse_labels(&labels)
                .and_then(|l| cilia_api::labels::validate_endpoint_labels(&l).map(|()| l))
                .map_err(|e| e.in_field("--labels"))?;
            cilia_api::limits::check_ifname("--ifname", &ifname)?;
            let named_ports = named_ports_of(&named_ports)?;
            let req = EndpointCreate {
                netns,
                labels,
                ifname: Some(ifname),
                container_id: None,
                namespace: Some(namespace),
                label_source: None,
                network: None,
                named_ports,
                k8s_pod: None,
            };
            let e = client.create_endpoint(&req).await?;
            print_one(output, &e, |e| {
                outln!(
                    "endpoint {} created: ipv6 {} ipv4 {}",
                    e.id,
                    e.ipv6,
                    e.ipv4.as_deref().unwrap_or("-")
                )
            })
        }
        EndpointCmd::List => {
            let list = client.endpoints(&EndpointQuery::default()).await?;
            print_rows(
                output,
                &list,
                &[
                    "ID",
                    "STATE",
                    "IPV6",
                    "IPV4",
                    "NETNS",
                    "LABELS",
                    "NAMED PORTS",
                ],
                |e| {
                    let state = format!("{:?}", e.state).to_lowercase();
                    let ipv4 = e.ipv4.as_deref().unwrap_or("-");
                    let ports = named_ports_text(&e.named_ports);
                    cells(&[
                        &e.id,
                        &state,
                        &e.ipv6,
                        &ipv4,
                        &e.netns,
                        &labels_text(e),
                        &ports,
                    ])
                },
            )
        }
        EndpointCmd::Get { id } => {
            let e = client.endpoint(id).await?;
            print_one(output, &e, print_endpoint)
        }
        EndpointCmd::Config { id, setting } => {
            let audit = match setting.as_str() {
                "policy-audit=enabled" => true,
                "policy-audit=disabled" => false,
                other => anyhow::bail!(
                    "unknown setting {other:?}: use policy-audit=enabled or policy-audit=disabled"
                ),
            };
            let req = EndpointSettings {
                policy_audit: audit,
            };
            let e = client.set_endpoint_config(id, &req).await?;
            print_one(output, &e, |e| {
                let state = if e.policy_audit {
                    "enabled"
                } else {
                    "disabled"
                };
                outln!("endpoint {id}: policy audit {state}")
            })
        }
        EndpointCmd::Delete { id } => {
            client.delete_endpoint(id).await?;
            if !output.json() {
                outln!("endpoint {id} deleted");
            }
            Ok(())
        }
    }
}

/// Endpoint labels as `k=v,…` (an empty value as `k=`), or `-` for none.
fn labels_text(e: &Endpoint) -> String {
    if e.labels.is_empty() {
        return "-".into();
    }
    e.labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `--named-port` values, with the agent's checks run before sending
/// (README, "Input limits").
fn named_ports_of(values: &[String]) -> anyhow::Result<Vec<cilia_api::NamedPort>> {
    use cilia_policy::named;
    let ports = values
        .iter()
        .map(|v| v.parse::<cilia_api::NamedPort>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--named-port: {e}"))?;
    let max = cilia_api::limits::MAX_NAMED_PORTS;
    if ports.len() > max {
        anyhow::bail!("--named-port: {} given, at most {max}", ports.len());
    }
    let checked = ports
        .iter()
        .map(|p| named::named_port(&p.name, &p.protocol, u32::from(p.port)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--named-port: {e}"))?;
    named::endpoint_named_ports(&checked).map_err(|e| anyhow::anyhow!("--named-port: {e}"))?;
    Ok(ports)
}

fn print_endpoint(e: &Endpoint) {
    outln!("ID:          {}", e.id);
    outln!("State:       {:?}", e.state);
    if let Some(r) = &e.reason {
        outln!("Reason:      {r}");
    }
    outln!("IPv6:        {}", e.ipv6);
    outln!("IPv4:        {}", e.ipv4.as_deref().unwrap_or("-"));
    outln!("Netns:       {}", e.netns);
    outln!("Interface:   {} ({})", e.ifname, e.mac);
    outln!("Host side:   {} ({})", e.host_ifname, e.host_mac);
    outln!("Labels:      {}", labels_text(e));
    if !e.named_ports.is_empty() {
        outln!("Named ports: {}", named_ports_text(&e.named_ports));
    }
    if let Some(c) = &e.container_id {
        outln!("Container:   {c}");
    }
    if let Some(n) = &e.network {
        outln!("Network:     {n} (CNI, interface {})", e.ifname);
    }
}

/// `http=TCP/8080,metrics=TCP/9090`, or `-` when the endpoint names none.
fn named_ports_text(ports: &[cilia_api::NamedPort]) -> String {
    if ports.is_empty() {
        return "-".into();
    }
    ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",")
}
