//! Authentication and authorization, etcd's model (docs/security.md, "Authentication and
//! authorization"; docs/etcd.md, "Auth").
//!
//! - **State** — users (bcrypt password hashes, roles), roles (key permissions), whether auth
//!   is enabled, and the auth revision — is kept as records in the system key space
//!   (`\xff\xff\xff\xffatoll/auth/`), so it is replicated by raft like every key and survives
//!   restarts. Every change is one transaction that also rewrites the state record with the
//!   revision plus one: two concurrent changes conflict on it, so changes are serializable
//!   ([`AuthStore::mutate`]).
//! - **Every store caches the state** ([`AuthState`]) and confirms it on demand: a call that
//!   finds the cache last confirmed more than [`REFRESH_INTERVAL`] ago first reads the state
//!   record's revision at a fresh timestamp (one read for all the calls waiting, waited for
//!   up to [`CONFIRM_WAIT`], else the cached state is used), and the whole state when the
//!   revision moved. A change made on one store is thus enforced on
//!   every store for calls that start more than that interval after it was acknowledged, and
//!   on the store that made it at once. An idle store reads nothing, so the region holding
//!   the auth records hibernates like any other.
//! - **Tokens** are signed by the store that issued them and valid on every store (token.rs);
//!   a token carries its user, the auth revision it was issued at and its expiry. It is
//!   refused once expired, once its user is deleted, once the user's password changed after
//!   it was issued, and once auth was disabled (and enabled again) after it was issued.
//! - **Who calls** ([`Caller`]): a user with a token (gRPC metadata `token`, or
//!   `authorization` as etcd's gateway sends it), else with `--client-cert-auth` the common
//!   name of the client's TLS certificate (`atoll_util::identity::PeerIdentity`), else nobody.
//!   Calls from this store's own client (the etcd layer, which checked the user first) are
//!   marked in process (`atoll_client::InProcess`) or carry a store token: they are
//!   [`Caller::Store`] and never refused.

pub mod check;
pub mod perm;
pub mod service;
pub mod token;

use crate::errors;
use atoll_client::Client;
use atoll_pd_client::PdClient;
use atoll_proto::authpb::permission::Type as PermType;
use atoll_proto::authpb::Permission;
use ed25519_dalek::{SigningKey, VerifyingKey};
use parking_lot::{Mutex, RwLock};
use perm::{Access, Perms};
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Status};

/// How long a confirmed auth state is used before a call confirms it again.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(500);
/// How long a call waits for a confirmation before it uses the cached state.
pub const CONFIRM_WAIT: Duration = Duration::from_secs(1);
/// etcd's default `--auth-token-ttl` (seconds).
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 300;
/// etcd's default bcrypt cost (`bcrypt.DefaultCost`).
pub const BCRYPT_COST: u32 = 10;
/// How long a store token lives; a new one is signed when half of it is gone.
const STORE_TOKEN_TTL_MS: u64 = 3_600_000;
/// Verified tokens remembered (a signature is checked once per token, not per call).
const VERIFIED_CACHE: usize = 4096;

pub const ROOT_USER: &str = "root";
pub const ROOT_ROLE: &str = "root";

/// The metadata key of a token (etcd's `rpctypes.TokenFieldNameGRPC`).
pub const TOKEN_KEY: &str = "token";
/// The metadata key etcd's gateway puts the `Authorization` header under.
pub const GATEWAY_TOKEN_KEY: &str = "authorization";

fn auth_key(tail: &[u8]) -> Vec<u8> {
    [atoll_keys::SYSTEM_PREFIX, b"auth/", tail].concat()
}
/// The state record.
pub fn state_key() -> Vec<u8> {
    auth_key(b"state")
}
fn user_key(name: &str) -> Vec<u8> {
    auth_key(&[b"user/", name.as_bytes()].concat())
}
fn role_key(name: &str) -> Vec<u8> {
    auth_key(&[b"role/", name.as_bytes()].concat())
}
/// Every auth record: `[start, end)`.
pub fn records_range() -> (Vec<u8>, Vec<u8>) {
    (
        [atoll_keys::SYSTEM_PREFIX, b"auth/"].concat(),
        [atoll_keys::SYSTEM_PREFIX, b"auth0"].concat(),
    )
}

/// The state record.
#[derive(Clone, PartialEq, Message)]
pub struct StateRecord {
    #[prost(bool, tag = "1")]
    pub enabled: bool,
    /// Bumped by every change.
    #[prost(uint64, tag = "2")]
    pub revision: u64,
    /// The revision auth was last enabled at: older tokens are refused.
    #[prost(uint64, tag = "3")]
    pub enabled_revision: u64,
}

/// A user record.
#[derive(Clone, PartialEq, Message)]
pub struct UserRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    /// The bcrypt hash (empty for a user without password).
    #[prost(bytes = "vec", tag = "2")]
    pub password: Vec<u8>,
    /// Sorted, as etcd keeps them.
    #[prost(string, repeated, tag = "3")]
    pub roles: Vec<String>,
    #[prost(bool, tag = "4")]
    pub no_password: bool,
    /// Tokens issued at a revision below this are refused (the revision of the user's
    /// creation or last password change).
    #[prost(uint64, tag = "5")]
    pub tokens_from: u64,
}

/// A role record.
#[derive(Clone, PartialEq, Message)]
pub struct RoleRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    /// Sorted by key, as etcd keeps them.
    #[prost(message, repeated, tag = "2")]
    pub perms: Vec<Permission>,
}

