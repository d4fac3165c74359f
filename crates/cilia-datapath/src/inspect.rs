//! Reading back what is attached: a pinned TCX link's id and device, its
//! program's tag (which build it came from) and the configuration baked
//! into its `.rodata`. aya 0.14 exposes none of these for a program known
//! only by id (its `LinkInfo` hides the TCX ifindex, and it has no map lookup
//! on a raw map id), so this module issues the few `bpf(2)` commands it
//! needs itself. Read-only but for one command: clearing a slot of an array
//! of maps (`clear_map_slot`), which aya 0.14 cannot do either.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr` as zeroed bytes; every command below fills a prefix.
pub(crate) type Attr = [u8; 128];

pub(crate) fn put_u32(attr: &mut Attr, off: usize, v: u32) {
    attr[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut Attr, off: usize, v: u64) {
    attr[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

pub(crate) fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-initialised buffer at least as large as the
    // bpf_attr prefix of every command used here and outlives the call; the
    // pointers the callers wrote into it point at buffers that outlive it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

fn owned_fd(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

pub(crate) fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut attr: Attr = [0; 128];
    put_u64(&mut attr, 0, c.as_ptr() as u64); // pathname
    bpf(BPF_OBJ_GET, &mut attr).map(owned_fd)
}

fn get_fd_by_id(cmd: libc::c_long, id: u32) -> std::io::Result<OwnedFd> {
    let mut attr: Attr = [0; 128];
    put_u32(&mut attr, 0, id); // prog_id / map_id
    bpf(cmd, &mut attr).map(owned_fd)
}

/// `BPF_OBJ_GET_INFO_BY_FD` into a zeroed buffer of 256 bytes (larger than
/// any info struct read here; the kernel accepts zeroed tail bytes).
fn info(fd: &OwnedFd, buf: &mut [u8; 256]) -> std::io::Result<()> {
    let mut attr: Attr = [0; 128];
    put_u32(&mut attr, 0, fd.as_raw_fd() as u32); // bpf_fd
    put_u32(&mut attr, 4, buf.len() as u32); // info_len
    put_u64(&mut attr, 8, buf.as_mut_ptr() as u64); // info
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

fn u32_at(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[off..off + 4]);
    u32::from_ne_bytes(b)
}

/// What a pinned TCX link is attached to and which program it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTarget {
    /// The link's own id: it stays the same when its program is swapped.
    pub link_id: u32,
    pub program_id: u32,
    /// 0 when the device is gone (the link is then defunct).
    pub ifindex: u32,
}

/// Reads a pinned TCX link. `struct bpf_link_info`: type, id, prog_id
/// (u32 each), then a union aligned to 8 whose `tcx` member starts with
/// the ifindex (offset 16).
pub fn link_target(pin: &Path) -> std::io::Result<LinkTarget> {
    let fd = obj_get(pin)?;
    let mut buf = [0u8; 256];
    info(&fd, &mut buf)?;
    Ok(LinkTarget {
        link_id: u32_at(&buf, 4),
        program_id: u32_at(&buf, 8),
        ifindex: u32_at(&buf, 16),
    })
}

/// What a pinned cgroup link is attached to and which program it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLinkTarget {
    pub link_id: u32,
    pub program_id: u32,
    /// The cgroup's id (its cgroup2 directory's inode number); 0 when the
    /// cgroup is gone (the link is then defunct).
    pub cgroup_id: u64,
}

/// Reads a pinned cgroup link: the union of `struct bpf_link_info` (offset
/// 16) starts, for a cgroup link, with the cgroup id (u64).
pub fn cgroup_link_target(pin: &Path) -> std::io::Result<CgroupLinkTarget> {
    let fd = obj_get(pin)?;
    let mut buf = [0u8; 256];
    info(&fd, &mut buf)?;
    let mut id = [0u8; 8];
    id.copy_from_slice(&buf[16..24]);
    Ok(CgroupLinkTarget {
        link_id: u32_at(&buf, 4),
        program_id: u32_at(&buf, 8),
        cgroup_id: u64::from_ne_bytes(id),
    })
}

/// A loaded program's tag: the kernel's hash of its instructions with map
/// references blanked (`struct bpf_prog_info`: tag, 8 bytes at offset 8).
/// Load-time constants live in `.rodata`, not in the instructions, so
/// every endpoint's program of one build has the same tag, and a program
/// built from other source has another.
pub fn program_tag(program_id: u32) -> std::io::Result<[u8; 8]> {
    let prog = get_fd_by_id(BPF_PROG_GET_FD_BY_ID, program_id)?;
    let mut buf = [0u8; 256];
    info(&prog, &mut buf)?;
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&buf[8..16]);
    Ok(tag)
}

/// The `.rodata` contents of a loaded program (its load-time constants).
/// `struct bpf_prog_info`: nr_map_ids at offset 52, map_ids pointer at 56;
/// `struct bpf_map_info`: value_size at 12, name (16 bytes) at 24.
pub fn program_rodata(program_id: u32) -> std::io::Result<Option<Vec<u8>>> {
    let prog = get_fd_by_id(BPF_PROG_GET_FD_BY_ID, program_id)?;
    let mut ids = [0u32; 32];
    let mut buf = [0u8; 256];
    buf[52..56].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    buf[56..64].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    info(&prog, &mut buf)?;
    let n = (u32_at(&buf, 52) as usize).min(ids.len());
    for id in &ids[..n] {
        let map = get_fd_by_id(BPF_MAP_GET_FD_BY_ID, *id)?;
        let mut mbuf = [0u8; 256];
        info(&map, &mut mbuf)?;
        let name = &mbuf[24..40];
        let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
        if !name.ends_with(b".rodata") {
            continue;
        }
        let value_size = u32_at(&mbuf, 12) as usize;
        let mut value = vec![0u8; value_size];
        let key = 0u32;
        let mut attr: Attr = [0; 128];
        put_u32(&mut attr, 0, map.as_raw_fd() as u32); // map_fd
        put_u64(&mut attr, 8, &key as *const u32 as u64); // key
        put_u64(&mut attr, 16, value.as_mut_ptr() as u64); // value
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr)?;
        return Ok(Some(value));
    }
    Ok(None)
}

/// Clears slot `index` of an array of maps (aya 0.14's `ArrayOfMaps` has
/// no delete). `NotFound` when the slot was already empty.
pub(crate) fn clear_map_slot(map: &OwnedFd, index: u32) -> std::io::Result<()> {
    let mut attr: Attr = [0; 128];
    put_u32(&mut attr, 0, map.as_raw_fd() as u32); // map_fd
    put_u64(&mut attr, 8, &index as *const u32 as u64); // key
    bpf(BPF_MAP_DELETE_ELEM, &mut attr).map(|_| ())
}

/// Whether `haystack` contains `needle` (the baked-in configuration's bytes
/// inside `.rodata`, wherever the linker put the global).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
