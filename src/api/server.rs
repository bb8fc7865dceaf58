//! The control API server (axum). Handlers validate at the edge (paths and
//! bodies parse into model types), check the caller's scope, call the store,
//! and map errors to HTTP statuses in one place ([`ApiError`]).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, Path as UrlPath, Query, State,
};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{
    AddInstance, CreateOrg, CreateOrgToken, CreatePeer, ErrorBody, Health, InstanceInfo, OrgInfo,
    OrgToken, PeerInfo, PeerStatus, RegionInfo, TokenInfo, MAX_BODY, MAX_EPHEMERAL_TTL_SECS,
    MAX_TOKEN_LIFETIME_SECS,
};
use crate::model::{AppName, GatewayName, InstanceId, OrgName, PeerName, RegionName, TokenId};
use crate::store::{
    InstanceAddress, NewInstance, NewOrgToken, NewPeer, OrgTokenRecord, Store, StoreError,
};

pub use crate::liveness::{
    DataplaneHealth, DataplaneView, PeerStats, FIRST_PASS_WAIT, INSTALL_WAIT,
};

/// Shared state of all handlers.
pub struct ApiState {
    /// The store.
    pub store: Arc<dyn Store>,
    /// This gateway's name.
    pub gateway: GatewayName,
    /// This gateway's region.
    pub region: RegionName,
    /// SHA-256 of the admin bearer token (TCP only).
    pub admin_token_sha256: Option<[u8; 32]>,
    /// The dataplane, when this daemon runs one.
    pub dataplane: Option<Arc<dyn DataplaneView>>,
    /// What `/metrics` shows.
    pub metrics: Vec<Arc<dyn super::metrics::MetricsSource>>,
}

impl ApiState {
    /// Where the handlers learn whether a peer is live.
    fn liveness(&self) -> crate::liveness::Liveness<'_> {
        crate::liveness::Liveness::new(
            self.store.as_ref(),
            &self.gateway,
            self.dataplane.as_deref(),
        )
    }
}

/// How a request arrived; set by the listener, not by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The root-only unix socket: the caller is an admin.
    Unix,
    /// TCP: the caller must present a bearer token.
    Tcp,
}

/// An error with its HTTP status; rendered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match e {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Conflict(_) | StoreError::Exhausted(_) => StatusCode::CONFLICT,
            StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
            StoreError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "store call failed");
        }
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// A JSON body whose rejections (malformed, wrong type, too large) become
/// one-line JSON errors.
struct Body<T>(T);

impl<S, T> FromRequest<S> for Body<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(JsonRejection::BytesRejection(e)) => Err(ApiError::new(
                e.status(),
                format!("request body too large or unreadable (limit {MAX_BODY} bytes)"),
            )),
            Err(e) => Err(ApiError::new(e.status(), e.body_text())),
        }
    }
}

/// Who is calling: an admin, or a token scoped to one org.
#[derive(Debug, Clone)]
enum Caller {
    Admin,
    Org(OrgName),
}

impl Caller {
    fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Org(_) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "this needs the admin token",
            )),
        }
    }
    fn require_org(&self, org: &OrgName) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Org(o) if o == org => Ok(()),
            Caller::Org(o) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("this token is scoped to org '{o}', not '{org}'"),
            )),
        }
    }
}

/// Hashes a bearer token for lookup; tokens are stored only as hashes.
pub fn token_sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A fresh random bearer token (`sixpn_` + 32 random bytes, base64url).
pub fn new_token() -> String {
    use base64::Engine as _;
    let raw: [u8; 32] = rand::random();
    format!(
        "sixpn_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    )
}

/// Now, in unix seconds (the clock tokens expire by).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Compares two hashes in constant time.
fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ApiError> {
        let transport = parts
            .extensions
            .get::<Transport>()
            .copied()
            .unwrap_or(Transport::Tcp);
        if transport == Transport::Unix {
            return Ok(Caller::Admin);
        }
        let unauthorized = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or unknown bearer token (set SIXPN_TOKEN)",
            )
        };
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(unauthorized)?;
        let sha = token_sha256(token);
        if state
            .admin_token_sha256
            .as_ref()
            .is_some_and(|admin| same_hash(admin, &sha))
        {
            return Ok(Caller::Admin);
        }
        match state.store.token_org(sha).await? {
            Some(t) if t.expired(unix_now()) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                format!(
                    "this token ({}) of org '{}' has expired; ask an admin for a new one",
                    t.id, t.org
                ),
            )),
            Some(t) => Ok(Caller::Org(t.org)),
            None => Err(unauthorized()),
        }
    }
}

