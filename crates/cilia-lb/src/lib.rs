//! Services of the cilia load balancer, pure: no kernel, no socket, no file.
//!
//! * [`model`]: a service (frontend `[VIP]:PORT/PROTO`, backends with weight
//!   and state, algorithm, affinity), parsed from user text and validated,
//!   every error naming the input and the reason.
//! * [`maglev`]: the Maglev lookup table of a service's backends (weights
//!   respected), generated here and never in BPF.
//! * [`rows`]: a validated service as the datapath's rows
//!   ([`cilia_abi::LbService`], [`cilia_abi::LbBackend`]).
//!
//! Invariant: everything here is a function of its inputs (no clock, no
//! randomness), so the agent writes the same tables after a restart and two
//! agents with the same services write the same tables.

pub mod maglev;
pub mod model;
pub mod rows;

pub use maglev::{check_table_size, MaglevBackend, MAX_TABLE_SIZE, MIN_TABLE_SIZE};
pub use model::{Algorithm, Backend, BackendState, Frontend, LbError, Protocol, Service};
pub use rows::datapath_rows;

/// Entries of every service's Maglev table when the agent is not told
/// otherwise (a prime).
pub const DEFAULT_TABLE_SIZE: u32 = cilia_abi::CILIA_LB_MAGLEV_SIZE_DEFAULT;
/// Backends one service may have (its slots in the datapath).
pub const SLOTS_MAX: usize = cilia_abi::CILIA_LB_SLOTS_MAX as usize;
