//! Membership in etcd: `/<cluster>/workers/<id>` → the worker's JSON record, attached to one
//! lease per registration; `/<cluster>/placement/<model>` → the model's published placement
//! (no lease: it outlives coordinators, so a new leader finds what the workers loaded). The lease is kept alive from a thread with its own runtime, so a
//! worker whose cores are busy with compute (or whose main runtime is) still renews it.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    WatchOptions,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use super::{
    Election, MemberEvent, Membership, MembershipError, PlacementRecord, Registration, Result,
    WorkerRecord,
};

/// How to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// `host:port` or `http(s)://host:port`, one or more.
    pub endpoints: Vec<String>,
    /// Keys live under `/<cluster>/`, so several clusters can share one etcd.
    pub cluster: String,
    /// etcd authentication (user, password), when enabled on the server.
    pub user: Option<(String, String)>,
    /// TLS to etcd (`https://` endpoints, or any endpoint when set).
    pub tls: Option<EtcdTls>,
}

/// TLS settings for etcd, as PEM files.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The CA that signed etcd's server certificate (no system roots are built in).
    pub ca: PathBuf,
    /// A client certificate and its key, when etcd runs with `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name to verify etcd's certificate against (default: the endpoint's host).
    pub domain: Option<String>,
}

impl EtcdTls {
    fn tonic(&self) -> Result<TlsOptions> {
        let read = |what: &str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| {
                MembershipError::Closed(format!("etcd TLS {what} {}: {e}", p.display()))
            })
        };
        let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read("CA", &self.ca)?));
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                t = t.identity(Identity::from_pem(read("certificate", c)?, read("key", k)?));
            }
            (None, None) => {}
            _ => {
                return Err(MembershipError::Closed(
                    "etcd TLS: a client certificate needs its key, and a key its certificate"
                        .into(),
                ));
            }
        }
        if let Some(d) = &self.domain {
            t = t.domain_name(d.clone());
        }
        Ok(t)
    }
}

impl EtcdOptions {
    fn connect_options(&self) -> Result<ConnectOptions> {
        self.options_with(Some(Duration::from_secs(5)))
    }

    fn options_with(&self, timeout: Option<Duration>) -> Result<ConnectOptions> {
        let mut o = ConnectOptions::new().with_connect_timeout(Duration::from_secs(3));
        if let Some(t) = timeout {
            o = o.with_timeout(t);
        }
        if let Some((u, p)) = &self.user {
            // Tokens expire (five minutes by default); a worker lives for weeks.
            o = o
                .with_user(u.clone(), p.clone())
                .with_auto_token_refresh(true);
        }
        if let Some(t) = &self.tls {
            o = o.with_tls(t.tonic()?);
        }
        Ok(o)
    }

    /// Connects a client.
    pub async fn connect(&self) -> Result<Client> {
        Client::connect(&self.endpoints, Some(self.connect_options()?))
            .await
            .map_err(|e| self.err(e))
    }

    fn err(&self, e: impl std::fmt::Display) -> MembershipError {
        MembershipError::Etcd {
            endpoints: self.endpoints.join(","),
            msg: e.to_string(),
        }
    }

    /// `/<cluster>/` + `rest`.
    pub fn key(&self, rest: &str) -> String {
        format!("/{}/{rest}", self.cluster)
    }
}

/// How long a request is retried while etcd answers "unavailable" before the error is the
/// caller's. A member that is starting or restarting refuses connections, and the client's
/// balanced channel reports a connection attempt that failed on the *next* request routed to
/// that member, even once the member is up: one such error is not an outage, and failing a job
/// for it (as a CI run of the chart test once did) is wrong. Longer outages are the callers' to
/// handle (a worker's lease outlives them up to its TTL; a coordinator retries the job).
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(3);

/// Whether an etcd error says the member could not be reached (rather than that the request
/// was wrong or refused), so the same request may succeed on a retry.
fn unavailable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) => s.code() == tonic::Code::Unavailable,
        _ => false,
    }
}