/// The `{org}` path segment, validated before any body is read.
struct OrgPath(OrgName);

impl<S: Send + Sync> FromRequestParts<S> for OrgPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let UrlPath(params) =
            UrlPath::<std::collections::HashMap<String, String>>::from_request_parts(parts, state)
                .await
                .map_err(|e| ApiError::bad_request(e.body_text()))?;
        let org = params
            .get("org")
            .ok_or_else(|| ApiError::bad_request("missing org in path"))?;
        parse(org).map(OrgPath)
    }
}

fn parse<T: std::str::FromStr<Err = crate::model::InvalidValue>>(s: &str) -> Result<T, ApiError> {
    s.parse()
        .map_err(|e: crate::model::InvalidValue| ApiError::bad_request(e.to_string()))
}

/// The API's routes, with `state`. Each listener adds its [`Transport`].
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/regions", get(regions))
        .route("/v1/orgs", get(list_orgs).post(create_org))
        .route("/v1/orgs/{org}/tokens", get(list_tokens).post(create_token))
        .route("/v1/orgs/{org}/tokens/{id}", delete(revoke_token))
        .route("/v1/orgs/{org}/peers", get(list_peers).post(create_peer))
        .route("/v1/orgs/{org}/peers/{name}", delete(remove_peer))
        .route("/v1/orgs/{org}/peers/{name}/status", get(peer_status))
        .route(
            "/v1/orgs/{org}/instances",
            get(list_instances).post(add_instance),
        )
        .route(
            "/v1/orgs/{org}/instances/{app}/{id}",
            delete(remove_instance),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such API path") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn health(State(st): State<Arc<ApiState>>, _caller: Caller) -> ApiResult<Health> {
    let revision = *st.store.subscribe().borrow();
    Ok(Json(Health {
        status: "ok".into(),
        gateway: st.gateway.clone(),
        region: st.region.clone(),
        revision,
        dataplane: st.dataplane.as_ref().map(|d| d.health()),
    }))
}

/// Liveness for load balancers and probes: no token needed, no secrets in
/// it. 200 once the kernel has matched the store, 503 before.
async fn healthz(State(st): State<Arc<ApiState>>) -> Response {
    let dp = st.dataplane.as_ref().map(|d| d.health());
    let synced = dp.as_ref().is_none_or(|d| d.last_sync.is_some());
    let body = serde_json::json!({
        "status": if synced { "ok" } else { "starting" },
        "gateway": st.gateway,
        "last_sync": dp.as_ref().and_then(|d| d.last_sync),
        "installed_peers": dp.as_ref().map(|d| d.installed_peers),
        "registered_peers": dp.as_ref().map(|d| d.registered_peers),
    });
    let code = if synced {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Prometheus text exposition. Admin only: the series cover every org on
/// this gateway (names, peer counts, traffic), which no org token may read.
async fn metrics(State(st): State<Arc<ApiState>>, caller: Caller) -> Result<Response, ApiError> {
    caller.require_admin()?;
    let mut out = String::with_capacity(4096);
    for m in &st.metrics {
        m.render(&mut out).await;
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response())
}

async fn regions(State(st): State<Arc<ApiState>>, _caller: Caller) -> ApiResult<Vec<RegionInfo>> {
    let snap = st.store.snapshot().await?;
    let mut out: Vec<RegionInfo> = Vec::new();
    for g in &snap.gateways {
        match out.iter_mut().find(|r| r.region == g.region) {
            Some(r) => r.gateways.push(g.name.clone()),
            None => out.push(RegionInfo {
                region: g.region.clone(),
                gateways: vec![g.name.clone()],
            }),
        }
    }
    out.sort_by(|a, b| a.region.cmp(&b.region));
    Ok(Json(out))
}

async fn list_orgs(State(st): State<Arc<ApiState>>, caller: Caller) -> ApiResult<Vec<OrgInfo>> {
    let snap = st.store.snapshot().await?;
    Ok(Json(
        snap.orgs
            .iter()
            .filter(|o| caller.require_org(&o.name).is_ok())
            .map(OrgInfo::from)
            .collect(),
    ))
}

async fn create_org(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Body(req): Body<CreateOrg>,
) -> Result<(StatusCode, Json<OrgInfo>), ApiError> {
    caller.require_admin()?;
    let org = st.store.create_org(&req.name).await?;
    tracing::info!(org = %org.name, prefix = %org.prefix(), "org created");
    Ok((StatusCode::CREATED, Json(OrgInfo::from(&org))))
}

async fn create_token(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    OrgPath(org): OrgPath,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<OrgToken>), ApiError> {
    caller.require_admin()?;
    // No body at all is a token that never expires (what older clients send).
    let req: CreateOrgToken = if body.iter().all(u8::is_ascii_whitespace) {
        CreateOrgToken::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("bad body: {e}")))?
    };
    let now = unix_now();
    let expires_at = match req.expires_in_secs {
        None => None,
        Some(0) => return Err(ApiError::bad_request("expires_in_secs must be at least 1")),
        Some(s) if s > MAX_TOKEN_LIFETIME_SECS => {
            return Err(ApiError::bad_request(format!(
                "expires_in_secs may be at most {MAX_TOKEN_LIFETIME_SECS} (100 years); \
                 leave it out for a token that never expires"
            )))
        }
        Some(s) => Some(now + s),
    };
    let token = new_token();
    let rec = st
        .store
        .add_org_token(&NewOrgToken {
            org: org.clone(),
            sha256: token_sha256(&token),
            created_at: now,
            expires_at,
        })
        .await?;
    tracing::info!(org = %org, id = %rec.id, expires_at = ?rec.expires_at, "org token created");
    Ok((
        StatusCode::CREATED,
        Json(OrgToken {
            org,
            token,
            id: rec.id,
            expires_at: rec.expires_at,
        }),
    ))
}

