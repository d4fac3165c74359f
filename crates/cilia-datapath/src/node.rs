//! The node programs (`bpf/overlay.c`) and the node maps: what carries
//! traffic between this node and the others.
//!
//! ```text
//! <root>/node/overlay_in    TCX link of cil_from_overlay (VXLAN device, ingress)
//! <root>/node/overlay_out   TCX link of cil_to_overlay (VXLAN device, egress)
//! <root>/node/netdev_in     TCX link of cil_from_netdev (underlay device, ingress)
//! <root>/maps/cilia_nodes, cilia_node_config
//! ```
//!
//! The same invariants as the endpoints' (see [`crate::endpoint`]): the
//! pinned links keep the programs attached when the agent is gone, and a
//! re-attach swaps the new program into the link (`BPF_LINK_UPDATE`), so
//! the device never runs without one. A link found on another device (the
//! device was deleted and made again) is detached first: that device is
//! gone and its link serves nothing.

use std::net::IpAddr;
use std::path::PathBuf;

use aya::programs::{SchedClassifier, TcAttachType};
use cilia_abi::{EndpointConfig, EndpointKey, NodeConfig, NodeValue};

use crate::endpoint::{
    attach_pinned, is_not_found, load_programs, lock, swap_pinned, unpin_link, BpfDatapath,
};
use crate::error::DatapathError;
use crate::object::{
    MAP_NODES, MAP_NODE_CONFIG, OVERLAY_OBJECT, PROG_FROM_NETDEV, PROG_FROM_OVERLAY,
    PROG_TO_OVERLAY,
};
use crate::testrun::TestProgram;

/// The specialization of the node programs: no endpoint of their own
/// (conntrack and events go to the packet's local endpoint), events kept,
/// both families.
pub fn node_program_config() -> EndpointConfig {
    EndpointConfig {
        endpoint_id: 0,
        monitor: 1,
        enable_ipv4: 1,
        ..Default::default()
    }
}

/// Which devices the node programs are attached to (their pinned links).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeLinks {
    /// ifindex of the VXLAN device the overlay programs are on (0: the
    /// device is gone); `None`: not attached.
    pub overlay: Option<u32>,
    /// ifindex of the underlay device `cil_from_netdev` is on.
    pub netdev: Option<u32>,
}

/// One node program: its name, hook and link pin name.
type NodeLink = (&'static str, TcAttachType, &'static str);

const OVERLAY_LINKS: &[NodeLink] = &[
    (PROG_FROM_OVERLAY, TcAttachType::Ingress, "overlay_in"),
    (PROG_TO_OVERLAY, TcAttachType::Egress, "overlay_out"),
];
const NETDEV_LINKS: &[NodeLink] = &[(PROG_FROM_NETDEV, TcAttachType::Ingress, "netdev_in")];

impl BpfDatapath {
    /// Pin path of a node program's TCX link (`overlay_in`, `overlay_out`,
    /// `netdev_in`).
    pub fn node_link_pin(&self, name: &str) -> PathBuf {
        self.root().join("node").join(name)
    }

    /// Attaches `cil_from_overlay` / `cil_to_overlay` to the VXLAN device
    /// `ifname` (ingress / egress), or swaps them into their pinned links.
    pub fn attach_overlay(&self, ifname: &str) -> Result<(), DatapathError> {
        self.attach_node(ifname, OVERLAY_LINKS)
    }

    /// Attaches `cil_from_netdev` to the underlay device `ifname` (ingress),
    /// or swaps it into its pinned link.
    pub fn attach_netdev(&self, ifname: &str) -> Result<(), DatapathError> {
        self.attach_node(ifname, NETDEV_LINKS)
    }

