//! The network namespaces the socket load balancer serves: the node's and
//! every ready endpoint's, by netns cookie (`cilia_lb_netns`). Sockets of
//! other namespaces — other agents', the machine's — are never translated.
//!
//! A cookie is read from the namespace's fd the create holds (never from a
//! path that may name another namespace by then) and remembered per
//! endpoint, so a delete removes exactly what its create added. Cookies are
//! never reused by the kernel, so an entry left behind by a crash is
//! harmless until the next start, which rebuilds the set from the records.

use std::fs::File;

use tracing::warn;

use super::{netdev, EndpointError, EndpointManager};
use crate::store::EndpointRecord;
use cilia_api::EndpointState;

impl EndpointManager {
    /// Serves the namespace `netns` of a new endpoint (when the socket LB
    /// is on).
    pub(crate) fn serve_netns(
        &mut self,
        rec: &EndpointRecord,
        netns: &File,
    ) -> Result<(), EndpointError> {
        if self.socket_lb.is_none() {
            return Ok(());
        }
        let cookie = cilia_datapath::socklb::netns_cookie(netns)?;
        self.dp().add_lb_netns(cookie, rec.id)?;
        self.lb_netns.insert(rec.id, cookie);
        Ok(())
    }

    /// Stops serving an endpoint's namespace, unless the node or another
    /// endpoint (a second interface of the same pod) still lives in it.
    pub(crate) fn unserve_netns(&mut self, id: u16) -> Result<(), EndpointError> {
        let Some(cookie) = self.lb_netns.remove(&id) else {
            return Ok(());
        };
        if self.socket_lb == Some(cookie) || self.lb_netns.values().any(|c| *c == cookie) {
            return Ok(());
        }
        self.dp().remove_lb_netns(cookie)?;
        Ok(())
    }

    /// After restore: serves the node's namespace and every ready
    /// endpoint's, and stops serving any other (left by a crash or by
    /// endpoints deleted while the agent was down). Returns how many
    /// namespaces are served.
    pub fn sync_socket_lb_netns(&mut self) -> Result<usize, EndpointError> {
        let Some(node) = self.socket_lb else {
            return Ok(0);
        };
        self.lb_netns.clear();
        for rec in self.store.endpoints()? {
            if rec.state != EndpointState::Ready {
                continue;
            }
            let cookie = netdev::open_netns(&rec.netns, &self.agent_netns)
                .map_err(EndpointError::from)
                .and_then(|ns| Ok(cilia_datapath::socklb::netns_cookie(&ns.file)?));
            match cookie {
                Ok(cookie) => {
                    self.lb_netns.insert(rec.id, cookie);
                }
                Err(e) => {
                    warn!(id = rec.id, netns = %rec.netns, error = %e, "socket LB: cannot read the endpoint's netns cookie; its sockets are balanced per packet only")
                }
            }
        }
        // Cookie -> the endpoint named in its service events: the lowest id
        // living there; the node's namespace is the node (0).
        let mut want: std::collections::BTreeMap<u64, u16> = std::collections::BTreeMap::new();
        for (id, cookie) in &self.lb_netns {
            want.entry(*cookie).or_insert(*id);
        }
        want.insert(node, 0);
        for cookie in self.dp().lb_netns()? {
            if !want.contains_key(&cookie) {
                self.dp().remove_lb_netns(cookie)?;
            }
        }
        for (cookie, id) in &want {
            self.dp().add_lb_netns(*cookie, *id)?;
        }
        Ok(want.len())
    }
}