async fn list_tokens(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    OrgPath(org): OrgPath,
) -> ApiResult<Vec<TokenInfo>> {
    caller.require_admin()?;
    let now = unix_now();
    let tokens = st.store.org_tokens(&org).await?;
    Ok(Json(
        tokens.into_iter().map(|t| token_info(t, now)).collect(),
    ))
}

fn token_info(t: OrgTokenRecord, now: u64) -> TokenInfo {
    TokenInfo {
        expired: t.expired(now),
        id: t.id,
        org: t.org,
        created_at: t.created_at,
        expires_at: t.expires_at,
    }
}

async fn revoke_token(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    UrlPath((org, id)): UrlPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let org: OrgName = parse(&org)?;
    let id: TokenId = parse(&id)?;
    caller.require_admin()?;
    let t = st.store.revoke_org_token(&org, &id).await?;
    tracing::info!(org = %t.org, id = %t.id, "org token revoked");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_peers(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    OrgPath(org): OrgPath,
) -> ApiResult<Vec<PeerInfo>> {
    caller.require_org(&org)?;
    let snap = st.store.snapshot().await?;
    if snap.org(&org).is_none() {
        return Err(StoreError::NotFound(format!("org '{org}' not found")).into());
    }
    let live = st.liveness();
    live.settle().await;
    Ok(Json(
        snap.peers
            .iter()
            .filter(|p| p.org == org)
            .filter_map(|p| PeerInfo::from_snapshot(p, &snap, live.state(p)))
            .collect(),
    ))
}

async fn create_peer(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    OrgPath(org): OrgPath,
    Body(req): Body<CreatePeer>,
) -> Result<(StatusCode, Json<PeerInfo>), ApiError> {
    caller.require_org(&org)?;
    match req.ephemeral {
        Some(ttl) if ttl == 0 || ttl > MAX_EPHEMERAL_TTL_SECS => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "ephemeral must be a time to live of 1 to {MAX_EPHEMERAL_TTL_SECS} seconds \
                     (30 days), not {ttl}; leave it out for a normal peer"
                ),
            ))
        }
        _ => {}
    }
    // WireGuard would take a gateway's own key as a peer silently and never
    // install it; say so instead.
    let snap = st.store.snapshot().await?;
    if let Some(g) = snap
        .gateways
        .iter()
        .find(|g| g.public_key == req.public_key)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "public key {} is gateway '{}''s own key; a peer needs a key pair of its own",
                req.public_key, g.name
            ),
        ));
    }
    let (peer, gateway) = st
        .store
        .create_peer(&NewPeer {
            org: org.clone(),
            name: req.name,
            region: req.region,
            public_key: req.public_key,
            ephemeral: req.ephemeral,
        })
        .await?;
    // A backend with a cap (wireguard-go, every peer installed) can't take
    // one more: say so now rather than leave the peer pending for ever.
    if let Some(dp) = st.dataplane.as_ref().filter(|_| peer.gateway == st.gateway) {
        if let Some(cap) = dp
            .peer_cap()
            .filter(|cap| dp.health().registered_peers >= *cap)
        {
            st.store.remove_peer(&org, &peer.name).await?;
            return Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                format!(
                    "gateway '{}' holds {cap} peers, as many as {} can: use the kernel module \
                     (backend = \"kernel\") or peers = \"jit\" on it",
                    st.gateway,
                    dp.health().backend
                ),
            ));
        }
    }
    let prefix = crate::model::OrgPrefix::of(peer.net.network())
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "peer outside 6PN"))?;
    tracing::info!(org = %org, peer = %peer.name, gateway = %peer.gateway,
        address = %peer.net.peer_addr(), ephemeral = ?peer.ephemeral, "peer registered");
    let state = st.liveness().wait(&peer, INSTALL_WAIT).await;
    let info = PeerInfo::new(&peer, prefix, &gateway.public_key, &gateway.endpoint, state);
    Ok((StatusCode::CREATED, Json(info)))
}

