//! The narrow interface between the agent's bookkeeping and the kernel.
//! [`cilia_datapath::BpfDatapath`] is the real implementation; tests use a
//! fake, so endpoint lifecycle logic is testable without root.

use std::net::IpAddr;

use cilia_abi::{EndpointConfig, EndpointInfo, EndpointKey, MetricsKey, MetricsValue};
use cilia_datapath::{BpfDatapath, DatapathError};

pub trait Datapath: Send {
    fn attach_endpoint(
        &mut self,
        config: &EndpointConfig,
        host_ifname: &str,
    ) -> Result<(), DatapathError>;
    fn detach_endpoint(&mut self, endpoint_id: u16) -> Result<(), DatapathError>;
    fn endpoint_attached(&self, endpoint_id: u16) -> bool;
    fn upsert_endpoint(&mut self, ip: IpAddr, info: EndpointInfo) -> Result<(), DatapathError>;
    fn remove_endpoint(&mut self, ip: IpAddr) -> Result<(), DatapathError>;
    fn list_endpoints(&self) -> Result<Vec<(EndpointKey, EndpointInfo)>, DatapathError>;
    fn metrics(&self) -> Result<Vec<(MetricsKey, MetricsValue)>, DatapathError>;
}

impl Datapath for BpfDatapath {
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
}
