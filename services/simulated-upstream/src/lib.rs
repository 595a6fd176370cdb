//! A **simulated** OpenAI-compatible model upstream. It is not a model and never calls
//! one: it answers chat completions with deterministic, clearly labelled text, so that
//! `crewmesh up` and the test suites run without an API key or network access. Every
//! response carries the header `x-crewmesh-simulated: true`, every reply text starts with
//! `[simulated]`, and models are "owned by" `crewmesh-simulated`.
//!
//! # Endpoints
//!
//! * `GET /v1/models` lists `sim-small` and `sim-large`; `GET /v1/models/{id}` describes
//!   any id. Completions accept any model name.
//! * `POST /v1/chat/completions` speaks the OpenAI wire format (see below).
//! * `GET /healthz` answers `200`.
//! * `/_sim/faults` sets fault settings at run time (see below).
//! * Anything else is a `404` with an OpenAI error body.
//!
//! The `Authorization` header is accepted and ignored (any bearer token works); no header
//! is logged.
//!
//! # Requests
//!
//! The parser is lenient: unknown fields and fields the simulation does not act on
//! (`temperature`, `seed`, `response_format`, `logprobs`, ...) are ignored. Message
//! `content` may be a string, an array of content parts (the `text` of each part is
//! concatenated; image and other parts are skipped) or null. A missing `model` counts as
//! `sim-small`. A body that is not JSON, lacks `messages`, has an empty `messages`, or
//! gives a field the simulation reads the wrong type (`n` outside 1..=128, a `stop` that is
//! not a string or strings, a tool without `function.name`, a `tool_choice` naming an
//! undeclared function, ...) is answered `400` with an OpenAI error body whose message and
//! `param` name the problem. Bodies over 4 MiB get `413`.
//!
//! # The deterministic reply
//!
//! * If the last message has role `tool`: `"[simulated] tool result: <its content>"`.
//! * Else, if `tools` is non-empty, the last message has role `user` and `tool_choice` is
//!   not `"none"`: one call to the first tool (or to the function `tool_choice` names),
//!   with `id` `"call_"` + the first 16 hex digits of SHA-256 of the user text,
//!   `arguments` `{"input":"<user text>"}` (a JSON document in a string), `content` null
//!   and `finish_reason` `"tool_calls"`.
//! * Else: `"[simulated] echo: <text of the last user message>"`.
//!
//! Echoed text is cut to 2,000 characters. Text replies are then cut at the earliest
//! `stop` sequence (`finish_reason` `"stop"`), and then to `max_completion_tokens` (or
//! `max_tokens`) × 4 characters, in which case `finish_reason` is `"length"`. `n` > 1
//! gives `n` identical choices.
//!
//! Usage: `prompt_tokens` = ceil(characters of all message contents / 4) + 1 per message
//! (at least 1); `completion_tokens` = ceil(reply characters / 4) (at least 1; for a tool
//! call, the characters of its name and arguments) times `n`; `total_tokens` is the sum.
//!
//! The reply is a `chat.completion` with `id` `"chatcmpl-sim-"` + 24 hex digits of
//! SHA-256 of the raw request body, `created` 1700000000, `model` as requested and
//! `system_fingerprint` `"crewmesh-simulated"`: the same body always gets the same bytes.
//!
//! # Streaming
//!
//! With `"stream": true` the reply is `text/event-stream`, one `data: <json>\n\n` event
//! per `chat.completion.chunk`: an opening chunk with delta
//! `{"role":"assistant","content":""}`, one chunk per 8 characters of content, a closing
//! chunk with an empty delta and the finish reason, then (with
//! `stream_options.include_usage`, which also puts `"usage":null` on the other chunks) a
//! chunk with `choices: []` and the usage, then `data: [DONE]`. A tool call streams as
//! OpenAI's do: the opening delta carries
//! `tool_calls[{index:0,id,type:"function",function:{name,arguments:""}}]`, the following
//! chunks carry 8-character fragments of `arguments`. With `n` > 1 each chunk is sent once
//! per choice index.
//!
//! # Fault injection
//!
//! For router tests, a request can ask for a failure by its `model` name or by the request
//! header `x-sim-fault` ([`FAULT_HEADER`]); the header wins, `x-sim-fault: none` turns
//! faults off whatever the model is called, and an unknown header value is a `400` (so a
//! typo does not silently pass). Names are case-insensitive.
//!
//! | fault | behaviour |
//! |---|---|
//! | `error-500` | `500` `{"error":{"message":"simulated upstream failure","type":"server_error","code":null}}` |
//! | `error-429` | `429` with `retry-after: 1`, `type` `"requests"`, `code` `"rate_limit_exceeded"` |
//! | `error-400` | `400` `invalid_request_error` |
//! | `slow-<ms>` | waits that many milliseconds (at most 30,000), then answers normally |
//! | `stream-break` | streamed: the opening chunk and two content chunks, then the connection is dropped without `[DONE]`; not streamed: half the JSON body, then the connection is dropped |
//! | `hang` | never answers; ends when the client goes away |
//!
//! A header-selected `error-*` is answered before the body is parsed. During a graceful
//! shutdown, `hang` and `slow-*` requests still in flight are answered `503` so the drain
//! can finish.
//!
//! # Fault settings at run time
//!
//! Faults can also be set per deployment (the upstream model name a request names) while
//! the upstream runs, through a small admin API on the same port (plain HTTP, no
//! authentication: the simulated upstream is a local test tool):
//!
//! * `PUT /_sim/faults/{model}` with a JSON body installs or replaces the settings of
//!   `model`; `*` is the default for every model without settings of its own. The answer
//!   is the installed entry.
//! * `GET /_sim/faults` lists every entry (`model`, `settings` with defaults filled in,
//!   `requests` drawn and `faults_injected` so far); `GET /_sim/faults/{model}` shows one.
//! * `DELETE /_sim/faults/{model}` clears one (`404` if it had none); `DELETE
//!   /_sim/faults` clears all.
//!
//! ```json
//! { "error_rate": 0.2, "error_status": 500,
//!   "rate_limit": {"rate": 0.1, "retry_after_s": 2},
//!   "latency": {"distribution": "lognormal", "median_ms": 20, "p99_ms": 200},
//!   "hang_rate": 0.0, "drop_mid_stream_rate": 0.0, "drop_after_chunks": 2, "seed": 42 }
//! ```
//!
//! Every field is optional (rates default to 0, `error_status` to 500, `retry_after_s`
//! to 1, `drop_after_chunks` to 2). Latency distributions: `fixed` (`ms`), `uniform`
//! (`min_ms`, `max_ms`), `normal` (`mean_ms`, `stddev_ms`; negative draws become 0) and
//! `lognormal` (`median_ms`, `p99_ms`); every draw is cut to 30,000 ms. Parsing is strict:
//! an unknown field, a rate outside `[0, 1]`, an `error_status` outside 400..=599 or a
//! field the chosen distribution does not take is a `400` whose `param` names the field,
//! and nothing is installed. A change is swapped in atomically and applies from the next
//! request on.
//!
//! Per request: the latency is waited first (for every request, faulted or not), then at
//! most one fault is acted out, checked in this order: hang, rate limit (`429` with
//! `Retry-After: retry_after_s`), error (`error_status`, `server_error` body for 5xx),
//! drop (a stream is cut after the opening chunk and `drop_after_chunks` content
//! chunks, a plain answer halfway through its JSON, and the connection is dropped).
//! With `seed` the draws are reproducible: the same sequence of requests to a model gets
//! the same faults after each `PUT`. The `x-sim-fault` header, and then a fault-named
//! model, win over these settings (`x-sim-fault: none` turns them off for a request).
//!
//! # Use
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use crewmesh_simulated_upstream::SimulatedUpstream;
//!
//! let upstream = SimulatedUpstream::bind("127.0.0.1:0".parse().expect("valid")).await?;
//! let base_url = upstream.base_url(); // http://127.0.0.1:PORT/v1
//! let served = upstream.request_count();
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(upstream.run_until_stopped(async move {
//!     let _ = stopped.await;
//! }));
//! // ... point an OpenAI client at `base_url` ...
//! let _ = stop.send(());
//! server.await.expect("server task")?;
//! # let _ = (base_url, served);
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod error;
mod fault_settings;
mod faults;
mod reply;
mod routes;
mod stream;
mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use fault_settings::ANY_MODEL;
pub use faults::FAULT_HEADER;
pub use routes::{LISTED_MODELS, SIMULATED_HEADER};

/// A bound, not yet serving, simulated upstream.
#[derive(Debug)]
pub struct SimulatedUpstream {
    listener: TcpListener,
    local_addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

impl SimulatedUpstream {
    /// Binds on `addr` (port 0 picks a free port; read it back with
    /// [`local_addr`](Self::local_addr)).
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(Self {
            listener,
            local_addr,
            requests: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Base URL for OpenAI clients, e.g. `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.local_addr)
    }

    /// Number of `POST /v1/chat/completions` requests received so far, faulted and
    /// rejected ones included; the counter stays live after
    /// [`run_until_stopped`](Self::run_until_stopped) takes `self`.
    pub fn request_count(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.requests)
    }

    /// Serves until `shutdown` resolves, then stops accepting, answers in-flight `hang`
    /// and `slow-*` requests with `503`, and waits for open requests to finish.
    /// Accepted sockets get `TCP_NODELAY`.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (draining, signal) = watch::channel(false);
        let app = routes::app(routes::AppState {
            requests: self.requests,
            shutdown: routes::ShutdownSignal::new(signal),
            faults: Arc::default(),
        });
        let listener = self.listener.tap_io(|socket| {
            if let Err(err) = socket.set_nodelay(true) {
                tracing::warn!(error = %err, "failed to set TCP_NODELAY on a simulated upstream connection");
            }
        });
        tracing::info!(addr = %self.local_addr, "simulated upstream serving");
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                tracing::info!("simulated upstream draining");
                // Nobody listening just means no request is waiting on the signal.
                let _ = draining.send(true);
            })
            .await
    }
}

/// The simulated upstream as a bare router, for embedding in another server. Its request
/// counter is private and `hang` requests only end when the client goes away.
pub fn router() -> axum::Router {
    let (_never_draining, signal) = watch::channel(false);
    routes::app(routes::AppState {
        requests: Arc::new(AtomicU64::new(0)),
        shutdown: routes::ShutdownSignal::new(signal),
        faults: Arc::default(),
    })
}
