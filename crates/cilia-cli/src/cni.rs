//! `cilia cni install`: puts the `cilia-cni` plugin and its network config
//! into the host's CNI directories. The DaemonSet's init container runs it
//! (`install/kubernetes/cilia.yaml`): the image is `FROM scratch`, without a
//! shell or `cp`, so the copy is done by a binary the image already has.
//!
//! Each file is written beside its target and renamed over it: a runtime
//! executing the old plugin, or reading the old conflist, at that moment
//! sees either the old file or the new one, never a partial one (and a
//! running plugin binary is replaced, not overwritten, so no `ETXTBSY`).
//! The conflist is `examples/cni/cilia.conflist`, the one
//! `scripts/install-cni.sh` installs, under the same name.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;

/// The network config installed: the same file as `scripts/install-cni.sh`.
pub const CONFLIST: &str = include_str!("../../../examples/cni/cilia.conflist");
/// Its file name (runtimes take the first conflist in lexical order).
pub const CONFLIST_NAME: &str = "10-cilia.conflist";
/// The plugin's executable name (the `type` in the conflist).
pub const PLUGIN: &str = "cilia-cni";

#[derive(Debug, Subcommand)]
pub enum CniCmd {
    /// Install `cilia-cni` and its conflist into the host's CNI directories
    /// (atomic replace of each file; run again to update).
    ///
    /// Example: cilia cni install --bin-dir /host/opt/cni/bin --conf-dir /host/etc/cni/net.d
    Install {
        /// Directory of CNI plugin executables.
        #[arg(long, default_value = "/opt/cni/bin")]
        bin_dir: PathBuf,
        /// Directory of CNI network configs.
        #[arg(long, default_value = "/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The plugin to install; default: `cilia-cni` beside this `cilia`.
        #[arg(long)]
        plugin: Option<PathBuf>,
    },
}

pub fn run(cmd: CniCmd) -> anyhow::Result<()> {
    match cmd {
        CniCmd::Install {
            bin_dir,
            conf_dir,
            plugin,
        } => {
            let plugin = match plugin {
                Some(p) => p,
                None => beside_this_binary()?,
            };
            let installed = install(&plugin, &bin_dir, &conf_dir)?;
            for path in installed {
                outln!("installed {}", path.display());
            }
            Ok(())
        }
    }
}

/// `cilia-cni` in the directory of the running `cilia`.
fn beside_this_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("finding the cilia executable")?;
    let dir = me
        .parent()
        .with_context(|| format!("{} has no directory", me.display()))?;
    Ok(dir.join(PLUGIN))
}

/// Installs `plugin` as `<bin_dir>/cilia-cni` (mode 0755) and the conflist
/// as `<conf_dir>/10-cilia.conflist` (mode 0644); returns the two paths.
/// Both directories must exist (they are the host's, mounted in).
pub fn install(plugin: &Path, bin_dir: &Path, conf_dir: &Path) -> anyhow::Result<[PathBuf; 2]> {
    let binary = std::fs::read(plugin)
        .with_context(|| format!("reading the plugin {}", plugin.display()))?;
    let bin = bin_dir.join(PLUGIN);
    let conf = conf_dir.join(CONFLIST_NAME);
    replace(&bin, &binary, 0o755)?;
    replace(&conf, CONFLIST.as_bytes(), 0o644)?;
    Ok([bin, conf])
}

/// Writes `<target>.cilia-tmp`, syncs it and renames it over `target`.
fn replace(target: &Path, content: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = target
        .parent()
        .with_context(|| format!("{} has no directory", target.display()))?;
    anyhow::ensure!(
        dir.is_dir(),
        "{} is not a directory (is the host directory mounted?)",
        dir.display()
    );
    let mut tmp_name = target.as_os_str().to_owned();
    tmp_name.push(".cilia-tmp");
    let tmp = PathBuf::from(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(content)?;
        // The mode of an existing temporary file is not changed by open.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, target)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("writing {}: {e}", target.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "cilia-cni-install-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(p.join("bin")).unwrap();
            std::fs::create_dir_all(p.join("net.d")).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn install_writes_the_plugin_executable_and_the_example_conflist() {
        let t = TempDir::new("fresh");
        let plugin = t.0.join("plugin-src");
        std::fs::write(&plugin, b"\x7fELF new").unwrap();
        let [bin, conf] = install(&plugin, &t.0.join("bin"), &t.0.join("net.d")).unwrap();
        assert_eq!(bin, t.0.join("bin/cilia-cni"));
        assert_eq!(std::fs::read(&bin).unwrap(), b"\x7fELF new");
        let mode = std::fs::metadata(&bin).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755);
        assert_eq!(conf, t.0.join("net.d/10-cilia.conflist"));
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
        assert_eq!(v["plugins"][0]["type"], PLUGIN);
        // Nothing but the two files is left behind.
        assert_eq!(std::fs::read_dir(t.0.join("bin")).unwrap().count(), 1);
        assert_eq!(std::fs::read_dir(t.0.join("net.d")).unwrap().count(), 1);
    }

    #[test]
    fn install_replaces_an_older_plugin_and_keeps_other_configs() {
        let t = TempDir::new("upgrade");
        std::fs::write(t.0.join("bin/cilia-cni"), b"old").unwrap();
        std::fs::write(t.0.join("net.d/99-other.conflist"), b"{}").unwrap();
        let plugin = t.0.join("plugin-src");
        std::fs::write(&plugin, b"new").unwrap();
        install(&plugin, &t.0.join("bin"), &t.0.join("net.d")).unwrap();
        assert_eq!(std::fs::read(t.0.join("bin/cilia-cni")).unwrap(), b"new");
        assert_eq!(
            std::fs::read(t.0.join("net.d/99-other.conflist")).unwrap(),
            b"{}"
        );
    }

    #[test]
    fn a_missing_host_directory_is_named() {
        let t = TempDir::new("missing");
        let plugin = t.0.join("plugin-src");
        std::fs::write(&plugin, b"x").unwrap();
        let e = install(&plugin, &t.0.join("nope"), &t.0.join("net.d")).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("nope") && msg.contains("mounted"), "{msg}");
        let e = install(&t.0.join("absent"), &t.0.join("bin"), &t.0.join("net.d")).unwrap_err();
        assert!(format!("{e:#}").contains("reading the plugin"), "{e:#}");
    }
}
