//! `cilia-proxy`: the L7 HTTP proxy, its own process so that an agent restart
//! never cuts an L7 connection. The datapath hands it the connections whose
//! policy entry names a proxy port (transparently: the accepted socket's local
//! address is the original destination); it enforces the HTTP rules the agent
//! pushed per request, answers denied requests `403 Access denied`, forwards
//! allowed ones from the client's own address, and reports every request.
//!
//! [`control`] is the agent↔proxy protocol; it is the only part the agent uses.

#![warn(missing_docs)]

pub mod control;