#[derive(Clone)]
pub struct EtcdMembership {
    opts: EtcdOptions,
    client: Client,
}

impl std::fmt::Debug for EtcdMembership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdMembership")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl EtcdMembership {
    pub async fn connect(opts: EtcdOptions) -> Result<Self> {
        let client = opts.connect().await?;
        Ok(Self { opts, client })
    }

    /// Runs one request on a clone of the client, again while etcd is [unavailable] for up to
    /// [`UNAVAILABLE_RETRY`], backing off from 50 ms. Only for requests that may be repeated:
    /// reads and puts of a whole value (a lease grant repeated leaves a lease that expires).
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let start = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match f(self.client.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) if unavailable(&e) && start.elapsed() + pause < UNAVAILABLE_RETRY => {
                    debug!(error = %e, ?pause, what, "etcd unavailable; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(800));
                }
                Err(e) => return Err(self.opts.err(e)),
            }
        }
    }

    /// Grants a lease of `ttl` and keeps it alive from its own thread until the registration
    /// drops (then revokes it, deleting `key` too).
    /// A lease of `ttl` kept alive in the background. It counts as lost once no renewal
    /// succeeded for `deadline` (≤ `ttl`), measured from when that renewal was sent: a
    /// deadline below the TTL reports the loss before etcd can expire the lease.
    async fn lease(
        &self,
        ttl: Duration,
        deadline: Duration,
        key: Option<String>,
    ) -> Result<(i64, Registration)> {
        let secs = ttl.as_secs().max(1) as i64;
        let lease = self
            .call("granting a lease", |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?
            .id();
        let (lost_tx, lost) = watch::channel(false);
        let (stop, stopped) = std::sync::mpsc::channel();
        let opts = self.opts.clone();
        std::thread::Builder::new()
            .name("etcd-lease".into())
            .spawn(move || {
                keep_alive_thread(opts, key, ttl, deadline.min(ttl), lease, lost_tx, stopped)
            })
            .map_err(|e| MembershipError::Closed(format!("keep-alive thread: {e}")))?;
        Ok((
            lease,
            Registration {
                lease,
                token: 0,
                lost,
                _stop: Some(stop),
            },
        ))
    }

    fn prefix(&self) -> String {
        self.opts.key("workers/")
    }

    fn placement_prefix(&self) -> String {
        self.opts.key("placement/")
    }

    /// The worker records of a prefix read, sorted by id.
    fn records(&self, r: &etcd_client::GetResponse) -> Result<Vec<WorkerRecord>> {
        let mut v = r
            .kvs()
            .iter()
            .map(|kv| decode::<WorkerRecord>(kv.key(), kv.value()))
            .collect::<Result<Vec<_>>>()?;
        v.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(v)
    }

    async fn put_record(&self, rec: &WorkerRecord, lease: i64) -> Result<()> {
        let key = format!("{}{}", self.prefix(), rec.id);
        let value = serde_json::to_string(rec)
            .map_err(|e| MembershipError::Closed(format!("encoding the record: {e}")))?;
        self.call("putting a worker record", |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await?;
        Ok(())
    }

    /// A prefix read, then a watch from just after it; `f` turns each put (`Some(value)`) or
    /// delete (`None`) of a key into an event, or nothing.
    async fn get_and_watch<T, E>(
        &self,
        prefix: String,
        f: impl Fn(&str, Option<&[u8]>) -> Option<E> + Send + 'static,
    ) -> Result<(Vec<T>, mpsc::Receiver<E>)>
    where
        T: serde::de::DeserializeOwned,
        E: Send + 'static,
    {
        let r = self
            .call("reading a prefix", |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let rev = r.header().map(|h| h.revision()).unwrap_or(0);
        let now = r
            .kvs()
            .iter()
            .map(|kv| decode::<T>(kv.key(), kv.value()))
            .collect::<Result<Vec<_>>>()?;
        let mut stream = self
            .call("watching a prefix", |mut c| {
                let prefix = prefix.clone();
                let from = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1);
                async move { c.watch(prefix, Some(from)).await }
            })
            .await?;
        let (tx, out) = mpsc::channel(256);
        tokio::spawn(async move {
            while let Ok(Some(resp)) = stream.message().await {
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key());
                    let rest = key.strip_prefix(&prefix).unwrap_or(&key);
                    let value = match ev.event_type() {
                        EventType::Put => Some(kv.value()),
                        EventType::Delete => None,
                    };
                    if let Some(e) = f(rest, value)
                        && tx.send(e).await.is_err()
                    {
                        return;
                    }
                }
            }
            // The watch ended (etcd went away): the receiver sees the channel close.
        });
        Ok((now, out))
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| MembershipError::BadRecord {
        key: String::from_utf8_lossy(key).into_owned(),
        msg: e.to_string(),
    })
}