    fn attach_node(&self, ifname: &str, links: &[NodeLink]) -> Result<(), DatapathError> {
        let ifindex = nix::net::if_::if_nametoindex(ifname)
            .map_err(|_| DatapathError::NoSuchInterface(ifname.to_string()))?;
        let names: Vec<&'static str> = links.iter().map(|(name, _, _)| *name).collect();
        // Every program is verified before any link changes.
        let mut ebpf = load_programs(
            &self.root().join("maps"),
            OVERLAY_OBJECT,
            &node_program_config(),
            &names,
        )?;
        for (name, attach, pin_name) in links {
            let pin = self.node_link_pin(pin_name);
            if pin.exists() {
                let on = crate::inspect::link_target(&pin).map(|t| t.ifindex).ok();
                if on != Some(ifindex) {
                    tracing::info!(pin = %pin.display(), ?on, ifindex, "node link on another device: detaching it");
                    unpin_link(&pin)?;
                }
            }
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|e| DatapathError::program(name, e))?;
            attach_pinned(prog, name, ifname, *attach, &pin)?;
        }
        Ok(())
    }

    /// Detaches every node program (removes their pinned links). Nothing
    /// attached is not an error.
    pub fn detach_node_programs(&self) -> Result<(), DatapathError> {
        self.detach_overlay()?;
        self.detach_netdev()
    }

    /// Detaches the overlay programs only (a node switching to native
    /// routing). Nothing attached is not an error.
    pub fn detach_overlay(&self) -> Result<(), DatapathError> {
        self.detach_links(OVERLAY_LINKS)
    }

    /// Detaches the native-routing program only (a node switching to the
    /// overlay). Nothing attached is not an error.
    pub fn detach_netdev(&self) -> Result<(), DatapathError> {
        self.detach_links(NETDEV_LINKS)
    }

    fn detach_links(&self, links: &[NodeLink]) -> Result<(), DatapathError> {
        for (_, _, pin_name) in links {
            unpin_link(&self.node_link_pin(pin_name))?;
        }
        Ok(())
    }

    /// Where the node programs are attached.
    pub fn node_links(&self) -> Result<NodeLinks, DatapathError> {
        let on = |pin_name: &str| -> Result<Option<u32>, DatapathError> {
            let pin = self.node_link_pin(pin_name);
            if !pin.exists() {
                return Ok(None);
            }
            crate::inspect::link_target(&pin)
                .map(|t| Some(t.ifindex))
                .map_err(|e| DatapathError::io(format!("inspecting {}", pin.display()), e))
        };
        Ok(NodeLinks {
            overlay: on("overlay_in")?,
            netdev: on("netdev_in")?,
        })
    }

    /// Loads this build's node programs (the XDP prefilter's included)
    /// again and swaps them into the links that are pinned (the
    /// `datapath reload` of the node programs);
    /// a rejected program leaves the old ones attached. Links whose device
    /// is gone are left alone. Returns how many links were swapped.
    pub fn reload_node_programs(&self) -> Result<usize, DatapathError> {
        let mut swapped = 0;
        for links in [OVERLAY_LINKS, NETDEV_LINKS] {
            let pins: Vec<PathBuf> = links
                .iter()
                .map(|(_, _, pin_name)| self.node_link_pin(pin_name))
                .collect();
            if !pins.iter().all(|p| p.exists()) {
                continue;
            }
            let names: Vec<&'static str> = links.iter().map(|(name, _, _)| *name).collect();
            let mut ebpf = load_programs(
                &self.root().join("maps"),
                OVERLAY_OBJECT,
                &node_program_config(),
                &names,
            )?;
            for ((name, _, _), pin) in links.iter().zip(&pins) {
                let prog: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .ok_or(DatapathError::MissingProgram(name))?
                    .try_into()
                    .map_err(|e| DatapathError::program(name, e))?;
                swap_pinned(prog, name, pin)?;
                swapped += 1;
            }
        }
        swapped += self.reload_prefilter()?;
        Ok(swapped)
    }

    /// Sets the node's tunnel settings (what from-container does with
    /// packets for remote prefixes).
    pub fn set_node_config(&self, config: &NodeConfig) -> Result<(), DatapathError> {
        lock(&self.node_config)
            .set(0, config.value(), 0)
            .map_err(|e| DatapathError::map(MAP_NODE_CONFIG, e))
    }

    /// The node's tunnel settings; an unknown mode reads as off (which is
    /// what the datapath does with it).
    pub fn node_config(&self) -> Result<NodeConfig, DatapathError> {
        let value = lock(&self.node_config)
            .get(&0, 0)
            .map_err(|e| DatapathError::map(MAP_NODE_CONFIG, e))?;
        Ok(NodeConfig::decode(&value).unwrap_or_default())
    }

    /// Adds underlay addresses of nodes whose tunnel packets are accepted.
    pub fn publish_nodes(&self, addrs: &[IpAddr]) -> Result<(), DatapathError> {
        let mut nodes = lock(&self.nodes);
        addrs.iter().try_for_each(|ip| {
            nodes
                .insert(EndpointKey::from_ip(*ip), NodeValue::default(), 0)
                .map_err(|e| DatapathError::map(MAP_NODES, e))
        })
    }

    /// Removes node addresses. Absent ones are not an error.
    pub fn withdraw_nodes(&self, addrs: &[IpAddr]) -> Result<(), DatapathError> {
        let mut nodes = lock(&self.nodes);
        for ip in addrs {
            match nodes.remove(&EndpointKey::from_ip(*ip)) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(DatapathError::map(MAP_NODES, e)),
            }
        }
        Ok(())
    }

    /// The node addresses in the nodes map.
    pub fn nodes(&self) -> Result<Vec<IpAddr>, DatapathError> {
        let mut out: Vec<IpAddr> = lock(&self.nodes)
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DatapathError::map(MAP_NODES, e))?
            .iter()
            .filter_map(EndpointKey::ip)
            .collect();
        out.sort();
        Ok(out)
    }

    /// Loads a node program (`cil_from_overlay`, `cil_to_overlay`,
    /// `cil_from_netdev`) for `BPF_PROG_TEST_RUN`, sharing this datapath's
    /// maps but attached nowhere.
    pub fn test_node_program(&self, name: &'static str) -> Result<TestProgram, DatapathError> {
        let ebpf = load_programs(
            &self.root().join("maps"),
            OVERLAY_OBJECT,
            &node_program_config(),
            &[name],
        )?;
        Ok(TestProgram::new(ebpf, name))
    }
}
