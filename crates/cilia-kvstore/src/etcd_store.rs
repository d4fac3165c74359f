//! [`EtcdStore`]: the [`KvStore`] over an etcd v3 cluster.
//!
//! What maps to what: the store's revisions are etcd's (a fresh etcd is at
//! revision 1); [`KvStore::txn`] is one etcd `Txn` (a [`Compare::ModRevision`]
//! is `mod_revision == r`, which etcd evaluates as 0 for an absent key;
//! [`Compare::Exists`] is `create_revision > 0`; [`Op::Put`] a put with its
//! lease, [`Op::Delete`] a delete); [`KvStore::watch`] is an etcd watch of
//! the prefix with `start_revision`; leases are etcd leases (etcd rounds a
//! time to live up to whole seconds and to its own minimum).
//!
//! The runtime: the trait is synchronous, the etcd client async. The store
//! owns a tokio runtime with one worker thread and runs every call on it
//! with `block_on`. One worker, not a current-thread runtime, because a
//! watch's stream must be read while no caller is inside the store (a
//! current-thread runtime only runs its tasks inside `block_on`). Callers
//! block: call the store from blocking code (the agent calls its store from
//! tokio's blocking pool, `spawn_blocking`), never from an async task —
//! tokio refuses `block_on` there with a panic rather than stall a worker.

use std::sync::mpsc;
use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    Txn, TxnOp, WatchOptions,
};

use crate::{
    check_ops, check_ttl, excerpt, Compare, EventKind, KeyValue, KvError, KvStore, LeaseId,
    Listing, Op, Revision, TxnResult, Watch, WatchEvent,
};

/// The longest one call to etcd may take before it fails as unreachable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`KvStore`] over etcd v3 (see the module documentation for what maps
/// to what, and why calls must come from blocking code).
pub struct EtcdStore {
    /// `Some` until drop (dropped in the background there, so dropping the
    /// store inside an async context does not panic).
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    /// The endpoints, comma separated, for error messages.
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`host:port` or `http://host:port`)
    /// and checks that one of them answers within [`REQUEST_TIMEOUT`].
    pub fn connect(endpoints: &[String]) -> Result<Self, KvError> {
        let joined = endpoints.join(",");
        if endpoints.is_empty() {
            return Err(KvError::Unreachable {
                endpoints: joined,
                reason: "no endpoint given".to_string(),
            });
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cilia-kvstore-etcd")
            .enable_all()
            .build()
            .map_err(|e| KvError::Backend(format!("etcd runtime: cannot start: {e}")))?;
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        let unreachable = |reason: String| KvError::Unreachable {
            endpoints: joined.clone(),
            reason,
        };
        let client = rt.block_on(async {
            let connect = Client::connect(endpoints, Some(options));
            let mut client = tokio::time::timeout(REQUEST_TIMEOUT, connect)
                .await
                .map_err(|_| unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))?
                .map_err(|e| unreachable(e.to_string()))?;
            tokio::time::timeout(REQUEST_TIMEOUT, client.status())
                .await
                .map_err(|_| unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))?
                .map_err(|e| unreachable(e.to_string()))?;
            Ok::<_, KvError>(client)
        })?;
        Ok(Self {
            rt: Some(rt),
            client,
            endpoints: joined,
        })
    }

    /// Discards etcd's history before `revision`: a watch from an earlier
    /// revision is then [`KvError::Compacted`].
    pub fn compact(&self, revision: Revision) -> Result<(), KvError> {
        let mut c = self.client.clone();
        self.call(async move { c.compact(revision, None).await })?;
        Ok(())
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        // Only `drop` takes it out.
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the store")
    }

    /// Runs one etcd call on the store's runtime, bounded in time.
    fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, KvError> {
        match self
            .runtime()
            .block_on(async { tokio::time::timeout(REQUEST_TIMEOUT, fut).await })
        {
            Ok(r) => r.map_err(|e| self.error(e)),
            Err(_) => Err(KvError::Unreachable {
                endpoints: self.endpoints.clone(),
                reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
            }),
        }
    }

    fn error(&self, e: etcd_client::Error) -> KvError {
        use etcd_client::Error as E;
        let unreachable = match &e {
            E::TransportError(_) | E::IoError(_) => true,
            E::GRpcStatus(s) => matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            ),
            _ => false,
        };
        if unreachable {
            KvError::Unreachable {
                endpoints: self.endpoints.clone(),
                reason: e.to_string(),
            }
        } else {
            KvError::Backend(format!("etcd {}: {e}", self.endpoints))
        }
    }
}

