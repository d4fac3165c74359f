//! `cilia prefilter`: the XDP prefilter's source CIDRs (dropped on the
//! agent's `--prefilter-device`s before the node's stack sees them).

use cilia_api::{ApiClient, Prefilter, PrefilterCidrs};
use clap::Subcommand;

use crate::output::{print_one, print_table, Output};

#[derive(Debug, Subcommand)]
pub enum PrefilterCmd {
    /// Add source CIDRs to drop (those already listed stay; all or nothing).
    ///
    /// Example: cilia prefilter update --cidr 203.0.113.0/24 --cidr 2001:db8:bad::/48
    Update {
        /// A CIDR, ADDRESS/LENGTH with no host bits set; repeat or comma
        /// separate for several.
        #[arg(long, required = true, value_delimiter = ',')]
        cidr: Vec<String>,
    },
    /// The devices the prefilter runs on (and in which XDP mode), and its
    /// CIDRs with the packets and bytes each dropped.
    ///
    /// Example: cilia prefilter list -o json
    List,
    /// Remove source CIDRs (each must be listed; all or nothing).
    ///
    /// Example: cilia prefilter delete --cidr 203.0.113.0/24
    Delete {
        /// A listed CIDR; repeat or comma separate for several.
        #[arg(long, required = true, value_delimiter = ',')]
        cidr: Vec<String>,
    },
}

pub async fn run(cmd: PrefilterCmd, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    let p = match cmd {
        PrefilterCmd::Update { cidr } => {
            client
                .add_prefilter(&PrefilterCidrs { cidrs: cidr })
                .await?
        }
        PrefilterCmd::List => client.prefilter().await?,
        PrefilterCmd::Delete { cidr } => {
            client
                .delete_prefilter(&PrefilterCidrs { cidrs: cidr })
                .await?
        }
    };
    print_one(output, &p, print_prefilter)
}

fn print_prefilter(p: &Prefilter) {
    if p.devices.is_empty() {
        outln!("Devices: none (start the agent with --prefilter-device to enforce)");
    } else {
        let devices: Vec<String> = p
            .devices
            .iter()
            .map(|d| format!("{} ({})", d.name, d.mode))
            .collect();
        outln!("Devices: {}", devices.join(", "));
        for d in &p.devices {
            if let Some(note) = &d.note {
                outln!("  {}: {note}", d.name);
            }
        }
    }
    print_table(
        &["CIDR", "PACKETS", "BYTES"],
        p.cidrs
            .iter()
            .map(|c| vec![c.cidr.clone(), c.packets.to_string(), c.bytes.to_string()])
            .collect(),
    );
}
