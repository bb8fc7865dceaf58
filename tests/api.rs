//! Control API tests against a temporary database: the real server on real
//! sockets (a unix socket and loopback TCP), driven through the real client.

use std::sync::Arc;

use hyper::{Method, StatusCode};
use sixpn::api::client::{Client, ClientError};
use sixpn::api::server::{self, ApiState, DataplaneHealth, DataplaneView, PeerStats};
use sixpn::api::{AddInstance, CreatePeer, PeerState};
use sixpn::model::{OrgName, PrivateKey, PublicKey};
use sixpn::store::sqlite::SqliteStore;
use sixpn::store::{Gateway, Store};

struct Api {
    _dir: tempfile::TempDir,
    unix: Client,
    tcp_addr: String,
    admin_token: String,
    store: Arc<SqliteStore>,
    stop: tokio::sync::watch::Sender<bool>,
}

impl Api {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    /// An API whose daemon runs `dataplane`.
    async fn start_with(dataplane: Option<Arc<dyn DataplaneView>>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path().join("state.db")).unwrap());
        for (name, region, host) in [("lhr-1", "lhr", "a7b:d6b"), ("iad-1", "iad", "a7b:1")] {
            store
                .register_gateway(&Gateway {
                    name: name.parse().unwrap(),
                    region: region.parse().unwrap(),
                    host_id: host.parse().unwrap(),
                    endpoint: format!("{name}.example.net:51820").parse().unwrap(),
                    public_key: PrivateKey::generate().public_key(),
                })
                .await
                .unwrap();
        }
        let admin_token = "admin-secret-token".to_owned();
        let state = Arc::new(ApiState {
            store: store.clone(),
            gateway: "lhr-1".parse().unwrap(),
            region: "lhr".parse().unwrap(),
            admin_token_sha256: Some(server::token_sha256(&admin_token)),
            dataplane,
            metrics: Vec::new(),
        });
        let router = server::router(state);
        let (stop, rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let sock = dir.path().join("api.sock");
        let unix = server::bind_unix(&sock).unwrap();
        tokio::spawn(server::serve_unix(unix, router.clone(), stopped()));
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let limits = server::TcpLimits {
            max_connections: FLOOD_CAP,
            header_timeout: std::time::Duration::from_secs(1),
            connection_timeout: std::time::Duration::from_secs(5),
        };
        let tcp_addr = format!("http://{}", tcp.local_addr().unwrap());
        tokio::spawn(server::serve_tcp(tcp, router, limits, None, stopped()));
        Self {
            unix: Client::new(sock.to_str().unwrap(), None).unwrap(),
            tcp_addr,
            admin_token,
            store,
            stop,
            _dir: dir,
        }
    }

    fn tcp(&self, token: Option<&str>) -> Client {
        Client::new(&self.tcp_addr, token.map(str::to_owned)).unwrap()
    }
}

/// The TCP connection cap of the test API.
const FLOOD_CAP: usize = 64;

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A dataplane that has run no pass until the test publishes what is
/// live (as a daemon just after a restart, its kernel already full).
#[derive(Default)]
struct FakeDataplane {
    live: tokio::sync::watch::Sender<Option<Vec<PublicKey>>>,
}

#[async_trait::async_trait]
impl DataplaneView for FakeDataplane {
    async fn wait_installed(&self, key: &PublicKey, timeout: std::time::Duration) -> bool {
        let mut rx = self.live.subscribe();
        let live = rx.wait_for(|l| l.as_ref().is_some_and(|l| l.contains(key)));
        let done = tokio::time::timeout(timeout, live).await.is_ok();
        done
    }

    async fn wait_published(&self, timeout: std::time::Duration) -> bool {
        let mut rx = self.live.subscribe();
        let done = tokio::time::timeout(timeout, rx.wait_for(Option::is_some))
            .await
            .is_ok();
        done
    }

    fn is_installed(&self, key: &PublicKey) -> bool {
        self.live.borrow().as_ref().is_some_and(|l| l.contains(key))
    }

    async fn peer_stats(&self, key: &PublicKey) -> Option<PeerStats> {
        self.is_installed(key).then(|| PeerStats {
            installed_since: Some(1),
            ..PeerStats::default()
        })
    }

    fn health(&self) -> DataplaneHealth {
        DataplaneHealth::default()
    }
}

fn org(s: &str) -> OrgName {
    s.parse().unwrap()
}

