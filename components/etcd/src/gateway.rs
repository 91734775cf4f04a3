//! etcd's HTTP/JSON gateway: the HTTP side of a store's client port, as etcd serves it
//! (grpc-gateway v1 in front of its gRPC services, plus `/version` and `/health`).
//!
//! Each `POST /v3/...` path reads the body as the JSON of the call's request ([`crate::json`]),
//! calls the gRPC service implementation directly (no loopback connection), and answers the
//! JSON of its response with `200`, or an error as grpc-gateway writes it:
//! `{"error": msg, "code": grpc_code, "message": msg}` with the HTTP status grpc-gateway maps
//! the code to ([`http_status`]). An `Authorization` header reaches the service as gRPC
//! metadata `authorization`, and `Grpc-Metadata-<key>` headers as `<key>`, as grpc-gateway
//! forwards them.
//!
//! | path | call |
//! | --- | --- |
//! | `/v3/kv/range`, `/v3/kv/put`, `/v3/kv/deleterange`, `/v3/kv/txn`, `/v3/kv/compaction` | KV |
//! | `/v3/cluster/member/{list,add,remove,update,promote}` | Cluster |
//! | `/v3/maintenance/{status,alarm,defragment,hash,hashkv,transfer-leadership,downgrade}` | Maintenance |
//! | `/v3/watch` | Watch: the body's requests in, one `{"result": ...}` line per response out |
//! | `/v3/election/{campaign,proclaim,leader,resign}` | Election |
//! | `/v3/election/observe` | Election's Observe: one `{"result": ...}` line per leader response |
//! | `/v3/lock/{lock,unlock}` | Lock |
//! | `/v3/lease/{grant,revoke,timetolive,leases}` (and `/v3/kv/lease/{revoke,timetolive,leases}`) | Lease |
//! | `/v3/auth/{enable,disable,status,authenticate}`, `/v3/auth/user/{add,get,list,delete,changepw,grant,revoke}`, `/v3/auth/role/{add,get,list,delete,grant,revoke}` | Auth |
//! | `/v3/lease/keepalive` | LeaseKeepAlive: one `{"result": ...}` line per request of the body |
//! | `GET /version` | `{"etcdserver":"3.5.17","etcdcluster":"3.5.0"}` |
//! | `GET /health` | a linearizable range of one key through the KV service (`?serializable=true`: a serializable one) |

