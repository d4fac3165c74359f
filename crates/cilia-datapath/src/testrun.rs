//! `BPF_PROG_TEST_RUN` harness: runs a loaded tc program on a crafted packet
//! and returns the verdict and the packet as the program left it. Used by the
//! datapath fixtures (tests) and by the benchmarks.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::Duration;

use aya::maps::{Array, HashMap, LpmTrie, MapData};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};
use cilia_abi::{ClockConfig, CtKey, CtValue, IpcacheKey, IpcacheValue, PolicyEntry, PolicyValue};

use crate::error::DatapathError;
use crate::keys::{ipcache_to_lpm, policy_to_lpm, IpcacheData, PolicyData};
use crate::object::{FLOOR_OBJECT, PROBE_OBJECT, PROG_EMPTY};

/// The new-flow floors' maps in `bpf/floor.c`.
const FLOOR_NEW_CT: &str = "floor_new_ct_map";
const FLOOR_IPCACHE: &str = "floor_ipcache_map";
const FLOOR_POLICY: &str = "floor_policy_map";
/// The floors' clock calibration (`cil_now()`'s, see `clock.rs`).
const FLOOR_CLOCK: &str = "floor_clock";

/// tc verdicts, as returned by the program.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// Outcome of one run.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub verdict: u32,
    /// The packet after the program ran (rewrites included).
    pub packet: Vec<u8>,
    /// `skb->mark` after the program ran.
    pub mark: u32,
}

/// `struct __sk_buff` as `BPF_PROG_TEST_RUN` takes and returns it: the
/// fields before `mark` must be zero; the kernel copies back at most as
/// many bytes as it has (192 on 6.x), so a larger buffer is fine.
const SKB_CTX_LEN: usize = 256;
/// Offset of `mark` in `struct __sk_buff` (after `len` and `pkt_type`).
const SKB_MARK_OFFSET: usize = 8;
/// `offsetof(struct __sk_buff, cb)`.
const SKB_CB_OFFSET: usize = 48;

/// A loaded tc program, not attached anywhere.
pub struct TestProgram {
    ebpf: Ebpf,
    name: &'static str,
    /// A new-flow floor's conntrack, emptied between bench rounds.
    conntrack: Option<Mutex<HashMap<MapData, CtKey, CtValue>>>,
}

impl TestProgram {
    pub(crate) fn new(ebpf: Ebpf, name: &'static str) -> Self {
        Self {
            ebpf,
            name,
            conntrack: None,
        }
    }

    /// The empty program (returns TC_ACT_OK): the benchmark baseline.
    pub fn empty() -> Result<Self, DatapathError> {
        Self::load_one(PROBE_OBJECT, PROG_EMPTY)
    }

    /// One of the probe programs of `bpf/probe.c` (`object::PROG_PROBE_*`).
    pub(crate) fn probe(name: &'static str) -> Result<Self, DatapathError> {
        Self::load_one(PROBE_OBJECT, name)
    }

    /// One of the benchmark floors of `bpf/floor.c` (`object::PROG_FLOOR_*`):
    /// the least a program must do to deliver an established IPv4 flow.
    pub fn floor(name: &'static str) -> Result<Self, DatapathError> {
        let mut program = Self::load_one(FLOOR_OBJECT, name)?;
        program.seed_floor_clock()?;
        Ok(program)
    }

    /// A floor reads the clock as the datapath does: its `floor_clock` gets
    /// the calibration the datapath's `cilia_clock` gets (left at zero, the
    /// coarse clock, when there is none, as the datapath's would be).
    fn seed_floor_clock(&mut self) -> Result<(), DatapathError> {
        let Ok(calibration) = crate::clock::calibration() else {
            return Ok(());
        };
        let map = self
            .ebpf
            .map_mut(FLOOR_CLOCK)
            .ok_or(DatapathError::MissingMap(FLOOR_CLOCK))?;
        let mut clock: Array<&mut MapData, ClockConfig> =
            Array::try_from(map).map_err(|e| DatapathError::map(FLOOR_CLOCK, e))?;
        clock
            .set(0, calibration, 0)
            .map_err(|e| DatapathError::map(FLOOR_CLOCK, e))
    }

