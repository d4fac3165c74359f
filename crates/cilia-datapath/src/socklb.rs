//! The socket load balancer (`bpf/sock.c`): eight cgroup sock_addr
//! programs on one cgroup v2 directory, and the map of network namespaces
//! whose sockets they translate.
//!
//! ```text
//! <root>/socklb/connect4 … getpeername6   cgroup links, one per hook
//! <root>/maps/cilia_lb_netns              netns cookie -> endpoint id (served namespaces; 0: the node)
//! <root>/maps/cilia_lb_sock               per-socket translations (LRU)
//! <root>/maps/cilia_lb_sock_storage       socket storage: a translated socket's own state
//! ```
//!
//! The same invariants as the endpoint programs': the pinned links keep
//! the programs attached when the agent is gone, every program is verified
//! before any link changes, and attaching again swaps the new programs into
//! the existing links (`BPF_LINK_UPDATE`), so a restart never leaves a
//! socket untranslated. A link found on another cgroup is detached first.
//! The programs use the shared maps pinned by name in `<root>/maps`, the
//! same ones `lxc.o` uses (the services, backends, affinity and stats).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::EbpfLoader;

use crate::endpoint::{is_not_found, unpin_link, BpfDatapath};
use crate::error::DatapathError;
use crate::inspect::{bpf, obj_get, put_u32, Attr};
use crate::object::{
    MAP_LB_NETNS, PROG_SOCK_CONNECT4, PROG_SOCK_CONNECT6, PROG_SOCK_GETPEERNAME4,
    PROG_SOCK_GETPEERNAME6, PROG_SOCK_RECVMSG4, PROG_SOCK_RECVMSG6, PROG_SOCK_SENDMSG4,
    PROG_SOCK_SENDMSG6, SOCK_OBJECT,
};

/// The socket LB's programs and the names of their link pins.
pub const SOCK_LINKS: &[(&str, &str)] = &[
    (PROG_SOCK_CONNECT4, "connect4"),
    (PROG_SOCK_CONNECT6, "connect6"),
    (PROG_SOCK_SENDMSG4, "sendmsg4"),
    (PROG_SOCK_SENDMSG6, "sendmsg6"),
    (PROG_SOCK_RECVMSG4, "recvmsg4"),
    (PROG_SOCK_RECVMSG6, "recvmsg6"),
    (PROG_SOCK_GETPEERNAME4, "getpeername4"),
    (PROG_SOCK_GETPEERNAME6, "getpeername6"),
];

/// `statfs` magic of a cgroup v2 mount.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `SOL_SOCKET` option: the socket's network namespace cookie (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Where the socket LB's programs are attached (their pinned links).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketLbLinks {
    /// Id of the cgroup the links are on (its cgroup2 directory's inode
    /// number); 0 when that cgroup is gone.
    pub cgroup_id: u64,
    /// How many of the eight hooks have a pinned link (8 when complete).
    pub programs: usize,
}

/// Id of a cgroup v2 directory (its inode number), refusing anything else.
pub fn cgroup_id(cgroup: &Path) -> Result<u64, DatapathError> {
    let err = |reason: String| DatapathError::Cgroup {
        path: cgroup.to_path_buf(),
        reason,
    };
    let fs = nix::sys::statfs::statfs(cgroup).map_err(|e| err(e.to_string()))?;
    if fs.filesystem_type().0 != CGROUP2_SUPER_MAGIC {
        return Err(err(
            "not on a cgroup v2 file system (on a hybrid hierarchy it is mounted at /sys/fs/cgroup/unified)".into(),
        ));
    }
    let meta = std::fs::metadata(cgroup).map_err(|e| err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(err("not a directory".into()));
    }
    Ok(meta.ino())
}

/// The cgroup v2 root of this machine: `/sys/fs/cgroup` on a unified
/// hierarchy, `/sys/fs/cgroup/unified` on a hybrid one.
pub fn default_cgroup_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| cgroup_id(p).is_ok())
}

