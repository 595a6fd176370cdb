//! mTLS transport for tonic: an incoming stream of authenticated connections for
//! servers, and a connector that dials a peer and checks its SPIFFE identity for
//! clients.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

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

/// A lazily connecting tonic channel to the service at `addr` whose identity must be
/// `expected`. It reconnects by itself after failures.
pub fn mesh_channel(addr: &str, expected: SpiffeId, tls: MeshTls) -> Result<Channel, ConnectError> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ConnectError::Address(addr.to_owned()))?
        // No `connect_timeout` here: tonic would then wrap every connection's reads and
        // writes in a timeout adapter for good. `connect_mtls` bounds the dial instead.
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let addr = addr.to_owned();
    let connector = tower::service_fn(move |_: http::Uri| {
        let addr = addr.clone();
        let expected = expected.clone();
        let tls = tls.clone();
        async move {
            connect_mtls(&addr, &expected, &tls)
                .await
                .map(TokioIo::new)
                .map_err(|e| io::Error::other(e.to_string()))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// Binds a TCP listener; port 0 picks a free port.
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
