//! Network namespaces and bpffs roots with RAII cleanup.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A unique short name: `<prefix><pid>x<n>` (fits in IFNAMSIZ for short prefixes).
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}x{n}", std::process::id())
}

#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {stderr}")]
pub struct CommandError {
    pub command: String,
    pub stderr: String,
}

/// Runs a command, returning stdout, or an error carrying stderr.
pub fn run(cmd: &mut Command) -> Result<String, CommandError> {
    let text = format!("{cmd:?}");
    let out: Output = cmd.output().map_err(|e| CommandError {
        command: text.clone(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(CommandError {
            command: text,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace (`ip netns add`), deleted on drop together with
/// every process still running inside it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self, CommandError> {
        let name = unique_name(prefix);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String, CommandError> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that will run inside this namespace (network only; the
    /// mount namespace, and so bpffs pins, stay the caller's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it
    /// creates live in the namespace for good.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = std::fs::File::open(self.path()).expect("open netns file");
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns into test netns");
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }

    /// Runs a shell snippet inside the namespace and returns stdout.
    pub fn sh(&self, script: &str) -> Result<String, CommandError> {
        run(self.command("sh").args(["-c", script]))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(pids) = run(Command::new("ip").args(["netns", "pids", &self.name])) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        let _ = run(Command::new("ip").args(["netns", "del", &self.name]));
    }
}

/// Mounts bpffs on /sys/fs/bpf when the machine has not, once per process,
/// so agents started in parallel never race to mount (and stack) it.
pub fn ensure_sys_fs_bpf() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let is_bpffs = nix::sys::statfs::statfs("/sys/fs/bpf")
            .map(|fs| fs.filesystem_type().0 == 0xcafe4a11)
            .unwrap_or(false);
        if !is_bpffs {
            run(Command::new("mount").args(["-t", "bpf", "bpffs", "/sys/fs/bpf"]))
                .expect("mounting bpffs on /sys/fs/bpf");
        }
    });
}

/// A private directory under `/sys/fs/bpf` for one test's pins, removed
/// (with every pin inside) on drop.
#[derive(Debug)]
pub struct BpfRoot {
    path: PathBuf,
}

impl BpfRoot {
    pub fn new() -> Self {
        ensure_sys_fs_bpf();
        Self {
            path: Path::new("/sys/fs/bpf").join(unique_name("cilia-test-")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for BpfRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpfRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
