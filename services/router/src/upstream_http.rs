//! The HTTP client that carries model calls to provider APIs: pooled keep-alive
//! connections, HTTP/2 where the upstream offers it (ALPN), TLS checked against the
//! platform's trust store, and HTTP proxies from the environment (`HTTP_PROXY`,
//! `HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`, upper or lower case).
//!
//! It is hyper's pooled client with only what a provider call needs: no redirects
//! (a provider API answers, it does not redirect), no cookies, no decompression.
//! Timeouts other than connecting are the caller's (`provider`), per attempt.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::Full;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower::Service;

/// The proxy environment variables `Matcher::from_env` reads.
const PROXY_VARS: [&str; 6] = [
    "ALL_PROXY",
    "all_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
];

type Connector = hyper_rustls::HttpsConnector<ProxyConnector>;

/// A pooled client for provider APIs. Cheap to clone: clones share the pool.
#[derive(Clone, Debug)]
pub struct UpstreamHttp {
    client: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
    /// `None` when no proxy is configured, so a call skips the lookup.
    proxies: Option<Arc<Matcher>>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot set up TLS for provider calls: {0}")]
    Tls(#[from] rustls::Error),
}

impl UpstreamHttp {
    /// A client whose proxies come from the environment.
    pub fn new(connect_timeout: Duration) -> Result<Self, BuildError> {
        let configured = PROXY_VARS
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
        Self::with_proxies(connect_timeout, configured.then(Matcher::from_env))
    }

    /// A client sending through `proxies` (`None`: always direct).
    pub fn with_proxies(
        connect_timeout: Duration,
        proxies: Option<Matcher>,
    ) -> Result<Self, BuildError> {
        use rustls_platform_verifier::ConfigVerifierExt;
        let tls = rustls::ClientConfig::with_platform_verifier()?;
        let proxies = proxies.map(Arc::new);
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(ProxyConnector {
                http,
                proxies: proxies.clone(),
            });
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .build(connector);
        Ok(Self { client, proxies })
    }

    /// Sends `req`; the response once its headers have arrived. A plain-HTTP request
    /// that goes through a proxy carries the proxy's credentials.
    pub async fn send(
        &self,
        mut req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        if let Some(proxies) = &self.proxies
            && req.uri().scheme() == Some(&http::uri::Scheme::HTTP)
            && let Some(auth) = proxies
                .intercept(req.uri())
                .and_then(|p| p.basic_auth().cloned())
        {
            req.headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, auth);
        }
        self.client.request(req).await
    }
}

/// Dials the upstream, or the proxy the environment names for it: an HTTPS upstream
/// through an HTTP `CONNECT` tunnel (TLS then runs end to end inside it), a plain-HTTP
/// upstream by sending the request to the proxy in absolute form.
#[derive(Clone, Debug)]
struct ProxyConnector {
    http: HttpConnector,
    proxies: Option<Arc<Matcher>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Service<Uri> for ProxyConnector {
    type Response = Dialed;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Dialed, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let proxy = self.proxies.as_ref().and_then(|p| p.intercept(&dst));
        let mut http = self.http.clone();
        Box::pin(async move {
            let Some(proxy) = proxy else {
                let io = http.call(dst).await?;
                return Ok(Dialed { io, proxied: false });
            };
            let proxy_uri = http_proxy_uri(&proxy)?;
            if dst.scheme() == Some(&http::uri::Scheme::HTTPS) {
                let mut tunnel = Tunnel::new(proxy_uri, http);
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                let io = tunnel.call(dst).await?;
                Ok(Dialed { io, proxied: false })
            } else {
                let io = http.call(proxy_uri).await?;
                Ok(Dialed { io, proxied: true })
            }
        })
    }
}

/// The proxy's address, if it is one this client can speak to (plain HTTP).
fn http_proxy_uri(proxy: &Intercept) -> Result<Uri, BoxError> {
    let uri = proxy.uri();
    if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
        return Err(format!(
            "proxy {} is not supported: only http:// proxies are",
            uri.scheme_str().unwrap_or("without a scheme")
        )
        .into());
    }
    // Without the credentials (they go in a header, never in the request line).
    let authority = uri
        .authority()
        .map(|a| a.as_str().rsplit('@').next().unwrap_or_default().to_owned())
        .unwrap_or_default();
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query("/")
        .build()
        .map_err(Into::into)
}

