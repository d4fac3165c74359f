//! Socket-level load balancing, the agent's side: attach the datapath's
//! cgroup programs at start (`--socket-lb`, `--socket-lb-cgroup`) and say
//! in `cilia status` how that went. The namespaces it serves (the node's
//! and each endpoint's, by netns cookie) are kept by the endpoint
//! subsystem (`endpoint::socklb`), which knows when they come and go.
//!
//! Default (no `--socket-lb`): on when the kernel lets it attach; a failure
//! is reported in `cilia status` (subsystem `socket-lb`, degraded, with the
//! reason) and the agent runs on with the per-packet load balancer alone.
//! `--socket-lb on` makes the same failure a start-up error; `--socket-lb
//! off` detaches what an earlier run attached.

use std::path::PathBuf;

use anyhow::bail;
use tracing::{info, warn};

use crate::endpoint::DatapathHandle;

/// `--socket-lb`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketLbFlag {
    On,
    Off,
}

/// The socket LB's flags.
#[derive(Debug, Clone, Default)]
pub struct SocketLbOptions {
    /// `None`: on when the kernel supports it.
    pub mode: Option<SocketLbFlag>,
    /// The cgroup v2 directory to attach to (`None`: the cgroup v2 root,
    /// `/sys/fs/cgroup` or, on a hybrid hierarchy, `/sys/fs/cgroup/unified`).
    pub cgroup: Option<PathBuf>,
}

/// How the socket LB stands after start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SocketLbState {
    /// `--socket-lb off`.
    #[default]
    Off,
    /// Attached to `cgroup`; the node's namespace has `node_netns` as cookie.
    On { cgroup: PathBuf, node_netns: u64 },
    /// On by default, but it could not be attached.
    Unavailable { reason: String },
}

impl SocketLbState {
    /// The node's netns cookie when the socket LB is on.
    pub fn node_netns(&self) -> Option<u64> {
        match self {
            SocketLbState::On { node_netns, .. } => Some(*node_netns),
            _ => None,
        }
    }

    /// The `socket-lb` subsystem of `cilia status`, with what the datapath
    /// reports: the programs' links (`None`: none pinned) and the number of
    /// namespaces served.
    pub fn subsystem(
        &self,
        links: Option<cilia_datapath::SocketLbLinks>,
        served: Option<usize>,
    ) -> cilia_api::SubsystemStatus {
        let programs = cilia_datapath::socklb::SOCK_LINKS.len();
        let (status, detail) = match self {
            SocketLbState::Off => ("off", "disabled (--socket-lb off)".to_string()),
            SocketLbState::On { cgroup, .. } => match links {
                Some(l) if l.programs == programs && l.cgroup_id != 0 => (
                    "ok",
                    match served {
                        Some(n) => {
                            format!("on cgroup {}, {n} network namespaces", cgroup.display())
                        }
                        None => format!("on cgroup {}", cgroup.display()),
                    },
                ),
                Some(l) if l.cgroup_id == 0 => (
                    "degraded",
                    format!("cgroup {} is gone: restart the agent", cgroup.display()),
                ),
                Some(l) => (
                    "degraded",
                    format!(
                        "{} of {programs} programs attached to cgroup {}: restart the agent",
                        l.programs,
                        cgroup.display()
                    ),
                ),
                None => (
                    "degraded",
                    format!(
                        "no program attached to cgroup {} (links removed?): restart the agent",
                        cgroup.display()
                    ),
                ),
            },
            SocketLbState::Unavailable { reason } => ("degraded", format!("unavailable: {reason}")),
        };
        cilia_api::SubsystemStatus {
            name: "socket-lb".into(),
            status: status.into(),
            detail,
            errors: Vec::new(),
        }
    }
}

/// Attaches the socket LB to its cgroup (swapping into the links an
/// earlier run pinned) and registers the node's namespace; or detaches it
/// with `--socket-lb off`.
pub fn start(
    options: &SocketLbOptions,
    datapath: &DatapathHandle,
) -> anyhow::Result<SocketLbState> {
    if options.mode == Some(SocketLbFlag::Off) {
        datapath.detach_socket_lb()?;
        if let Ok(cookie) = cilia_datapath::socklb::current_netns_cookie() {
            datapath.remove_lb_netns(cookie)?;
        }
        return Ok(SocketLbState::Off);
    }
    let attach = || -> Result<SocketLbState, String> {
        let cgroup = match &options.cgroup {
            Some(c) => c.clone(),
            None => cilia_datapath::socklb::default_cgroup_root().ok_or_else(|| {
                "no cgroup v2 mount at /sys/fs/cgroup or /sys/fs/cgroup/unified".to_string()
            })?,
        };
        let node_netns =
            cilia_datapath::socklb::current_netns_cookie().map_err(|e| e.to_string())?;
        datapath
            .attach_socket_lb(&cgroup)
            .map_err(|e| e.to_string())?;
        datapath
            .add_lb_netns(node_netns, 0)
            .map_err(|e| e.to_string())?;
        Ok(SocketLbState::On { cgroup, node_netns })
    };
    match attach() {
        Ok(state) => {
            if let SocketLbState::On { cgroup, .. } = &state {
                info!(cgroup = %cgroup.display(), "socket load balancer attached");
            }
            Ok(state)
        }
        Err(reason) if options.mode == Some(SocketLbFlag::On) => {
            bail!("--socket-lb on: {reason}")
        }
        Err(reason) => {
            warn!(%reason, "socket load balancer unavailable; services are balanced per packet only");
            Ok(SocketLbState::Unavailable { reason })
        }
    }
}