/// etcd's answer when a lease does not exist (anymore).
fn is_lease_not_found(e: &KvError) -> bool {
    matches!(e, KvError::Backend(m) if m.contains("lease not found"))
}

fn convert(kv: &etcd_client::KeyValue) -> Result<KeyValue, KvError> {
    let key = std::str::from_utf8(kv.key()).map_err(|_| KvError::Corrupt {
        key: excerpt(&String::from_utf8_lossy(kv.key())),
        reason: "the key is not UTF-8".to_string(),
    })?;
    Ok(KeyValue {
        key: key.to_string(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    })
}

fn header_revision(h: Option<&etcd_client::ResponseHeader>) -> Revision {
    h.map(|h| h.revision()).unwrap_or(0)
}

impl KvStore for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        if key.is_empty() {
            return Ok(None);
        }
        let mut c = self.client.clone();
        let key = key.to_string();
        let resp = self.call(async move { c.get(key, None).await })?;
        resp.kvs().first().map(convert).transpose()
    }

    fn list_prefix(&self, prefix: &str) -> Result<Listing, KvError> {
        let mut c = self.client.clone();
        let prefix = prefix.to_string();
        // etcd returns a range in key order unless asked otherwise.
        let resp =
            self.call(async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await })?;
        Ok(Listing {
            revision: header_revision(resp.header()),
            kvs: resp.kvs().iter().map(convert).collect::<Result<_, _>>()?,
        })
    }

    fn txn(&self, compares: &[Compare], ops: &[Op]) -> Result<TxnResult, KvError> {
        // The same refusals as the embedded store, by key name, before etcd
        // sees them.
        check_ops(ops)?;
        let when: Vec<EtcdCompare> = compares
            .iter()
            .map(|c| match c {
                Compare::ModRevision { key, revision } => {
                    EtcdCompare::mod_revision(key.as_str(), CompareOp::Equal, *revision)
                }
                Compare::Exists { key } => {
                    EtcdCompare::create_revision(key.as_str(), CompareOp::Greater, 0)
                }
            })
            .collect();
        let then: Vec<TxnOp> = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => {
                    let options = (*lease != 0).then(|| PutOptions::new().with_lease(*lease));
                    TxnOp::put(key.as_str(), value.clone(), options)
                }
                Op::Delete { key } => TxnOp::delete(key.as_str(), None),
            })
            .collect();
        let mut c = self.client.clone();
        let txn = Txn::new().when(when).and_then(then);
        let resp = self.call(async move { c.txn(txn).await }).map_err(|e| {
            if !is_lease_not_found(&e) {
                return e;
            }
            // Name the first put that carries a lease: etcd does not say which.
            match ops.iter().find_map(|op| match op {
                Op::Put { key, lease, .. } if *lease != 0 => Some((key, *lease)),
                _ => None,
            }) {
                Some((key, lease)) => KvError::LeaseNotFound {
                    key: excerpt(key),
                    lease,
                },
                None => e,
            }
        })?;
        Ok(TxnResult {
            succeeded: resp.succeeded(),
            revision: header_revision(resp.header()),
        })
    }

    fn watch(&self, prefix: &str, from_revision: Revision) -> Result<Watch, KvError> {
        let mut options = WatchOptions::new().with_prefix();
        if from_revision > 0 {
            options = options.with_start_revision(from_revision);
        }
        let mut c = self.client.clone();
        let key = prefix.to_string();
        let mut stream = self.call(async move { c.watch(key, Some(options)).await })?;
        // The watch is created before `watch` returns: a change made after
        // it is seen. etcd may report a compacted start revision in the
        // creating response or right after it (its unsynced watchers are
        // caught up periodically), so a start revision is checked below.
        let compacted = |first: Revision| KvError::Compacted {
            prefix: excerpt(prefix),
            requested: from_revision,
            first,
        };
        let mut pending = Vec::new();
        let created = self.call(async {
            loop {
                match stream.message().await? {
                    Some(r) if r.canceled() => return Ok(Some(r.compact_revision())),
                    Some(r) => {
                        pending.extend(r.events().to_vec());
                        if r.created() {
                            return Ok(None);
                        }
                    }
                    None => {
                        return Err(etcd_client::Error::WatchError(
                            "the watch stream ended before the watch was created".into(),
                        ))
                    }
                }
            }
        })?;
        if let Some(first) = created {
            return Err(compacted(first));
        }
        if from_revision > 0 {
            // Reading at the start revision fails if it is compacted; then
            // the watch's cancel (with the first kept revision) follows.
            let mut c = self.client.clone();
            let probe = GetOptions::new()
                .with_prefix()
                .with_revision(from_revision)
                .with_count_only();
            let key = prefix.to_string();
            if let Err(e) = self.call(async move { c.get(key, Some(probe)).await }) {
                match &e {
                    KvError::Backend(m) if m.contains("compacted") => {}
                    // A revision still to come: the watch waits for it.
                    KvError::Backend(m) if m.contains("future revision") => {
                        return Ok(watch_from(self, stream, pending))
                    }
                    _ => return Err(e),
                }
                let first = self.call(async {
                    while let Some(r) = stream.message().await? {
                        if r.canceled() {
                            return Ok(r.compact_revision());
                        }
                    }
                    Ok(0)
                });
                return Err(compacted(first.unwrap_or(0).max(from_revision + 1)));
            }
        }
        Ok(watch_from(self, stream, pending))
    }

    fn lease_grant(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        check_ttl(ttl)?;
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = i64::try_from(secs).map_err(|_| KvError::InvalidTtl(ttl))?;
        let mut c = self.client.clone();
        let resp = self.call(async move { c.lease_grant(secs, None).await })?;
        Ok(resp.id())
    }

    fn lease_keepalive(&self, lease: LeaseId) -> Result<Duration, KvError> {
        let mut c = self.client.clone();
        let ttl = self
            .call(async move {
                // Opening the keeper sends the first keep-alive; a second
                // one reads back the time to live.
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                Ok(stream.message().await?.map(|r| r.ttl()).unwrap_or(0))
            })
            .map_err(|e| match e {
                KvError::Backend(m) if m.contains("lease not found") => KvError::NoLease(lease),
                e => e,
            })?;
        if ttl <= 0 {
            return Err(KvError::NoLease(lease));
        }
        Ok(Duration::from_secs(ttl.unsigned_abs()))
    }

    fn lease_revoke(&self, lease: LeaseId) -> Result<(), KvError> {
        let mut c = self.client.clone();
        self.call(async move { c.lease_revoke(lease).await })
            .map_err(|e| {
                if is_lease_not_found(&e) {
                    KvError::NoLease(lease)
                } else {
                    e
                }
            })?;
        Ok(())
    }

    fn revision(&self) -> Result<Revision, KvError> {
        let mut c = self.client.clone();
        let resp = self.call(async move { c.status().await })?;
        Ok(header_revision(resp.header()))
    }
}