/// The network namespace cookie of a socket (`SO_NETNS_COOKIE`): what
/// `bpf_get_netns_cookie` returns for sockets of that namespace.
fn socket_netns_cookie(sock: BorrowedFd<'_>) -> std::io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `sock` is an open socket; the kernel writes at most `len`
    // bytes into `cookie`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The netns cookie of the calling thread's namespace, from a socket that
/// is never bound (so no address or device of the namespace is needed).
fn udp_socket_cookie() -> std::io::Result<u64> {
    // SAFETY: socket(2) takes no pointers; a non-negative result is a new
    // fd nothing else owns, which the OwnedFd closes.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: see above.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    socket_netns_cookie(sock.as_fd())
}

/// The cookie of the calling process's network namespace (the node's).
pub fn current_netns_cookie() -> Result<u64, DatapathError> {
    udp_socket_cookie()
        .map_err(|e| DatapathError::io("reading the netns cookie (SO_NETNS_COOKIE)", e))
}

/// The cookie of the network namespace `netns` (an nsfs file): a socket is
/// opened inside it, on a short-lived thread that entered it, and asked.
pub fn netns_cookie(netns: &File) -> Result<u64, DatapathError> {
    let ns = netns
        .try_clone()
        .map_err(|e| DatapathError::io("duplicating the netns fd", e))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                DatapathError::io("entering the network namespace", std::io::Error::from(e))
            })?;
            udp_socket_cookie()
                .map_err(|e| DatapathError::io("reading the netns cookie (SO_NETNS_COOKIE)", e))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(DatapathError::io(
                "reading the netns cookie",
                std::io::Error::other("thread panicked"),
            ))
        })
    })
}

