//! The mesh's mTLS transport: an incoming stream of authenticated connections for
//! servers ([`mtls_incoming`], [`mesh_incoming`]), dialling a peer and checking its
//! SPIFFE identity ([`connect_mtls`]), and the client channel the typed gRPC clients
//! call through ([`PeerChannel`], HTTP/2 with `crate::http2`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;

use crate::http2::{MAX_HEADER_LIST, RecvBody, keep_alive, pipe, send_ready, status_of};
use crate::identity::{PeerInfo, SpiffeId, spiffe_id_from_cert};
use crate::tls::MeshTls;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialing a peer's TCP port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An accepted connection whose TLS handshake succeeded with a client certificate
/// from the mesh CA.
pub struct MeshConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for MeshConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for MeshConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts TCP connections and performs TLS handshakes off the accept loop. Plaintext
/// clients and clients without a certificate from the mesh CA fail the handshake and
/// are dropped. The stream ends (and the listener closes) when the receiver is dropped,
/// which is how tonic's graceful shutdown stops accepting.
pub fn mtls_incoming(
    listener: TcpListener,
    tls: MeshTls,
) -> tokio_stream::wrappers::ReceiverStream<Result<MeshConnection, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = tx.closed() => break,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| spiffe_id_from_cert(c));
                        let info = PeerInfo {
                            remote_addr: Some(remote),
                            identity,
                        };
                        let _ = tx.send(Ok(MeshConnection { stream, info })).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %remote, error = %e, "tls handshake refused")
                    }
                    Err(_) => tracing::debug!(peer = %remote, "tls handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// [`mtls_incoming`] as [`crate::http2::serve`] takes it: each accepted connection with
/// the identity its handshake proved.
pub fn mesh_incoming(
    listener: TcpListener,
    tls: MeshTls,
) -> impl futures::Stream<Item = (MeshConnection, PeerInfo)> + Unpin {
    use futures::StreamExt;
    mtls_incoming(listener, tls).filter_map(|accepted| {
        std::future::ready(accepted.ok().map(|conn| {
            let peer = conn.info.clone();
            (conn, peer)
        }))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("peer {addr} presented identity {found:?}, expected {expected}")]
    WrongIdentity {
        addr: String,
        expected: SpiffeId,
        found: Option<SpiffeId>,
    },
    #[error("invalid address `{0}`: expected host:port")]
    Address(String),
}

/// Dials `addr` (host:port) over mTLS and checks that the peer is `expected`.
pub async fn connect_mtls(
    addr: &str,
    expected: &SpiffeId,
    tls: &MeshTls,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let io_err = |source| ConnectError::Io {
        addr: addr.to_owned(),
        source,
    };
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .ok_or_else(|| ConnectError::Address(addr.to_owned()))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| io_err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")))?
        .map_err(io_err)?;
    let _ = tcp.set_nodelay(true);
    // The name only feeds SNI; the verifier checks the chain and we check the SPIFFE id.
    let server_name =
        rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap_or_else(|_| {
            rustls::pki_types::ServerName::try_from("crewmesh.mesh").expect("static name")
        });
    let connector = TlsConnector::from(tls.client_config());
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, tcp))
        .await
        .map_err(|_| {
            io_err(io::Error::new(
                io::ErrorKind::TimedOut,
                "tls handshake timed out",
            ))
        })?
        .map_err(io_err)?;
    let found = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| spiffe_id_from_cert(c));
    if found.as_ref() != Some(expected) {
        return Err(ConnectError::WrongIdentity {
            addr: addr.to_owned(),
            expected: expected.clone(),
            found,
        });
    }
    Ok(stream)
}

/// A client channel to the service at `addr` whose identity must be `expected`: one
/// mTLS HTTP/2 connection, dialled on first use and again once it has closed. A call
/// opens its stream on the connection from the caller's own task (HTTP/2 multiplexes
/// them): unlike tonic's `Channel` (a queue and a worker task) or hyper's HTTP/2
/// client (a dispatch channel and two spawned tasks per request), nothing is handed
/// between tasks on the way out.
pub fn mesh_channel(
    addr: &str,
    expected: SpiffeId,
    tls: MeshTls,
) -> Result<PeerChannel, ConnectError> {
    PeerChannel::new(addr, Dial::Mtls { expected, tls })
}

/// See [`mesh_channel`]. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct PeerChannel {
    inner: Arc<PeerInner>,
}

struct PeerInner {
    /// The peer's `host:port`: what is dialled, and the requests' authority.
    authority: http::uri::Authority,
    dial: Dial,
    /// The open connection, if any.
    current: std::sync::Mutex<Option<Connection>>,
    /// Held while dialling, so that concurrent first calls share one connection.
    dialling: tokio::sync::Mutex<()>,
    /// Where the connection's task runs: the runtime the channel was made on (like
    /// tonic's channels; see `tasks::on_background`), else the dialling call's.
    runtime: Option<tokio::runtime::Handle>,
}

