//! The only crate that talks to the kernel's BPF subsystem.
//!
//! * [`object`]: what the embedded BPF objects contain (programs, maps,
//!   the specialization global) — knowledge of the object, no kernel calls.
//! * [`probe`]: which kernel features exist; the agent refuses to start
//!   without the required ones.
//! * [`endpoint`]: the pinned shared maps and the per-endpoint program:
//!   specialize, load, attach with TCX, pin the link so it outlives the agent;
//!   reload (swap a new specialization into the pinned link).
//! * `generic`: the one generic endpoint program a new endpoint is
//!   attached to at once, until its specialized build is verified.
//! * [`node`]: the node programs (overlay, underlay) and the node maps,
//!   for traffic between nodes; pinned like the endpoints'.
//! * `lb`: the load balancer's maps (services with their atomic
//!   generation flip, backends, rev-NAT, Maglev tables).
//! * [`socklb`]: the socket load balancer's cgroup programs and the
//!   network namespaces it serves.
//! * [`prefilter`]: the XDP prefilter (source CIDRs dropped on node
//!   devices), its pinned links and maps.
//! * [`inspect`]: read back what is attached (link, program tag, `.rodata`).
//! * [`testrun`]: `BPF_PROG_TEST_RUN` on crafted packets, for tests and
//!   benchmarks.
//! * [`interface`]: the domain-level [`Datapath`] trait the agent uses
//!   (typed rows of `cilia_abi::rows`, `&self`), implemented by
//!   [`BpfDatapath`] and by [`fake::FakeDatapath`] (in memory, for tests).
//!
//! Invariant: everything this crate attaches is pinned under the bpffs root
//! it was given; nothing it creates depends on the calling process staying
//! alive.

mod batch;
pub mod clock;
pub mod endpoint;
pub mod error;
pub mod events;
pub mod fake;
mod filter;
mod generic;
pub mod inspect;
pub mod interface;
mod keys;
mod lb;
mod lbstats;
pub mod node;
mod nodeport;
pub mod object;
pub mod packet;
pub mod prefilter;
pub mod probe;
pub mod socklb;
pub mod testrun;

pub use endpoint::{
    datapath_clock_ns, monotonic_ns, BpfDatapath, DatapathOptions, EndpointLoader, EndpointReload,
    LinkCheck, LinkSwap, LoadedEndpoint, PolicyUpdate, RecreatedMap, CT_MAX_RANGE, PIN_ABI_VERSION,
};
pub use error::DatapathError;
pub use interface::{CtBudgetUse, CtGcReport, Datapath, LoadedPrograms};
pub use node::NodeLinks;
pub use nodeport::NodePortOptions;
pub use prefilter::{DeviceXdp, PrefilterLink, PrefilterMode, XdpFeatures};
pub use probe::{probe_kernel, Feature, FeatureReport};
pub use socklb::SocketLbLinks;