/// Grants a lease, puts the record on it and keeps it alive until `stop` fires or the lease is
/// lost. Runs on its own thread and runtime.
fn keep_alive_thread(
    opts: EtcdOptions,
    key: Option<String>,
    ttl: Duration,
    deadline: Duration,
    lease: i64,
    lost: watch::Sender<bool>,
    stop: std::sync::mpsc::Receiver<()>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!(error = %e, "no runtime for the lease keep-alive");
            let _ = lost.send(true);
            return;
        }
    };
    rt.block_on(async move {
        let period = (ttl / 3).max(Duration::from_millis(100));
        // The lease lives as long as etcd heard from us within its TTL, so a broken
        // connection (etcd restarting, a network blip) is retried until then.
        let mut last_ok = std::time::Instant::now();
        let mut conn = None;
        loop {
            match stop.try_recv() {
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                _ => {
                    // Dropped: give the slot back at once rather than at expiry.
                    if let Ok(mut c) = opts.connect().await {
                        let _ = c.lease_revoke(lease).await;
                        if let Some(k) = &key {
                            let _ = c.delete(k.as_str(), None).await;
                        }
                    }
                    return;
                }
            }
            if conn.is_none()
                && let Ok(mut c) = opts.connect().await
            {
                conn = c.lease_keep_alive(lease).await.ok();
            }
            let mut wait = Duration::from_millis(100);
            if let Some((keeper, stream)) = conn.as_mut() {
                // etcd restarts the TTL when it takes the request, after this instant.
                let sent = std::time::Instant::now();
                let renew = async {
                    keeper.keep_alive().await.ok()?;
                    stream.message().await.ok()?
                };
                match tokio::time::timeout(period, renew).await {
                    Ok(Some(r)) if r.ttl() > 0 => {
                        last_ok = sent;
                        wait = period;
                        debug!(?key, lease, "lease renewed");
                    }
                    Ok(Some(_)) => {
                        warn!(?key, lease, "lease expired in etcd");
                        let _ = lost.send(true);
                        return;
                    }
                    _ => conn = None,
                }
            }
            if last_ok.elapsed() >= deadline {
                if deadline < ttl {
                    warn!(
                        ?key,
                        lease,
                        ?deadline,
                        ?ttl,
                        "lease given up: no renewal within its renew deadline, before etcd \
                         could expire it"
                    );
                } else {
                    warn!(
                        ?key,
                        lease, "lease lost: etcd unreachable for its whole TTL"
                    );
                }
                let _ = lost.send(true);
                return;
            }
            tokio::time::sleep(wait.min(deadline.saturating_sub(last_ok.elapsed()))).await;
        }
    });
}

#[tonic::async_trait]
impl Membership for EtcdMembership {
    async fn register(&self, rec: WorkerRecord, ttl: Duration) -> Result<Registration> {
        let key = format!("{}{}", self.prefix(), rec.id);
        let (lease, reg) = self.lease(ttl, ttl, Some(key)).await?;
        self.put_record(&rec, lease).await?;
        Ok(reg)
    }

    async fn update(&self, reg: &Registration, rec: WorkerRecord) -> Result<()> {
        if reg.is_lost() {
            return Err(MembershipError::Closed(format!(
                "worker {}'s lease is lost",
                rec.id
            )));
        }
        self.put_record(&rec, reg.lease).await
    }

