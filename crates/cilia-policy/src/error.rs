//! Parse errors.

/// Error from [`crate::parse_policies`].
///
/// Renders as one line naming the source, the 1-based document index, the policy name
/// (when known), the field path and the reason, e.g.
/// `policies.yaml: document 2 (rule1): spec.ingress[0].toPorts[0].ports[0].port: "eighty" is not a port number`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: document {document}{}{}: {message}", name_part(.policy), path_part(.path))]
pub struct PolicyError {
    /// The `source` argument given to `parse_policies` (usually a file name).
    pub file: String,
    /// 1-based index of the YAML document in the stream.
    pub document: usize,
    /// `metadata.name` of the document, when it could be read.
    pub policy: Option<String>,
    /// Field path inside the document (`spec.ingress[0].fromCIDR[1]`), empty for
    /// document-level problems such as YAML syntax errors.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn name_part(policy: &Option<String>) -> String {
    match policy {
        // A name is shown as written unless it is long or holds control
        // characters: then as a short quoted excerpt, so the error stays one line.
        Some(name) if name.chars().count() > 64 || name.chars().any(char::is_control) => {
            format!(" ({})", crate::labels::excerpt(name))
        }
        Some(name) => format!(" ({name})"),
        None => String::new(),
    }
}

fn path_part(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(": {path}")
    }
}
