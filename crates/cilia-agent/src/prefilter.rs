//! The XDP prefilter's control side: which source CIDRs the node drops
//! before its stack sees them, on which devices (`--prefilter-device`).
//!
//! Invariants:
//! * The store is the truth: a change is committed there first, then
//!   written into the kernel; a kernel write that fails undoes the store
//!   change. At start the kernel's CIDRs are made exactly the store's
//!   (a CIDR that keeps its counter slot keeps its counts).
//! * Each CIDR has its own counter slot, never shared while both exist;
//!   a slot freed by a delete is reused (its counts are zeroed first by
//!   the datapath).
//! * A change is all or nothing: every CIDR of a request is validated (and
//!   the capacity checked) before anything is written, and an error names
//!   the CIDR and the reason.
//! * The mode a device runs in (native or generic XDP) is reported as the
//!   kernel took it, with the reason native mode was refused, never
//!   silently.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use cilia_abi::{PrefilterEntry, CILIA_PREFILTER_MAX, PREFILTER_SLOTS};
use cilia_api::limits::excerpt;
use cilia_datapath::{DatapathError, PrefilterLink};
use ipnet::IpNet;

use crate::endpoint::DatapathHandle;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum PrefilterError {
    #[error("prefilter CIDR {cidr}: {reason}")]
    Invalid { cidr: String, reason: String },
    #[error("prefilter CIDR {cidr}: not in the prefilter")]
    NotFound { cidr: String },
    #[error("prefilter CIDR {cidr}: over capacity: the prefilter holds at most {max} IPv{family} CIDRs and has {held}")]
    Full {
        cidr: String,
        family: u8,
        max: u32,
        held: usize,
    },
    #[error("prefilter: no CIDR given")]
    Empty,
    #[error("prefilter device {device}: {source}")]
    Device {
        device: String,
        #[source]
        source: Box<DatapathError>,
    },
    /// Boxed: a datapath error is large, and every result carries it.
    #[error("prefilter: {0}")]
    Datapath(Box<DatapathError>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<DatapathError> for PrefilterError {
    fn from(e: DatapathError) -> Self {
        Self::Datapath(Box::new(e))
    }
}

/// Parses one CIDR of a request: `ADDRESS/LENGTH`, no host bits set.
pub fn parse_cidr(text: &str) -> Result<IpNet, PrefilterError> {
    let invalid = |reason: String| PrefilterError::Invalid {
        cidr: excerpt(text),
        reason,
    };
    if !text.contains('/') {
        return Err(invalid(
            "not a CIDR: give ADDRESS/LENGTH (a single address is /32 or /128)".into(),
        ));
    }
    let net: IpNet = text.trim().parse().map_err(|_| {
        invalid("not a CIDR: give ADDRESS/LENGTH, e.g. 203.0.113.0/24 or 2001:db8::/32".into())
    })?;
    if net.trunc() != net {
        return Err(invalid(format!(
            "host bits set (the network is {})",
            net.trunc()
        )));
    }
    Ok(net)
}

fn family(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(_) => 4,
        IpNet::V6(_) => 6,
    }
}

/// The prefilter on one device, as attached at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub link: PrefilterLink,
}

/// What `GET /v1/prefilter` and `status` show.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub devices: Vec<Device>,
    /// (cidr, packets, bytes), IPv4 first.
    pub cidrs: Vec<(IpNet, u64, u64)>,
}

/// The prefilter subsystem: its CIDRs (in the store) and devices (fixed at
/// start). `&self` throughout; changes are serialized by `changes`.
pub struct Prefilter {
    store: Arc<Store>,
    datapath: DatapathHandle,
    devices: Vec<Device>,
    /// Held across one change: slot allocation reads the store, decides
    /// and writes.
    changes: Mutex<()>,
}

impl std::fmt::Debug for Prefilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefilter")
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

