//! `cilia datapath`: the agent's BPF programs, hotfixed in place.

use cilia_api::{ApiClient, DatapathReload, LinkReload};
use clap::Subcommand;

use crate::output::{print_json, print_table, Output};

#[derive(Debug, Subcommand)]
pub enum DatapathCmd {
    /// Re-specialize every endpoint's programs from the agent's build and
    /// swap them in through their pinned links, keeping maps and
    /// connections. An endpoint whose new program fails (the verifier's
    /// reason is shown) keeps its old one; exits 1 if any failed.
    ///
    /// Example: cilia datapath reload --force -o json
    Reload {
        /// Also swap programs that already are this build's with the
        /// endpoint's configuration (otherwise reported unchanged).
        #[arg(long)]
        force: bool,
    },
}

pub async fn run(cmd: DatapathCmd, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        DatapathCmd::Reload { force } => {
            let r = client.datapath_reload(&DatapathReload { force }).await?;
            if output.json() {
                print_json(&r)?;
            } else {
                let rows = r
                    .endpoints
                    .iter()
                    .map(|e| {
                        let ids = |f: fn(&LinkReload) -> String| {
                            e.links.iter().map(f).collect::<Vec<_>>().join(",")
                        };
                        vec![
                            e.endpoint_id.to_string(),
                            serde_json::to_value(e.outcome)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default(),
                            ids(|l| l.link_id.to_string()),
                            ids(|l| format!("{} -> {}", l.old_program_id, l.new_program_id)),
                            e.reason.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ENDPOINT",
                        "RESULT",
                        "LINK",
                        "PROGRAM (OLD -> NEW)",
                        "REASON",
                    ],
                    rows,
                );
                outln!(
                    "{} reloaded, {} unchanged, {} failed, {} skipped",
                    r.reloaded,
                    r.unchanged,
                    r.failed,
                    r.skipped
                );
            }
            if r.failed > 0 {
                anyhow::bail!(
                    "{} endpoint(s) failed to reload and keep their old programs",
                    r.failed
                );
            }
            Ok(())
        }
    }
}
