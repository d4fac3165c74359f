//! `cilia policy`: import, show, delete, validate (offline) and trace
//! network policies.

use cilia_api::{
    ApiClient, PolicyChange, PolicyDelete, PolicyImport, TraceHttpRequest, TraceRequest,
    TraceResponse,
};
use clap::Subcommand;

use crate::output::{cells, print_json, print_one, print_table, Output};

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Import NetworkPolicy / CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy
    /// YAML (all documents or none); prints the new policy revision.
    ///
    /// Example: cilia policy import examples/starwars/cnp-l3-l4.yaml
    Import {
        /// YAML file, or - for standard input.
        file: String,
    },
    /// Show the imported policies.
    ///
    /// Example: cilia policy get -o yaml
    Get,
    /// Delete a policy by name, or all of them.
    ///
    /// Example: cilia policy delete rule1
    Delete {
        /// Policy name.
        #[arg(required_unless_present = "all")]
        name: Option<String>,
        /// Only the policy of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Delete every policy.
        #[arg(long, conflicts_with = "name")]
        all: bool,
    },
    /// Check a policy file without an agent (offline).
    ///
    /// Example: cilia policy validate examples/starwars/cnp-l3-l4.yaml
    Validate {
        /// YAML file, or - for standard input.
        file: String,
    },
    /// Explain the verdict for a connection, from the state that programs the maps;
    /// with --http-*, also what the L7 (HTTP) rules decide for one request.
    ///
    /// Example: cilia policy trace --src org=alliance,class=xwing --dst 1 --dport 80/TCP --datapath
    ///
    /// Example: cilia policy trace --src org=empire,class=tiefighter --dst org=empire,class=deathstar --dport 80/TCP --http-method POST --http-path /v1/request-landing
    Trace {
        /// Source: endpoint id, IP address, or labels k=v[,k=v…].
        #[arg(long)]
        src: String,
        /// Destination: endpoint id, IP address, or labels.
        #[arg(long)]
        dst: String,
        /// PORT/PROTO (80/TCP, 53/UDP, ICMP).
        #[arg(long)]
        dport: String,
        /// Also run the source endpoint's loaded program on a synthesized packet.
        #[arg(long)]
        datapath: bool,
        /// HTTP request method to run through the L7 rules (needs --http-path).
        #[arg(long, requires = "http_path")]
        http_method: Option<String>,
        /// HTTP request path and query (needs --http-method).
        #[arg(long, requires = "http_method")]
        http_path: Option<String>,
        /// HTTP Host header.
        #[arg(long, requires = "http_method")]
        http_host: Option<String>,
        /// HTTP header 'Name: value' (repeatable).
        #[arg(long = "http-header", requires = "http_method")]
        http_headers: Vec<String>,
    },
}

