//! The narrow interface between the agent's bookkeeping and the kernel.
//! [`cilia_datapath::BpfDatapath`] is the real implementation; tests use a
//! fake, so endpoint lifecycle logic is testable without root.
//!
//! Transitional: this trait is shaped like the maps (raw keys and values,
//! `&mut self`). Its successor is the domain-level
//! [`cilia_datapath::Datapath`] (typed rows of `cilia_abi::rows`, `&self`,
//! with `cilia_datapath::fake::FakeDatapath` for tests); call sites move
//! to it, and this module goes away.

use std::net::IpAddr;

use std::collections::BTreeMap;

use cilia_abi::{
    CtKey, CtValue, EndpointConfig, EndpointInfo, EndpointKey, IpcacheKey, IpcacheValue,
    MetricsKey, MetricsValue, PolicyKey, PolicyValue,
};
use cilia_datapath::{
    BpfDatapath, DatapathError, EndpointLoader, EndpointReload, LinkCheck, LoadedEndpoint,
};

/// An endpoint's programs loaded and verified by a [`ProgramLoader`], not
/// yet attached; what is inside is the implementation's business.
pub type LoadedPrograms = Box<dyn std::any::Any + Send>;

/// Loads (and verifies) one endpoint's programs without the [`Datapath`]
/// handle, so that it runs outside the endpoint manager's lock: it touches
/// no state shared with other endpoints.
pub trait ProgramLoader: Send + Sync {
    fn load(&self, config: &EndpointConfig) -> Result<LoadedPrograms, DatapathError>;
}

/// The loader of a datapath that loads at attach time (the tests' fakes).
struct LoadAtAttach;

impl ProgramLoader for LoadAtAttach {
    fn load(&self, _: &EndpointConfig) -> Result<LoadedPrograms, DatapathError> {
        Ok(Box::new(()))
    }
}

impl ProgramLoader for EndpointLoader {
    fn load(&self, config: &EndpointConfig) -> Result<LoadedPrograms, DatapathError> {
        Ok(Box::new(EndpointLoader::load(self, config)?))
    }
}

pub trait Datapath: Send {
    /// The loader whose output [`Datapath::attach_loaded`] takes.
    fn loader(&self) -> std::sync::Arc<dyn ProgramLoader> {
        std::sync::Arc::new(LoadAtAttach)
    }
    /// [`Datapath::attach_endpoint`] with programs `loader` loaded for
    /// `config`; programs loaded for another configuration (or by another
    /// loader) are not used: the endpoint's are loaded again here.
    fn attach_loaded(
        &mut self,
        _loaded: LoadedPrograms,
        config: &EndpointConfig,
        host_ifname: &str,
    ) -> Result<(), DatapathError> {
        self.attach_endpoint(config, host_ifname)
    }
    fn attach_endpoint(
        &mut self,
        config: &EndpointConfig,
        host_ifname: &str,
    ) -> Result<(), DatapathError>;
    fn detach_endpoint(&mut self, endpoint_id: u16) -> Result<(), DatapathError>;
    fn endpoint_attached(&self, endpoint_id: u16) -> bool;
    /// How the endpoint's pinned links stand against `expected` (its
    /// record): attached device and baked-in configuration; `None` when a
    /// link pin is missing.
    fn check_links(
        &self,
        expected: &EndpointConfig,
    ) -> Result<Option<Vec<LinkCheck>>, DatapathError>;
    /// Re-specializes an attached endpoint's programs from this build and
    /// swaps them into its pinned links; a program the verifier rejects
    /// leaves the old one attached. Without `force`, programs that already
    /// are this build's with `config` are left alone.
    fn reload_endpoint(
        &mut self,
        config: &EndpointConfig,
        force: bool,
    ) -> Result<EndpointReload, DatapathError>;
    /// Refuses (naming map and difference) when a pinned shared map no
    /// longer has this build's layout.
    fn check_pins(&self) -> Result<(), DatapathError>;
    fn upsert_endpoint(&mut self, ip: IpAddr, info: EndpointInfo) -> Result<(), DatapathError>;
    fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), DatapathError>;
    fn list_endpoints(&self) -> Result<Vec<(EndpointKey, EndpointInfo)>, DatapathError>;
    fn metrics(&self) -> Result<Vec<(MetricsKey, MetricsValue)>, DatapathError>;
    fn upsert_ipcache(&mut self, key: IpcacheKey, identity: u32) -> Result<(), DatapathError>;
    fn remove_ipcache(&mut self, key: IpcacheKey) -> Result<(), DatapathError>;
    fn list_ipcache(&self) -> Result<Vec<(IpcacheKey, IpcacheValue)>, DatapathError>;
    fn set_policy(
        &mut self,
        endpoint_id: u16,
        entries: &BTreeMap<PolicyKey, PolicyValue>,
    ) -> Result<(), DatapathError>;
    fn get_policy(
        &self,
        endpoint_id: u16,
    ) -> Result<Option<BTreeMap<PolicyKey, PolicyValue>>, DatapathError>;
    fn bump_policy_revision(&mut self) -> Result<u32, DatapathError>;
    fn list_ct(&self) -> Result<Vec<(CtKey, CtValue)>, DatapathError>;
    fn gc_ct(&mut self) -> Result<usize, DatapathError>;
    /// Live conntrack entries as of this handle's last `gc_ct` (None before
    /// one): cheap, unlike walking the table.
    fn ct_live(&self) -> Option<u64> {
        None
    }
    /// Removes the conntrack entries an endpoint created or that carry one
    /// of its addresses, and resets its conntrack budget.
    fn purge_ct(&mut self, endpoint_id: u16, addrs: &[IpAddr]) -> Result<usize, DatapathError>;
    /// Conntrack entries each endpoint may hold (0: the built-in default).
    fn set_ct_budget(&mut self, budget: u32) -> Result<(), DatapathError>;
    fn remove_ct(&mut self, key: CtKey) -> Result<(), DatapathError>;
    fn set_monitor_level(&mut self, level: u32) -> Result<(), DatapathError>;
    /// Runs a freshly loaded copy of an endpoint's from-container program on
    /// `packet` (BPF_PROG_TEST_RUN) and returns its tc verdict.
    fn test_run(&self, config: &EndpointConfig, packet: &[u8]) -> Result<u32, DatapathError>;
}