/// Swaps the program `prog_fd` into the link pinned at `pin`.
fn link_update(pin: &Path, prog_fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let link = obj_get(pin)?;
    let mut attr: Attr = [0; 128];
    put_u32(&mut attr, 0, link.as_raw_fd() as u32); // link_fd
    put_u32(&mut attr, 4, prog_fd.as_raw_fd() as u32); // new_prog_fd
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

impl BpfDatapath {
    /// Pin path of a socket LB link (`connect4`, …, `getpeername6`).
    pub fn socklb_link_pin(&self, name: &str) -> PathBuf {
        self.root().join("socklb").join(name)
    }

    /// Attaches the socket LB's eight programs to the cgroup v2 directory
    /// `cgroup`, or swaps them into their pinned links when those are on
    /// that cgroup already. Every program passes the verifier before any
    /// link changes.
    pub fn attach_socket_lb(&self, cgroup: &Path) -> Result<(), DatapathError> {
        let id = cgroup_id(cgroup)?;
        let dir = File::open(cgroup).map_err(|e| DatapathError::Cgroup {
            path: cgroup.to_path_buf(),
            reason: e.to_string(),
        })?;
        let links_dir = self.root().join("socklb");
        std::fs::create_dir_all(&links_dir)
            .map_err(|e| DatapathError::io(format!("creating {}", links_dir.display()), e))?;
        let mut ebpf = self.load_socket_lb()?;
        for (name, pin_name) in SOCK_LINKS {
            let pin = self.socklb_link_pin(pin_name);
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|e| DatapathError::program(name, e))?;
            if pin.exists() {
                let on = crate::inspect::cgroup_link_target(&pin)
                    .map(|t| t.cgroup_id)
                    .ok();
                if on == Some(id) {
                    let fd = prog.fd().map_err(|e| DatapathError::program(name, e))?;
                    link_update(&pin, fd.as_fd()).map_err(|e| DatapathError::Pin {
                        path: pin.clone(),
                        reason: format!("swapping {name} into the link: {e}"),
                    })?;
                    continue;
                }
                tracing::info!(pin = %pin.display(), ?on, cgroup_id = id, "socket LB link on another cgroup: detaching it");
                unpin_link(&pin)?;
            }
            let link_id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(|e| DatapathError::program(name, e))?;
            let link = prog
                .take_link(link_id)
                .map_err(|e| DatapathError::program(name, e))?;
            let pin_err = |reason: String| DatapathError::Pin {
                path: pin.clone(),
                reason,
            };
            let fd_link: FdLink = link
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| pin_err(e.to_string()))?;
            fd_link.pin(&pin).map_err(|e| pin_err(e.to_string()))?;
        }
        Ok(())
    }

    /// Loads (and so verifies) all eight programs against the pinned maps.
    fn load_socket_lb(&self) -> Result<aya::Ebpf, DatapathError> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(self.root().join("maps"))
            .load(SOCK_OBJECT)?;
        for (name, _) in SOCK_LINKS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|e| DatapathError::program(name, e))?;
            crate::error::load_program(name, || prog.load())?;
        }
        Ok(ebpf)
    }

    /// Loads this build's socket LB programs again and swaps them into the
    /// links that are pinned (the `datapath reload` of the socket LB); a
    /// rejected program leaves the old ones attached. Returns how many
    /// links were swapped (0: not attached).
    pub fn reload_socket_lb(&self) -> Result<usize, DatapathError> {
        if !SOCK_LINKS
            .iter()
            .any(|(_, pin_name)| self.socklb_link_pin(pin_name).exists())
        {
            return Ok(0);
        }
        let ebpf = self.load_socket_lb()?;
        let mut swapped = 0;
        for (name, pin_name) in SOCK_LINKS {
            let pin = self.socklb_link_pin(pin_name);
            if !pin.exists() {
                continue;
            }
            let prog: &CgroupSockAddr = ebpf
                .program(name)
                .ok_or(DatapathError::MissingProgram(name))?
                .try_into()
                .map_err(|e| DatapathError::program(name, e))?;
            let fd = prog.fd().map_err(|e| DatapathError::program(name, e))?;
            link_update(&pin, fd.as_fd()).map_err(|e| DatapathError::Pin {
                path: pin.clone(),
                reason: format!("swapping {name} into the link: {e}"),
            })?;
            swapped += 1;
        }
        Ok(swapped)
    }

    /// Detaches the socket LB (removes its pinned links). Nothing attached
    /// is not an error.
    pub fn detach_socket_lb(&self) -> Result<(), DatapathError> {
        for (_, pin_name) in SOCK_LINKS {
            unpin_link(&self.socklb_link_pin(pin_name))?;
        }
        Ok(())
    }

    /// Where the socket LB is attached; `None` when no link is pinned.
    pub fn socket_lb_links(&self) -> Result<Option<SocketLbLinks>, DatapathError> {
        let mut found: Option<SocketLbLinks> = None;
        for (_, pin_name) in SOCK_LINKS {
            let pin = self.socklb_link_pin(pin_name);
            if !pin.exists() {
                continue;
            }
            let target = crate::inspect::cgroup_link_target(&pin)
                .map_err(|e| DatapathError::io(format!("inspecting {}", pin.display()), e))?;
            let links = found.get_or_insert(SocketLbLinks {
                cgroup_id: target.cgroup_id,
                programs: 0,
            });
            links.programs += 1;
        }
        Ok(found)
    }

    fn lb_netns_map(&self) -> Result<HashMap<MapData, u64, u16>, DatapathError> {
        let err = |e: MapError| DatapathError::map(MAP_LB_NETNS, e);
        let data = MapData::from_pin(self.root().join("maps").join(MAP_LB_NETNS)).map_err(err)?;
        HashMap::try_from(Map::from_map_data(data).map_err(err)?).map_err(err)
    }

    /// Lets the socket LB translate sockets of the network namespace whose
    /// cookie is `cookie`, where endpoint `endpoint_id` lives (0: the node).
    pub fn add_lb_netns(&self, cookie: u64, endpoint_id: u16) -> Result<(), DatapathError> {
        self.lb_netns_map()?
            .insert(cookie, endpoint_id, 0)
            .map_err(|e| DatapathError::map(MAP_LB_NETNS, e))
    }

    /// Stops translating sockets of that namespace. Absent is not an error.
    pub fn remove_lb_netns(&self, cookie: u64) -> Result<(), DatapathError> {
        match self.lb_netns_map()?.remove(&cookie) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(DatapathError::map(MAP_LB_NETNS, e)),
        }
    }

    /// The cookies of the namespaces the socket LB serves, sorted.
    pub fn lb_netns(&self) -> Result<Vec<u64>, DatapathError> {
        let mut out = self
            .lb_netns_map()?
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DatapathError::map(MAP_LB_NETNS, e))?;
        out.sort_unstable();
        Ok(out)
    }
}
