//! `cilia identity`: security identities (labels -> number).

use cilia_api::{ApiClient, Identity};
use clap::Subcommand;

use crate::output::{cells, labels_of, print_one, print_rows, Output};

#[derive(Debug, Subcommand)]
pub enum IdentityCmd {
    /// List identities: reserved, endpoint and CIDR ones.
    ///
    /// Example: cilia identity list
    List,
    /// Show one identity.
    ///
    /// Example: cilia identity get 256
    Get { id: u32 },
}

pub async fn run(cmd: IdentityCmd, client: &ApiClient, output: Output) -> anyhow::Result<()> {
    match cmd {
        IdentityCmd::List => print_rows(
            output,
            &client.identities().await?,
            &["ID", "KIND", "ENDPOINTS", "LABELS"],
            |i| {
                let endpoints = endpoints_text(&i.endpoints);
                cells(&[&i.id, &i.kind, &endpoints, &labels_of(&i.labels)])
            },
        ),
        IdentityCmd::Get { id } => print_one(output, &client.identity(id).await?, print_identity),
    }
}

fn endpoints_text(endpoints: &[u16]) -> String {
    if endpoints.is_empty() {
        return "-".into();
    }
    endpoints
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn print_identity(i: &Identity) {
    outln!("ID:        {}", i.id);
    outln!("Kind:      {}", i.kind);
    outln!("Labels:    {}", labels_of(&i.labels));
    outln!("Endpoints: {:?}", i.endpoints);
}