async fn remove_peer(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    UrlPath((org, name)): UrlPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let org: OrgName = parse(&org)?;
    let name: PeerName = parse(&name)?;
    caller.require_org(&org)?;
    let peer = st.store.remove_peer(&org, &name).await?;
    tracing::info!(org = %org, peer = %peer.name, "peer removed");
    Ok(StatusCode::NO_CONTENT)
}

async fn peer_status(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    UrlPath((org, name)): UrlPath<(String, String)>,
) -> ApiResult<PeerStatus> {
    let org: OrgName = parse(&org)?;
    let name: PeerName = parse(&name)?;
    caller.require_org(&org)?;
    let snap = st.store.snapshot().await?;
    let peer = snap
        .peers
        .iter()
        .find(|p| p.org == org && p.name == name)
        .ok_or_else(|| StoreError::NotFound(format!("peer '{name}' not found in org '{org}'")))?;
    let crate::liveness::Status { state, stats, note } = st.liveness().status(peer).await;
    let info = PeerInfo::from_snapshot(peer, &snap, state).ok_or_else(|| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "peer's gateway is missing",
        )
    })?;
    let stats = stats.unwrap_or_default();
    Ok(Json(PeerStatus {
        peer: info,
        endpoint: stats.endpoint,
        latest_handshake: stats.latest_handshake,
        rx_bytes: note.is_none().then_some(stats.rx_bytes),
        tx_bytes: note.is_none().then_some(stats.tx_bytes),
        installed_since: stats.installed_since,
        installed_by: stats.installed_by.map(str::to_owned),
        evicted_at: stats.evicted_at,
        note,
    }))
}

#[derive(Deserialize)]
struct AppFilter {
    app: Option<String>,
}

async fn list_instances(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    OrgPath(org): OrgPath,
    Query(filter): Query<AppFilter>,
) -> ApiResult<Vec<InstanceInfo>> {
    caller.require_org(&org)?;
    let app: Option<AppName> = filter.app.as_deref().map(parse).transpose()?;
    let snap = st.store.snapshot().await?;
    if snap.org(&org).is_none() {
        return Err(StoreError::NotFound(format!("org '{org}' not found")).into());
    }
    Ok(Json(
        snap.instances
            .iter()
            .filter(|i| i.org == org && app.as_ref().is_none_or(|a| &i.app == a))
            .cloned()
            .collect(),
    ))
}

