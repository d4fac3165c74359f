//! `BPF_PROG_TEST_RUN` harness: runs a loaded tc program on a crafted packet
//! and returns the verdict and the packet as the program left it. Used by the
//! datapath fixtures (tests) and by the benchmarks.

use std::time::Duration;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};

use crate::error::DatapathError;
use crate::object::{FLOOR_OBJECT, PROBE_OBJECT, PROG_EMPTY};

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

/// A loaded tc program, not attached anywhere.
pub struct TestProgram {
    ebpf: Ebpf,
    name: &'static str,
}

impl TestProgram {
    pub(crate) fn new(ebpf: Ebpf, name: &'static str) -> Self {
        Self { ebpf, name }
    }

    /// The empty program (returns TC_ACT_OK): the benchmark baseline.
    pub fn empty() -> Result<Self, DatapathError> {
        Self::load_one(PROBE_OBJECT, PROG_EMPTY)
    }

    /// One of the benchmark floors of `bpf/floor.c` (`object::PROG_FLOOR_*`):
    /// the least a program must do to deliver an established IPv4 flow.
    pub fn floor(name: &'static str) -> Result<Self, DatapathError> {
        Self::load_one(FLOOR_OBJECT, name)
    }

    /// Loads program `name` of `object` alone (no configuration, no pins).
    fn load_one(object: &[u8], name: &'static str) -> Result<Self, DatapathError> {
        let mut ebpf = EbpfLoader::new().load(object)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|e| DatapathError::program(name, e))?;
        prog.load().map_err(|e| DatapathError::program(name, e))?;
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
        let mut out = vec![0u8; packet.len() + 512];
        let mut ctx_in = [0u8; SKB_MARK_OFFSET + 4];
        ctx_in[SKB_MARK_OFFSET..].copy_from_slice(&mark.to_ne_bytes());
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