use crate::election::ElectionService;
use crate::errors;
use crate::json::{self, JsonMessage};
use crate::lease::LeaseService;
use crate::lock::LockService;
use crate::watch::WatchService;
use atoll_proto::etcdserverpb::auth_server::Auth;
use atoll_proto::etcdserverpb::cluster_server::Cluster;
use atoll_proto::etcdserverpb::kv_server::Kv;
use atoll_proto::etcdserverpb::lease_server::Lease;
use atoll_proto::etcdserverpb::maintenance_server::Maintenance;
use atoll_proto::etcdserverpb::{LeaseKeepAliveRequest, RangeRequest, WatchRequest};
use atoll_proto::v3electionpb::election_server::Election;
use atoll_proto::v3electionpb::LeaderRequest;
use atoll_proto::v3lockpb::lock_server::Lock;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::routing::{any, post, MethodRouter};
use axum::Router;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::metadata::{Ascii, MetadataKey, MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// The largest request body the gateway reads.
pub const MAX_BODY: usize = 64 << 20;

/// How long `/health` waits for its range: etcd's request timeout (5 s plus two election
/// timeouts of its defaults).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(7);

/// The gateway over the services.
pub fn router<K, C, M>(
    kv: Arc<K>,
    cluster: Arc<C>,
    maintenance: Arc<M>,
    watch: Arc<WatchService>,
    lease: Arc<LeaseService>,
) -> Router
where
    K: Kv,
    C: Cluster,
    M: Maintenance,
{
    macro_rules! unary {
        ($svc:expr, $method:ident) => {{
            let svc = $svc.clone();
            post(move |req: Request| {
                let svc = svc.clone();
                async move { unary(req, move |r| async move { svc.$method(r).await }).await }
            })
            .fallback(method_not_allowed)
        }};
    }
    let health_kv = kv.clone();
    Router::new()
        .route("/v3/kv/range", unary!(kv, range))
        .route("/v3/kv/put", unary!(kv, put))
        .route("/v3/kv/deleterange", unary!(kv, delete_range))
        .route("/v3/kv/txn", unary!(kv, txn))
        .route("/v3/kv/compaction", unary!(kv, compact))
        .route("/v3/cluster/member/add", unary!(cluster, member_add))
        .route("/v3/cluster/member/remove", unary!(cluster, member_remove))
        .route("/v3/cluster/member/update", unary!(cluster, member_update))
        .route("/v3/cluster/member/list", unary!(cluster, member_list))
        .route(
            "/v3/cluster/member/promote",
            unary!(cluster, member_promote),
        )
        .route("/v3/maintenance/alarm", unary!(maintenance, alarm))
        .route("/v3/maintenance/status", unary!(maintenance, status))
        .route(
            "/v3/maintenance/defragment",
            unary!(maintenance, defragment),
        )
        .route("/v3/maintenance/hash", unary!(maintenance, hash))
        .route("/v3/maintenance/hashkv", unary!(maintenance, hash_kv))
        .route(
            "/v3/maintenance/transfer-leadership",
            unary!(maintenance, move_leader),
        )
        .route("/v3/maintenance/downgrade", unary!(maintenance, downgrade))
        .route(
            "/v3/watch",
            post(move |req: Request| {
                let watch = watch.clone();
                async move { watch_stream(req, &watch).await }
            })
            .fallback(method_not_allowed),
        )
        .route("/v3/lease/grant", unary!(lease, lease_grant))
        .route("/v3/lease/revoke", unary!(lease, lease_revoke))
        .route("/v3/kv/lease/revoke", unary!(lease, lease_revoke))
        .route("/v3/lease/timetolive", unary!(lease, lease_time_to_live))
        .route("/v3/kv/lease/timetolive", unary!(lease, lease_time_to_live))
        .route("/v3/lease/leases", unary!(lease, lease_leases))
        .route("/v3/kv/lease/leases", unary!(lease, lease_leases))
        .route("/v3/lease/keepalive", {
            let lease = lease.clone();
            post(move |req: Request| {
                let lease = lease.clone();
                async move { keep_alive_stream(req, &lease).await }
            })
            .fallback(method_not_allowed)
        })
        .route("/version", get_only(|_req: Request| async { version() }))
        .route(
            "/health",
            get_only(move |req: Request| {
                let kv = health_kv.clone();
                let serializable = req
                    .uri()
                    .query()
                    .unwrap_or("")
                    .split('&')
                    .any(|q| q == "serializable=true");
                async move { health(kv.as_ref(), serializable).await }
            }),
        )
        .fallback(not_found)
}

/// The gateway's Election and Lock paths (etcd 3.4/3.5's grpc-gateway paths), merged into
/// [`router`]'s. `/v3/election/observe` streams one `{"result": LeaderResponse}` line per
/// leader response, as `/v3/watch` does; the others are unary.
pub fn election_routes(election: Arc<ElectionService>, lock: Arc<LockService>) -> Router {
    macro_rules! unary {
        ($svc:expr, $tr:ident, $method:ident) => {{
            let svc = $svc.clone();
            post(move |req: Request| {
                let svc = svc.clone();
                async move {
                    unary(
                        req,
                        move |r| async move { $tr::$method(svc.as_ref(), r).await },
                    )
                    .await
                }
            })
            .fallback(method_not_allowed)
        }};
    }
    let observe_svc = election.clone();
    Router::new()
        .route(
            "/v3/election/campaign",
            unary!(election, Election, campaign),
        )
        .route(
            "/v3/election/proclaim",
            unary!(election, Election, proclaim),
        )
        .route("/v3/election/leader", unary!(election, Election, leader))
        .route("/v3/election/resign", unary!(election, Election, resign))
        .route(
            "/v3/election/observe",
            post(move |req: Request| {
                let svc = observe_svc.clone();
                async move { observe_stream(req, &svc).await }
            })
            .fallback(method_not_allowed),
        )
        .route("/v3/lock/lock", unary!(lock, Lock, lock))
        .route("/v3/lock/unlock", unary!(lock, Lock, unlock))
}

/// `POST /v3/election/observe`: the body is a LeaderRequest; the answer streams each leader
/// response as one line `{"result": ...}` (an error as a last line), until the client goes
/// away.
/// etcd's `/v3/auth/...` paths (the `Authorization` header of every call is its token).
pub fn auth_routes(auth: Arc<crate::auth::service::AuthService>) -> Router {
    macro_rules! unary {
        ($method:ident) => {{
            let svc = auth.clone();
            post(move |req: Request| {
                let svc = svc.clone();
                async move {
                    unary(
                        req,
                        move |r| async move { Auth::$method(svc.as_ref(), r).await },
                    )
                    .await
                }
            })
            .fallback(method_not_allowed)
        }};
    }
    Router::new()
        .route("/v3/auth/enable", unary!(auth_enable))
        .route("/v3/auth/disable", unary!(auth_disable))
        .route("/v3/auth/status", unary!(auth_status))
        .route("/v3/auth/authenticate", unary!(authenticate))
        .route("/v3/auth/user/add", unary!(user_add))
        .route("/v3/auth/user/get", unary!(user_get))
        .route("/v3/auth/user/list", unary!(user_list))
        .route("/v3/auth/user/delete", unary!(user_delete))
        .route("/v3/auth/user/changepw", unary!(user_change_password))
        .route("/v3/auth/user/grant", unary!(user_grant_role))
        .route("/v3/auth/user/revoke", unary!(user_revoke_role))
        .route("/v3/auth/role/add", unary!(role_add))
        .route("/v3/auth/role/get", unary!(role_get))
        .route("/v3/auth/role/list", unary!(role_list))
        .route("/v3/auth/role/delete", unary!(role_delete))
        .route("/v3/auth/role/grant", unary!(role_grant_permission))
        .route("/v3/auth/role/revoke", unary!(role_revoke_permission))
}

async fn observe_stream(req: Request, election: &ElectionService) -> Response {
    let mut md = MetadataMap::new();
    forward_metadata(req.headers(), &mut md);
    let peer = req
        .extensions()
        .get::<atoll_util::identity::PeerIdentity>()
        .cloned();
    let caller = election.ctx.auth.caller(&md, false, peer.as_ref()).await;
    let bytes = match axum::body::to_bytes(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return error_response(&Status::invalid_argument(e.to_string())),
    };
    let request: LeaderRequest = match json::from_json(&bytes) {
        Ok(m) => m,
        Err(e) => return error_response(&Status::invalid_argument(e.0)),
    };
    let need = [crate::election::read_prefix(&request.name)];
    if let Err(e) = caller.and_then(|c| election.ctx.auth.check(&c, &need)) {
        return error_response(&crate::election::as_etcd_answers(e));
    }
    let rx = election.serve_observe(request);
    stream_response(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A route that answers GET with `handler` and other methods with 405, as etcd's
/// `/version` and `/health` do.
fn get_only<F, Fut>(handler: F) -> MethodRouter
where
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    any(move |req: Request| {
        let handler = handler.clone();
        async move {
            if req.method() == Method::GET {
                handler(req).await
            } else {
                let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET"));
                r
            }
        }
    })
}

/// One unary call through the gateway.
async fn unary<Req, Resp, F, Fut>(req: Request, call: F) -> Response
where
    Req: JsonMessage,
    Resp: JsonMessage,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return error_response(&Status::invalid_argument(e.to_string())),
    };
    let msg: Req = match json::from_json(&bytes) {
        Ok(m) => m,
        Err(e) => return error_response(&Status::invalid_argument(e.0)),
    };
    let mut request = tonic::Request::new(msg);
    forward_metadata(&parts.headers, request.metadata_mut());
    if let Some(p) = parts.extensions.get::<atoll_util::identity::PeerIdentity>() {
        request.extensions_mut().insert(p.clone());
    }
    match call(request).await {
        Ok(resp) => match json::to_json(resp.get_ref()) {
            Ok(body) => json_response(StatusCode::OK, body),
            Err(e) => error_response(&Status::internal(e.0)),
        },
        Err(status) => error_response(&status),
    }
}

