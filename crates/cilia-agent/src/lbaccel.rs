//! NodePort acceleration (`--lb-acceleration`): the NodePort cases that
//! need no policy handled in XDP on the node's underlay device (see
//! "NodePort acceleration" in docs/SERVICES.md).
//!
//! Invariants: the acceleration lives in the device's one XDP program,
//! shared with a prefilter on the same device, and is turned on or off by
//! swapping that program inside its pinned link, so the device never runs
//! without a program it had; a device whose driver refuses native XDP gets
//! generic XDP, and that is reported (log, `cilia status`, metric), never
//! silent; an agent started without the flag turns it off again.

use crate::endpoint::DatapathHandle;

/// `--lb-acceleration`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LbAccelerationFlag {
    /// NodePort at tc only.
    #[default]
    Disabled,
    /// NodePort in XDP on the underlay device (native XDP; generic, and
    /// reported, where the driver has none).
    Native,
}

/// Why `--lb-acceleration native` cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum LbAccelerationError {
    #[error("--lb-acceleration native needs NodePort support: run in multi-node mode (--kvstore etcd), where the agent serves the node's underlay device")]
    NoNodePort,
    #[error("--lb-acceleration native: attaching XDP to the underlay device {device}: {source}")]
    Attach {
        device: String,
        source: Box<cilia_datapath::DatapathError>,
    },
    #[error("--lb-acceleration disabled: detaching it from {device}: {source}")]
    Detach {
        device: String,
        source: Box<cilia_datapath::DatapathError>,
    },
    #[error("listing the devices with NodePort acceleration: {0}")]
    List(Box<cilia_datapath::DatapathError>),
}

/// The node's underlay as the acceleration needs it.
#[derive(Debug, Clone)]
pub struct UnderlayDevice {
    pub name: String,
    /// The node runs native routing (VXLAN: remote backends stay at tc).
    pub native_routing: bool,
}

/// What runs, for `cilia status` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LbAcceleration {
    Disabled,
    On {
        device: String,
        mode: cilia_datapath::PrefilterMode,
        /// Why native XDP was refused, when this start fell back.
        fallback: Option<String>,
        /// What keeps the XDP path from doing its work (forwarding off on
        /// the device, VXLAN mode): packets then go to tc.
        notes: Vec<String>,
    },
}

impl LbAcceleration {
    /// Makes the datapath match the flag: on for the underlay device, off
    /// everywhere else.
    pub fn start(
        flag: LbAccelerationFlag,
        datapath: &DatapathHandle,
        underlay: Option<&UnderlayDevice>,
    ) -> Result<Self, LbAccelerationError> {
        let wanted = match (flag, underlay) {
            (LbAccelerationFlag::Disabled, _) => None,
            (LbAccelerationFlag::Native, None) => return Err(LbAccelerationError::NoNodePort),
            (LbAccelerationFlag::Native, Some(u)) => Some(u),
        };
        let links = datapath
            .lb_acceleration_links()
            .map_err(|e| LbAccelerationError::List(Box::new(e)))?;
        for link in links {
            if wanted.is_some_and(|u| u.name == link.ifname) {
                continue;
            }
            tracing::info!(device = %link.ifname, "NodePort acceleration no longer asked for on this device: turning it off");
            datapath.detach_lb_acceleration(&link.ifname).map_err(|e| {
                LbAccelerationError::Detach {
                    device: link.ifname.clone(),
                    source: Box::new(e),
                }
            })?;
        }
        let Some(underlay) = wanted else {
            return Ok(Self::Disabled);
        };
        let link = datapath
            .attach_lb_acceleration(&underlay.name, false)
            .map_err(|e| LbAccelerationError::Attach {
                device: underlay.name.clone(),
                source: Box::new(e),
            })?;
        let notes = notes(underlay, forwarding_off(&underlay.name));
        match &link.native_error {
            Some(why) => tracing::warn!(device = %underlay.name, reason = %why,
                "NodePort acceleration runs in generic XDP: the driver refused native mode"),
            None => {
                tracing::info!(device = %underlay.name, mode = link.mode.name(), "NodePort acceleration on")
            }
        }
        for note in &notes {
            tracing::warn!(device = %underlay.name, "NodePort acceleration: {note}");
        }
        Ok(Self::On {
            device: underlay.name.clone(),
            mode: link.mode,
            fallback: link.native_error,
            notes,
        })
    }