    /// A new-flow floor of `bpf/floor.c` (`object::PROG_FLOOR_NEW_*`), its
    /// maps seeded: `peer`/32 in its ipcache with the identity of `allow`,
    /// and `allow` in its policy (the same entry the endpoint program's
    /// bench policy holds; the floor looks up the full key only, so `allow`
    /// should name a protocol and a single port). Its conntrack starts
    /// empty; [`Self::clear_conntrack`] empties it again.
    pub fn new_flow_floor(
        name: &'static str,
        peer: Ipv4Addr,
        allow: &PolicyEntry,
    ) -> Result<Self, DatapathError> {
        let mut program = Self::load_one(FLOOR_OBJECT, name)?;
        program.seed_floor_clock()?;
        let take = |ebpf: &mut Ebpf, map: &'static str| {
            ebpf.take_map(map).ok_or(DatapathError::MissingMap(map))
        };
        let mut ipcache: LpmTrie<MapData, IpcacheData, IpcacheValue> =
            LpmTrie::try_from(take(&mut program.ebpf, FLOOR_IPCACHE)?)
                .map_err(|e| DatapathError::map(FLOOR_IPCACHE, e))?;
        let peer_value = IpcacheValue {
            identity: allow.identity,
            ..Default::default()
        };
        ipcache
            .insert(
                &ipcache_to_lpm(&IpcacheKey::new(IpAddr::V4(peer), 32)),
                peer_value,
                0,
            )
            .map_err(|e| DatapathError::map(FLOOR_IPCACHE, e))?;
        let mut policy: LpmTrie<MapData, PolicyData, PolicyValue> =
            LpmTrie::try_from(take(&mut program.ebpf, FLOOR_POLICY)?)
                .map_err(|e| DatapathError::map(FLOOR_POLICY, e))?;
        policy
            .insert(&policy_to_lpm(&allow.key()), allow.value(), 0)
            .map_err(|e| DatapathError::map(FLOOR_POLICY, e))?;
        let conntrack = HashMap::try_from(take(&mut program.ebpf, FLOOR_NEW_CT)?)
            .map_err(|e| DatapathError::map(FLOOR_NEW_CT, e))?;
        program.conntrack = Some(Mutex::new(conntrack));
        Ok(program)
    }

    /// Empties a new-flow floor's conntrack (a no-op for other programs);
    /// returns how many entries it held.
    pub fn clear_conntrack(&self) -> Result<usize, DatapathError> {
        let Some(conntrack) = &self.conntrack else {
            return Ok(0);
        };
        let mut conntrack = conntrack
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let keys: Vec<CtKey> = conntrack
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| DatapathError::map(FLOOR_NEW_CT, e))?;
        for key in &keys {
            conntrack
                .remove(key)
                .map_err(|e| DatapathError::map(FLOOR_NEW_CT, e))?;
        }
        Ok(keys.len())
    }

    /// Loads program `name` of `object` alone (no configuration, no pins).
    fn load_one(object: &[u8], name: &'static str) -> Result<Self, DatapathError> {
        let mut ebpf = EbpfLoader::new().load(object)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|e| DatapathError::program(name, e))?;
        crate::error::load_program(name, || prog.load())?;
        Ok(Self::new(ebpf, name))
    }

    fn prog(&self) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(self.name)
            .ok_or(DatapathError::MissingProgram(self.name))?
            .try_into()
            .map_err(|e| DatapathError::program(self.name, e))
    }

    /// How many instructions the verifier processed to accept the program
    /// (the kernel's `verified_insns`, 5.16+; `None` on older kernels): what
    /// a load costs, and how far the program is from the 1M limit.
    pub fn verified_instructions(&self) -> Result<Option<u32>, DatapathError> {
        let info = self
            .prog()?
            .info()
            .map_err(|e| DatapathError::program(self.name, e))?;
        Ok(info.verified_instruction_count())
    }

    /// Runs the program once on `packet`.
    pub fn run(&self, packet: &[u8]) -> Result<RunResult, DatapathError> {
        self.run_with_mark(packet, 0)
    }

    /// Runs the program once on `packet` arriving with `skb->mark` = `mark`.
    pub fn run_with_mark(&self, packet: &[u8], mark: u32) -> Result<RunResult, DatapathError> {
        self.run_with_ctx(packet, mark, [0; 5])
    }

    /// Runs the program once on `packet` arriving with `skb->cb` = `cb`:
    /// whatever an earlier layer left in the control block, which no
    /// program may take for its own word.
    pub fn run_with_cb(&self, packet: &[u8], cb: [u32; 5]) -> Result<RunResult, DatapathError> {
        self.run_with_ctx(packet, 0, cb)
    }

    fn run_with_ctx(
        &self,
        packet: &[u8],
        mark: u32,
        cb: [u32; 5],
    ) -> Result<RunResult, DatapathError> {
        let mut out = vec![0u8; packet.len() + 512];
        // The kernel takes mark and cb from the context (the bytes between
        // them must be zero).
        let mut ctx_in = [0u8; SKB_CB_OFFSET + 20];
        ctx_in[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4].copy_from_slice(&mark.to_ne_bytes());
        for (i, word) in cb.iter().enumerate() {
            let at = SKB_CB_OFFSET + 4 * i;
            ctx_in[at..at + 4].copy_from_slice(&word.to_ne_bytes());
        }
        let mut ctx_out = [0u8; SKB_CTX_LEN];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(&ctx_in);
        opts.ctx_out = Some(&mut ctx_out);
        let result = self
            .prog()?
            .test_run(opts)
            .map_err(|e| DatapathError::program(self.name, e))?;
        out.truncate(result.data_size_out as usize);
        let mut mark_out = [0u8; 4];
        mark_out.copy_from_slice(&ctx_out[SKB_MARK_OFFSET..SKB_MARK_OFFSET + 4]);
        Ok(RunResult {
            verdict: result.return_value,
            packet: out,
            mark: u32::from_ne_bytes(mark_out),
        })
    }

    /// Mean time per run over `repeat` runs inside the kernel.
    pub fn time_per_run(&self, packet: &[u8], repeat: u32) -> Result<Duration, DatapathError> {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.repeat = repeat;
        let result = self
            .prog()?
            .test_run(opts)
            .map_err(|e| DatapathError::program(self.name, e))?;
        Ok(result.duration)
    }
}