pub async fn run(cmd: PolicyCmd, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Import { file } => {
            let yaml = read_input(&file)?;
            // The agent would refuse it too, but only after the whole text crossed the socket.
            let max = cilia_policy::limits::MAX_POLICY_BYTES;
            if yaml.len() > max {
                anyhow::bail!(
                    "{file}: the policy text is {} bytes, more than the limit of {max} (MAX_POLICY_BYTES)",
                    yaml.len()
                );
            }
            let req = PolicyImport {
                source: if file == "-" { "stdin".into() } else { file },
                yaml,
            };
            let r = client.import_policy(&req).await?;
            print_one(output, &r, |r| print_imported(&req.source, r))
        }
        PolicyCmd::Get => {
            let list = client.policies().await?;
            match output {
                Output::Json => print_json(&list)?,
                Output::Yaml => {
                    let docs: Vec<&str> = list.policies.iter().map(|p| p.yaml.trim_end()).collect();
                    outln!("{}", docs.join("\n---\n"));
                }
                Output::Table => {
                    print_table(
                        &["KIND", "NAMESPACE", "NAME", "SOURCE"],
                        list.policies
                            .iter()
                            .map(|p| {
                                let namespace = p.namespace.as_deref().unwrap_or("-");
                                cells(&[&p.kind, &namespace, &p.name, &p.source])
                            })
                            .collect(),
                    );
                    outln!("Revision: {}", list.revision);
                    for e in &list.errors {
                        outln!("error (stored policy skipped): {e}");
                    }
                }
            }
            Ok(())
        }
        PolicyCmd::Delete {
            name,
            namespace,
            all,
        } => {
            let which = match (name, all) {
                (_, true) => PolicyDelete::All,
                (Some(name), false) => PolicyDelete::Named { name, namespace },
                (None, false) => anyhow::bail!("give a policy name or --all"),
            };
            let r = client.delete_policy(&which).await?;
            print_one(output, &r, |r| {
                for p in &r.policies {
                    outln!("deleted {p}");
                }
                outln!("Revision: {}", r.revision);
            })
        }
        PolicyCmd::Validate { file } => validate(&file),
        PolicyCmd::Trace {
            src,
            dst,
            dport,
            datapath,
            http_method,
            http_path,
            http_host,
            http_headers,
        } => {
            cilia_api::parse_port_proto(&dport).map_err(|e| anyhow::anyhow!(e))?;
            for h in &http_headers {
                if !h.contains(':') {
                    anyhow::bail!("--http-header {h:?}: expected 'Name: value'");
                }
            }
            let http = match (http_method, http_path) {
                (Some(method), Some(path)) => Some(TraceHttpRequest {
                    method,
                    path,
                    host: http_host,
                    headers: http_headers,
                }),
                _ => None,
            };
            let req = TraceRequest {
                src,
                dst,
                dport,
                datapath,
                http,
            };
            print_one(output, &client.trace(&req).await?, print_trace)
        }
    }
}

/// Parses a policy file locally, as the agent would, and lists what it holds.
fn validate(file: &str) -> anyhow::Result<()> {
    let yaml = read_input(file)?;
    let source = if file == "-" { "stdin" } else { file };
    let stream = cilia_policy::parse_stream(source, &yaml)?;
    if stream.policies.is_empty() {
        anyhow::bail!(
            "{source}: no policy documents found ({} document(s) read, all empty)",
            stream.documents
        );
    }
    outln!("{source}: read {} document(s)", stream.documents);
    for i in &stream.empty {
        outln!("note: document {i} is empty: skipped");
    }
    for d in &stream.policies {
        outln!(
            "valid: {:?} {} (document {})",
            d.policy.kind,
            d.policy.qualified_name(),
            d.index
        );
    }
    Ok(())
}

fn read_input(file: &str) -> anyhow::Result<String> {
    use std::io::Read;
    if file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{file}: {e}"))
    }
}

fn print_imported(source: &str, r: &PolicyChange) {
    if let Some(n) = r.documents {
        outln!("{source}: read {n} document(s)");
    }
    for note in &r.notes {
        outln!("note: {note}");
    }
    for p in &r.created {
        outln!("created {p}");
    }
    for p in &r.replaced {
        outln!("replaced {p}");
    }
    outln!("Revision: {}", r.revision);
}

fn print_trace(t: &TraceResponse) {
    outln!("From: {} (identity {})", t.src, t.src_identity);
    outln!("To:   {} (identity {})", t.dst, t.dst_identity);
    for s in &t.steps {
        outln!(
            "  {} of {}: {} — {}",
            s.direction,
            s.subject,
            s.verdict,
            s.reason
        );
        for r in &s.rules {
            outln!("      rule: {r}");
        }
        if let Some(l7) = &s.l7 {
            match &l7.verdict {
                Some(v) => outln!("      L7 (HTTP): {v} — {}", l7.reason),
                None => outln!("      L7 (HTTP): {}", l7.reason),
            }
            for r in &l7.rules {
                outln!("      L7 rule: {r}");
            }
        }
    }
    outln!("Verdict: {}", t.verdict);
    if let Some(v) = &t.http_verdict {
        let answer = if v == "DENIED" {
            " (the proxy answers 403 Access denied)"
        } else {
            ""
        };
        outln!("HTTP verdict: {v}{answer}");
    }
    if let Some(d) = &t.datapath {
        let agree = if *d == t.verdict {
            "agrees"
        } else {
            "DISAGREES"
        };
        outln!("Datapath: {d} (the loaded program {agree} with the control plane)");
    }
}
