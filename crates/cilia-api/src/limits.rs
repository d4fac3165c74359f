//! Bounds on what callers may hand the agent, shared by the agent, the
//! `cilia` CLI and the CNI plugin so all three refuse the same inputs with
//! the same words (README, "Input limits").
//!
//! Every refusal is one line that names the field and quotes at most
//! [`EXCERPT_CHARS`] characters of the bad value ([`excerpt`]): a hostile
//! 64 KB value never becomes a 64 KB log or error line.

/// Most labels one endpoint (or one namespace) may carry. Kubernetes has no
/// hard count, but identities are compared and stored whole; 64 is far more
/// than real pods use and keeps an identity's key small.
pub const MAX_LABELS: usize = 64;
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;
/// Longest container id or container name accepted (runtimes use 64 hex
/// characters; 256 leaves room for others without unbounded keys).
pub const MAX_CONTAINER_ID_LEN: usize = 256;
/// Most port names one endpoint may declare.
pub const MAX_NAMED_PORTS: usize = 64;
/// How much of a bad value an error quotes.
pub const EXCERPT_CHARS: usize = 64;
/// Largest request body the agent reads (a policy import is the largest).
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// A short, single-line rendering of a possibly huge or hostile value: the
/// first [`EXCERPT_CHARS`] characters, quoted with control characters
/// escaped, then `…` and the full length when something was cut.
pub fn excerpt(value: &str) -> String {
    let mut chars = value.char_indices();
    match chars.nth(EXCERPT_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
    }
}

/// A refused input: `field: "value excerpt": reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value}: {reason}")]
pub struct InputError {
    /// Where the value came from (`ifname`, `CNI_IFNAME`, `container_id`, …).
    pub field: String,
    /// [`excerpt`] of the value.
    pub value: String,
    pub reason: String,
}

impl InputError {
    pub fn new(field: &str, value: &str, reason: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            value: excerpt(value),
            reason: reason.into(),
        }
    }
}

fn safe_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

/// An interface name: 1-15 bytes of `[A-Za-z0-9_.-]`, not `.` or `..`.
/// Stricter than the kernel (which takes almost any byte) so a name can
/// never confuse a tool that prints or parses it.
pub fn check_ifname(field: &str, name: &str) -> Result<(), InputError> {
    let reason = if name.is_empty() || name.len() > MAX_IFNAME_LEN {
        format!("must be 1-{MAX_IFNAME_LEN} characters")
    } else if name == "." || name == ".." {
        "must not be \".\" or \"..\"".to_string()
    } else if !name.bytes().all(safe_name_char) {
        "may contain only [A-Za-z0-9_.-]".to_string()
    } else {
        return Ok(());
    };
    Err(InputError::new(field, name, reason))
}

/// A container id or name, as the CNI spec restricts container ids:
/// `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most [`MAX_CONTAINER_ID_LEN`] bytes.
pub fn check_container_id(field: &str, id: &str) -> Result<(), InputError> {
    let reason = if id.is_empty() || id.len() > MAX_CONTAINER_ID_LEN {
        format!("must be 1-{MAX_CONTAINER_ID_LEN} characters")
    } else if !id.as_bytes()[0].is_ascii_alphanumeric() || !id.bytes().all(safe_name_char) {
        "must start alphanumeric and contain only [A-Za-z0-9_.-]".to_string()
    } else {
        return Ok(());
    };
    Err(InputError::new(field, id, reason))
}

/// Longest network namespace path accepted (PATH_MAX).
pub const MAX_NETNS_LEN: usize = 4096;

/// A network namespace (a name under /run/netns or an absolute path): not
/// empty, at most [`MAX_NETNS_LEN`] bytes, no control characters.
pub fn check_netns(field: &str, netns: &str) -> Result<(), InputError> {
    if netns.is_empty() || netns.len() > MAX_NETNS_LEN {
        Err(InputError::new(
            field,
            netns,
            format!("must be 1-{MAX_NETNS_LEN} characters"),
        ))
    } else if netns.chars().any(char::is_control) {
        Err(InputError::new(
            field,
            netns,
            "must not contain control characters",
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_keeps_short_values_whole_and_quoted() {
        assert_eq!(excerpt("web"), "\"web\"");
        assert_eq!(excerpt("a\nb"), "\"a\\nb\"");
    }

    #[test]
    fn excerpt_cuts_a_huge_value_to_one_short_line() {
        let e = excerpt(&"x".repeat(65536));
        assert!(e.len() < 100, "{e}");
        assert!(e.ends_with("… (65536 bytes)"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn excerpt_cuts_on_a_character_boundary() {
        let e = excerpt(&"é".repeat(100));
        assert!(e.contains("… (200 bytes)"), "{e}");
    }

    #[test]
    fn ifname_with_a_hash_is_refused_naming_the_field() {
        let e = check_ifname("ifname", "eth0#x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "ifname: \"eth0#x\": may contain only [A-Za-z0-9_.-]"
        );
    }

    #[test]
    fn ifname_rules() {
        for ok in ["eth0", "net1", "a", "veth_a.b-c", "abcdefghijklmno"] {
            assert!(check_ifname("ifname", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "abcdefghijklmnop",
            "a/b",
            "a:b",
            "a b",
            "eth0\n",
            "é",
        ] {
            assert!(check_ifname("ifname", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn container_id_rules() {
        for ok in ["abc123", "0f3e", "pod_1.a-b", &"a".repeat(256)] {
            assert!(check_container_id("container_id", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a/b", "a;b", "a b", &"a".repeat(257)] {
            let e = check_container_id("container_id", bad).unwrap_err();
            assert!(e.to_string().starts_with("container_id: "), "{e}");
            assert!(e.to_string().len() < 200, "{e}");
        }
    }

    #[test]
    fn netns_must_be_bounded_and_free_of_control_characters() {
        assert!(check_netns("netns", "/run/netns/web1").is_ok());
        assert!(check_netns("netns", "web1").is_ok());
        for bad in ["", "web\n1", &"n".repeat(4097)] {
            let e = check_netns("netns", bad).unwrap_err().to_string();
            assert!(e.starts_with("netns: ") && e.len() < 200, "{e}");
        }
    }
}