/// The whole auth state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthState {
    pub state: StateRecord,
    pub users: BTreeMap<String, UserRecord>,
    pub roles: BTreeMap<String, RoleRecord>,
    /// Each user's merged permissions (derived).
    perms: HashMap<String, Arc<Perms>>,
}

/// etcd's root permission: everything.
pub fn root_perm() -> Permission {
    Permission {
        perm_type: PermType::Readwrite as i32,
        key: vec![],
        range_end: vec![0],
    }
}

impl AuthState {
    /// The state from its records (key, value).
    pub fn from_records<'a>(records: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        let mut s = AuthState::default();
        let (users, roles, state) = (user_key(""), role_key(""), state_key());
        for (k, v) in records {
            if k == state.as_slice() {
                if let Ok(r) = StateRecord::decode(v) {
                    s.state = r;
                }
            } else if k.starts_with(&users) {
                if let Ok(u) = UserRecord::decode(v) {
                    s.users.insert(u.name.clone(), u);
                }
            } else if k.starts_with(&roles) {
                if let Ok(r) = RoleRecord::decode(v) {
                    s.roles.insert(r.name.clone(), r);
                }
            }
        }
        s.derive();
        s
    }

    fn derive(&mut self) {
        self.perms = self
            .users
            .values()
            .map(|u| {
                let perms = u
                    .roles
                    .iter()
                    .filter_map(|r| self.roles.get(r))
                    .flat_map(|r| r.perms.iter());
                (u.name.clone(), Arc::new(Perms::merge(perms)))
            })
            .collect();
    }

    pub fn enabled(&self) -> bool {
        self.state.enabled
    }

    pub fn revision(&self) -> u64 {
        self.state.revision
    }

    /// Whether `user` exists and has the root role.
    pub fn is_root(&self, user: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == ROOT_ROLE))
    }

    /// Whether `user` has `role`.
    pub fn has_role(&self, user: &str, role: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == role))
    }

    /// The user a verified user token names, if the token is still good: auth enabled, user
    /// present, token issued after the user's creation or password change and after auth was
    /// last enabled, not expired at `now_ms`.
    pub fn user_of_token(&self, c: &token::Claims, now_ms: u64) -> Option<String> {
        if !self.enabled() || c.kind != token::Kind::User || c.expired(now_ms) {
            return None;
        }
        let u = self.users.get(&c.name)?;
        (c.revision >= u.tokens_from && c.revision >= self.state.enabled_revision)
            .then(|| c.name.clone())
    }

    /// etcd's `isOpPermitted` for a user: `access` to `key` or `[key, range_end)`.
    pub fn permitted(
        &self,
        user: &str,
        access: Access,
        key: &[u8],
        range_end: &[u8],
    ) -> Result<(), Status> {
        if !self.users.contains_key(user) {
            return Err(errors::permission_denied());
        }
        if self.is_root(user) {
            return Ok(());
        }
        // The system key space is Atoll's own: only root reaches it.
        let end_past_system = range_end == [0] || range_end > atoll_keys::SYSTEM_PREFIX;
        if atoll_keys::is_system_key(key) || (!range_end.is_empty() && end_past_system) {
            return Err(errors::permission_denied());
        }
        match self.perms.get(user) {
            Some(p) if p.allows(access, key, range_end) => Ok(()),
            _ => Err(errors::permission_denied()),
        }
    }

    /// etcd's `IsAdminPermitted` for a user.
    pub fn admin(&self, user: &str) -> Result<(), Status> {
        if !self.users.contains_key(user) {
            return Err(errors::user_not_found());
        }
        if !self.is_root(user) {
            return Err(errors::permission_denied());
        }
        Ok(())
    }
}

/// Whether a state read at revision `new` replaces the cached one at `cur`: the first read
/// always, later only a newer one. Reads run concurrently (a confirmation, a refresh after a
/// refusal, a change's own read) and finish in any order: an older one, even one that found
/// no records at all (revision 0, before auth was first touched), must not undo a newer one
/// (it could: a slow confirmation that read before `auth enable` put the empty state, auth
/// disabled, back on a store).
fn replaces(first: bool, cur: u64, new: u64) -> bool {
    first || new > cur
}

/// What is known of a store's token-signing key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyLookup {
    Key(VerifyingKey),
    /// The store does not exist, is gone, or publishes no key: its tokens are invalid.
    NoKey,
    /// PD could not be asked, or the store is not registered yet (a starting store calls
    /// others before its record is in PD): nothing can be said yet.
    Unknown,
}

/// What PD's answer for a store says of its key.
fn key_lookup(r: Result<atoll_proto::metapb::Store, atoll_pd_client::Error>) -> KeyLookup {
    match r {
        Ok(store) => <[u8; 32]>::try_from(store.auth_key.as_slice())
            .ok()
            .and_then(|b| VerifyingKey::from_bytes(&b).ok())
            .map_or(KeyLookup::NoKey, KeyLookup::Key),
        Err(atoll_pd_client::Error::StoreTombstone(_)) => KeyLookup::NoKey,
        Err(_) => KeyLookup::Unknown,
    }
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Auth is disabled: everything is allowed.
    Open,
    /// A storage node of this cluster (this one in process, or another with a store token).
    Store,
    /// Auth is enabled and the call names no user.
    Nobody,
    /// An authenticated user.
    User(String),
}

/// What a call needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Reading or writing a key (`end` empty) or a range in etcd's form.
    Keys {
        access: Access,
        key: Vec<u8>,
        end: Vec<u8>,
    },
    /// The root role.
    Admin,
    /// Any user.
    User,
}