/// One HTTP/2 connection to the peer: the handle that opens streams on it, and
/// whether its task has ended.
#[derive(Clone)]
struct Connection {
    sender: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

enum Dial {
    Mtls {
        expected: SpiffeId,
        tls: MeshTls,
    },
    /// Plain TCP, for tests of clients against in-process fakes.
    #[cfg(test)]
    Plaintext,
}

impl std::fmt::Debug for PeerChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerChannel")
            .field("addr", &self.inner.authority.as_str())
            .finish_non_exhaustive()
    }
}

/// Flow-control windows for what the peer sends (hyper's defaults for HTTP/2
/// clients), so that large responses and streams do not wait on window updates.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl PeerChannel {
    fn new(addr: &str, dial: Dial) -> Result<Self, ConnectError> {
        let authority = addr
            .parse::<http::uri::Authority>()
            .ok()
            .filter(|a| a.port().is_some())
            .ok_or_else(|| ConnectError::Address(addr.to_owned()))?;
        Ok(Self {
            inner: Arc::new(PeerInner {
                authority,
                dial,
                current: std::sync::Mutex::new(None),
                dialling: tokio::sync::Mutex::new(()),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        })
    }

    /// A plaintext channel to `addr`, for tests against in-process fakes.
    #[cfg(test)]
    pub(crate) fn plaintext(addr: &str) -> Self {
        Self::new(addr, Dial::Plaintext).expect("a test address")
    }

    /// The open connection.
    fn open(&self) -> Option<Connection> {
        let current = self.inner.current.lock().unwrap_or_else(|p| p.into_inner());
        current
            .as_ref()
            .filter(|c| !c.closed.load(Ordering::Acquire))
            .cloned()
    }

    /// The open connection, dialling a new one if there is none.
    async fn connection(&self) -> Result<Connection, tonic::Status> {
        if let Some(open) = self.open() {
            return Ok(open);
        }
        let _dialling = self.inner.dialling.lock().await;
        if let Some(open) = self.open() {
            return Ok(open);
        }
        let unavailable = |e: &dyn std::fmt::Display| tonic::Status::unavailable(e.to_string());
        let connection = match &self.inner.dial {
            Dial::Mtls { expected, tls } => {
                let stream = connect_mtls(self.inner.authority.as_str(), expected, tls)
                    .await
                    .map_err(|e| unavailable(&e))?;
                self.handshake(stream).await
            }
            #[cfg(test)]
            Dial::Plaintext => {
                let tcp = TcpStream::connect(self.inner.authority.as_str())
                    .await
                    .map_err(|e| unavailable(&e))?;
                self.handshake(tcp).await
            }
        }
        .map_err(|e| {
            unavailable(&format_args!(
                "HTTP/2 handshake with {}: {e}",
                self.inner.authority
            ))
        })?;
        *self.inner.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(connection.clone());
        Ok(connection)
    }

    /// A handle ready to open a stream: on the open connection or, when that one is
    /// going away (the peer sent GOAWAY, say on a restart, or it broke before its task
    /// noticed), on a newly dialled one. Nothing of the call has been sent yet, so the
    /// new connection is safe to use.
    async fn ready_sender(&self) -> Result<h2::client::SendRequest<Bytes>, tonic::Status> {
        let connection = self.connection().await?;
        match connection.sender.clone().ready().await {
            Ok(sender) => Ok(sender),
            Err(e) => {
                tracing::debug!(peer = %self.inner.authority, error = %e, "mesh connection going away: dialling again");
                connection.closed.store(true, Ordering::Release);
                let connection = self.connection().await?;
                connection.sender.ready().await.map_err(status_of)
            }
        }
    }

    /// Starts HTTP/2 on `io` and spawns the connection's task: it reads and writes
    /// the connection and pings the peer, and marks the connection closed when it
    /// ends (the peer closed it, it broke, or a ping went unanswered).
    async fn handshake<T>(&self, io: T) -> Result<Connection, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, mut connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(io)
            .await?;
        let pings = connection.ping_pong();
        let closed = Arc::new(AtomicBool::new(false));
        let peer = self.inner.authority.clone();
        let mark = closed.clone();
        let run = async move {
            tokio::select! {
                result = &mut connection => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "mesh connection closed");
                    }
                }
                () = keep_alive(pings) => {
                    tracing::debug!(%peer, "mesh connection closed: a ping went unanswered");
                }
            }
            mark.store(true, Ordering::Release);
        };
        self.spawn(run);
        Ok(Connection { sender, closed })
    }

    /// Spawns the channel's own work (a connection's task, the rest of a streaming
    /// request) on the runtime it was made on.
    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        match &self.inner.runtime {
            Some(runtime) => runtime.spawn(task),
            None => tokio::spawn(task),
        };
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for PeerChannel {
    type Response = http::Response<RecvBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Always ready: a call dials if it must, and HTTP/2 applies back-pressure.
        Poll::Ready(Ok(()))
    }

    /// Opens a stream for the request on the caller's task: the request's head and
    /// whatever of its body is ready (a unary request's whole message, sent with the
    /// end of the stream) go out without a hand-off to another task; only a body that
    /// is still streaming continues on a task of its own.
    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let (mut head, mut body) = req.into_parts();
        // tonic's requests carry only the path; HTTP/2 needs scheme and authority too.
        let mut uri = std::mem::take(&mut head.uri).into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(self.inner.authority.clone());
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        let channel = self.clone();
        Box::pin(async move {
            head.uri = http::Uri::from_parts(uri)?;
            let mut sender = channel.ready_sender().await?;
            let end_now = http_body::Body::is_end_stream(&body);
            let (response, mut stream) = sender
                .send_request(http::Request::from_parts(head, ()), end_now)
                .map_err(status_of)?;
            if !end_now {
                let finished =
                    std::future::poll_fn(|cx| Poll::Ready(send_ready(&mut body, &mut stream, cx)))
                        .await?;
                if !finished {
                    channel.spawn(pipe(body, stream));
                }
            }
            let response = response.await.map_err(status_of)?;
            Ok(response.map(RecvBody::new))
        })
    }
}