impl Prefilter {
    /// Makes the kernel's CIDRs the store's, detaches the prefilter from
    /// devices no longer asked for and attaches it to `devices` (or swaps
    /// this build's program into their pinned links).
    pub fn start(
        store: Arc<Store>,
        datapath: DatapathHandle,
        devices: &[String],
    ) -> Result<Self, PrefilterError> {
        let stored = store.prefilter_cidrs()?;
        let stale: Vec<IpNet> = datapath
            .prefilter()?
            .iter()
            .map(|c| c.entry.cidr)
            .filter(|cidr| !stored.contains_key(cidr))
            .collect();
        datapath.remove_prefilter(&stale)?;
        let entries: Vec<PrefilterEntry> = stored
            .iter()
            .map(|(cidr, counter)| PrefilterEntry {
                cidr: *cidr,
                counter: *counter,
            })
            .collect();
        datapath.upsert_prefilter(&entries)?;

        let wanted: BTreeSet<&str> = devices.iter().map(String::as_str).collect();
        for link in datapath.prefilter_links()? {
            if !wanted.contains(link.ifname.as_str()) {
                tracing::info!(device = %link.ifname, "prefilter no longer asked for on this device: detaching it");
                datapath.detach_prefilter(&link.ifname).map_err(|source| {
                    PrefilterError::Device {
                        device: link.ifname.clone(),
                        source: Box::new(source),
                    }
                })?;
            }
        }
        let mut attached = Vec::new();
        for name in &wanted {
            let link =
                datapath
                    .attach_prefilter(name)
                    .map_err(|source| PrefilterError::Device {
                        device: name.to_string(),
                        source: Box::new(source),
                    })?;
            match &link.native_error {
                Some(why) => {
                    tracing::warn!(device = name, reason = %why, "prefilter attached in generic XDP mode: the device refused native mode")
                }
                None => {
                    tracing::info!(device = name, mode = link.mode.name(), "prefilter attached")
                }
            }
            attached.push(Device {
                name: name.to_string(),
                link,
            });
        }
        if !stored.is_empty() {
            tracing::info!(cidrs = stored.len(), "prefilter CIDRs restored");
        }
        Ok(Self {
            store,
            datapath,
            devices: attached,
            changes: Mutex::new(()),
        })
    }

    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// Adds `cidrs` (all or nothing); those already in stay as they are.
    pub fn add(&self, cidrs: &[String]) -> Result<View, PrefilterError> {
        let parsed = parse_all(cidrs)?;
        let _change = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let stored = self.store.prefilter_cidrs()?;
        let new: Vec<IpNet> = parsed
            .into_iter()
            .filter(|c| !stored.contains_key(c))
            .collect();
        for fam in [4u8, 6] {
            let held = stored.keys().filter(|c| family(c) == fam).count();
            let adding: Vec<&IpNet> = new.iter().filter(|c| family(c) == fam).collect();
            if held + adding.len() > CILIA_PREFILTER_MAX as usize {
                let first_over =
                    adding[CILIA_PREFILTER_MAX as usize - held.min(CILIA_PREFILTER_MAX as usize)];
                return Err(PrefilterError::Full {
                    cidr: first_over.to_string(),
                    family: fam,
                    max: CILIA_PREFILTER_MAX,
                    held,
                });
            }
        }
        let used: BTreeSet<u32> = stored.values().copied().collect();
        let mut free = (0..PREFILTER_SLOTS).filter(|s| !used.contains(s));
        let mut added = BTreeMap::new();
        for cidr in new {
            // The capacity check leaves a free slot for each: at most
            // CILIA_PREFILTER_MAX per family, 2 * CILIA_PREFILTER_MAX slots.
            let Some(slot) = free.next() else {
                return Err(PrefilterError::Full {
                    cidr: cidr.to_string(),
                    family: family(&cidr),
                    max: CILIA_PREFILTER_MAX,
                    held: stored.len(),
                });
            };
            added.insert(cidr, slot);
        }
        if !added.is_empty() {
            self.store.change_prefilter(&added, &[])?;
            let entries: Vec<PrefilterEntry> = added
                .iter()
                .map(|(cidr, counter)| PrefilterEntry {
                    cidr: *cidr,
                    counter: *counter,
                })
                .collect();
            if let Err(e) = self.datapath.upsert_prefilter(&entries) {
                let keys: Vec<IpNet> = added.keys().copied().collect();
                self.undo(&BTreeMap::new(), &keys);
                return Err(e.into());
            }
        }
        drop(_change);
        self.view()
    }

    /// Removes `cidrs` (all or nothing): each must be in the prefilter.
    pub fn delete(&self, cidrs: &[String]) -> Result<View, PrefilterError> {
        let parsed = parse_all(cidrs)?;
        let _change = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let stored = self.store.prefilter_cidrs()?;
        if let Some(missing) = parsed.iter().find(|c| !stored.contains_key(c)) {
            return Err(PrefilterError::NotFound {
                cidr: missing.to_string(),
            });
        }
        self.store.change_prefilter(&BTreeMap::new(), &parsed)?;
        if let Err(e) = self.datapath.remove_prefilter(&parsed) {
            let back: BTreeMap<IpNet, u32> = parsed.iter().map(|c| (*c, stored[c])).collect();
            self.undo(&back, &[]);
            return Err(e.into());
        }
        drop(_change);
        self.view()
    }