impl Need {
    pub fn read(key: &[u8], end: &[u8]) -> Need {
        Need::Keys {
            access: Access::Read,
            key: key.to_vec(),
            end: end.to_vec(),
        }
    }
    pub fn write(key: &[u8], end: &[u8]) -> Need {
        Need::Keys {
            access: Access::Write,
            key: key.to_vec(),
            end: end.to_vec(),
        }
    }
}

/// A store's auth: the cached state, its signing key, and the other stores' keys.
pub struct AuthStore {
    store_id: u64,
    client: Arc<Client>,
    pd: Arc<dyn PdClient>,
    key: RwLock<SigningKey>,
    state: RwLock<Arc<AuthState>>,
    /// When the cached state was last confirmed current: every change acknowledged before
    /// this instant is in it (`None`: never read).
    confirmed: Mutex<Option<std::time::Instant>>,
    /// Whether a confirmation runs (one at a time, in its own task).
    confirming: std::sync::atomic::AtomicBool,
    /// Bumped when a confirmation ends, however it ended (callers wait for it).
    attempts: tokio::sync::watch::Sender<u64>,
    /// After a failed confirmation, calls use the cached state without waiting until then.
    retry_at: Mutex<Option<std::time::Instant>>,
    /// This store, for the confirmation task.
    me: std::sync::Weak<AuthStore>,
    token_ttl_ms: AtomicU64,
    /// How long a confirmed state is used ([`REFRESH_INTERVAL`] unless configured), in ms.
    cache_ttl_ms: AtomicU64,
    /// Other stores' public keys.
    keys: RwLock<HashMap<u64, VerifyingKey>>,
    /// When each store's key was last asked of PD (at most once a second each), and what
    /// came of it.
    fetched: Mutex<HashMap<u64, (std::time::Instant, KeyLookup)>>,
    /// Tokens whose signature checked out: token -> claims.
    verified: Mutex<HashMap<String, token::Claims>>,
    /// This store's current store token.
    store_token: Mutex<Option<(String, u64)>>,
}

impl AuthStore {
    pub fn new(store_id: u64, client: Arc<Client>, pd: Arc<dyn PdClient>) -> Arc<AuthStore> {
        Arc::new_cyclic(|me| AuthStore {
            store_id,
            client,
            pd,
            key: RwLock::new(token::new_key()),
            state: RwLock::new(Arc::default()),
            confirmed: Mutex::new(None),
            confirming: Default::default(),
            attempts: tokio::sync::watch::channel(0).0,
            retry_at: Mutex::new(None),
            me: me.clone(),
            token_ttl_ms: AtomicU64::new(DEFAULT_TOKEN_TTL_SECS * 1000),
            cache_ttl_ms: AtomicU64::new(REFRESH_INTERVAL.as_millis() as u64),
            keys: RwLock::default(),
            fetched: Mutex::default(),
            verified: Mutex::default(),
            store_token: Mutex::default(),
        })
    }

    /// Signs with `key` from now on (the storage node's key from its data directory).
    pub fn set_key(&self, key: SigningKey) {
        *self.key.write() = key;
        *self.store_token.lock() = None;
    }

    /// The public half of this store's key (published in its PD store record).
    pub fn public_key(&self) -> VerifyingKey {
        self.key.read().verifying_key()
    }