/// The JSON objects of a request body (one after another, as grpc-gateway reads a client
/// stream), each parsed as a `Req`; the empty body is one empty request.
async fn stream_requests<Req: JsonMessage>(req: Request) -> Result<Vec<Req>, Status> {
    let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
        .await
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut requests = vec![];
    let values = serde_json::Deserializer::from_slice(&bytes).into_iter::<serde_json::Value>();
    for v in values {
        let parsed = v
            .map_err(|e| e.to_string())
            .and_then(|v| json::from_json(v.to_string().as_bytes()).map_err(|e| e.0))
            .map_err(Status::invalid_argument)?;
        requests.push(parsed);
    }
    if requests.is_empty() {
        requests.push(Req::default());
    }
    Ok(requests)
}

/// A streamed answer: one line `{"result": ...}` per message (an error as its error body), as
/// etcd's gateway writes a server stream.
fn stream_response<Resp, S>(answers: S) -> Response
where
    Resp: JsonMessage,
    S: tokio_stream::Stream<Item = Result<Resp, Status>> + Send + 'static,
{
    let lines = answers.map(|r| {
        let mut line = match r {
            Ok(resp) => match json::to_json(&resp) {
                Ok(body) => [b"{\"result\":".as_slice(), &body, b"}"].concat(),
                Err(e) => error_body(&Status::internal(e.0)),
            },
            Err(status) => error_body(&status),
        };
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(line)
    });
    let mut r = Response::new(Body::from_stream(lines));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `POST /v3/watch`: the body holds watch requests; the answer streams each watch response
/// as one line `{"result": ...}`, as etcd's gateway does, until the client goes away.
async fn watch_stream(req: Request, watch: &WatchService) -> Response {
    let mut md = MetadataMap::new();
    forward_metadata(req.headers(), &mut md);
    let peer = req
        .extensions()
        .get::<atoll_util::identity::PeerIdentity>()
        .cloned();
    let caller = watch.hub().ctx.auth.caller(&md, false, peer.as_ref()).await;
    let requests = match stream_requests::<WatchRequest>(req).await {
        Ok(r) => r,
        Err(status) => return error_response(&status),
    };
    let inbound = tokio_stream::iter(requests.into_iter().map(Ok)).chain(tokio_stream::pending());
    let rx = watch.serve_as(caller, inbound);
    stream_response(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// `POST /v3/lease/keepalive`: each keep-alive request of the body answered by one line
/// `{"result": ...}`; the answer ends with the requests.
async fn keep_alive_stream(req: Request, lease: &LeaseService) -> Response {
    let requests = match stream_requests::<LeaseKeepAliveRequest>(req).await {
        Ok(r) => r,
        Err(status) => return error_response(&status),
    };
    stream_response(lease.keep_alive_stream(tokio_stream::iter(requests.into_iter().map(Ok))))
}

/// Headers grpc-gateway passes on as metadata: `Authorization` (as `authorization`) and
/// `Grpc-Metadata-<key>` (as `<key>`).
fn forward_metadata(headers: &HeaderMap, md: &mut MetadataMap) {
    for (name, value) in headers {
        let key = if name == header::AUTHORIZATION {
            "authorization"
        } else if let Some(k) = name.as_str().strip_prefix("grpc-metadata-") {
            k
        } else {
            continue;
        };
        let Ok(k) = MetadataKey::<Ascii>::from_bytes(key.as_bytes()) else {
            continue;
        };
        let Some(v) = value
            .to_str()
            .ok()
            .and_then(|v| MetadataValue::<Ascii>::try_from(v).ok())
        else {
            continue;
        };
        md.append(k, v);
    }
}

/// The HTTP status grpc-gateway v1 answers for a gRPC code (`runtime.HTTPStatusFromCode`).
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        Code::Aborted => StatusCode::CONFLICT,
        Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The body grpc-gateway writes for an error: `{"error":msg,"code":n,"message":msg}`.
pub fn error_body(status: &Status) -> Vec<u8> {
    let msg = serde_json::to_string(status.message()).unwrap_or_else(|_| "\"\"".into());
    format!(
        r#"{{"error":{msg},"code":{},"message":{msg}}}"#,
        status.code() as i32
    )
    .into_bytes()
}

fn error_response(status: &Status) -> Response {
    json_response(http_status(status.code()), error_body(status))
}

fn json_response(code: StatusCode, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A plain-text answer as Go's `http.Error` writes it.
fn text(code: StatusCode, body: impl Into<Body>) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = code;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

async fn method_not_allowed() -> Response {
    text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n")
}

/// grpc-gateway's 404 under `/v3/`, Go's `ServeMux` one elsewhere.
async fn not_found(req: Request) -> Response {
    if req.uri().path().starts_with("/v3/") {
        text(StatusCode::NOT_FOUND, "Not Found\n")
    } else {
        text(StatusCode::NOT_FOUND, "404 page not found\n")
    }
}

fn version() -> Response {
    let body = format!(
        r#"{{"etcdserver":"{}","etcdcluster":"{}"}}"#,
        crate::ETCD_VERSION,
        crate::ETCD_CLUSTER_VERSION
    );
    json_response(StatusCode::OK, body.into_bytes())
}

/// etcd's `/health`: `{"health":"true","reason":""}` with 200 if a range of one key
/// succeeds within [`HEALTH_TIMEOUT`], else `{"health":"false","reason":"RANGE ERROR:<msg>"}`
/// with 503. etcd ranges the empty key from inside the server; through the KV service a key
/// must be given, so it ranges `health` (the key `etcdctl endpoint health` reads). Atoll raises
/// no alarms, so `?exclude=` changes nothing.
async fn health<K: Kv>(kv: &K, serializable: bool) -> Response {
    let range = RangeRequest {
        key: b"health".to_vec(),
        keys_only: true,
        limit: 1,
        serializable,
        ..Default::default()
    };
    let reason =
        match tokio::time::timeout(HEALTH_TIMEOUT, kv.range(crate::auth::internal(range))).await {
            Ok(Ok(_)) => None,
            Ok(Err(status)) => Some(format!("RANGE ERROR:{}", status.message())),
            Err(_) => Some(format!(
                "RANGE ERROR:{}",
                errors::deadline_exceeded().message()
            )),
        };
    match reason {
        // Go writes the success body without a content type of its own (sniffed as text).
        None => {
            let mut r = text(StatusCode::OK, r#"{"health":"true","reason":""}"#);
            r.headers_mut().remove(header::X_CONTENT_TYPE_OPTIONS);
            r
        }
        Some(reason) => {
            tracing::warn!(%reason, "serving /health false");
            // The members in etcd's order (which is also the sorted order serde_json keeps).
            let body = serde_json::json!({"health": "false", "reason": reason});
            text(StatusCode::SERVICE_UNAVAILABLE, format!("{body}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_written_as_grpc_gateway_does() {
        let s = errors::compacted();
        assert_eq!(http_status(s.code()), StatusCode::BAD_REQUEST);
        assert_eq!(
            String::from_utf8(error_body(&s)).unwrap(),
            r#"{"error":"etcdserver: mvcc: required revision has been compacted","code":11,"message":"etcdserver: mvcc: required revision has been compacted"}"#
        );
        let s = Status::unavailable("a \"quoted\" word");
        let v: serde_json::Value = serde_json::from_slice(&error_body(&s)).unwrap();
        assert_eq!(v["error"], "a \"quoted\" word");
        assert_eq!(v["code"], 14);
        assert_eq!(
            http_status(Code::Unimplemented),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(Code::FailedPrecondition),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn authorization_and_grpc_metadata_headers_are_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("tok"));
        h.insert("grpc-metadata-hasleader", HeaderValue::from_static("true"));
        h.insert("x-other", HeaderValue::from_static("no"));
        let mut md = MetadataMap::new();
        forward_metadata(&h, &mut md);
        assert_eq!(md.get("authorization").unwrap(), "tok");
        assert_eq!(md.get("hasleader").unwrap(), "true");
        assert!(md.get("x-other").is_none());
    }
}
