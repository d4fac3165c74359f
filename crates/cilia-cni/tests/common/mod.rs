//! Shared by the cilia-cni integration tests: a podman of the test's own
//! (private storage, run dir, containers.conf and CNI config dir), a local
//! busybox image, and a test agent it talks to. Everything is removed on
//! drop, even when the test panics.

#![allow(dead_code)] // each test binary uses a part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cilia_testnet::{bin, AgentOptions, TestAgent};

pub const IMAGE: &str = "localhost/cilia-busybox:test";
/// The network name in the private CNI config dir.
pub const NETWORK: &str = "cilia";

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A private podman: `--root`/`--runroot` and `CONTAINERS_CONF` under a temp
/// dir, so the machine's podman config and containers are never used.
pub struct Podman {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub net_dir: PathBuf,
    pub wrapper: PathBuf,
}

impl Podman {
    pub fn new() -> Self {
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("cilia-podman-{}x{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let plugin_dir = dir.join("cni-bin");
        let net_dir = dir.join("net.d");
        for d in [&plugin_dir, &net_dir, &dir.join("tmp")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::os::unix::fs::symlink(bin("cilia-cni"), plugin_dir.join("cilia-cni")).unwrap();
        let conf = dir.join("containers.conf");
        std::fs::write(
            &conf,
            format!(
                r#"[engine]
runtime = "runc"
tmp_dir = "{tmp}"
cgroup_manager = "cgroupfs"
events_logger = "file"

[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[network]
network_backend = "cni"
network_config_dir = "{net}"
cni_plugin_dirs = ["{plugins}"]
"#,
                tmp = dir.join("tmp").display(),
                net = net_dir.display(),
                plugins = plugin_dir.display(),
            ),
        )
        .unwrap();
        // What the agent runs to learn a container's labels.
        let wrapper = dir.join("podman-wrapper");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nCONTAINERS_CONF={} exec podman --root {} --runroot {} \"$@\"\n",
                conf.display(),
                dir.join("root").display(),
                dir.join("runroot").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            &wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let podman = Self {
            dir,
            conf,
            net_dir,
            wrapper,
        };
        podman.import_image();
        podman
    }

    /// The network config pointing at `socket`.
    pub fn write_network(&self, socket: &Path) {
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [{ "type": "cilia-cni", "socket": socket }],
        });
        std::fs::write(
            self.net_dir.join("10-cilia.conflist"),
            serde_json::to_vec_pretty(&conflist).unwrap(),
        )
        .unwrap();
    }

    /// A minimal rootfs (static busybox and a web page) imported as `IMAGE`.
    fn import_image(&self) {
        let rootfs = self.dir.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::create_dir_all(rootfs.join("www")).unwrap();
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .expect("/bin/busybox (Debian busybox-static) is installed");
        for applet in [
            "sh", "sleep", "ping", "ping6", "nc", "wget", "httpd", "cat", "ip", "true", "timeout",
        ] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
        }
        std::fs::write(rootfs.join("www/index.html"), "cilia-ok\n").unwrap();
        let tar = self.dir.join("rootfs.tar");
        let out = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .output()
            .unwrap();
        assert!(out.status.success(), "tar: {out:?}");
        let out = self.run(&[
            "import",
            "--change",
            "CMD [\"/bin/sleep\", \"600\"]",
            tar.to_str().unwrap(),
            IMAGE,
        ]);
        assert!(out.status.success(), "podman import: {}", text(&out.stderr));
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", &self.conf)
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"));
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// `podman run -d` on the cilia network with the flags this machine
    /// needs; returns the output (the container id on success).
    pub fn start(&self, name: &str, extra: &[&str], cmd: &[&str]) -> Output {
        self.start_image(name, IMAGE, extra, cmd)
    }

    /// Like `start`, from another image.
    pub fn start_image(&self, name: &str, image: &str, extra: &[&str], cmd: &[&str]) -> Output {
        self.start_env(name, &[], image, extra, cmd)
    }

    /// Like `start_image`, with podman's own environment extended by `env`
    /// (podman hands its `CNI_ARGS` on to the plugins).
    pub fn start_env(
        &self,
        name: &str,
        env: &[(&str, &str)],
        image: &str,
        extra: &[&str],
        cmd: &[&str],
    ) -> Output {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--runtime",
            "runc",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            "--network",
            NETWORK,
            "--cap-add",
            "NET_RAW",
        ];
        args.extend_from_slice(extra);
        args.push(image);
        args.extend_from_slice(cmd);
        let mut command = self.command();
        command.envs(env.iter().copied());
        command.args(&args).output().unwrap()
    }

    /// Like `start`, asserting success; returns the container id.
    pub fn start_ok(&self, name: &str, extra: &[&str], cmd: &[&str]) -> String {
        let out = self.start(name, extra, cmd);
        assert!(
            out.status.success(),
            "podman run {name}: {}",
            text(&out.stderr)
        );
        text(&out.stdout).trim().to_string()
    }

    pub fn exec(&self, name: &str, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", name];
        args.extend_from_slice(cmd);
        self.run(&args)
    }

    /// Ids of running containers.
    pub fn running(&self) -> Vec<String> {
        self.ok(&["ps", "-q", "--no-trunc"])
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "-af", "-t", "0"]);
        let _ = self.run(&["rmi", "-af"]);
        // Whatever podman left mounted under its root (overlay, shm).
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            let dir = self.dir.to_string_lossy().to_string();
            let mut points: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|p| p.starts_with(&dir))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = Command::new("umount").arg("-l").arg(p).output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A podman and the agent it uses. Fields drop in order: containers are
/// removed (CNI DEL) while the agent still runs.
pub struct World {
    pub podman: Podman,
    pub agent: TestAgent,
}

impl World {
    pub fn new(options: AgentOptions) -> Self {
        let podman = Podman::new();
        let agent = TestAgent::start_with_env(
            options,
            &[("CILIA_PODMAN", podman.wrapper.to_str().unwrap())],
        );
        podman.write_network(&agent.socket);
        Self { podman, agent }
    }

    /// Waits until `f` holds of the container's endpoint.
    pub fn wait_endpoint(
        &self,
        id: &str,
        within: Duration,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let ep = self.agent.endpoint_of_container(id);
            if f(&ep) {
                return ep;
            }
            assert!(
                Instant::now() < deadline,
                "endpoint of {id} did not reach the expected state: {ep}\nagent log:\n{}",
                self.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
