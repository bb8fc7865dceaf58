//! The control API client the CLI uses: HTTP/1.1 over the unix socket or TCP
//! (`http://host:port`), with a bearer token for TCP.

use std::path::PathBuf;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    AddInstance, CreateOrg, CreateOrgToken, CreatePeer, ErrorBody, Health, InstanceInfo, OrgInfo,
    OrgToken, PeerInfo, PeerStatus, RegionInfo, TokenInfo,
};
use crate::model::{AppName, InstanceId, OrgName, PeerName, TokenId};

/// One HTTP/1.1 request over an open stream.
async fn exchange<S>(
    stream: S,
    req: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let proto = |e: hyper::Error| ClientError::Protocol(e.to_string());
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(proto)?;
    tokio::spawn(conn);
    tx.send_request(req).await.map_err(proto)
}

/// The largest response the client reads (lists of 100k peers fit).
const MAX_RESPONSE: usize = 256 * 1024 * 1024;

/// What can go wrong talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The `--api` value is not a socket path or an http URL.
    #[error("bad API address {0:?}: {1}")]
    Address(String, &'static str),
    /// Nothing answers there.
    #[error("cannot reach the sixpn API at {target}: {source} (is `sixpn gateway` running?)")]
    Connect {
        /// Where we tried.
        target: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server answered with an error.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The server's one-line message.
        message: String,
    },
    /// The exchange itself failed.
    #[error("API protocol error: {0}")]
    Protocol(String),
    /// TLS could not be set up, or the server's certificate is not trusted
    /// (nothing was sent).
    #[error("TLS to {target}: {reason}")]
    Tls {
        /// Where we tried.
        target: String,
        /// Why (e.g. an unknown issuer: set SIXPN_CA).
        reason: String,
    },
}

#[derive(Clone)]
enum Target {
    Unix(PathBuf),
    Tcp {
        authority: String,
    },
    Https {
        authority: String,
        host: rustls_pki_types::ServerName<'static>,
        tls: tokio_rustls::TlsConnector,
    },
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "Unix({})", p.display()),
            Target::Tcp { authority } => write!(f, "Tcp({authority})"),
            Target::Https { authority, .. } => write!(f, "Https({authority})"),
        }
    }
}

/// `host:port` of an `http(s)://host:port` address, and the host alone.
fn authority<'a>(
    api: &str,
    rest: &'a str,
    scheme: &'static str,
) -> Result<(&'a str, &'a str), ClientError> {
    let authority = rest.trim_end_matches('/');
    let expected = if scheme == "https" {
        "expected https://host:port"
    } else {
        "expected http://host:port"
    };
    if authority.is_empty() || authority.contains('/') {
        return Err(ClientError::Address(api.into(), expected));
    }
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => return Err(ClientError::Address(api.into(), expected)),
    };
    Ok((
        authority,
        host.trim_start_matches('[').trim_end_matches(']'),
    ))
}

/// A client for one API endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    target: Target,
    token: Option<String>,
}

impl Client {
    /// `api` is a unix socket path, `http://host:port` or
    /// `https://host:port`; `token` is sent as a bearer token (needed for
    /// TCP). HTTPS trusts the system's roots.
    pub fn new(api: &str, token: Option<String>) -> Result<Self, ClientError> {
        Self::with_ca(api, token, None)
    }