    /// Puts the store (and what the kernel got of the change) back after a
    /// failed kernel write; logs what it cannot undo (the next start
    /// rewrites the kernel from the store anyway).
    fn undo(&self, restore: &BTreeMap<IpNet, u32>, remove: &[IpNet]) {
        if let Err(e) = self.store.change_prefilter(restore, remove) {
            tracing::error!(error = %e, "prefilter: undoing a failed change in the store");
        }
        let entries: Vec<PrefilterEntry> = restore
            .iter()
            .map(|(cidr, counter)| PrefilterEntry {
                cidr: *cidr,
                counter: *counter,
            })
            .collect();
        let kernel = self
            .datapath
            .remove_prefilter(remove)
            .and_then(|()| self.datapath.upsert_prefilter(&entries));
        if let Err(e) = kernel {
            tracing::error!(error = %e, "prefilter: undoing a failed change in the kernel");
        }
    }

    /// The devices and the stored CIDRs with the kernel's counts.
    pub fn view(&self) -> Result<View, PrefilterError> {
        let stored = self.store.prefilter_cidrs()?;
        let counts: BTreeMap<IpNet, (u64, u64)> = self
            .datapath
            .prefilter()?
            .into_iter()
            .map(|c| (c.entry.cidr, (c.packets, c.bytes)))
            .collect();
        let mut cidrs: Vec<(IpNet, u64, u64)> = stored
            .keys()
            .map(|cidr| {
                let (p, b) = counts.get(cidr).copied().unwrap_or_default();
                (*cidr, p, b)
            })
            .collect();
        cidrs.sort_by_key(|(cidr, ..)| (family(cidr), *cidr));
        Ok(View {
            devices: self.devices.clone(),
            cidrs,
        })
    }

    /// The status line: devices with their mode, and the CIDR count.
    pub fn status(&self) -> (bool, String) {
        let count = match self.store.prefilter_cidrs() {
            Ok(c) => c.len().to_string(),
            Err(e) => return (false, format!("reading the stored CIDRs: {e}")),
        };
        if self.devices.is_empty() {
            return (
                true,
                format!("not attached (no --prefilter-device); {count} CIDRs stored"),
            );
        }
        let devices: Vec<String> = self
            .devices
            .iter()
            .map(|d| format!("{} ({})", d.name, d.link.mode.name()))
            .collect();
        (true, format!("{}; {count} CIDRs", devices.join(", ")))
    }
}

