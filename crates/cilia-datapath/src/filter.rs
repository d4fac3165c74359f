//! Address filters (`CILIA_ADDR_FILTER_WORDS` in abi.h): a bit per hash of
//! an address, in front of a hash map keyed by addresses, so that a packet
//! to an address the map does not hold skips the map's cold bucket.
//!
//! The one rule that keeps them correct: a key's bit is set before the key
//! is written, and cleared only after the last key on it is removed. The
//! filter counts the keys on each bit; the caller serializes the check of
//! whether a key is new, its write and the matching call here (under the
//! lock of the map behind the filter). A write that fails after
//! [`AddrFilter::before_add`] leaves the bit set with no key counted on it:
//! a lookup more, until the next rebuild, never a key hidden.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use aya::maps::{Array, Map, MapData};
use cilia_abi::{addr_filter_bit, CILIA_ADDR_FILTER_WORDS};

use crate::endpoint::lock;
use crate::error::DatapathError;

pub(crate) struct AddrFilter {
    name: &'static str,
    words: Mutex<Array<MapData, u64>>,
    /// Keys on each bit that has any.
    uses: Mutex<HashMap<u32, u32>>,
}

impl AddrFilter {
    pub(crate) fn new(name: &'static str, map: Map) -> Result<Self, DatapathError> {
        Ok(Self {
            name,
            words: Mutex::new(Array::try_from(map).map_err(|e| DatapathError::map(name, e))?),
            uses: Mutex::new(HashMap::new()),
        })
    }

    /// Counts `addrs` (one per key of the map behind the filter) and writes
    /// every word from the counts.
    pub(crate) fn rebuild(
        &self,
        addrs: impl IntoIterator<Item = IpAddr>,
    ) -> Result<(), DatapathError> {
        let mut uses = lock(&self.uses);
        uses.clear();
        for ip in addrs {
            *uses.entry(addr_filter_bit(ip)).or_default() += 1;
        }
        let mut words = vec![0u64; CILIA_ADDR_FILTER_WORDS as usize];
        for bit in uses.keys() {
            words[(bit >> 6) as usize] |= 1 << (bit & 63);
        }
        let mut map = lock(&self.words);
        for (i, word) in words.into_iter().enumerate() {
            map.set(i as u32, word, 0)
                .map_err(|e| DatapathError::map(self.name, e))?;
        }
        Ok(())
    }

    /// Before a new key with address `ip` is written: sets its bit.
    pub(crate) fn before_add(&self, ip: IpAddr) -> Result<(), DatapathError> {
        self.set_bit(addr_filter_bit(ip), true)
    }

    /// After a new key with address `ip` was written: counts it.
    pub(crate) fn added(&self, ip: IpAddr) {
        *lock(&self.uses).entry(addr_filter_bit(ip)).or_default() += 1;
    }

    /// After a key with address `ip` was removed: the last key on its bit
    /// clears it.
    pub(crate) fn removed(&self, ip: IpAddr) -> Result<(), DatapathError> {
        let bit = addr_filter_bit(ip);
        let mut uses = lock(&self.uses);
        let Some(n) = uses.get_mut(&bit) else {
            return Ok(());
        };
        *n -= 1;
        if *n == 0 {
            uses.remove(&bit);
            self.set_bit(bit, false)?;
        }
        Ok(())
    }

    fn set_bit(&self, bit: u32, on: bool) -> Result<(), DatapathError> {
        let err = |e| DatapathError::map(self.name, e);
        let mut map = lock(&self.words);
        let word = map.get(&(bit >> 6), 0).map_err(err)?;
        let mask = 1u64 << (bit & 63);
        let new = if on { word | mask } else { word & !mask };
        if new != word {
            map.set(bit >> 6, new, 0).map_err(err)?;
        }
        Ok(())
    }

    /// The set bits, in order, as the kernel holds them.
    pub(crate) fn bits(&self) -> Result<Vec<u32>, DatapathError> {
        let map = lock(&self.words);
        let mut bits = Vec::new();
        for i in 0..CILIA_ADDR_FILTER_WORDS {
            let word = map
                .get(&i, 0)
                .map_err(|e| DatapathError::map(self.name, e))?;
            bits.extend((0..64).filter(|b| word >> b & 1 == 1).map(|b| i * 64 + b));
        }
        Ok(bits)
    }
}