/// Feeds `pending` and then the stream's events into a new [`Watch`], on the
/// store's runtime, until the watch is dropped or the stream ends (each
/// watch has its own gRPC stream; dropping it cancels the watch at etcd).
fn watch_from(
    store: &EtcdStore,
    mut stream: etcd_client::WatchStream,
    pending: Vec<etcd_client::Event>,
) -> Watch {
    let (tx, rx) = mpsc::channel();
    let (cancel, mut cancelled) = tokio::sync::oneshot::channel::<()>();
    store.runtime().spawn(async move {
        let send = |ev: &etcd_client::Event| -> bool {
            let Some(kv) = ev.kv() else { return true };
            let Ok(kv) = convert(kv) else { return true };
            let kind = match ev.event_type() {
                EventType::Put => EventKind::Put,
                EventType::Delete => EventKind::Delete,
            };
            tx.send(WatchEvent { kind, kv }).is_ok()
        };
        if !pending.iter().all(&send) {
            return;
        }
        loop {
            tokio::select! {
                _ = &mut cancelled => break,
                msg = stream.message() => match msg {
                    Ok(Some(r)) => {
                        if !r.events().iter().all(&send) || r.canceled() {
                            break;
                        }
                    }
                    // The stream ended or failed: the watch ends (its
                    // receiver sees the store gone).
                    Ok(None) | Err(_) => break,
                },
            }
        }
        // Dropping the stream here cancels the watch at etcd.
    });
    Watch::with_cancel(rx, Box::new(cancel))
}