fn peer_req(region: &str, name: &str) -> CreatePeer {
    CreatePeer {
        region: region.parse().unwrap(),
        name: name.parse().unwrap(),
        public_key: PrivateKey::generate().public_key(),
        ephemeral: None,
    }
}

fn status(e: ClientError) -> (StatusCode, String) {
    match e {
        ClientError::Api { status, message } => (status, message),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn create_peer_returns_everything_the_client_needs() {
    let api = Api::start().await;
    let o = api.unix.create_org(&org("personal")).await.unwrap();
    assert_eq!(o.prefix.to_string(), "fdaa:0:1::/48");
    let req = peer_req("lhr", "basic");
    let p = api.unix.create_peer(&org("personal"), &req).await.unwrap();
    assert_eq!(p.address.to_string(), "fdaa:0:1:a7b:d6b:0:a:2");
    assert_eq!(p.network.to_string(), "fdaa:0:1:a7b:d6b:0:a:0/120");
    assert_eq!(p.org_prefix, o.prefix);
    assert_eq!(p.dns.to_string(), "fdaa:0:1::3");
    assert_eq!(p.gateway.as_str(), "lhr-1");
    assert_eq!(p.endpoint.as_str(), "lhr-1.example.net:51820");
    assert_eq!(p.public_key, req.public_key);
    let snap = api.store.snapshot().await.unwrap();
    assert_eq!(
        p.gateway_public_key,
        snap.gateway(&p.gateway).unwrap().public_key
    );
    // No dataplane in this daemon: the API says so rather than pretending.
    assert_eq!(p.state, PeerState::Registered);

    // A peer in another region lands on that region's gateway.
    let q = api
        .unix
        .create_peer(&org("personal"), &peer_req("iad", "other"))
        .await
        .unwrap();
    assert_eq!(q.gateway.as_str(), "iad-1");
    assert_eq!(q.address.to_string(), "fdaa:0:1:a7b:1:0:a:2");

    let list = api.unix.peers(&org("personal")).await.unwrap();
    assert_eq!(list.len(), 2);
    let st = api
        .unix
        .peer_status(&org("personal"), &"basic".parse().unwrap())
        .await
        .unwrap();
    assert!(st.note.is_some() && st.latest_handshake.is_none());

    api.unix
        .remove_peer(&org("personal"), &"basic".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(api.unix.peers(&org("personal")).await.unwrap().len(), 1);
    let (code, msg) = status(
        api.unix
            .remove_peer(&org("personal"), &"basic".parse().unwrap())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(msg.contains("peer 'basic' not found"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ephemeral_peers_show_their_ttl_and_deadline_and_bad_ttls_are_refused() {
    let api = Api::start().await;
    api.unix.create_org(&org("ci")).await.unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut req = peer_req("lhr", "job-1");
    req.ephemeral = Some(5_400);
    let p = api.unix.create_peer(&org("ci"), &req).await.unwrap();
    assert_eq!(p.ephemeral, Some(5_400));
    let stored = api.store.snapshot().await.unwrap();
    let created = stored.peers.iter().find(|q| q.name == p.name).unwrap();
    assert_eq!(created.ephemeral, Some(5_400));
    assert!(created.created_at >= before);
    assert_eq!(p.expires_at, Some(created.created_at + 5_400));
    api.unix
        .create_peer(&org("ci"), &peer_req("lhr", "laptop"))
        .await
        .unwrap();

    let list = api.unix.peers(&org("ci")).await.unwrap();
    let find = |n: &str| list.iter().find(|q| q.name.as_str() == n).unwrap();
    assert_eq!(
        (find("job-1").ephemeral, find("job-1").expires_at),
        (Some(5_400), Some(created.created_at + 5_400))
    );
    assert_eq!(
        (find("laptop").ephemeral, find("laptop").expires_at),
        (None, None)
    );
    // The JSON carries the fields (null for a normal peer).
    let (code, body) = api
        .unix
        .raw(Method::GET, "/v1/orgs/ci/peers", Vec::new())
        .await
        .unwrap();
    assert_eq!(code, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let rows = json.as_array().unwrap();
    assert!(rows
        .iter()
        .any(|r| r["ephemeral"] == 5_400 && r["expires_at"].is_u64()));
    assert!(rows
        .iter()
        .any(|r| r["ephemeral"].is_null() && r["expires_at"].is_null()));
    let st = api.unix.peer_status(&org("ci"), &p.name).await.unwrap();
    assert_eq!(st.peer.expires_at, p.expires_at);

    let before = api.store.snapshot().await.unwrap();
    for bad in [0, 30 * 24 * 3600 + 1, u64::MAX] {
        let mut req = peer_req("lhr", "job-2");
        req.ephemeral = Some(bad);
        let (code, msg) = status(api.unix.create_peer(&org("ci"), &req).await.unwrap_err());
        assert_eq!(code, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {msg}");
        assert!(
            msg.contains("ephemeral must be a time to live of 1 to 2592000 seconds"),
            "{bad}: {msg}"
        );
    }
    // Exactly 30 days is allowed.
    let mut req = peer_req("lhr", "job-3");
    req.ephemeral = Some(30 * 24 * 3600);
    let after_bad = api.store.snapshot().await.unwrap();
    assert_eq!(
        after_bad.peers, before.peers,
        "a refused create wrote nothing"
    );
    api.unix.create_peer(&org("ci"), &req).await.unwrap();
    // A body from an older client (no field) makes a normal peer.
    let (code, body) = api
        .unix
        .raw(
            Method::POST,
            "/v1/orgs/ci/peers",
            format!(
                r#"{{"region":"lhr","name":"old","public_key":"{}"}}"#,
                PrivateKey::generate().public_key()
            )
            .into_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(
        code,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let old: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(old["ephemeral"].is_null(), "{old}");
}

#[tokio::test(flavor = "multi_thread")]
async fn org_tokens_see_and_change_only_their_org() {
    let api = Api::start().await;
    let admin = api.tcp(Some(&api.admin_token));
    admin.create_org(&org("acme")).await.unwrap();
    admin.create_org(&org("globex")).await.unwrap();
    let acme_token = admin
        .create_org_token(&org("acme"), None)
        .await
        .unwrap()
        .token;
    let acme = api.tcp(Some(&acme_token));

    // Own org: allowed.
    acme.create_peer(&org("acme"), &peer_req("lhr", "laptop"))
        .await
        .unwrap();
    assert_eq!(acme.peers(&org("acme")).await.unwrap().len(), 1);
    let orgs = acme.orgs().await.unwrap();
    assert_eq!(orgs.len(), 1, "an org token lists only its org");
    assert_eq!(orgs[0].name.as_str(), "acme");

    // Other org: 403, and nothing written.
    for result in [
        acme.peers(&org("globex")).await.map(|_| ()),
        acme.create_peer(&org("globex"), &peer_req("lhr", "x"))
            .await
            .map(|_| ()),
        acme.instances(&org("globex"), None).await.map(|_| ()),
        acme.create_org(&org("mine")).await.map(|_| ()),
        acme.create_org_token(&org("acme"), None).await.map(|_| ()),
        acme.org_tokens(&org("acme")).await.map(|_| ()),
    ] {
        let (code, _) = status(result.unwrap_err());
        assert_eq!(code, StatusCode::FORBIDDEN);
    }
    assert!(admin.peers(&org("globex")).await.unwrap().is_empty());
    assert_eq!(admin.orgs().await.unwrap().len(), 2);

    // /metrics names every org and its traffic: admin only.
    let (code, body) = acme.raw(Method::GET, "/metrics", Vec::new()).await.unwrap();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(code, StatusCode::FORBIDDEN, "{text}");
    assert!(!text.contains("globex"), "{text}");
    let (code, _) = admin
        .raw(Method::GET, "/metrics", Vec::new())
        .await
        .unwrap();
    assert_eq!(code, StatusCode::OK);

    // No token, or a wrong one: 401.
    for client in [api.tcp(None), api.tcp(Some("nope"))] {
        let (code, msg) = status(client.orgs().await.unwrap_err());
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        assert!(msg.contains("SIXPN_TOKEN"), "{msg}");
    }
    // The unix socket is root-only, so it needs no token.
    assert_eq!(api.unix.orgs().await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn org_tokens_are_listed_without_secrets_expire_and_revoke_at_once() {
    let api = Api::start().await;
    let admin = api.tcp(Some(&api.admin_token));
    admin.create_org(&org("acme")).await.unwrap();
    admin.create_org(&org("globex")).await.unwrap();
    let forever = admin.create_org_token(&org("acme"), None).await.unwrap();
    let brief = admin.create_org_token(&org("acme"), Some(1)).await.unwrap();
    let other = admin.create_org_token(&org("globex"), None).await.unwrap();
    assert_eq!(forever.expires_at, None);
    assert!(brief.expires_at.is_some());

    // Listed by id, with times, never the secret; each org its own.
    let raw = admin
        .raw(Method::GET, "/v1/orgs/acme/tokens", Vec::new())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&raw.1).into_owned();
    assert_eq!(raw.0, StatusCode::OK, "{text}");
    for secret in [&forever.token, &brief.token, &other.token] {
        assert!(!text.contains(secret.as_str()), "{text}");
    }
    let listed = admin.org_tokens(&org("acme")).await.unwrap();
    let mut ids: Vec<_> = listed.iter().map(|t| t.id).collect();
    ids.sort();
    let mut want = vec![forever.id, brief.id];
    want.sort();
    assert_eq!(ids, want);
    assert!(listed.iter().all(|t| t.created_at > 0 && !t.expired));

    // An expired token gets 401 saying so.
    let acme_brief = api.tcp(Some(&brief.token));
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (code, msg) = status(acme_brief.peers(&org("acme")).await.unwrap_err());
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert!(
        msg.contains("expired") && msg.contains(&brief.id.to_string()),
        "{msg}"
    );
    assert!(admin
        .org_tokens(&org("acme"))
        .await
        .unwrap()
        .iter()
        .any(|t| t.id == brief.id && t.expired));

    // Revoked: the next request fails; the org's other token and the other
    // org's are untouched; revoking through the wrong org is a 404.
    let acme = api.tcp(Some(&forever.token));
    assert!(acme.peers(&org("acme")).await.is_ok());
    let (code, _) = status(
        admin
            .revoke_org_token(&org("globex"), &forever.id)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, StatusCode::NOT_FOUND);
    admin
        .revoke_org_token(&org("acme"), &forever.id)
        .await
        .unwrap();
    let (code, _) = status(acme.peers(&org("acme")).await.unwrap_err());
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, msg) = status(
        admin
            .revoke_org_token(&org("acme"), &forever.id)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, StatusCode::NOT_FOUND, "{msg}");
    assert!(api
        .tcp(Some(&other.token))
        .peers(&org("globex"))
        .await
        .is_ok());
    let left: Vec<_> = admin
        .org_tokens(&org("acme"))
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(left, vec![brief.id]);

    // Bad input: one clear 400, nothing written.
    for (path, body) in [
        ("/v1/orgs/acme/tokens", r#"{"expires_in_secs":0}"#),
        (
            "/v1/orgs/acme/tokens",
            r#"{"expires_in_secs":99999999999999}"#,
        ),
        ("/v1/orgs/acme/tokens", r#"{"expires":"1d"}"#),
    ] {
        let (code, body) = admin
            .raw(Method::POST, path, body.as_bytes().to_vec())
            .await
            .unwrap();
        assert_eq!(
            code,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(&body)
        );
    }
    let (code, _) = admin
        .raw(Method::DELETE, "/v1/orgs/acme/tokens/NOT-AN-ID", Vec::new())
        .await
        .unwrap();
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(admin.org_tokens(&org("acme")).await.unwrap().len(), 1);
    // A create without a body (older clients) still works.
    let (code, _) = admin
        .raw(Method::POST, "/v1/orgs/acme/tokens", Vec::new())
        .await
        .unwrap();
    assert_eq!(code, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_one_clear_error_and_write_nothing() {
    let api = Api::start().await;
    api.unix.create_org(&org("acme")).await.unwrap();
    api.unix
        .create_peer(&org("acme"), &peer_req("lhr", "laptop"))
        .await
        .unwrap();
    let before = api.store.snapshot().await.unwrap();

    let cases: Vec<(Method, &str, Vec<u8>, StatusCode, &str)> = vec![
        (
            Method::POST,
            "/v1/orgs/acme/peers",
            b"{not json".to_vec(),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            Method::POST,
            "/v1/orgs/acme/peers",
            br#"{"region":"lhr","name":"Bad_Name","public_key":"x"}"#.to_vec(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "peer name",
        ),
        (
            Method::POST,
            "/v1/orgs/acme/peers",
            format!(
                r#"{{"region":"lhr","name":"ok","public_key":"{}"}}"#,
                "A".repeat(43) + "="
            )
            .into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "all-zero",
        ),
        (
            Method::POST,
            "/v1/orgs/acme/peers",
            format!(
                r#"{{"region":"lhr","name":"ok","public_key":"{}","extra":1}}"#,
                PrivateKey::generate().public_key()
            )
            .into_bytes(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "extra",
        ),
        (
            Method::POST,
            "/v1/orgs/acme/peers",
            vec![b' '; 70 * 1024],
            StatusCode::PAYLOAD_TOO_LARGE,
            "too large",
        ),
        (
            Method::POST,
            "/v1/orgs/NOPE/peers",
            b"{}".to_vec(),
            StatusCode::BAD_REQUEST,
            "org name",
        ),
        (
            Method::POST,
            "/v1/orgs/acme/instances",
            br#"{"app":"web","region":"lhr"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "address",
        ),
        (
            Method::GET,
            "/v1/nothing",
            Vec::new(),
            StatusCode::NOT_FOUND,
            "no such API path",
        ),
    ];
    for (method, path, body, want, needle) in cases {
        let (code, body) = api.unix.raw(method, path, body).await.unwrap();
        let text = String::from_utf8_lossy(&body);
        assert_eq!(code, want, "{path}: {text}");
        let err: serde_json::Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{path}: error body is not JSON ({e}): {text}"));
        let msg = err["error"].as_str().unwrap();
        assert!(!msg.contains('\n'), "one line: {msg}");
        assert!(msg.contains(needle), "{needle:?} not in {msg}");
    }

    // Store-level refusals map to 404/409.
    let dup = api
        .unix
        .create_peer(&org("acme"), &peer_req("lhr", "laptop"))
        .await
        .unwrap_err();
    assert_eq!(status(dup).0, StatusCode::CONFLICT);
    let unknown = api
        .unix
        .create_peer(&org("nobody"), &peer_req("lhr", "x"))
        .await
        .unwrap_err();
    assert_eq!(status(unknown).0, StatusCode::NOT_FOUND);
    let (code, msg) = status(
        api.unix
            .create_peer(&org("acme"), &peer_req("syd", "x"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert!(msg.contains("region 'syd'"), "{msg}");
    let outside = AddInstance {
        app: "web".parse().unwrap(),
        region: "lhr".parse().unwrap(),
        address: Some("fdaa:0:99::2".parse().unwrap()),
        host: None,
        machine: None,
        id: None,
        process_group: None,
        started: true,
    };
    let (code, _) = status(
        api.unix
            .add_instance(&org("acme"), &outside)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, StatusCode::BAD_REQUEST);
    // An instance inside peers' /120s (slot 0 of lhr-1 here) would take a
    // peer's traffic: refused, whether or not the slot is taken yet.
    for taken in ["fdaa:0:1:a7b:d6b:0:a:2", "fdaa:0:1:a7b:1:0:ff:2"] {
        let at_peer = AddInstance {
            address: Some(taken.parse().unwrap()),
            ..outside.clone()
        };
        let (code, msg) = status(
            api.unix
                .add_instance(&org("acme"), &at_peer)
                .await
                .unwrap_err(),
        );
        assert_eq!(code, StatusCode::BAD_REQUEST, "{taken}: {msg}");
        assert!(msg.contains("peers' /120s"), "{msg}");
    }
    // A gateway's own key as a peer's: WireGuard would ignore it for ever.
    for gw in &before.gateways {
        let own = CreatePeer {
            public_key: gw.public_key,
            ephemeral: None,
            ..peer_req("lhr", "own-key")
        };
        let (code, msg) = status(api.unix.create_peer(&org("acme"), &own).await.unwrap_err());
        assert_eq!(code, StatusCode::CONFLICT, "{msg}");
        assert!(msg.contains(&format!("gateway '{}'", gw.name)), "{msg}");
        assert!(msg.contains("own key"), "{msg}");
    }

    assert_eq!(*api.store.snapshot().await.unwrap(), *before);
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_round_trip() {
    let api = Api::start().await;
    api.unix.create_org(&org("acme")).await.unwrap();
    let add = |app: &str, machine: &str, started: bool| AddInstance {
        app: app.parse().unwrap(),
        region: "lhr".parse().unwrap(),
        address: None,
        host: Some("a7b:7d".parse().unwrap()),
        machine: Some(machine.parse().unwrap()),
        id: None,
        process_group: Some("web".parse().unwrap()),
        started,
    };
    let a = api
        .unix
        .add_instance(&org("acme"), &add("web", "f066:b83b", true))
        .await
        .unwrap();
    assert_eq!(a.address.to_string(), "fdaa:0:1:a7b:7d:f066:b83b:2");
    api.unix
        .add_instance(&org("acme"), &add("db", "1:2", false))
        .await
        .unwrap();
    let all = api.unix.instances(&org("acme"), None).await.unwrap();
    assert_eq!(all.len(), 2);
    let web = api
        .unix
        .instances(&org("acme"), Some(&"web".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(web, vec![a.clone()]);
    let (code, _) = status(
        api.unix
            .add_instance(&org("acme"), &add("web", "f066:b83b", true))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, StatusCode::CONFLICT);
    api.unix
        .remove_instance(&org("acme"), &a.app, &a.id)
        .await
        .unwrap();
    assert_eq!(
        api.unix.instances(&org("acme"), None).await.unwrap().len(),
        1
    );
    let h = api.unix.health().await.unwrap();
    assert_eq!(h.status, "ok");
    assert!(h.revision > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_get_distinct_addresses() {
    let api = Api::start().await;
    api.unix.create_org(&org("acme")).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let c = api.unix.clone();
        tasks.spawn(async move {
            c.create_peer(&org("acme"), &peer_req("lhr", &format!("p{i}")))
                .await
                .unwrap()
                .address
        });
    }
    let mut addrs = std::collections::HashSet::new();
    while let Some(a) = tasks.join_next().await {
        assert!(addrs.insert(a.unwrap()));
    }
    assert_eq!(addrs.len(), 50);
}

/// An API whose dataplane has run no pass yet, with a peer of this
/// gateway registered in the store (as a daemon just after a restart).
async fn started_with_a_peer() -> (Api, Arc<FakeDataplane>, CreatePeer) {
    let dp = Arc::new(FakeDataplane::default());
    let api = Api::start_with(Some(dp.clone())).await;
    api.unix.create_org(&org("personal")).await.unwrap();
    let req = peer_req("lhr", "keep");
    api.store
        .create_peer(&sixpn::store::NewPeer {
            org: org("personal"),
            name: req.name.clone(),
            region: req.region.clone(),
            public_key: req.public_key,
            ephemeral: None,
        })
        .await
        .unwrap();
    (api, dp, req)
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_states_just_after_a_start_wait_for_the_first_pass() {
    let (api, dp, req) = started_with_a_peer().await;
    // The first pass finds the peer live a moment after the API is up.
    let publisher = dp.clone();
    let key = req.public_key;
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        publisher.live.send_replace(Some(vec![key]));
    });
    let list = api.unix.peers(&org("personal")).await.unwrap();
    assert_eq!(list[0].state, PeerState::Installed, "{list:?}");
    let st = api
        .unix
        .peer_status(&org("personal"), &req.name)
        .await
        .unwrap();
    assert_eq!(st.peer.state, PeerState::Installed);
    assert_eq!(st.installed_since, Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn peer_states_answer_pending_when_the_first_pass_never_ends() {
    let (api, _dp, _) = started_with_a_peer().await;
    let t0 = std::time::Instant::now();
    let list = api.unix.peers(&org("personal")).await.unwrap();
    assert_eq!(list[0].state, PeerState::Pending);
    let took = t0.elapsed();
    assert!(
        took >= server::FIRST_PASS_WAIT && took < server::FIRST_PASS_WAIT * 2,
        "a list with no pass yet took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_silent_tcp_connections_stalls_nothing() {
    use std::io::{Read, Write};
    let api = Api::start().await;
    api.unix.create_org(&org("acme")).await.unwrap();
    let addr = api.tcp_addr.trim_start_matches("http://").to_owned();
    // Four times the cap, each having sent one byte of a request and no more.
    let mut flood = Vec::new();
    for _ in 0..FLOOD_CAP * 4 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let _ = s.write_all(b"G");
        flood.push(s);
    }
    // The root socket answers at once, and a create completes.
    let t0 = std::time::Instant::now();
    api.unix.orgs().await.unwrap();
    api.unix
        .create_peer(&org("acme"), &peer_req("lhr", "during-flood"))
        .await
        .unwrap();
    let took = t0.elapsed();
    assert!(
        took < std::time::Duration::from_secs(1),
        "unix socket took {took:?} under the flood"
    );
    eprintln!(
        "unix socket list + create under a {}-connection flood: {took:?}",
        flood.len()
    );
    // Past the header timeout every one of them has been closed by the server.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    for (i, s) in flood.iter_mut().enumerate() {
        s.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let mut answer = Vec::new();
        match s.read_to_end(&mut answer) {
            // Closed, possibly after a 408 for the timed-out request.
            Ok(_) => {}
            Err(e) => assert!(
                e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut,
                "connection {i} still open after the header timeout"
            ),
        }
    }
    drop(flood);
    // And TCP serves again.
    let admin = api.tcp(Some(&api.admin_token));
    assert_eq!(admin.orgs().await.unwrap().len(), 1);
}
