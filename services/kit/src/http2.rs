//! gRPC over HTTP/2 with `h2` directly, for the mesh's servers and for its clients
//! ([`crate::transport::PeerChannel`]): what moves a message body onto and off an
//! HTTP/2 stream, and the server's connection loop with its routing by service name.
//!
//! A call's request or response is sent from the task that has it, and a unary
//! message goes out as one DATA frame carrying the end of the stream. Compared with
//! hyper's HTTP/2 server and client and tonic's transport around them, that spares
//! every call a hand-off between tasks, two spawned tasks on the client, and tonic's
//! and axum's routing layers on the server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{HeaderMap, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::body::Body;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use crate::identity::PeerInfo;

/// How often a connection's peer is pinged, and how long a ping may go unanswered.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one client may have open on a server connection at a time.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Largest header block accepted: a server's requests, a client's responses.
pub(crate) const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Flow-control windows of a server for what clients send (hyper's server defaults).
const SERVER_STREAM_WINDOW: u32 = 1024 * 1024;
const SERVER_CONNECTION_WINDOW: u32 = 1024 * 1024;

/// Pings the peer every [`KEEP_ALIVE_INTERVAL`]; returns when a ping is not answered
/// within [`KEEP_ALIVE_TIMEOUT`] (the connection counts as broken and is closed).
pub(crate) async fn keep_alive(pings: Option<h2::PingPong>) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEP_ALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// The gRPC status for an HTTP/2 error, as gRPC's HTTP/2 mapping has it: a broken or
/// closing connection and a refused stream are `UNAVAILABLE` (the call may be tried
/// again), a cancelled stream is `CANCELLED`.
pub(crate) fn status_of(e: h2::Error) -> tonic::Status {
    use h2::Reason;
    if e.is_io() {
        return tonic::Status::unavailable(format!("the connection failed: {e}"));
    }
    if e.is_go_away() {
        return tonic::Status::unavailable(format!("the peer closed the connection: {e}"));
    }
    let code = match e.reason() {
        Some(Reason::REFUSED_STREAM) => tonic::Code::Unavailable,
        Some(Reason::CANCEL) => tonic::Code::Cancelled,
        Some(Reason::ENHANCE_YOUR_CALM) => tonic::Code::ResourceExhausted,
        Some(Reason::INADEQUATE_SECURITY) => tonic::Code::PermissionDenied,
        _ => tonic::Code::Internal,
    };
    tonic::Status::new(code, format!("HTTP/2 stream error: {e}"))
}

/// Sends what of `body` is ready now, without waiting for flow control: `Ok(true)`
/// when the body is done (its last data frame carries the end of the stream),
/// `Ok(false)` when it has more to come, which [`pipe`] then sends as the window
/// allows. A ready chunk is held back until the next poll says whether it ends the
/// body, so a unary message is one DATA frame, not a DATA frame and an empty one; a
/// second ready chunk marks a stream, and at most two chunks go out here.
pub(crate) fn send_ready(
    body: &mut tonic::body::Body,
    stream: &mut h2::SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Result<bool, tonic::Status> {
    use http_body::Body as _;
    let mut held: Option<Bytes> = None;
    loop {
        match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => {
                    if let Some(previous) = held.take() {
                        stream.send_data(previous, false).map_err(status_of)?;
                        stream.send_data(data, false).map_err(status_of)?;
                        return Ok(false);
                    }
                    held = Some(data);
                }
                Err(frame) => {
                    if let Some(previous) = held.take() {
                        stream.send_data(previous, false).map_err(status_of)?;
                    }
                    if let Ok(trailers) = frame.into_trailers() {
                        stream.send_trailers(trailers).map_err(status_of)?;
                        return Ok(true);
                    }
                }
            },
            Poll::Ready(None) => {
                stream
                    .send_data(held.take().unwrap_or_default(), true)
                    .map_err(status_of)?;
                return Ok(true);
            }
            Poll::Ready(Some(Err(e))) => {
                stream.send_reset(h2::Reason::INTERNAL_ERROR);
                return Err(e);
            }
            Poll::Pending => {
                if let Some(previous) = held.take() {
                    stream.send_data(previous, false).map_err(status_of)?;
                }
                return Ok(false);
            }
        }
    }
}