    /// etcd's `--auth-token-ttl`.
    pub fn set_token_ttl(&self, ttl: Duration) {
        self.token_ttl_ms
            .store(ttl.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    /// How long a confirmed state is used before a call confirms it again (storage-node
    /// `auth-cache-ttl`, default [`REFRESH_INTERVAL`]).
    pub fn set_cache_ttl(&self, ttl: Duration) {
        self.cache_ttl_ms
            .store(ttl.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    fn cache_ttl(&self) -> Duration {
        Duration::from_millis(self.cache_ttl_ms.load(Ordering::Relaxed))
    }

    /// The cached state.
    pub fn state(&self) -> Arc<AuthState> {
        self.state.read().clone()
    }

    /// A store token of this store, to put in its calls to other stores.
    pub fn store_token(&self) -> String {
        let now = token::now_ms();
        let mut t = self.store_token.lock();
        if let Some((tok, exp)) = &*t {
            if now + STORE_TOKEN_TTL_MS / 2 < *exp {
                return tok.clone();
            }
        }
        let claims = token::Claims {
            kind: token::Kind::Store,
            issuer: self.store_id,
            revision: 0,
            expiry_ms: now + STORE_TOKEN_TTL_MS,
            name: String::new(),
        };
        let tok = token::sign(&self.key.read(), &claims);
        *t = Some((tok.clone(), claims.expiry_ms));
        tok
    }

    /// A user token for `user` at the current revision.
    fn user_token(&self, user: &str, revision: u64) -> String {
        let claims = token::Claims {
            kind: token::Kind::User,
            issuer: self.store_id,
            revision,
            expiry_ms: token::now_ms() + self.token_ttl_ms.load(Ordering::Relaxed),
            name: user.to_string(),
        };
        token::sign(&self.key.read(), &claims)
    }

    /// The public key of store `id`: this store's, a cached one, or from PD. PD is asked at
    /// most once a second per store; in between, the last answer stands.
    async fn key_of(&self, id: u64, refresh: bool) -> KeyLookup {
        if id == self.store_id {
            return KeyLookup::Key(self.public_key());
        }
        if !refresh {
            if let Some(k) = self.keys.read().get(&id) {
                return KeyLookup::Key(*k);
            }
        }
        {
            let mut f = self.fetched.lock();
            let now = std::time::Instant::now();
            if let Some((t, last)) = f.get(&id) {
                if now.duration_since(*t) < Duration::from_secs(1) {
                    return match self.keys.read().get(&id) {
                        Some(k) => KeyLookup::Key(*k),
                        None => *last,
                    };
                }
            }
            if f.len() >= VERIFIED_CACHE {
                f.clear();
            }
            f.insert(id, (now, KeyLookup::Unknown));
        }
        let found = key_lookup(self.pd.get_store(id).await);
        if let KeyLookup::Key(k) = found {
            self.keys.write().insert(id, k);
        }
        if let Some(e) = self.fetched.lock().get_mut(&id) {
            e.1 = found;
        }
        found
    }

    /// The claims of a token some store of this cluster signed (expiry not checked):
    /// `Ok(None)` if it is not such a token; an error (unavailable) if whether it is cannot be
    /// told now (its issuer's key could not be had from PD): a caller with a good token must
    /// not be told it is invalid (etcd clients then authenticate again, in a loop) because PD
    /// did not answer.
    pub async fn verify(&self, tok: &str) -> Result<Option<token::Claims>, Status> {
        if let Some(c) = self.verified.lock().get(tok) {
            return Ok(Some(c.clone()));
        }
        let Some((claims, payload, sig)) = token::parse(tok) else {
            return Ok(None);
        };
        let mut unknown = false;
        for refresh in [false, true] {
            match self.key_of(claims.issuer, refresh).await {
                KeyLookup::Key(k) if token::signed_by(&k, &payload, &sig) => {
                    let mut v = self.verified.lock();
                    if v.len() >= VERIFIED_CACHE {
                        v.clear();
                    }
                    v.insert(tok.to_string(), claims.clone());
                    return Ok(Some(claims));
                }
                KeyLookup::Key(_) | KeyLookup::NoKey => unknown = false,
                KeyLookup::Unknown => unknown = true,
            }
        }
        if unknown {
            return Err(errors::atoll(
                Code::Unavailable,
                format!(
                    "cannot check the token now: the key of store {} is not known yet",
                    claims.issuer
                ),
            ));
        }
        Ok(None)
    }

    /// Whether the cached state was confirmed within the cache TTL (`auth-cache-ttl`, default
    /// [`REFRESH_INTERVAL`]).
    fn fresh(&self) -> bool {
        self.confirmed
            .lock()
            .is_some_and(|t| t.elapsed() < self.cache_ttl())
    }

    /// The state, confirmed current within the cache TTL. A stale cache starts a
    /// confirmation (in its own task, one at a time) and waits for it up to [`CONFIRM_WAIT`];
    /// if the auth records cannot be read in that time, the cached state is used and calls
    /// stop waiting for [`REFRESH_INTERVAL`] (no call depends on the availability of the
    /// region holding them for longer). A store that never read the state waits up to 5 s,
    /// then answers unavailable.
    async fn loaded_state(&self) -> Result<Arc<AuthState>, Status> {
        if self.fresh() {
            return Ok(self.state());
        }
        let never = self.confirmed.lock().is_none();
        let now = std::time::Instant::now();
        if !never && self.retry_at.lock().is_some_and(|t| now < t) {
            return Ok(self.state());
        }
        let mut rx = self.attempts.subscribe();
        let seen = *rx.borrow_and_update();
        self.start_confirm();
        let wait = if never {
            Duration::from_secs(5)
        } else {
            CONFIRM_WAIT
        };
        let _ = tokio::time::timeout(wait, rx.wait_for(|g| *g != seen)).await;
        if self.confirmed.lock().is_none() {
            return Err(errors::atoll(
                Code::Unavailable,
                "the auth state could not be read yet",
            ));
        }
        if !self.fresh() {
            tracing::debug!(
                "the auth state could not be confirmed in time; the cached one is used"
            );
            let mut r = self.retry_at.lock();
            if r.is_none_or(|t| t < now) {
                *r = Some(now + self.cache_ttl().min(REFRESH_INTERVAL));
            }
        }
        Ok(self.state())
    }

    /// Starts a confirmation unless one runs.
    fn start_confirm(&self) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        if self.confirming.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(async move {
            if let Err(e) = me.confirm().await {
                tracing::debug!(error = %e.message(), "reading the auth state failed");
            }
            me.confirming.store(false, Ordering::Release);
            me.attempts.send_modify(|g| *g = g.wrapping_add(1));
        });
    }

    /// Reads the state record's revision at a fresh timestamp, and the whole state if it is
    /// not the cached one's.
    async fn confirm(&self) -> Result<(), Status> {
        if self.confirmed.lock().is_none() {
            return self.refresh().await;
        }
        let started = std::time::Instant::now();
        let ts = self.client.tso().await.map_err(crate::kv::client_error)?;
        let k = state_key();
        let mut end = k.clone();
        end.push(0);
        let (kvs, _) = self
            .client
            .etcd_range(&k, &end, ts, 1, false, false)
            .await
            .map_err(crate::kv::client_error)?;
        let rev = kvs
            .first()
            .and_then(|kv| StateRecord::decode(kv.value.as_slice()).ok())
            .map_or(0, |s| s.revision);
        if rev == self.state().revision() {
            self.mark_confirmed(started);
            return Ok(());
        }
        let s = self.read_at(ts).await?;
        self.install(s, started);
        Ok(())
    }

    fn mark_confirmed(&self, at: std::time::Instant) {
        let mut c = self.confirmed.lock();
        if c.is_none_or(|t| t < at) {
            *c = Some(at);
        }
    }

    /// Who makes a call with this metadata and these extensions.
    /// `in_process`: the request carries [`atoll_client::InProcess`]; `peer`: the identity
    /// its TLS connection proved.
    pub async fn caller(
        &self,
        md: &tonic::metadata::MetadataMap,
        in_process: bool,
        peer: Option<&atoll_util::identity::PeerIdentity>,
    ) -> Result<Caller, Status> {
        if in_process {
            return Ok(Caller::Store);
        }
        let tok = md
            .get(TOKEN_KEY)
            .or_else(|| md.get(GATEWAY_TOKEN_KEY))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let verified = match &tok {
            Some(t) => self.verify(t).await?,
            None => None,
        };
        if verified
            .as_ref()
            .is_some_and(|c| c.kind == token::Kind::Store && !c.expired(token::now_ms()))
        {
            return Ok(Caller::Store);
        }
        let mut state = self.loaded_state().await?;
        if verified
            .as_ref()
            .is_some_and(|c| c.kind == token::Kind::User && c.revision > state.revision())
        {
            // Issued by a store that has seen a newer state than this one: catch up.
            let _ = self.refresh().await;
            state = self.state();
        }
        decide(&state, tok.is_some(), verified, peer, token::now_ms())
    }

    /// The caller of a gRPC request.
    pub async fn caller_of<T>(&self, req: &tonic::Request<T>) -> Result<Caller, Status> {
        let ext = req.extensions();
        self.caller(
            req.metadata(),
            ext.get::<atoll_client::InProcess>().is_some(),
            ext.get::<atoll_util::identity::PeerIdentity>(),
        )
        .await
    }

    /// Whether `caller` may do everything in `needs` (in the current state).
    pub fn check(&self, caller: &Caller, needs: &[Need]) -> Result<(), Status> {
        check_in(&self.state(), caller, needs)
    }

    /// The caller of `req`, checked for `needs`.
    pub async fn authorize<T>(
        &self,
        req: &tonic::Request<T>,
        needs: &[Need],
    ) -> Result<Caller, Status> {
        let c = self.caller_of(req).await?;
        self.check_fresh(&c, needs).await?;
        Ok(c)
    }

    /// [`AuthStore::check`]; a refusal is confirmed against a fresh read of the state (a
    /// permission just granted on another store holds here at once; one just revoked holds
    /// until this store's next refresh at the latest).
    pub async fn check_fresh(&self, caller: &Caller, needs: &[Need]) -> Result<(), Status> {
        match self.check(caller, needs) {
            Err(e) if e.code() == Code::PermissionDenied => {
                if self.refresh().await.is_err() {
                    return Err(e);
                }
                self.check(caller, needs)
            }
            r => r,
        }
    }

    /// Reads the state at a fresh timestamp and caches it if it is newer than the cached one.
    pub async fn refresh(&self) -> Result<(), Status> {
        let started = std::time::Instant::now();
        let ts = self.client.tso().await.map_err(crate::kv::client_error)?;
        let s = self.read_at(ts).await?;
        self.install(s, started);
        Ok(())
    }

    async fn read_at(&self, ts: u64) -> Result<AuthState, Status> {
        let (start, end) = records_range();
        let (kvs, _) = self
            .client
            .etcd_range(&start, &end, ts, 0, false, false)
            .await
            .map_err(crate::kv::client_error)?;
        Ok(AuthState::from_records(
            kvs.iter()
                .map(|kv| (kv.key.as_slice(), kv.value.as_slice())),
        ))
    }

    /// Caches `s`, read at a timestamp taken after `started`.
    fn install(&self, s: AuthState, started: std::time::Instant) {
        {
            let mut cur = self.state.write();
            let first = self.confirmed.lock().is_none();
            if replaces(first, cur.revision(), s.revision()) {
                *cur = Arc::new(s);
            }
        }
        self.mark_confirmed(started);
    }

    /// Reads the state once at start (retried until it succeeds or `stop` turns true), so
    /// the first call does not wait for it. Later reads are made on demand.
    pub async fn load(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            match self.loaded_state().await {
                Ok(_) => return,
                Err(e) => {
                    tracing::debug!(error = %e.message(), "reading the auth state failed; tried again")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH_INTERVAL) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Applies `change` to the state as one transaction and bumps the revision; retried on a
    /// conflict with a concurrent change. `change` answers whether it changed anything (if
    /// not, nothing is written and the revision stays); an error from it writes nothing.
    pub async fn mutate<F>(&self, mut change: F) -> Result<Arc<AuthState>, Status>
    where
        F: FnMut(&mut AuthState) -> Result<bool, Status>,
    {
        let deadline = tokio::time::Instant::now() + self.client.config().timeout;
        let mut attempt = 0;
        loop {
            attempt += 1;
            if tokio::time::Instant::now() >= deadline {
                return Err(errors::timeout());
            }
            let opts = atoll_client::TxnOptions {
                try_one_pc: false,
                ..Default::default()
            };
            let started = std::time::Instant::now();
            let mut t = self
                .client
                .begin_with(opts)
                .await
                .map_err(crate::kv::client_error)?;
            t.allow_system_keys();
            let before = self.read_at(t.start_ts()).await?;
            let mut after = before.clone();
            after.state.revision = before.state.revision + 1;
            let rev = after.state.revision;
            if !change(&mut after)? {
                let _ = t.rollback().await;
                self.install(before, started);
                return Ok(self.state());
            }
            after.state.revision = rev;
            after.derive();
            let put = |t: &mut atoll_client::Transaction, k: Vec<u8>, v: Vec<u8>| {
                t.put(k, v).map_err(crate::kv::client_error)
            };
            put(&mut t, state_key(), after.state.encode_to_vec())?;
            for (n, u) in &after.users {
                if before.users.get(n) != Some(u) {
                    put(&mut t, user_key(n), u.encode_to_vec())?;
                }
            }
            for n in before
                .users
                .keys()
                .filter(|n| !after.users.contains_key(*n))
            {
                t.delete(user_key(n)).map_err(crate::kv::client_error)?;
            }
            for (n, r) in &after.roles {
                if before.roles.get(n) != Some(r) {
                    put(&mut t, role_key(n), r.encode_to_vec())?;
                }
            }
            for n in before
                .roles
                .keys()
                .filter(|n| !after.roles.contains_key(*n))
            {
                t.delete(role_key(n)).map_err(crate::kv::client_error)?;
            }
            match t.commit().await {
                Ok(_) => {
                    self.install(after, started);
                    return Ok(self.state());
                }
                Err(atoll_client::Error::WriteConflict { .. })
                | Err(atoll_client::Error::TxnRolledBack(_)) => {
                    crate::kv::backoff(attempt).await;
                }
                Err(e) => return Err(crate::kv::client_error(e)),
            }
        }
    }

    /// etcd's `Authenticate`: a token for `name` if the password is right.
    pub async fn authenticate(&self, name: &str, password: &str) -> Result<String, Status> {
        let state = self.loaded_state().await?;
        if !state.enabled() {
            return Err(errors::auth_not_enabled());
        }
        let Some(u) = state.users.get(name).cloned() else {
            return Err(errors::auth_failed());
        };
        if u.no_password {
            return Err(errors::auth_failed());
        }
        let pw = password.to_string();
        let ok = tokio::task::spawn_blocking(move || {
            let hash = String::from_utf8_lossy(&u.password).into_owned();
            bcrypt::verify(pw, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if !ok {
            return Err(errors::auth_failed());
        }
        Ok(self.user_token(name, state.revision()))
    }
}

/// Who a call is, once its token (if any: `has_token`) was checked (`verified`: its claims if a
/// store of this cluster signed it) — etcd's `AuthInfoFromCtx`, then with a TLS client
/// certificate and no token its common name as the user (`AuthInfoFromTLS`).
pub fn decide(
    state: &AuthState,
    has_token: bool,
    verified: Option<token::Claims>,
    peer: Option<&atoll_util::identity::PeerIdentity>,
    now_ms: u64,
) -> Result<Caller, Status> {
    if verified
        .as_ref()
        .is_some_and(|c| c.kind == token::Kind::Store && !c.expired(now_ms))
    {
        return Ok(Caller::Store);
    }
    if !state.enabled() {
        // etcd ignores tokens while auth is disabled.
        return Ok(Caller::Open);
    }
    if has_token {
        return verified
            .and_then(|c| state.user_of_token(&c, now_ms))
            .map(Caller::User)
            .ok_or_else(errors::invalid_auth_token);
    }
    if let Some(cn) = peer
        .and_then(|p| p.common_name.clone())
        .filter(|cn| !cn.is_empty())
    {
        return Ok(Caller::User(cn));
    }
    Ok(Caller::Nobody)
}

/// `msg` as a request from this store itself (the etcd services calling each other in
/// process: Election and Lock on KV, the gateway's `/health`): never refused.
pub fn internal<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.extensions_mut().insert(atoll_client::InProcess);
    r
}

/// [`AuthStore::check`] against a given state.
pub fn check_in(state: &AuthState, caller: &Caller, needs: &[Need]) -> Result<(), Status> {
    let user = match caller {
        Caller::Open | Caller::Store => return Ok(()),
        Caller::Nobody if needs.is_empty() => return Ok(()),
        Caller::Nobody => return Err(errors::user_empty()),
        Caller::User(u) => u,
    };
    for n in needs {
        match n {
            Need::Keys { access, key, end } => state.permitted(user, *access, key, end)?,
            Need::Admin => state.admin(user)?,
            Need::User => {}
        }
    }
    Ok(())
}

/// A bcrypt hash of `password` at etcd's cost, computed off the async threads.
pub async fn hash_password(password: String) -> Result<Vec<u8>, Status> {
    tokio::task::spawn_blocking(move || bcrypt::hash(password, BCRYPT_COST))
        .await
        .map_err(|e| errors::atoll(Code::Internal, e))?
        .map(String::into_bytes)
        .map_err(|e| errors::atoll(Code::Internal, format!("hashing the password: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> AuthState {
        let mut s = AuthState::default();
        s.state.enabled = true;
        s.state.revision = 10;
        s.state.enabled_revision = 5;
        s.users.insert(
            "root".into(),
            UserRecord {
                name: "root".into(),
                roles: vec!["root".into()],
                tokens_from: 1,
                ..Default::default()
            },
        );
        s.users.insert(
            "alice".into(),
            UserRecord {
                name: "alice".into(),
                roles: vec!["reader".into()],
                tokens_from: 7,
                ..Default::default()
            },
        );
        s.roles.insert(
            "reader".into(),
            RoleRecord {
                name: "reader".into(),
                perms: vec![Permission {
                    perm_type: PermType::Read as i32,
                    key: b"/a/".to_vec(),
                    range_end: b"/a0".to_vec(),
                }],
            },
        );
        s.derive();
        s
    }

    fn user_token(name: &str, revision: u64, expiry_ms: u64) -> token::Claims {
        token::Claims {
            kind: token::Kind::User,
            issuer: 1,
            revision,
            expiry_ms,
            name: name.into(),
        }
    }

    /// etcd's algorithm and cost; a hash and a check take tens of milliseconds (printed).
    #[test]
    fn passwords_are_bcrypt_at_etcds_cost() {
        let t = std::time::Instant::now();
        let h = bcrypt::hash("secret", BCRYPT_COST).unwrap();
        let hashed = t.elapsed();
        assert!(h.starts_with("$2b$10$"), "{h}");
        let t = std::time::Instant::now();
        assert!(bcrypt::verify("secret", &h).unwrap());
        let checked = t.elapsed();
        assert!(!bcrypt::verify("Secret", &h).unwrap());
        eprintln!("bcrypt cost {BCRYPT_COST}: hash {hashed:?}, check {checked:?}");
    }

    #[test]
    fn records_round_trip() {
        let s = state();
        let mut recs: Vec<(Vec<u8>, Vec<u8>)> = vec![(state_key(), s.state.encode_to_vec())];
        for u in s.users.values() {
            recs.push((user_key(&u.name), u.encode_to_vec()));
        }
        for r in s.roles.values() {
            recs.push((role_key(&r.name), r.encode_to_vec()));
        }
        let back = AuthState::from_records(recs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())));
        assert_eq!(back, s);
        let (start, end) = records_range();
        assert!(recs.iter().all(|(k, _)| *k >= start && *k < end));
        assert!(atoll_keys::is_system_key(&start));
    }

    /// Only a definite answer makes a token invalid: a PD that cannot be asked, or a store
    /// that is not registered yet, leaves it unknown (the call is refused as unavailable, and
    /// retried; etcd clients would take "invalid auth token" as theirs and authenticate again).
    #[test]
    fn a_store_key_is_unknown_unless_pd_answers_definitely() {
        use atoll_pd_client::Error as E;
        use atoll_proto::metapb::Store;
        let k = token::new_key().verifying_key();
        let store = |key: Vec<u8>| Store {
            id: 2,
            auth_key: key,
            ..Default::default()
        };
        assert_eq!(
            key_lookup(Ok(store(k.to_bytes().to_vec()))),
            KeyLookup::Key(k)
        );
        assert_eq!(key_lookup(Ok(store(vec![]))), KeyLookup::NoKey);
        assert_eq!(key_lookup(Ok(store(vec![7; 5]))), KeyLookup::NoKey);
        assert_eq!(key_lookup(Err(E::StoreTombstone(2))), KeyLookup::NoKey);
        assert_eq!(key_lookup(Err(E::StoreNotFound(2))), KeyLookup::Unknown);
        assert_eq!(
            key_lookup(Err(E::Other("connection refused".into()))),
            KeyLookup::Unknown
        );
    }

    /// A store token checked by another store before PD has the issuer's key (a starting
    /// store's first calls, or PD not answering) is unavailable, not invalid: it failed with
    /// "invalid auth token" before, which etcd clients answer by authenticating again, in a
    /// loop. Once PD has the key it verifies; one signed by another key stays invalid.
    #[tokio::test]
    async fn a_token_whose_issuer_pd_does_not_know_yet_is_unavailable_not_invalid() {
        use atoll_proto::metapb::Store;
        let mock = Arc::new(atoll_test_cluster::MockPd::new());
        let pd: Arc<dyn PdClient> = mock.clone();
        let client = Client::with_pd(atoll_client::ClientConfig::new(vec![]), pd.clone());
        let me = AuthStore::new(1, client.clone(), pd.clone());
        let other = AuthStore::new(2, client, pd.clone());
        let tok = other.store_token();
        let e = me.verify(&tok).await.expect_err("store 2 is not in PD yet");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        pd.put_store(Store {
            id: 2,
            address: "127.0.0.1:2".into(),
            auth_key: other.public_key().to_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
        // PD is asked at most once a second per store.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let c = me.verify(&tok).await.unwrap().expect("verified");
        assert_eq!((c.kind, c.issuer), (token::Kind::Store, 2));
        let forged = token::sign(
            &token::new_key(),
            &token::Claims {
                kind: token::Kind::Store,
                issuer: 2,
                revision: 0,
                expiry_ms: u64::MAX,
                name: String::new(),
            },
        );
        assert_eq!(me.verify(&forged).await.unwrap(), None, "another key");
        assert_eq!(me.verify("junk").await.unwrap(), None);
    }

    #[test]
    fn an_older_read_never_replaces_a_newer_state() {
        assert!(super::replaces(true, 0, 0), "the first read");
        assert!(
            super::replaces(true, 5, 3),
            "the first read, whatever it found"
        );
        assert!(super::replaces(false, 2, 3));
        assert!(!super::replaces(false, 3, 3));
        assert!(!super::replaces(false, 3, 2));
        assert!(
            !super::replaces(false, 2, 0),
            "an empty read from before auth was touched"
        );
    }

    #[test]
    fn tokens_are_checked_against_the_state() {
        let s = state();
        let now = 1000;
        assert_eq!(
            s.user_of_token(&user_token("alice", 10, 2000), now),
            Some("alice".into())
        );
        assert_eq!(
            s.user_of_token(&user_token("alice", 10, 1000), now),
            None,
            "expired"
        );
        assert_eq!(
            s.user_of_token(&user_token("alice", 6, 2000), now),
            None,
            "issued before the password change"
        );
        assert_eq!(
            s.user_of_token(&user_token("bob", 10, 2000), now),
            None,
            "no such user"
        );
        assert_eq!(
            s.user_of_token(&user_token("root", 4, 2000), now),
            None,
            "issued before auth was enabled"
        );
        let mut off = s.clone();
        off.state.enabled = false;
        assert_eq!(off.user_of_token(&user_token("alice", 10, 2000), now), None);
        let store = token::Claims {
            kind: token::Kind::Store,
            ..user_token("alice", 10, 2000)
        };
        assert_eq!(s.user_of_token(&store, now), None);
    }

    /// With a client certificate and no token, the certificate's common name is the user
    /// (etcd's rule); a token wins over it; no certificate and no token is nobody.
    #[test]
    fn tls_common_name_is_the_user_without_a_token() {
        let s = state();
        let mut req = tonic::Request::new(());
        req.extensions_mut()
            .insert(atoll_util::identity::PeerIdentity {
                common_name: Some("alice".into()),
                remote_addr: Some("127.0.0.1:5000".parse().unwrap()),
                ..Default::default()
            });
        let peer = req.extensions().get::<atoll_util::identity::PeerIdentity>();
        let c = decide(&s, false, None, peer, 1000).unwrap();
        assert_eq!(c, Caller::User("alice".into()));
        assert!(check_in(&s, &c, &[Need::read(b"/a/x", b"")]).is_ok());
        assert!(check_in(&s, &c, &[Need::write(b"/a/x", b"")]).is_err());
        // A token is used first; a bad one is refused even with a certificate.
        let e = decide(&s, true, None, peer, 1000).unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let root = decide(&s, true, Some(user_token("root", 10, 2000)), peer, 1000);
        assert_eq!(root.unwrap(), Caller::User("root".into()));
        // No certificate name, no token.
        let anon = atoll_util::identity::PeerIdentity::default();
        assert_eq!(
            decide(&s, false, None, Some(&anon), 1000).unwrap(),
            Caller::Nobody
        );
        assert_eq!(decide(&s, false, None, None, 1000).unwrap(), Caller::Nobody);
        // A certificate naming a user that does not exist gets nothing.
        let ghost = atoll_util::identity::PeerIdentity {
            common_name: Some("ghost".into()),
            remote_addr: None,
            ..Default::default()
        };
        let g = decide(&s, false, None, Some(&ghost), 1000).unwrap();
        assert!(check_in(&s, &g, &[Need::read(b"/a/x", b"")]).is_err());
        // Auth off: everyone may do everything; a store's token always.
        let mut off = s.clone();
        off.state.enabled = false;
        assert_eq!(decide(&off, false, None, peer, 1000).unwrap(), Caller::Open);
        let store = token::Claims {
            kind: token::Kind::Store,
            ..user_token("", 0, 2000)
        };
        assert_eq!(
            decide(&s, true, Some(store), None, 1000).unwrap(),
            Caller::Store
        );
        let expired = token::Claims {
            kind: token::Kind::Store,
            ..user_token("", 0, 500)
        };
        assert!(decide(&s, true, Some(expired), None, 1000).is_err());
    }

    #[test]
    fn checks_answer_etcds_errors() {
        let s = state();
        let alice = Caller::User("alice".into());
        let root = Caller::User("root".into());
        let read_ax = [Need::read(b"/a/x", b"")];
        assert!(check_in(&s, &alice, &read_ax).is_ok());
        let e = check_in(&s, &alice, &[Need::write(b"/a/x", b"")]).unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert_eq!(e.message(), "etcdserver: permission denied");
        assert!(check_in(&s, &alice, &[Need::read(b"/b/x", b"")]).is_err());
        assert!(check_in(&s, &alice, &[Need::read(b"/a/", b"/a0")]).is_ok());
        assert!(check_in(&s, &alice, &[Need::read(b"/", b"/0")]).is_err());
        let e = check_in(&s, &alice, &[Need::Admin]).unwrap_err();
        assert_eq!(e.message(), "etcdserver: permission denied");
        let e = check_in(&s, &Caller::User("bob".into()), &[Need::Admin]).unwrap_err();
        assert_eq!(e.message(), "etcdserver: user name not found");
        let e = check_in(&s, &Caller::User("bob".into()), &read_ax).unwrap_err();
        assert_eq!(e.message(), "etcdserver: permission denied");
        let e = check_in(&s, &Caller::Nobody, &read_ax).unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (Code::InvalidArgument, "etcdserver: user name is empty")
        );
        assert!(check_in(&s, &root, &[Need::write(b"/b/x", b""), Need::Admin]).is_ok());
        assert!(check_in(&s, &Caller::Store, &[Need::Admin]).is_ok());
        assert!(check_in(&s, &Caller::Open, &[Need::Admin]).is_ok());
        // The system key space: root only, whatever the permissions say.
        let sys = state_key();
        assert!(check_in(&s, &alice, &[Need::read(&sys, b"")]).is_err());
        assert!(check_in(&s, &root, &[Need::read(&sys, b"")]).is_ok());
        let mut open = s.clone();
        open.roles
            .get_mut("reader")
            .unwrap()
            .perms
            .push(Permission {
                perm_type: PermType::Read as i32,
                key: b"/".to_vec(),
                range_end: vec![0],
            });
        open.derive();
        assert!(check_in(&open, &alice, &[Need::read(b"/z", b"\0")]).is_err());
        assert!(check_in(&open, &alice, &[Need::read(b"/z", b"")]).is_ok());
    }
}
