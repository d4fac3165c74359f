//! The XDP prefilter's CIDRs in the store: `cilia/prefilter/<cidr>` → the
//! CIDR's counter slot in the datapath. The store is the truth the agent
//! writes into the kernel at every start.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::{decode, Store, StoreError};

const PREFILTER: &str = "cilia/prefilter/";

impl Store {
    /// Every prefilter CIDR with its counter slot.
    pub fn prefilter_cidrs(&self) -> Result<BTreeMap<IpNet, u32>, StoreError> {
        let mut out = BTreeMap::new();
        for (key, value) in self.list(PREFILTER)? {
            let cidr = key[PREFILTER.len()..]
                .parse()
                .map_err(|e| StoreError::Db(format!("{key}: {e}")))?;
            out.insert(cidr, decode::<u32>(&key, &value)?);
        }
        Ok(out)
    }

    /// Adds `added` and removes `removed`, in one change.
    pub fn change_prefilter(
        &self,
        added: &BTreeMap<IpNet, u32>,
        removed: &[IpNet],
    ) -> Result<(), StoreError> {
        self.change(|c| {
            for cidr in removed {
                c.delete(format!("{PREFILTER}{cidr}"));
            }
            for (cidr, slot) in added {
                c.put(format!("{PREFILTER}{cidr}"), slot)?;
            }
            Ok(())
        })
    }
}
