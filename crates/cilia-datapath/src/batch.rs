//! Whole-map reads and deletes in a few `bpf(2)` calls instead of one or
//! two per entry. aya 0.14 walks a map with a next-key and a lookup call
//! per entry and has no batch commands; the conntrack GC, which reads the
//! whole table and all 65,536 budget slots every run, spent 65 ms on a node
//! with nothing to collect and 0.8 s on a full table that way. The kernel's
//! `BPF_MAP_LOOKUP_BATCH` and `BPF_MAP_DELETE_BATCH` (5.6+) move a chunk of
//! entries per call.
//!
//! A batch walk of a hash map is consistent per bucket only, like aya's
//! walk: entries created or deleted during it may or may not be seen.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::inspect::{bpf, put_u32, Attr};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Entries per call at most: large enough that a walk of a full conntrack
/// table takes a few dozen calls, small enough that its buffers stay in
/// the cache. A hash map's call must fit its largest bucket (it fails with
/// `ENOSPC` otherwise): buckets hold a handful of entries.
const CHUNK: usize = 4096;
/// Entries of a walk's first call; each full call doubles the next, up to
/// [`CHUNK`]: a walk of a small map (the endpoints map, read twice a
/// second by the conntrack pressure check) allocates little.
const FIRST_CHUNK: usize = 256;

fn put_ptr<T>(attr: &mut Attr, off: usize, p: *const T) {
    attr[off..off + 8].copy_from_slice(&(p as u64).to_ne_bytes());
}

fn count_of(attr: &Attr) -> usize {
    u32::from_ne_bytes([attr[32], attr[33], attr[34], attr[35]]) as usize
}

/// Every entry of the map behind `fd` (a hash map or an array; `K` and `V`
/// must be its key and value types).
pub(crate) fn lookup_all<K: Copy + Default, V: Copy + Default>(
    fd: BorrowedFd<'_>,
) -> std::io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut chunk = FIRST_CHUNK;
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    // The position tokens: a bucket index for a hash map, a key for an
    // array; both fit in 8 bytes.
    let mut position = [0u64; 2];
    let mut first = true;
    loop {
        let mut attr: Attr = [0; 128];
        // batch.in_batch (NULL: from the start), out_batch, keys, values,
        // count, map_fd
        if !first {
            put_ptr(&mut attr, 0, &position[0]);
        }
        put_ptr(&mut attr, 8, std::ptr::addr_of_mut!(position[1]));
        put_ptr(&mut attr, 16, keys.as_mut_ptr());
        put_ptr(&mut attr, 24, values.as_mut_ptr());
        put_u32(&mut attr, 32, chunk as u32);
        put_u32(&mut attr, 36, fd.as_raw_fd() as u32);
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let done = match result {
            Ok(_) => false,
            // The end of the map; the last chunk's entries are still valid.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let n = count_of(&attr).min(chunk);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        if done {
            return Ok(out);
        }
        position[0] = position[1];
        first = false;
        if n == chunk && chunk < CHUNK {
            chunk = (chunk * 2).min(CHUNK);
            keys.resize(chunk, K::default());
            values.resize(chunk, V::default());
        }
    }
}

/// Deletes `keys` from the map behind `fd`; keys already absent are
/// skipped. Returns how many entries were deleted.
pub(crate) fn delete_keys<K>(fd: BorrowedFd<'_>, keys: &[K]) -> std::io::Result<usize> {
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let n = rest.len().min(CHUNK);
        let mut attr: Attr = [0; 128];
        // batch.keys, count, map_fd
        put_ptr(&mut attr, 16, rest.as_ptr());
        put_u32(&mut attr, 32, n as u32);
        put_u32(&mut attr, 36, fd.as_raw_fd() as u32);
        match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(_) => {
                deleted += n;
                rest = &rest[n..];
            }
            // The kernel stops at the first key it cannot delete and
            // reports how many it did before it: skip that key.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let done = count_of(&attr).min(n);
                deleted += done;
                rest = &rest[done + 1..];
            }
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
