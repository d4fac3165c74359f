//! The health endpoint's network namespace: named and persistent like one
//! `ip netns add` makes (a bind mount of the namespace onto
//! `/var/run/netns/NAME`), so the endpoint manager can connect it by name
//! and it outlives the thread that created it; and entering it on one
//! thread only, so the rest of the agent stays in the node's namespace.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

/// Where named network namespaces live (as `ip netns` keeps them).
pub const NETNS_DIR: &str = "/var/run/netns";

/// `statfs` magic of nsfs: a namespace file (bind-mounted or under /proc).
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// The path of the named namespace `name`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.len() > 255 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("network namespace name {name:?}: not a file name"),
        ));
    }
    Ok(())
}

/// Whether `path` is a namespace file (nsfs), i.e. a mounted namespace.
fn is_netns(path: &Path) -> bool {
    // The type is a c_long: i64 here, i32 on 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    nix::sys::statfs::statfs(path)
        .map(|fs| fs.filesystem_type().0 as i64 == NSFS_MAGIC)
        .unwrap_or(false)
}

/// Creates the named network namespace `name` (or reuses it, if it exists:
/// an agent restart keeps its health endpoint), returning its path.
pub fn create_health_netns(name: &str) -> io::Result<PathBuf> {
    check_name(name)?;
    let path = netns_path(name);
    if is_netns(&path) {
        return Ok(path);
    }
    std::fs::create_dir_all(NETNS_DIR)?;
    // The mount point: an empty file, as `ip netns add` makes it.
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    let target = path.clone();
    // unshare() moves only the calling thread into the new namespace: a
    // thread of its own, which ends right after the bind mount pins it.
    let made = std::thread::Builder::new()
        .name("cilia-netns-add".into())
        .spawn(move || -> io::Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(io::Error::from)
        })?
        .join()
        .map_err(|_| io::Error::other("the namespace thread panicked"))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(io::Error::new(
            e.kind(),
            format!("creating network namespace {}: {e}", path.display()),
        ));
    }
    Ok(path)
}

/// Deletes the named network namespace `name` (its bind mount and file);
/// a namespace that does not exist is no error. The namespace itself ends
/// when nothing else holds it (no process, socket or device in it).
pub fn delete_health_netns(name: &str) -> io::Result<()> {
    check_name(name)?;
    let path = netns_path(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point; ENOENT: no file.
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Moves the calling thread (only it) into the network namespace at
/// `path`: sockets it creates from then on live there.
pub fn enter(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("opening network namespace {}: {e}", path.display()),
        )
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| {
        io::Error::other(format!(
            "entering network namespace {}: {e}",
            path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_not_file_names_are_refused() {
        for bad in ["", ".", "..", "a/b", "../etc"] {
            assert!(create_health_netns(bad).is_err(), "{bad:?}");
            assert!(delete_health_netns(bad).is_err(), "{bad:?}");
        }
    }
}