async fn add_instance(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    OrgPath(org): OrgPath,
    Body(req): Body<AddInstance>,
) -> Result<(StatusCode, Json<InstanceInfo>), ApiError> {
    caller.require_org(&org)?;
    let address = match (req.address, req.host, req.machine) {
        (Some(a), None, None) => InstanceAddress::Address(a),
        (None, Some(host), Some(machine)) => InstanceAddress::HostMachine { host, machine },
        _ => {
            return Err(ApiError::bad_request(
                "give either address, or host and machine",
            ))
        }
    };
    let new = NewInstance {
        org,
        app: req.app,
        id: req.id,
        region: req.region,
        address,
        process_group: req.process_group,
        started: req.started,
    };
    // An instance among a gateway's peer /120s would take a peer's traffic.
    let snap = st.store.snapshot().await?;
    if let Some(o) = snap.org(&new.org) {
        let (addr, _) = new.resolve(o.prefix())?;
        let host = crate::model::peer_region_host(addr);
        if let Some(g) = snap.gateways.iter().find(|g| Some(g.host_id) == host) {
            return Err(ApiError::bad_request(format!(
                "address {addr} lies among gateway '{}''s WireGuard peers' /120s \
                 (…:0:a:0 and up on host {}); an instance can't share it",
                g.name, g.host_id
            )));
        }
    }
    let inst = st.store.add_instance(&new).await?;
    tracing::info!(org = %inst.org, app = %inst.app, instance = %inst.id,
        address = %inst.address, "instance added");
    Ok((StatusCode::CREATED, Json(inst)))
}

async fn remove_instance(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    UrlPath((org, app, id)): UrlPath<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let org: OrgName = parse(&org)?;
    let app: AppName = parse(&app)?;
    let id: InstanceId = parse(&id)?;
    caller.require_org(&org)?;
    let inst = st.store.remove_instance(&org, &app, &id).await?;
    tracing::info!(org = %org, app = %app, instance = %inst.id, "instance removed");
    Ok(StatusCode::NO_CONTENT)
}

/// Why a listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another process answers on the socket.
    #[error("another process already serves the API socket {0}")]
    InUse(String),
    /// The socket path is taken by something that is not a socket.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(String),
    /// Binding or setting permissions failed.
    #[error("cannot listen on {what}: {source}")]
    Io {
        /// The socket path or address.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Binds the root-only unix socket: removes a stale socket file left by a
/// crashed daemon, refuses to steal a live one, and makes it mode 0600.
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ListenError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |source| ListenError::Io {
        what: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(ListenError::NotASocket(path.display().to_string()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ListenError::InUse(path.display().to_string()));
        }
        // A stale socket left by a daemon that crashed.
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves `router` on the unix socket until `shutdown` resolves.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router.layer(Extension(Transport::Unix)))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Bounds on the TCP listener, which anyone who can reach it may open
/// connections to (no token is needed to connect).
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    /// Connections served at once; one more is closed as soon as accepted,
    /// so a flood holds at most this many descriptors.
    pub max_connections: usize,
    /// A request's headers must arrive within this.
    pub header_timeout: Duration,
    /// A whole connection (one request: no keep-alive) lasts at most this.
    pub connection_timeout: Duration,
}

impl Default for TcpLimits {
    fn default() -> Self {
        Self {
            max_connections: crate::config::DEFAULT_MAX_CONNECTIONS,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
        }
    }
}

/// One request on one (plain or TLS) connection, within `limits`.
async fn serve_conn<S>(stream: S, router: Router, limits: TcpLimits, peer: std::net::SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let service = hyper_util::service::TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(limits.connection_timeout, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "API connection ended"),
        Err(_) => tracing::debug!(%peer, "API connection took too long; closed"),
    }
}

/// Serves `router` on TCP (bearer tokens required) until `shutdown`
/// resolves, within `limits`: a connection that sends no complete request
/// in time is closed, each serves one request, and past the cap new ones
/// are closed at once. The unix socket and the reconciler share nothing
/// with this listener but the process's descriptor limit, which the cap
/// keeps it far from.
///
/// With `tls`, each connection is a TLS one: its handshake must complete
/// within the header timeout, and the certificate is the one `tls` holds
/// when the connection is accepted (so a reload changes only new ones).
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: TcpLimits,
    tls: Option<Arc<super::tls::ServerTls>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router.layer(Extension(Transport::Tcp));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut shutdown = std::pin::pin!(shutdown);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "API connection refused: at the connection cap");
            drop(stream);
            continue;
        };
        let router = router.clone();
        let acceptor = tls.as_ref().and_then(|t| t.acceptor());
        conns.spawn(async move {
            let _permit = permit;
            match acceptor {
                None => serve_conn(stream, router, limits, peer).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => serve_conn(tls, router, limits, peer).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "API TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "API TLS handshake took too long; closed"),
                    }
                }
            }
        });
    }
    // In-flight requests finish (bounded by the connection timeout).
    let _ = tokio::time::timeout(limits.connection_timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}