/// Parses every CIDR of a request (deduplicated, in order); the first bad
/// one fails the request.
fn parse_all(cidrs: &[String]) -> Result<Vec<IpNet>, PrefilterError> {
    if cidrs.is_empty() {
        return Err(PrefilterError::Empty);
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for text in cidrs {
        let net = parse_cidr(text)?;
        if seen.insert(net) {
            out.push(net);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report

    use super::*;
    use cilia_datapath::fake::FakeDatapath;
    use cilia_datapath::{Datapath, PrefilterMode};

    fn setup(devices: &[&str]) -> (tempfile::TempDir, Arc<FakeDatapath>, Prefilter) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("state.redb")).unwrap());
        let dp = Arc::new(FakeDatapath::new());
        let devices: Vec<String> = devices.iter().map(|d| d.to_string()).collect();
        let p = Prefilter::start(store, dp.clone(), &devices).unwrap();
        (dir, dp, p)
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cidrs_are_refused_with_their_reason() {
        for (text, reason) in [
            (
                "203.0.113.7/24",
                "host bits set (the network is 203.0.113.0/24)",
            ),
            ("203.0.113.0", "not a CIDR: give ADDRESS/LENGTH"),
            ("203.0.113.0/33", "not a CIDR"),
            (
                "2001:db8::1/32",
                "host bits set (the network is 2001:db8::/32)",
            ),
            ("bad/8", "not a CIDR"),
        ] {
            let err = parse_cidr(text).unwrap_err().to_string();
            assert!(err.contains(text) && err.contains(reason), "{text}: {err}");
        }
        assert_eq!(
            parse_cidr("2001:db8::/32").unwrap(),
            "2001:db8::/32".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn cidrs_get_distinct_slots_and_freed_slots_are_reused() {
        let (_dir, dp, p) = setup(&[]);
        p.add(&strings(&[
            "203.0.113.0/24",
            "2001:db8::/32",
            "203.0.113.0/24",
        ]))
        .unwrap();
        let slots: Vec<u32> = dp
            .prefilter()
            .unwrap()
            .iter()
            .map(|c| c.entry.counter)
            .collect();
        assert_eq!(slots.len(), 2);
        assert_ne!(slots[0], slots[1]);
        p.delete(&strings(&["203.0.113.0/24"])).unwrap();
        p.add(&strings(&["198.51.100.0/24"])).unwrap();
        let view = p.view().unwrap();
        let listed: Vec<String> = view.cidrs.iter().map(|c| c.0.to_string()).collect();
        assert_eq!(listed, ["198.51.100.0/24", "2001:db8::/32"]);
        let mut slots: Vec<u32> = dp
            .prefilter()
            .unwrap()
            .iter()
            .map(|c| c.entry.counter)
            .collect();
        slots.sort();
        assert_eq!(slots, [0, 1], "the freed slot 0 was reused");
    }

    #[test]
    fn a_bad_cidr_fails_the_whole_request() {
        let (_dir, dp, p) = setup(&[]);
        let err = p
            .add(&strings(&["203.0.113.0/24", "198.51.100.1/24"]))
            .unwrap_err();
        assert!(err.to_string().contains("198.51.100.1/24"), "{err}");
        assert!(dp.prefilter().unwrap().is_empty());
        let err = p.delete(&strings(&["203.0.113.0/24"])).unwrap_err();
        assert!(matches!(err, PrefilterError::NotFound { .. }), "{err}");
    }

    #[test]
    fn a_failed_kernel_write_leaves_the_store_as_it_was() {
        let (_dir, dp, p) = setup(&[]);
        dp.fail_next("upsert_prefilter", 1);
        assert!(p.add(&strings(&["203.0.113.0/24"])).is_err());
        assert!(p.view().unwrap().cidrs.is_empty());
        p.add(&strings(&["203.0.113.0/24"])).unwrap();
        dp.fail_next("remove_prefilter", 1);
        assert!(p.delete(&strings(&["203.0.113.0/24"])).is_err());
        assert_eq!(p.view().unwrap().cidrs.len(), 1);
    }

    #[test]
    fn start_restores_the_store_into_the_kernel_and_detaches_unwanted_devices() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("state.redb")).unwrap());
        let dp = Arc::new(FakeDatapath::new());
        dp.state().prefilter_no_native.insert("eth1".into());
        let p = Prefilter::start(store.clone(), dp.clone(), &strings(&["eth0", "eth1"])).unwrap();
        p.add(&strings(&["203.0.113.0/24"])).unwrap();
        let modes: Vec<PrefilterMode> = p.devices().iter().map(|d| d.link.mode).collect();
        assert_eq!(modes, [PrefilterMode::Native, PrefilterMode::Generic]);
        assert!(p.status().1.contains("eth1 (generic)"), "{}", p.status().1);
        drop(p);
        // The kernel lost its CIDRs and holds a stale one; eth1 is no longer asked for.
        dp.state().prefilter.clear();
        dp.upsert_prefilter(&[PrefilterEntry {
            cidr: "198.51.100.0/24".parse().unwrap(),
            counter: 9,
        }])
        .unwrap();
        let p = Prefilter::start(store, dp.clone(), &strings(&["eth0"])).unwrap();
        let kernel: Vec<String> = dp
            .prefilter()
            .unwrap()
            .iter()
            .map(|c| c.entry.cidr.to_string())
            .collect();
        assert_eq!(kernel, ["203.0.113.0/24"]);
        assert_eq!(
            dp.state().prefilter_links.keys().collect::<Vec<_>>(),
            ["eth0"]
        );
        assert!(p.status().1.starts_with("eth0 (native); 1 CIDRs"));
    }

    #[test]
    fn a_full_family_refuses_the_next_cidr_naming_it() {
        let (_dir, dp, p) = setup(&[]);
        let all: Vec<String> = (0..CILIA_PREFILTER_MAX)
            .map(|i| format!("{}/32", std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        p.add(&all).unwrap();
        let err = p
            .add(&strings(&["2001:db8::/32", "203.0.113.0/24"]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "prefilter CIDR 203.0.113.0/24: over capacity: the prefilter holds at most 65536 IPv4 CIDRs and has 65536"
        );
        // All or nothing: the IPv6 CIDR of the refused request is not in.
        assert_eq!(dp.prefilter().unwrap().len(), CILIA_PREFILTER_MAX as usize);
    }

    #[test]
    fn without_devices_the_status_says_not_attached() {
        let (_dir, _dp, p) = setup(&[]);
        p.add(&strings(&["203.0.113.0/24"])).unwrap();
        assert_eq!(
            p.status().1,
            "not attached (no --prefilter-device); 1 CIDRs stored"
        );
    }
}
