//! `cilia namespace`: namespaces and their labels (what namespaceSelector
//! matches).

use cilia_api::{ApiClient, Namespace};
use clap::Subcommand;

use crate::output::{cells, labels_of, print_one, print_rows, Output};

#[derive(Debug, Subcommand)]
pub enum NamespaceCmd {
    /// Set a namespace's labels (replacing the old ones).
    ///
    /// Example: cilia namespace set prod --labels team=payments
    Set {
        name: String,
        /// Labels: k=v[,k=v…].
        #[arg(long, default_value = "")]
        labels: String,
    },
    /// List namespaces and their labels.
    ///
    /// Example: cilia namespace list
    List,
}

pub async fn run(cmd: NamespaceCmd, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        NamespaceCmd::Set { name, labels } => {
            let labels =
                cilia_api::labels::parse_labels(&labels).map_err(|e| e.in_field("--labels"))?;
            let ns = client.set_namespace(&Namespace { name, labels }).await?;
            print_one(output, &ns, |ns| {
                outln!("namespace {} labels: {}", ns.name, labels_of(&ns.labels))
            })
        }
        NamespaceCmd::List => print_rows(
            output,
            &client.namespaces().await?,
            &["NAMESPACE", "LABELS"],
            |n| cells(&[&n.name, &labels_of(&n.labels)]),
        ),
    }
}