    /// The mode as `cilia status` and the metric name it: `disabled`,
    /// `native` or `generic`.
    pub fn mode_name(&self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::On { mode, .. } => mode.name(),
        }
    }

    /// The `lb-acceleration` subsystem of `cilia status`.
    pub fn subsystem(&self) -> cilia_api::SubsystemStatus {
        let (status, detail) = match self {
            Self::Disabled => ("off", "disabled (--lb-acceleration disabled)".to_string()),
            Self::On {
                device,
                mode,
                fallback,
                notes,
            } => {
                let mut detail = match (mode, fallback) {
                    (cilia_datapath::PrefilterMode::Native, _) => format!("native on {device}"),
                    (cilia_datapath::PrefilterMode::Generic, Some(why)) => {
                        format!("generic (fallback: {why}) on {device}")
                    }
                    (cilia_datapath::PrefilterMode::Generic, None) => {
                        format!(
                            "generic (fallback: attached so before this agent started) on {device}"
                        )
                    }
                };
                for note in notes {
                    detail.push_str("; ");
                    detail.push_str(note);
                }
                let degraded = *mode == cilia_datapath::PrefilterMode::Generic || !notes.is_empty();
                (if degraded { "degraded" } else { "ok" }, detail)
            }
        };
        cilia_api::SubsystemStatus {
            name: "lb-acceleration".into(),
            status: status.into(),
            detail,
            errors: Vec::new(),
        }
    }
}

/// The families whose forwarding is off on `device`: the kernel's FIB
/// helper answers XDP only for a device that forwards.
fn forwarding_off(device: &str) -> Vec<&'static str> {
    [("IPv4", "ipv4"), ("IPv6", "ipv6")]
        .into_iter()
        .filter(|(_, dir)| {
            std::fs::read_to_string(format!("/proc/sys/net/{dir}/conf/{device}/forwarding"))
                .map(|v| v.trim() == "0")
                .unwrap_or(true)
        })
        .map(|(family, _)| family)
        .collect()
}

fn notes(underlay: &UnderlayDevice, forwarding_off: Vec<&'static str>) -> Vec<String> {
    let mut notes = Vec::new();
    if !underlay.native_routing {
        notes.push(
            "VXLAN mode: remote backends are reached through tc (XDP does not encapsulate)"
                .to_string(),
        );
    }
    for family in forwarding_off {
        let dir = if family == "IPv4" { "ipv4" } else { "ipv6" };
        notes.push(format!(
            "{family} forwarding is off on {dev}, so XDP's FIB lookups fail and tc does the work (sysctl net.{dir}.conf.{dev}.forwarding=1)",
            dev = underlay.name
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use cilia_datapath::fake::FakeDatapath;
    use std::sync::Arc;

    fn underlay() -> UnderlayDevice {
        UnderlayDevice {
            name: "eth0".into(),
            native_routing: true,
        }
    }

    #[test]
    fn native_without_nodeport_support_is_refused_with_the_reason() {
        let dp: DatapathHandle = Arc::new(FakeDatapath::new());
        let err = LbAcceleration::start(LbAccelerationFlag::Native, &dp, None).unwrap_err();
        assert!(err.to_string().contains("needs NodePort support"), "{err}");
    }

    #[test]
    fn a_generic_fallback_is_reported_with_the_drivers_reason() {
        let fake = Arc::new(FakeDatapath::new());
        fake.state().prefilter_no_native.insert("eth0".into());
        let dp: DatapathHandle = fake;
        let accel =
            LbAcceleration::start(LbAccelerationFlag::Native, &dp, Some(&underlay())).unwrap();
        assert_eq!(accel.mode_name(), "generic");
        let sub = accel.subsystem();
        assert_eq!(sub.status, "degraded");
        assert!(
            sub.detail.starts_with(
                "generic (fallback: native XDP not supported by the fake device) on eth0"
            ),
            "{}",
            sub.detail
        );
    }

    #[test]
    fn an_agent_started_without_the_flag_turns_it_off() {
        let fake = Arc::new(FakeDatapath::new());
        let dp: DatapathHandle = fake.clone();
        LbAcceleration::start(LbAccelerationFlag::Native, &dp, Some(&underlay())).unwrap();
        assert_eq!(fake.state().lb_acceleration_links.len(), 1);
        let off =
            LbAcceleration::start(LbAccelerationFlag::Disabled, &dp, Some(&underlay())).unwrap();
        assert_eq!(off, LbAcceleration::Disabled);
        assert!(fake.state().lb_acceleration_links.is_empty());
        assert_eq!(
            off.subsystem().detail,
            "disabled (--lb-acceleration disabled)"
        );
    }

    #[test]
    fn what_keeps_xdp_from_working_is_said() {
        let vxlan = UnderlayDevice {
            name: "eth0".into(),
            native_routing: false,
        };
        let notes = notes(&vxlan, vec!["IPv4"]);
        assert_eq!(notes.len(), 2);
        assert!(notes[0].starts_with("VXLAN mode"));
        assert!(notes[1].contains("sysctl net.ipv4.conf.eth0.forwarding=1"));
    }
}