    async fn publish_placement(&self, rec: &PlacementRecord) -> Result<()> {
        let key = format!("{}{}", self.placement_prefix(), rec.model);
        let value = serde_json::to_string(rec)
            .map_err(|e| MembershipError::Closed(format!("encoding the placement: {e}")))?;
        self.call("publishing a placement", |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.put(key, value, None).await }
        })
        .await?;
        Ok(())
    }

    async fn placement(&self, model: &str) -> Result<Option<PlacementRecord>> {
        let key = format!("{}{model}", self.placement_prefix());
        let r = self
            .call("reading a placement", |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        r.kvs()
            .first()
            .map(|kv| decode(kv.key(), kv.value()))
            .transpose()
    }

    async fn watch_placements(
        &self,
    ) -> Result<(Vec<PlacementRecord>, mpsc::Receiver<PlacementRecord>)> {
        self.get_and_watch(self.placement_prefix(), |key, value| {
            match decode::<PlacementRecord>(key.as_bytes(), value?) {
                Ok(p) => Some(p),
                Err(e) => {
                    warn!(error = %e, "ignoring a bad placement record");
                    None
                }
            }
        })
        .await
    }

    async fn list(&self) -> Result<Vec<WorkerRecord>> {
        let prefix = self.prefix();
        let r = self
            .call("listing workers", |mut c| {
                let prefix = prefix.clone();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        self.records(&r)
    }

    async fn watch(&self) -> Result<(Vec<WorkerRecord>, mpsc::Receiver<MemberEvent>)> {
        let (mut now, rx) = self
            .get_and_watch(self.prefix(), |id, value| match value {
                None => Some(MemberEvent::Removed(id.to_string())),
                Some(v) => match decode(id.as_bytes(), v) {
                    Ok(rec) => Some(MemberEvent::Put(rec)),
                    Err(e) => {
                        warn!(error = %e, "ignoring a bad membership record");
                        None
                    }
                },
            })
            .await?;
        now.sort_by(|a: &WorkerRecord, b| a.id.cmp(&b.id));
        Ok((now, rx))
    }
}

/// How long a leader may go without renewing its election lease before it steps down: two
/// thirds of the TTL, so it stops before etcd expires the lease (at the TTL after the last
/// renewal) and elects another.
pub fn renew_deadline(ttl: Duration) -> Duration {
    ttl * 2 / 3
}

#[tonic::async_trait]
impl Election for EtcdMembership {
    async fn campaign(&self, value: String, ttl: Duration) -> Result<Registration> {
        // The lease is kept alive while waiting too: a campaign may wait for hours. A leader
        // gives up at two thirds of its TTL without a renewal, so it stops driving jobs before
        // etcd can expire its lease and elect another.
        let (lease, mut reg) = self.lease(ttl, renew_deadline(ttl), None).await?;
        // No request timeout on this client: campaign returns only once elected.
        let mut ec = Client::connect(&self.opts.endpoints, Some(self.opts.options_with(None)?))
            .await
            .map_err(|e| self.opts.err(e))?;
        let name = self.opts.key("coordinator");
        tokio::select! {
            r = ec.campaign(name.as_str(), value.as_str(), lease) => {
                let r = r.map_err(|e| self.opts.err(e))?;
                // The election key's creation revision. The leader is the candidate whose key
                // has the lowest revision while it exists; a key older than this leader's was
                // gone before it led and never returns, so every later leader's key, and its
                // token, is younger (larger).
                reg.token = r
                    .leader()
                    .map(|k| k.rev())
                    .and_then(|rev| u64::try_from(rev).ok())
                    .filter(|&t| t > 0)
                    .ok_or_else(|| {
                        MembershipError::Closed("the election answered without a leader key".into())
                    })?;
            }
            _ = async {
                let mut l = reg.lost.clone();
                let _ = l.wait_for(|x| *x).await;
            } => {
                return Err(MembershipError::Closed("the election lease was lost while campaigning".into()));
            }
        }
        Ok(reg)
    }
}