/// Sends the rest of a streaming body (a request's or a response's), one frame at a
/// time as the stream's flow-control window allows; resets the stream if the body
/// fails, and stops when the peer resets it.
pub(crate) async fn pipe(mut body: tonic::body::Body, mut stream: h2::SendStream<Bytes>) {
    use http_body::Body as _;
    loop {
        // Wait for room in the window before pulling more from the body, so at most
        // one frame waits in the connection's buffer.
        stream.reserve_capacity(1);
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(reset) = stream.poll_reset(cx) {
                return Poll::Ready(Err(reset.ok()));
            }
            if stream.capacity() == 0 {
                match stream.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(_))) => {}
                    Poll::Ready(None | Some(Err(_))) => return Poll::Ready(Err(None)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            Pin::new(&mut body).poll_frame(cx).map(Ok)
        })
        .await;
        let sent = match next {
            Err(_reset_or_closed) => return,
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => stream.send_data(data, false),
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        let _ = stream.send_trailers(trailers);
                        return;
                    }
                    Err(_) => Ok(()),
                },
            },
            Ok(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "body failed: resetting the stream");
                stream.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// A body as it arrives on its HTTP/2 stream (a request's on the server, a response's
/// on the client): data, then trailers. Each data frame handed on is given back to the
/// peer's flow-control window.
pub struct RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl RecvBody {
    pub(crate) fn new(recv: h2::RecvStream) -> Self {
        Self {
            recv,
            data_done: false,
        }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        if !self.data_done {
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(status_of(e)))),
                None => self.data_done = true,
            }
        }
        match std::task::ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(status_of(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// One gRPC service of a server, as routing sees it.
pub type GrpcService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// A server's gRPC services by name: a request for `/{name}/{method}` goes to the
/// service called `name`; any other path is answered `UNIMPLEMENTED`.
/// Cheap to clone (every request clones the service stack it goes through).
#[derive(Clone, Default)]
pub struct GrpcRoutes {
    services: Arc<HashMap<&'static str, GrpcService>>,
}

impl GrpcRoutes {
    pub fn add(&mut self, name: &'static str, service: GrpcService) {
        Arc::make_mut(&mut self.services).insert(name, service);
    }

    fn route(&self, path: &str) -> Option<&GrpcService> {
        let (name, _method) = path.strip_prefix('/')?.split_once('/')?;
        self.services.get(name)
    }
}

impl tower::Service<Request<Body>> for GrpcRoutes {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures::future::Either<
        tower::util::Oneshot<GrpcService, Request<Body>>,
        std::future::Ready<Result<Response<Body>, Infallible>>,
    >;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        match self.route(req.uri().path()) {
            Some(service) => futures::future::Either::Left(service.clone().oneshot(req)),
            None => {
                let status = tonic::Status::unimplemented(format!(
                    "no service answers {}",
                    req.uri().path()
                ));
                futures::future::Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// What [`serve`] serves: a server's whole gRPC service stack (its layers around its
/// [`GrpcRoutes`]), cloned for each connection and each call.
pub trait GrpcStack:
    tower::Service<
        Request<Body>,
        Response = Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> GrpcStack for S where
    S: tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Serves `service` on every connection `incoming` yields (with the identity its TLS
/// handshake proved) until `stop` turns true; then stops accepting, tells every
/// connection's client to open no new streams (HTTP/2 GOAWAY) and returns once the
/// streams in flight have finished.
pub async fn serve<I, T, S>(
    mut incoming: I,
    service: S,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    I: Stream<Item = (T, PeerInfo)> + Unpin,
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: GrpcStack,
{
    let mut connections = tokio::task::JoinSet::new();
    let for_connections = stop.clone();
    loop {
        tokio::select! {
            next = incoming.next() => match next {
                Some((io, peer)) => {
                    let stop = for_connections.clone();
                    connections.spawn(serve_connection(io, peer, service.clone(), stop));
                }
                None => break,
            },
            _ = stop.wait_for(|stopped| *stopped) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(incoming);
    while connections.join_next().await.is_some() {}
}

/// One HTTP/2 connection: each stream the client opens is served on a task of its own.
async fn serve_connection<T, S>(
    io: T,
    peer: PeerInfo,
    service: S,
    mut stop: tokio::sync::watch::Receiver<bool>,
) where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: GrpcStack,
{
    let remote = peer.remote_addr;
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .initial_window_size(SERVER_STREAM_WINDOW)
        .initial_connection_window_size(SERVER_CONNECTION_WINDOW)
        .handshake::<_, Bytes>(io);
    let mut connection = tokio::select! {
        handshake = handshake => match handshake {
            Ok(connection) => connection,
            Err(e) => {
                tracing::debug!(?remote, error = %e, "HTTP/2 handshake failed");
                return;
            }
        },
        _ = stop.wait_for(|stopped| *stopped) => return,
    };
    let keep_alive = keep_alive(connection.ping_pong());
    tokio::pin!(keep_alive);
    let mut stopping = false;
    loop {
        tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    tokio::spawn(serve_stream(req, respond, service.clone(), peer.clone()));
                }
                Some(Err(e)) => {
                    tracing::debug!(?remote, error = %e, "mesh connection failed");
                    break;
                }
                None => break,
            },
            () = &mut keep_alive => {
                tracing::debug!(?remote, "mesh connection closed: a ping went unanswered");
                break;
            }
            _ = stop.wait_for(|stopped| *stopped), if !stopping => {
                stopping = true;
                connection.graceful_shutdown();
            }
        }
    }
}

/// One call: the request goes to the service, within the caller's `grpc-timeout`;
/// the answer goes back on the stream. A client that resets the stream cancels the
/// call (its future is dropped).
async fn serve_stream<S>(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    service: S,
    peer: PeerInfo,
) where
    S: tower::Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    let (head, recv) = req.into_parts();
    let deadline = grpc_timeout(&head.headers);
    let mut req = Request::from_parts(head, Body::new(RecvBody::new(recv)));
    req.extensions_mut().insert(peer);
    let call = service.oneshot(req);
    let answer = async move {
        let Some(deadline) = deadline else {
            return call.await;
        };
        match tokio::time::timeout(deadline, call).await {
            Ok(answer) => answer,
            Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                "no answer within the caller's deadline of {deadline:?}"
            ))
            .into_http()),
        }
    };
    let response = tokio::select! {
        answer = answer => match answer {
            Ok(response) => response,
            Err(never) => match never {},
        },
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
    };
    let (head, mut body) = response.into_parts();
    let end_now = http_body::Body::is_end_stream(&body);
    let Ok(mut stream) = respond.send_response(Response::from_parts(head, ()), end_now) else {
        return;
    };
    if end_now {
        return;
    }
    if let Ok(false) =
        std::future::poll_fn(|cx| Poll::Ready(send_ready(&mut body, &mut stream, cx))).await
    {
        pipe(body, stream).await;
    }
}

/// The caller's deadline from its `grpc-timeout` header (1-8 digits and a unit: `H`,
/// `M`, `S`, `m`, `u` or `n`). A malformed value is ignored, as gRPC servers do.
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");
    let value = headers.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::net::TcpListener;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

    use super::*;
    use crate::transport::PeerChannel;

    const HEALTH: &str = "grpc.health.v1.Health";

    /// Serves `routes` over plaintext TCP on a free port until the returned sender
    /// says stop; the task ends once the server has drained.
    async fn start(
        routes: GrpcRoutes,
    ) -> (
        String,
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, server) = serve_on(listener, routes);
        (addr, stop, server)
    }

    /// Serves `routes` on `listener` (plaintext) until the returned sender says stop.
    fn serve_on(
        listener: TcpListener,
        routes: GrpcRoutes,
    ) -> (
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(|tcp| {
            std::future::ready(tcp.ok().map(|tcp| {
                let peer = PeerInfo {
                    remote_addr: tcp.peer_addr().ok(),
                    identity: None,
                };
                (tcp, peer)
            }))
        });
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve(Box::pin(incoming), routes, stopped));
        (stop, server)
    }

    /// A health service that answers every call with `status` after `delay`, and sets
    /// `dropped` if the call is abandoned before that.
    fn slow(delay: Duration, dropped: Arc<AtomicBool>) -> GrpcService {
        struct Flag(Arc<AtomicBool>, bool);
        impl Drop for Flag {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.store(true, Ordering::SeqCst);
                }
            }
        }
        BoxCloneSyncService::new(tower::service_fn(move |_req: Request<Body>| {
            let dropped = dropped.clone();
            async move {
                let mut flag = Flag(dropped, false);
                tokio::time::sleep(delay).await;
                flag.1 = true;
                Ok::<_, Infallible>(tonic::Status::not_found("answered late").into_http())
            }
        }))
    }

    #[tokio::test]
    async fn calls_are_routed_by_service_name_with_the_callers_identity() {
        let mut routes = GrpcRoutes::default();
        let (_, health) = tonic_health::server::health_reporter();
        routes.add(HEALTH, BoxCloneSyncService::new(health));
        routes.add(
            "peer.Echo",
            BoxCloneSyncService::new(tower::service_fn(|req: Request<Body>| async move {
                let peer = req.extensions().get::<PeerInfo>().cloned();
                let addr = peer.and_then(|p| p.remote_addr);
                Ok::<_, Infallible>(tonic::Status::not_found(format!("{addr:?}")).into_http())
            })),
        );
        let (addr, _stop, _server) = start(routes).await;
        let channel = PeerChannel::plaintext(&addr);

        let mut health = HealthClient::new(channel.clone());
        let answer = health.check(HealthCheckRequest::default()).await.unwrap();
        assert_eq!(answer.into_inner().status, 1, "SERVING");

        // The request reached the service with the connection's peer attached.
        let err = call(&channel, "/peer.Echo/Who").await;
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
        assert!(err.message().starts_with("Some(127.0.0.1:"), "{err:?}");

        // A service the server does not have.
        let err = call(&channel, "/nobody.Here/Call").await;
        assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    }

    /// Calls `path` without a message; the status the call ends with.
    async fn call(channel: &PeerChannel, path: &'static str) -> tonic::Status {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static(path);
        grpc.unary::<(), Vec<u8>, _>(tonic::Request::new(()), path, NoMessages)
            .await
            .unwrap_err()
    }

    /// A server whose health service answers after `delay` (see [`slow`]), and the flag
    /// that says whether a call was abandoned.
    async fn start_slow(
        delay: Duration,
    ) -> (
        String,
        Arc<AtomicBool>,
        tokio::sync::watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let dropped = Arc::new(AtomicBool::new(false));
        let mut routes = GrpcRoutes::default();
        routes.add(HEALTH, slow(delay, dropped.clone()));
        let (addr, stop, server) = start(routes).await;
        (addr, dropped, stop, server)
    }

    #[tokio::test]
    async fn a_call_past_the_callers_deadline_is_answered_deadline_exceeded_and_dropped() {
        let (addr, dropped, _stop, _server) = start_slow(Duration::from_secs(30)).await;
        let mut health = HealthClient::new(PeerChannel::plaintext(&addr));
        let mut request = tonic::Request::new(HealthCheckRequest::default());
        request.set_timeout(Duration::from_millis(100));
        let err = health.check(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_call_whose_client_gives_up_is_cancelled_on_the_server() {
        let (addr, dropped, _stop, _server) = start_slow(Duration::from_secs(30)).await;
        let mut health = HealthClient::new(PeerChannel::plaintext(&addr));
        // No deadline sent: the client just stops waiting, which resets the stream.
        let call = health.check(HealthCheckRequest::default());
        assert!(
            tokio::time::timeout(Duration::from_millis(100), call)
                .await
                .is_err()
        );
        for _ in 0..100 {
            if dropped.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the server kept running a call its client had abandoned");
    }

    /// A server whose calls take `delay`, told to stop 100 ms into a call: the server's
    /// address, a channel to it, whether the call was abandoned, the call, and the server.
    async fn stop_during_a_call(
        delay: Duration,
    ) -> (
        String,
        PeerChannel,
        Arc<AtomicBool>,
        tokio::task::JoinHandle<Result<tonic::Response<HealthCheckResponse>, tonic::Status>>,
        tokio::task::JoinHandle<()>,
    ) {
        let (addr, dropped, stop, server) = start_slow(delay).await;
        let channel = PeerChannel::plaintext(&addr);
        let mut health = HealthClient::new(channel.clone());
        let in_flight =
            tokio::spawn(async move { health.check(HealthCheckRequest::default()).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(true).unwrap();
        (addr, channel, dropped, in_flight, server)
    }

    #[tokio::test]
    async fn stopping_lets_calls_in_flight_finish_and_then_closes() {
        let (_addr, channel, dropped, in_flight, server) =
            stop_during_a_call(Duration::from_millis(300)).await;

        // The call in flight gets its (late) answer, then the server finishes.
        let err = in_flight.await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
        assert!(!dropped.load(Ordering::SeqCst));
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server drains")
            .unwrap();

        // Nothing listens any more.
        let err = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    }

    #[tokio::test]
    async fn a_client_whose_server_restarts_calls_the_new_one_while_the_old_one_drains() {
        // The old server stops: it sends GOAWAY but keeps the connection open for the
        // call in flight. A new one takes the port.
        let (addr, channel, _dropped, in_flight, old) =
            stop_during_a_call(Duration::from_millis(500)).await;
        let mut listener = None;
        for _ in 0..50 {
            match TcpListener::bind(&addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        let listener = listener.expect("the old server released its port");
        let mut routes = GrpcRoutes::default();
        let (_, health) = tonic_health::server::health_reporter();
        routes.add(HEALTH, BoxCloneSyncService::new(health));
        let (_stop_new, _new) = serve_on(listener, routes);

        // A new call goes to the new server, not to the connection that is going away.
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .unwrap();
        assert_eq!(answer.into_inner().status, 1, "SERVING");

        // The old server still answers its call in flight, then ends.
        let err = in_flight.await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
        tokio::time::timeout(Duration::from_secs(5), old)
            .await
            .expect("the old server drains")
            .unwrap();
    }

    #[tokio::test]
    async fn a_streamed_answer_larger_than_every_window_arrives_whole_and_in_order() {
        const MESSAGES: usize = 600;
        const SIZE: usize = 16 * 1024;
        // Every message is ready at once: the server must pace them by the client's
        // windows (2 MiB per stream, 5 MiB per connection) rather than queue ~10 MiB.
        let mut routes = GrpcRoutes::default();
        routes.add(
            "bulk.Stream",
            BoxCloneSyncService::new(tower::service_fn(|_req: Request<Body>| async move {
                let frames = (0..MESSAGES)
                    .map(|i| {
                        let mut message = vec![(i % 251) as u8; 5 + SIZE];
                        message[0] = 0;
                        message[1..5].copy_from_slice(&(SIZE as u32).to_be_bytes());
                        Ok::<_, tonic::Status>(http_body::Frame::data(Bytes::from(message)))
                    })
                    .chain(std::iter::once(Ok(http_body::Frame::trailers({
                        let mut t = HeaderMap::new();
                        t.insert("grpc-status", http::HeaderValue::from_static("0"));
                        t
                    }))));
                let body = Body::new(http_body_util::StreamBody::new(futures::stream::iter(
                    frames,
                )));
                let mut response = Response::new(body);
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/grpc"),
                );
                Ok::<_, Infallible>(response)
            })),
        );
        let (addr, _stop, _server) = start(routes).await;
        let mut grpc = tonic::client::Grpc::new(PeerChannel::plaintext(&addr));
        grpc.ready().await.unwrap();
        let mut answers = grpc
            .server_streaming::<(), Vec<u8>, _>(
                tonic::Request::new(()),
                http::uri::PathAndQuery::from_static("/bulk.Stream/All"),
                NoMessages,
            )
            .await
            .unwrap()
            .into_inner();
        let mut seen = 0;
        while let Some(message) = answers.message().await.unwrap() {
            assert_eq!(message.len(), SIZE);
            assert!(
                message.iter().all(|&b| b == (seen % 251) as u8),
                "message {seen}"
            );
            seen += 1;
        }
        assert_eq!(seen, MESSAGES);
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_malformed_ones_ignored() {
        let timeout = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", http::HeaderValue::from_static(v));
            grpc_timeout(&h)
        };
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout("30S"), Some(Duration::from_secs(30)));
        assert_eq!(timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "S", "123456789S", "10x", "-1S", "1.5S", "10 S"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    /// A codec that sends no request message and takes answers as raw bytes.
    #[derive(Default)]
    struct NoMessages;

    impl tonic::codec::Codec for NoMessages {
        type Encode = ();
        type Decode = Vec<u8>;
        type Encoder = NoMessages;
        type Decoder = NoMessages;
        fn encoder(&mut self) -> Self::Encoder {
            NoMessages
        }
        fn decoder(&mut self) -> Self::Decoder {
            NoMessages
        }
    }

    impl tonic::codec::Encoder for NoMessages {
        type Item = ();
        type Error = tonic::Status;
        fn encode(
            &mut self,
            _: (),
            _: &mut tonic::codec::EncodeBuf<'_>,
        ) -> Result<(), tonic::Status> {
            Ok(())
        }
    }

    impl tonic::codec::Decoder for NoMessages {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(
            &mut self,
            buf: &mut tonic::codec::DecodeBuf<'_>,
        ) -> Result<Option<Vec<u8>>, tonic::Status> {
            use bytes::Buf;
            Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
        }
    }
}