/// Binds a TCP listener; port 0 picks a free port.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::StreamExt;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;

    /// A plaintext gRPC health server on `listener` that counts the connections it
    /// accepts, until `stop` fires (then it closes its connections).
    fn serve(
        listener: TcpListener,
        accepted: Arc<AtomicUsize>,
        stop: tokio::sync::oneshot::Receiver<()>,
    ) -> tokio::task::JoinHandle<()> {
        let (_, health) = tonic_health::server::health_reporter();
        let incoming =
            tokio_stream::wrappers::TcpListenerStream::new(listener).inspect(move |_| {
                accepted.fetch_add(1, Ordering::SeqCst);
            });
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop.await;
                })
                .await
                .unwrap();
        })
    }

    async fn check(client: &mut HealthClient<PeerChannel>) -> Result<(), tonic::Status> {
        client
            .check(HealthCheckRequest::default())
            .await
            .map(|_| ())
    }

    #[tokio::test]
    async fn concurrent_first_calls_share_one_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (_stop, stop) = tokio::sync::oneshot::channel();
        serve(listener, accepted.clone(), stop);
        let client = HealthClient::new(PeerChannel::plaintext(&addr));
        let calls = (0..8).map(|_| {
            let mut client = client.clone();
            async move { check(&mut client).await }
        });
        for result in futures::future::join_all(calls).await {
            result.unwrap();
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_peer_that_is_down_is_unavailable_and_is_dialled_again_once_it_is_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (stop_first, stop) = tokio::sync::oneshot::channel();
        let first = serve(listener, accepted.clone(), stop);
        let mut client = HealthClient::new(PeerChannel::plaintext(&addr.to_string()));
        check(&mut client).await.unwrap();

        // The server stops and closes the connection: calls fail as unavailable.
        stop_first.send(()).unwrap();
        first.await.unwrap();
        let err = check(&mut client).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

        // Back on the same port: the next call dials a new connection.
        let listener = TcpListener::bind(addr).await.unwrap();
        let (_stop, stop) = tokio::sync::oneshot::channel();
        serve(listener, accepted.clone(), stop);
        check(&mut client).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_larger_than_the_peers_window_is_sent_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (_stop, stop) = tokio::sync::oneshot::channel();
        serve(listener, Arc::new(AtomicUsize::new(0)), stop);
        let mut client = HealthClient::new(PeerChannel::plaintext(&addr));
        // Three times the server's windows (1 MiB per stream and per connection, tonic's
        // and hyper's defaults): the rest goes out as the server grants window. The
        // server reads all of it to answer that it knows no such service.
        let service = "s".repeat(3 * 1024 * 1024);
        let err = client
            .check(HealthCheckRequest { service })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    }

    #[tokio::test]
    async fn a_streaming_request_is_sent_as_it_is_produced_and_its_answers_arrive_in_turn() {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(reflection)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut client = ServerReflectionClient::new(PeerChannel::plaintext(&addr));
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let ask = |request| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        tx.send(ask(MessageRequest::ListServices(String::new())))
            .await
            .unwrap();
        let mut answers = client
            .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let first: ServerReflectionResponse = answers.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
            panic!("expected the list of services, got {first:?}");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

        // The request stream is still open: a second question, asked only after the
        // first answer arrived, is sent and answered on the same call.
        tx.send(ask(MessageRequest::FileContainingSymbol(
            "grpc.health.v1.Health".into(),
        )))
        .await
        .unwrap();
        let second = answers.message().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else {
            panic!("expected a file descriptor, got {second:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty());

        // Closing the request stream ends the call cleanly.
        drop(tx);
        assert!(answers.message().await.unwrap().is_none());
    }

    #[test]
    fn an_address_without_a_port_is_refused() {
        let refused = PeerChannel::new("localhost", Dial::Plaintext);
        assert!(matches!(refused, Err(ConnectError::Address(a)) if a == "localhost"));
    }
}