/// A dialed TCP connection; `proxied`: to an HTTP proxy that expects absolute-form
/// request lines.
#[derive(Debug)]
pub struct Dialed {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Connection for Dialed {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl Read for Dialed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for Dialed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A forward proxy on loopback that records the head of each request it gets.
    /// Plain requests are relayed to `origin`; a `CONNECT` is refused with 403.
    async fn proxy(origin: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match client.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_lowercase();
                    let connect = head.starts_with("connect ");
                    seen.lock().unwrap().push(head);
                    if connect {
                        let _ = client.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").await;
                        return;
                    }
                    let mut upstream = TcpStream::connect(origin).await.unwrap();
                    upstream.write_all(&buf).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        (addr, heads)
    }

    /// The simulated upstream; its URL and the address the proxy relays to.
    async fn simulated() -> (crate::tests::Upstream, SocketAddr) {
        let sim = crate::tests::sim().await;
        let origin: Uri = sim.url.parse().unwrap();
        let addr = origin.authority().unwrap().as_str().parse().unwrap();
        (sim, addr)
    }

    /// The one request head the proxy saw.
    fn only_head(heads: &Mutex<Vec<String>>) -> String {
        let heads = heads.lock().unwrap();
        assert_eq!(heads.len(), 1, "{heads:?}");
        heads[0].clone()
    }

    /// `Proxy-Authorization` for `alice:s3cret`, as the proxy sees it (lower-cased).
    const ALICE: &str = "proxy-authorization: basic ywxpy2u6cznjcmv0\r\n";

    fn chat(url: &str) -> http::Request<Full<Bytes>> {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        http::Request::post(format!("{url}/chat/completions"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    fn client(proxies: Option<Matcher>) -> UpstreamHttp {
        crewmesh_testkit::init_crypto();
        UpstreamHttp::with_proxies(Duration::from_secs(5), proxies).unwrap()
    }

    #[tokio::test]
    async fn plain_http_goes_through_the_proxy_in_absolute_form_with_its_credentials() {
        let (sim, origin) = simulated().await;
        let (proxy, heads) = proxy(origin).await;
        let proxies = Matcher::builder()
            .http(format!("http://alice:s3cret@{proxy}"))
            .build();
        let resp = client(Some(proxies)).send(chat(&sim.url)).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(body.starts_with(b"{"), "{body:?}");
        let head = only_head(&heads);
        let line = format!("post {}/chat/completions http/1.1\r\n", sim.url);
        assert!(head.starts_with(&line), "{head}");
        assert!(head.contains(ALICE), "{head}");
    }

    #[tokio::test]
    async fn https_is_tunnelled_with_connect_and_a_refused_tunnel_fails_the_call() {
        let (_sim, origin) = simulated().await;
        let (proxy, heads) = proxy(origin).await;
        let proxies = Matcher::builder()
            .https(format!("http://alice:s3cret@{proxy}"))
            .build();
        let err = client(Some(proxies))
            .send(chat("https://api.example.test/v1"))
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        let head = only_head(&heads);
        assert!(
            head.starts_with("connect api.example.test:443 http/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains(ALICE), "{head}");
    }

    #[tokio::test]
    async fn hosts_in_no_proxy_and_clients_without_proxies_are_reached_directly() {
        let (sim, origin) = simulated().await;
        let (proxy, heads) = proxy(origin).await;
        let bypassed = Matcher::builder()
            .all(format!("http://{proxy}"))
            .no("127.0.0.1")
            .build();
        for proxies in [Some(bypassed), None] {
            let resp = client(proxies).send(chat(&sim.url)).await.unwrap();
            assert_eq!(resp.status(), 200);
        }
        assert!(heads.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_proxy_this_client_cannot_speak_to_is_an_error_naming_it() {
        let proxies = Matcher::builder().all("socks5://127.0.0.1:9").build();
        let err = client(Some(proxies))
            .send(chat("http://127.0.0.1:9/v1"))
            .await
            .unwrap_err();
        let chain = format!("{:?}", std::error::Error::source(&err));
        assert!(chain.contains("proxy socks5 is not supported"), "{chain}");
    }
}