impl Datapath for BpfDatapath {
    fn loader(&self) -> std::sync::Arc<dyn ProgramLoader> {
        std::sync::Arc::new(BpfDatapath::loader(self))
    }
    fn attach_loaded(
        &mut self,
        loaded: LoadedPrograms,
        config: &EndpointConfig,
        host_ifname: &str,
    ) -> Result<(), DatapathError> {
        match loaded.downcast::<LoadedEndpoint>() {
            Ok(loaded) if loaded.config() == config => {
                BpfDatapath::attach_loaded(self, *loaded, host_ifname)
            }
            _ => BpfDatapath::attach_endpoint(self, config, host_ifname),
        }
    }
    fn attach_endpoint(
        &mut self,
        config: &EndpointConfig,
        host_ifname: &str,
    ) -> Result<(), DatapathError> {
        BpfDatapath::attach_endpoint(self, config, host_ifname)
    }
    fn detach_endpoint(&mut self, endpoint_id: u16) -> Result<(), DatapathError> {
        BpfDatapath::detach_endpoint(self, endpoint_id)
    }
    fn endpoint_attached(&self, endpoint_id: u16) -> bool {
        BpfDatapath::endpoint_attached(self, endpoint_id)
    }
    fn check_links(
        &self,
        expected: &EndpointConfig,
    ) -> Result<Option<Vec<LinkCheck>>, DatapathError> {
        BpfDatapath::check_links(self, expected)
    }
    fn reload_endpoint(
        &mut self,
        config: &EndpointConfig,
        force: bool,
    ) -> Result<EndpointReload, DatapathError> {
        BpfDatapath::reload_endpoint(self, config, force)
    }
    fn check_pins(&self) -> Result<(), DatapathError> {
        BpfDatapath::check_pins(self)
    }
    fn upsert_endpoint(&mut self, ip: IpAddr, info: EndpointInfo) -> Result<(), DatapathError> {
        BpfDatapath::upsert_endpoint(self, ip, info)
    }
    fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), DatapathError> {
        BpfDatapath::remove_endpoint(self, ip)
    }
    fn list_endpoints(&self) -> Result<Vec<(EndpointKey, EndpointInfo)>, DatapathError> {
        BpfDatapath::list_endpoints(self)
    }
    fn metrics(&self) -> Result<Vec<(MetricsKey, MetricsValue)>, DatapathError> {
        BpfDatapath::metrics(self)
    }
    fn upsert_ipcache(&mut self, key: IpcacheKey, identity: u32) -> Result<(), DatapathError> {
        BpfDatapath::upsert_ipcache(self, key, identity)
    }
    fn remove_ipcache(&mut self, key: IpcacheKey) -> Result<(), DatapathError> {
        BpfDatapath::remove_ipcache(self, key)
    }
    fn list_ipcache(&self) -> Result<Vec<(IpcacheKey, IpcacheValue)>, DatapathError> {
        BpfDatapath::list_ipcache(self)
    }
    fn set_policy(
        &mut self,
        endpoint_id: u16,
        entries: &BTreeMap<PolicyKey, PolicyValue>,
    ) -> Result<(), DatapathError> {
        BpfDatapath::set_policy(self, endpoint_id, entries).map(|_| ())
    }
    fn get_policy(
        &self,
        endpoint_id: u16,
    ) -> Result<Option<BTreeMap<PolicyKey, PolicyValue>>, DatapathError> {
        BpfDatapath::get_policy(self, endpoint_id)
    }
    fn bump_policy_revision(&mut self) -> Result<u32, DatapathError> {
        BpfDatapath::bump_policy_revision(self)
    }
    fn list_ct(&self) -> Result<Vec<(CtKey, CtValue)>, DatapathError> {
        BpfDatapath::list_ct(self)
    }
    fn gc_ct(&mut self) -> Result<usize, DatapathError> {
        BpfDatapath::gc_ct(self)
    }
    fn ct_live(&self) -> Option<u64> {
        BpfDatapath::ct_live(self)
    }
    fn purge_ct(&mut self, endpoint_id: u16, addrs: &[IpAddr]) -> Result<usize, DatapathError> {
        BpfDatapath::purge_ct(self, endpoint_id, addrs)
    }
    fn set_ct_budget(&mut self, budget: u32) -> Result<(), DatapathError> {
        BpfDatapath::set_ct_budget(self, budget)
    }
    fn remove_ct(&mut self, key: CtKey) -> Result<(), DatapathError> {
        BpfDatapath::remove_ct(self, key)
    }
    fn set_monitor_level(&mut self, level: u32) -> Result<(), DatapathError> {
        BpfDatapath::set_monitor_level(self, level)
    }
    fn test_run(&self, config: &EndpointConfig, packet: &[u8]) -> Result<u32, DatapathError> {
        Ok(self.test_program(config)?.run(packet)?.verdict)
    }
}

