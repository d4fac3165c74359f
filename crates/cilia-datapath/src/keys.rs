//! aya's LPM-trie wrapper keeps the prefix length apart from the key data;
//! these are the data parts of the ABI's LPM keys, with conversions, so the
//! rest of the crate only handles `cilia_abi` types.

use aya::maps::lpm_trie::Key;
use cilia_abi::{IpcacheKey, PolicyKey};

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct IpcacheData {
    family: u8,
    pad: [u8; 3],
    addr: [u8; 16],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PolicyData {
    identity: u32,
    direction: u8,
    proto: u8,
    dport: u16,
}

// SAFETY: repr(C), integers and byte arrays only, no implicit padding.
unsafe impl aya::Pod for IpcacheData {}
// SAFETY: as above.
unsafe impl aya::Pod for PolicyData {}

pub(crate) fn ipcache_to_lpm(k: &IpcacheKey) -> Key<IpcacheData> {
    Key::new(
        k.prefixlen,
        IpcacheData {
            family: k.family,
            pad: [0; 3],
            addr: k.addr,
        },
    )
}

pub(crate) fn ipcache_from_lpm(k: &Key<IpcacheData>) -> IpcacheKey {
    let d = k.data();
    IpcacheKey {
        prefixlen: k.prefix_len(),
        family: d.family,
        pad: [0; 3],
        addr: d.addr,
    }
}

pub(crate) fn policy_to_lpm(k: &PolicyKey) -> Key<PolicyData> {
    Key::new(
        k.prefixlen,
        PolicyData {
            identity: k.identity,
            direction: k.direction,
            proto: k.proto,
            dport: k.dport,
        },
    )
}

pub(crate) fn policy_from_lpm(k: &Key<PolicyData>) -> PolicyKey {
    let d = k.data();
    PolicyKey {
        prefixlen: k.prefix_len(),
        identity: d.identity,
        direction: d.direction,
        proto: d.proto,
        dport: d.dport,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpm_keys_have_the_abi_layout() {
        assert_eq!(size_of::<Key<IpcacheData>>(), size_of::<IpcacheKey>());
        assert_eq!(size_of::<Key<PolicyData>>(), size_of::<PolicyKey>());
    }

    #[test]
    fn keys_round_trip() {
        let p = PolicyKey {
            prefixlen: 56,
            identity: 7u32.to_be(),
            direction: 2,
            proto: 6,
            dport: 80u16.to_be(),
        };
        assert_eq!(policy_from_lpm(&policy_to_lpm(&p)), p);
        let i = IpcacheKey::new("10.0.0.0".parse().unwrap(), 8);
        assert_eq!(ipcache_from_lpm(&ipcache_to_lpm(&i)), i);
    }
}