    /// As [`Client::new`]; HTTPS trusts only the CA certificates in `ca`
    /// (PEM) when given.
    pub fn with_ca(
        api: &str,
        token: Option<String>,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, ClientError> {
        let target = if let Some(rest) = api.strip_prefix("http://") {
            let (authority, _) = authority(api, rest, "http")?;
            Target::Tcp {
                authority: authority.into(),
            }
        } else if let Some(rest) = api.strip_prefix("https://") {
            let (authority, host) = authority(api, rest, "https")?;
            let host = rustls_pki_types::ServerName::try_from(host.to_owned())
                .map_err(|_| ClientError::Address(api.into(), "not a host name or address"))?;
            let tls = super::tls::connector(ca).map_err(|e| ClientError::Tls {
                target: api.trim_end_matches('/').into(),
                reason: e.to_string(),
            })?;
            Target::Https {
                authority: authority.into(),
                host,
                tls,
            }
        } else if api.is_empty() {
            return Err(ClientError::Address(api.into(), "empty"));
        } else {
            Target::Unix(api.into())
        };
        Ok(Self {
            target,
            token: token.filter(|t| !t.is_empty()),
        })
    }

    fn describe(&self) -> String {
        match &self.target {
            Target::Unix(p) => p.display().to_string(),
            Target::Tcp { authority } => format!("http://{authority}"),
            Target::Https { authority, .. } => format!("https://{authority}"),
        }
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), ClientError> {
        let connect = |source| ClientError::Connect {
            target: self.describe(),
            source,
        };
        let resp = match &self.target {
            Target::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(connect)?;
                exchange(stream, req).await?
            }
            Target::Tcp { authority } => {
                let stream = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .map_err(connect)?;
                exchange(stream, req).await?
            }
            Target::Https {
                authority,
                host,
                tls,
            } => {
                let stream = tokio::net::TcpStream::connect(authority.as_str())
                    .await
                    .map_err(connect)?;
                let stream = tls.connect(host.clone(), stream).await.map_err(|e| {
                    let hint = if e.to_string().contains("UnknownIssuer") {
                        " (set SIXPN_CA to the CA certificate that signed the API's)"
                    } else {
                        ""
                    };
                    ClientError::Tls {
                        target: self.describe(),
                        reason: format!("{e}{hint}"),
                    }
                })?;
                exchange(stream, req).await?
            }
        };
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    /// A request with the Host and bearer-token headers set.
    fn request(
        &self,
        method: Method,
        path: &str,
        json: Option<Vec<u8>>,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let host = match &self.target {
            Target::Unix(_) => "localhost".to_owned(),
            Target::Tcp { authority } | Target::Https { authority, .. } => authority.clone(),
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host);
        if let Some(token) = &self.token {
            builder = builder.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let bytes = match json {
            Some(b) => {
                builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
                b
            }
            None => Vec::new(),
        };
        builder
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ClientError::Protocol(e.to_string()))
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let json = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let req = self.request(method, path, json)?;
        let (status, body) = self.send(req).await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| format!("{status}: {}", String::from_utf8_lossy(&body).trim()));
            return Err(ClientError::Api { status, message });
        }
        let body = if body.is_empty() {
            Bytes::from_static(b"null")
        } else {
            body
        };
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Protocol(format!("unexpected response: {e}")))
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    /// `GET /v1/health`.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get("/v1/health").await
    }
    /// `GET /v1/regions`.
    pub async fn regions(&self) -> Result<Vec<RegionInfo>, ClientError> {
        self.get("/v1/regions").await
    }
    /// `GET /v1/orgs`.
    pub async fn orgs(&self) -> Result<Vec<OrgInfo>, ClientError> {
        self.get("/v1/orgs").await
    }
    /// `POST /v1/orgs`.
    pub async fn create_org(&self, name: &OrgName) -> Result<OrgInfo, ClientError> {
        let body = CreateOrg { name: name.clone() };
        self.call(Method::POST, "/v1/orgs", Some(&body)).await
    }
    /// `POST /v1/orgs/{org}/tokens`.
    pub async fn create_org_token(
        &self,
        org: &OrgName,
        expires_in_secs: Option<u64>,
    ) -> Result<OrgToken, ClientError> {
        let body = CreateOrgToken { expires_in_secs };
        self.call(Method::POST, &format!("/v1/orgs/{org}/tokens"), Some(&body))
            .await
    }
    /// `GET /v1/orgs/{org}/tokens`.
    pub async fn org_tokens(&self, org: &OrgName) -> Result<Vec<TokenInfo>, ClientError> {
        self.get(&format!("/v1/orgs/{org}/tokens")).await
    }
    /// `DELETE /v1/orgs/{org}/tokens/{id}`.
    pub async fn revoke_org_token(&self, org: &OrgName, id: &TokenId) -> Result<(), ClientError> {
        self.call::<(), ()>(Method::DELETE, &format!("/v1/orgs/{org}/tokens/{id}"), None)
            .await
    }
    /// `GET /v1/orgs/{org}/peers`.
    pub async fn peers(&self, org: &OrgName) -> Result<Vec<PeerInfo>, ClientError> {
        self.get(&format!("/v1/orgs/{org}/peers")).await
    }
    /// `POST /v1/orgs/{org}/peers`.
    pub async fn create_peer(
        &self,
        org: &OrgName,
        req: &CreatePeer,
    ) -> Result<PeerInfo, ClientError> {
        self.call(Method::POST, &format!("/v1/orgs/{org}/peers"), Some(req))
            .await
    }
    /// `DELETE /v1/orgs/{org}/peers/{name}`.
    pub async fn remove_peer(&self, org: &OrgName, name: &PeerName) -> Result<(), ClientError> {
        self.call::<(), ()>(
            Method::DELETE,
            &format!("/v1/orgs/{org}/peers/{name}"),
            None,
        )
        .await
    }
    /// `GET /v1/orgs/{org}/peers/{name}/status`.
    pub async fn peer_status(
        &self,
        org: &OrgName,
        name: &PeerName,
    ) -> Result<PeerStatus, ClientError> {
        self.get(&format!("/v1/orgs/{org}/peers/{name}/status"))
            .await
    }
    /// `GET /v1/orgs/{org}/instances[?app=APP]`.
    pub async fn instances(
        &self,
        org: &OrgName,
        app: Option<&AppName>,
    ) -> Result<Vec<InstanceInfo>, ClientError> {
        match app {
            Some(app) => {
                self.get(&format!("/v1/orgs/{org}/instances?app={app}"))
                    .await
            }
            None => self.get(&format!("/v1/orgs/{org}/instances")).await,
        }
    }
    /// `POST /v1/orgs/{org}/instances`.
    pub async fn add_instance(
        &self,
        org: &OrgName,
        req: &AddInstance,
    ) -> Result<InstanceInfo, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/orgs/{org}/instances"),
            Some(req),
        )
        .await
    }
    /// `DELETE /v1/orgs/{org}/instances/{app}/{id}`.
    pub async fn remove_instance(
        &self,
        org: &OrgName,
        app: &AppName,
        id: &InstanceId,
    ) -> Result<(), ClientError> {
        self.call::<(), ()>(
            Method::DELETE,
            &format!("/v1/orgs/{org}/instances/{app}/{id}"),
            None,
        )
        .await
    }

    /// Sends raw bytes (for tests of malformed input).
    #[doc(hidden)]
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let req = self.request(method, path, Some(body))?;
        self.send(req).await
    }
}