/// The domain-level policy of a resolved policy: what
/// [`crate::policy::map_entries`] builds as raw map entries, for
/// [`cilia_datapath::Datapath::set_endpoint_policy`]. `cookies` numbers
/// its rules.
pub fn endpoint_policy(
    resolved: &cilia_policy::ResolvedPolicy,
    cookies: &mut crate::policy::RuleCookies,
    audit: bool,
) -> cilia_abi::EndpointPolicy {
    let rule_cookies: Vec<u32> = resolved
        .rules
        .iter()
        .map(|r| cookies.cookie_of(r))
        .collect();
    let direction = |d: cilia_policy::Direction| match d {
        cilia_policy::Direction::Ingress => cilia_abi::Direction::Ingress,
        cilia_policy::Direction::Egress => cilia_abi::Direction::Egress,
    };
    cilia_abi::EndpointPolicy {
        enforcement: cilia_abi::Enforcement {
            ingress: resolved.ingress_enforced,
            egress: resolved.egress_enforced,
            audit,
        },
        entries: resolved
            .entries
            .iter()
            .map(|e| cilia_abi::PolicyEntry {
                direction: direction(e.direction),
                identity: e.identity,
                proto: e.proto,
                port: e.port,
                port_prefix_len: e.port_prefix_len,
                verdict: match e.verdict {
                    cilia_policy::Verdict::Allow => cilia_abi::Verdict::Allow,
                    cilia_policy::Verdict::Deny => cilia_abi::Verdict::Deny,
                },
                rule: rule_cookies.get(e.rule as usize).copied().unwrap_or(0),
                proxy_port: 0,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use cilia_policy::{Direction, MapEntry, PolicyKind, ResolvedPolicy, RuleRef, Verdict};

    use super::*;
    use crate::policy::{map_entries, RuleCookies};

    fn rule(index: usize, deny: bool) -> RuleRef {
        RuleRef {
            policy: "prod/web".into(),
            kind: PolicyKind::CiliumNetworkPolicy,
            direction: Direction::Ingress,
            index,
            deny,
            spec: 0,
        }
    }

    fn entry(
        direction: Direction,
        identity: u32,
        proto: u8,
        port: u16,
        port_prefix_len: u8,
        verdict: Verdict,
        rule: u32,
    ) -> MapEntry {
        MapEntry {
            direction,
            identity,
            proto,
            port,
            port_prefix_len,
            verdict,
            rule,
        }
    }

    /// Every match kind, a port range, and an allow and a deny on one key.
    fn resolution() -> ResolvedPolicy {
        use Direction::*;
        use Verdict::*;
        ResolvedPolicy {
            ingress_enforced: true,
            egress_enforced: true,
            entries: vec![
                entry(Ingress, 300, 0, 0, 0, Allow, 0),
                entry(Ingress, 301, 17, 0, 0, Allow, 0),
                entry(Ingress, 302, 6, 80, 16, Allow, 0),
                entry(Ingress, 302, 6, 80, 16, Deny, 1),
                entry(Egress, 2, 6, 1024, 6, Allow, 0),
                entry(Egress, 2, 6, 8080, 16, Allow, 1),
            ],
            rules: vec![rule(0, false), rule(0, true)],
        }
    }

    #[test]
    fn domain_policy_encodes_to_the_agents_map_entries() {
        for audit in [false, true] {
            let mut cookies = RuleCookies::default();
            let raw = map_entries(&resolution(), &mut cookies, audit);
            let domain = endpoint_policy(&resolution(), &mut cookies, audit);
            assert_eq!(domain.encode(), raw);
            assert_eq!(
                cilia_abi::EndpointPolicy::decode(&raw).encode(),
                raw,
                "decoding the agent's map loses nothing"
            );
        }
    }
}
