//! The OpenAI-compatible HTTP API beside gRPC (axum 0.8 on hyper 1, the versions tonic already
//! brings): `POST /v1/completions`, `POST /v1/chat/completions` (JSON, or Server-Sent Events
//! with `stream: true`), `GET /v1/models`, `GET /health`.
//!
//! A request is a job like any other: checked as an upload is, stored, queued by priority
//! (`ringmoe_priority`), run by the same core; its tokens stream from the job's token log the
//! way `WatchJob` streams them. Completion log-probabilities come from a score job over the
//! prompt and the completion (the per-token NLL machinery). A client that disconnects cancels
//! its job. Every refusal is an OpenAI error body with the status a client expects, and the
//! server keeps serving.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ringmoe_proto::proto;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use tracing::{info, warn};

use crate::admission::{check_length, check_tenant_input};
use crate::auth::{Caller, authenticate};
use crate::models::ServedModel;
use crate::openai::{self, ApiError, Prompt, Sampling, StopScan};
use crate::output::Outcome;
use crate::runtime::lock;
use crate::service::Coordinator;
use crate::store::{JobId, JobMode, JobSpec};

/// The HTTP server's settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Bound by the caller (so it can print the address); served while this coordinator leads.
    pub listener: Arc<std::net::TcpListener>,
    /// Largest request body (`--http-max-body-bytes`); longer inputs belong on gRPC.
    pub max_body_bytes: usize,
    /// Unfinished jobs (all APIs) beyond which a request gets 429 (`--http-max-jobs`).
    pub max_jobs: usize,
    /// Serve HTTPS with this process's certificate (`--tls-cert`/`--tls-key`, reloaded with
    /// it); clients are not asked for a certificate. `None`: plain HTTP.
    pub tls: Option<ringmoe_proto::tls::Tls>,
}

/// `max_tokens` of a chat request that gives none.
pub const CHAT_DEFAULT_MAX_TOKENS: u32 = 256;

#[derive(Clone)]
struct Api {
    c: Coordinator,
    cfg: HttpConfig,
}

/// Serves the API on `cfg.listener` until `shutdown` resolves.
pub(crate) async fn serve(
    c: Coordinator,
    cfg: HttpConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let std_listener = cfg.listener.try_clone()?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let tls = cfg.tls.clone().filter(|t| t.http_server().is_some());
    info!(addr = %listener.local_addr()?, https = tls.is_some(), "OpenAI-compatible HTTP API");
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(|| async { ApiError::status(404, "invalid_request_error", "no such route; this server has POST /v1/completions, POST /v1/chat/completions, GET /v1/models and GET /health") })
        .method_not_allowed_fallback(|| async {
            ApiError::status(405, "invalid_request_error", "method not allowed on this route")
        })
        .with_state(Api { c, cfg })
        .into_make_service_with_connect_info::<PeerAddr>();
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
        Some(t) => {
            let local = listener.local_addr()?;
            let incoming = ringmoe_proto::server::tls_accept(listener, move || t.http_server());
            axum::serve(TlsListener { incoming, local }, app)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}

/// A client's address, as the handlers see it (`ConnectInfo`) over HTTP and HTTPS alike.
#[derive(Debug, Clone, Copy)]
struct PeerAddr(std::net::SocketAddr);

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for PeerAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Self(*s.remote_addr())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for PeerAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Self(*s.remote_addr())
    }
}

/// The HTTP API's connections after their TLS handshake.
struct TlsListener {
    incoming: tokio::sync::mpsc::Receiver<(
        tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
        std::net::SocketAddr,
    )>,
    local: std::net::SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(c) => c,
            // The accept loop ended (the runtime is shutting down): nothing more arrives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// A coordinator refusal as the HTTP error a client expects.
fn from_status(s: Status) -> ApiError {
    match s.code() {
        Code::InvalidArgument if s.message().contains("K/V for") => {
            ApiError::bad(s.message()).with_code("context_length_exceeded")
        }
        Code::InvalidArgument => ApiError::bad(s.message()),
        Code::NotFound => ApiError::status(404, "invalid_request_error", s.message()),
        Code::Unauthenticated => ApiError {
            code: Some("invalid_api_key"),
            ..ApiError::status(401, "invalid_request_error", s.message())
        },
        // A client's own queue limit: retrying later helps.
        Code::ResourceExhausted => ApiError {
            retry_after: Some(5),
            code: Some("rate_limit_exceeded"),
            ..ApiError::status(429, "rate_limit_error", s.message())
        },
        Code::Unavailable => ApiError {
            retry_after: Some(5),
            ..ApiError::status(503, "server_error", s.message())
        },
        _ => ApiError::status(500, "server_error", s.message()),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A seed for a request that gives none (OpenAI samples differently each time).
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Cancels a job when dropped unless it finished: a client that goes away (its handler or its
/// event stream dropped) takes its job with it.
struct CancelOnDrop {
    c: Coordinator,
    id: Option<JobId>,
}

impl CancelOnDrop {
    fn finished(&mut self) {
        self.id = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let (Some(id), Ok(h)) = (self.id, tokio::runtime::Handle::try_current()) {
            let c = self.c.clone();
            h.spawn(async move {
                // The server's own act for a client that left: no owner check.
                match c.cancel(id, &Caller::Anyone).await {
                    Ok(phase) => {
                        info!(job = id, phase = ?phase, "HTTP client gone: job cancel requested")
                    }
                    Err(e) => warn!(job = id, error = %e.message(), "cancelling an abandoned job"),
                }
            });
        }
    }
}

/// Where streamed text goes: the response's event channel and how a piece becomes a chunk.
struct Sink {
    tx: mpsc::Sender<Result<SseEvent, Infallible>>,
    chunk: Box<dyn Fn(&str) -> Value + Send + Sync>,
}

impl Sink {
    async fn send(&self, v: &Value) -> Result<(), ApiError> {
        self.tx
            .send(Ok(SseEvent::default().data(v.to_string())))
            .await
            .map_err(|_| gone())
    }

    async fn text(&self, piece: &str) -> Result<(), ApiError> {
        if piece.is_empty() {
            return Ok(());
        }
        self.send(&(self.chunk)(piece)).await
    }
}

fn gone() -> ApiError {
    ApiError::status(499, "client_closed_request", "the client disconnected")
}

/// What a generation produced.
struct Generated {
    tokens: Vec<u32>,
    text: String,
    finish: &'static str,
}

/// A checked request, ready to run.
struct Prepared<'a> {
    name: String,
    model: &'a ServedModel,
    tokens: Vec<u32>,
    sampling: Sampling,
    /// The caller's W3C trace context headers, if it sent them: the job's trace continues it.
    trace: tonic::metadata::MetadataMap,
    /// Who asked: the job's owner, and whose limits apply.
    caller: Caller,
}

/// The authenticated caller of a request (the bearer token checked against the tokens file,
/// as gRPC's interceptor does); a refusal is OpenAI's 401 `invalid_api_key`.
struct Authed(Caller);

impl FromRequestParts<Api> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let peer = parts
            .extensions
            .get::<ConnectInfo<PeerAddr>>()
            .map_or_else(|| "unknown".to_string(), |c| c.0.to_string());
        authenticate(api.c.rt.cfg.auth.as_deref(), header, &peer)
            .map(Authed)
            .map_err(from_status)
    }
}

/// The trace context headers of an HTTP request.
fn trace_headers(h: &HeaderMap) -> tonic::metadata::MetadataMap {
    let mut keep = HeaderMap::new();
    for k in ["traceparent", "tracestate"] {
        if let Some(v) = h.get(k) {
            keep.insert(k, v.clone());
        }
    }
    tonic::metadata::MetadataMap::from_headers(keep)
}

/// A job's trace root for `p` (continuing the caller's trace).
fn job_span(p: &Prepared<'_>) -> tracing::Span {
    let span = crate::telemetry::job_span();
    ringmoe_telemetry::propagate::set_parent(&span, &p.trace);
    span
}

impl Api {
    async fn body(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<serde_json::Map<String, Value>, ApiError> {
        let max = self.cfg.max_body_bytes;
        let too_big = |n: Option<u64>| ApiError {
            code: Some("request_too_large"),
            ..ApiError::status(
                413,
                "invalid_request_error",
                format!(
                    "the request body{} is over this server's limit of {max} bytes \
                     (--http-max-body-bytes); send long inputs over gRPC (`ringmoe submit --file`), \
                     which uploads them in chunks",
                    n.map(|n| format!(" ({n} bytes)")).unwrap_or_default()
                ),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(too_big(declared));
        }
        let bytes = axum::body::to_bytes(body, max).await.map_err(|e| {
            if e.to_string().contains("length limit") {
                too_big(None)
            } else {
                ApiError::bad(format!("reading the request body: {e}"))
            }
        })?;
        openai::object(&bytes)
    }

    fn model(&self, name: &str) -> Result<&ServedModel, ApiError> {
        self.c.rt.models.get(name).ok_or_else(|| {
            let mut known: Vec<&str> = self.c.rt.models.keys().map(String::as_str).collect();
            known.sort_unstable();
            ApiError {
                param: Some("model".into()),
                code: Some("model_not_found"),
                ..ApiError::status(
                    404,
                    "invalid_request_error",
                    format!(
                        "the model '{name}' does not exist; this server serves: {}",
                        known.join(", ")
                    ),
                )
            }
        })
    }

    /// Room for one more job: live workers, and fewer unfinished jobs than `--http-max-jobs`.
    async fn admit(&self, p: &Prepared<'_>) -> Result<(), ApiError> {
        self.c.admit_caller(&p.caller).map_err(from_status)?;
        check_tenant_input(p.caller.tenant(), p.tokens.len()).map_err(from_status)?;
        let unfinished = lock(&self.c.rt.jobs)
            .map_err(from_status)?
            .values()
            .filter(|j| !crate::convert::phase_finished(j.progress.borrow().progress.phase()))
            .count();
        if unfinished >= self.cfg.max_jobs {
            return Err(ApiError {
                retry_after: Some(2),
                code: Some("rate_limit_exceeded"),
                ..ApiError::status(
                    429,
                    "rate_limit_error",
                    format!(
                        "{unfinished} jobs are queued or running, the most this server takes \
                         (--http-max-jobs); try again shortly"
                    ),
                )
            });
        }
        let workers = self.c.rt.live_workers().await.map_err(from_status)?;
        if workers.is_empty() {
            return Err(ApiError {
                retry_after: Some(5),
                ..ApiError::status(503, "server_error", "no live workers; try again shortly")
            });
        }
        let n = p.sampling.max_tokens.unwrap_or(0);
        let spec = self.spec(
            p,
            if n > 0 {
                self.generate_mode(&p.sampling, n)
            } else {
                JobMode::Score
            },
        );
        let len = if n > 0 {
            p.tokens.len()
        } else {
            p.tokens.len().max(2)
        };
        check_length(&spec, len, p.model, &workers).map_err(from_status)
    }

    fn generate_mode(&self, s: &Sampling, max_new_tokens: u32) -> JobMode {
        JobMode::Generate {
            max_new_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            seed: s.seed.unwrap_or_else(fresh_seed),
        }
    }

    fn spec(&self, p: &Prepared<'_>, mode: JobMode) -> JobSpec {
        JobSpec {
            model: p.name.clone(),
            mode,
            attention: p.sampling.attention.clone(),
            priority: p.sampling.priority,
            owner: p.caller.owner(),
        }
    }

    /// Starts a generate job; the guard cancels it if the request goes away first.
    async fn start(&self, p: &Prepared<'_>, n: u32) -> Result<(JobId, CancelOnDrop), ApiError> {
        let spec = self.spec(p, self.generate_mode(&p.sampling, n));
        let id = self
            .c
            .create_job(spec, p.tokens.clone(), job_span(p))
            .await
            .map_err(from_status)?;
        Ok((
            id,
            CancelOnDrop {
                c: self.c.clone(),
                id: Some(id),
            },
        ))
    }

    /// Follows job `id` to its end, cutting at the first stop string (then the rest of the
    /// job is cancelled); streamed text goes to `sink` as soon as no stop string can start in
    /// it.
    async fn drive(
        &self,
        id: JobId,
        guard: &mut CancelOnDrop,
        p: &Prepared<'_>,
        sink: Option<&Sink>,
    ) -> Result<Generated, ApiError> {
        let mut rx = self.c.follow(id, &p.caller).map_err(from_status)?;
        let stops = &p.sampling.stop;
        let (mut tokens, mut text, mut sent) = (Vec::new(), String::new(), 0);
        loop {
            let msg = match sink {
                Some(s) => tokio::select! {
                    m = rx.recv() => m,
                    _ = s.tx.closed() => return Err(gone()),
                },
                None => rx.recv().await,
            };
            let Some(msg) = msg else {
                return Err(ApiError::status(
                    500,
                    "server_error",
                    format!("job {id}'s progress ended early"),
                ));
            };
            let m = msg.map_err(from_status)?;
            if m.phase() == proto::JobPhase::Retrying {
                // The new run decodes from the first token again (same seed, same tokens);
                // what was already streamed is not sent twice.
                tokens.clear();
                text.clear();
            }
            tokens.extend_from_slice(&m.new_tokens);
            text.push_str(&m.new_text);
            match openai::scan_stops(&text, sent, stops) {
                StopScan::Stopped { at } => {
                    if let Some(s) = sink {
                        s.text(&text[sent.min(at)..at]).await?;
                    }
                    text.truncate(at);
                    // Dropping the guard cancels the rest of the job.
                    return Ok(Generated {
                        tokens,
                        text,
                        finish: "stop",
                    });
                }
                StopScan::Safe { upto } if upto > sent => {
                    if let Some(s) = sink {
                        s.text(&text[sent..upto]).await?;
                    }
                    sent = upto;
                }
                StopScan::Safe { .. } => {}
            }
            match m.phase() {
                proto::JobPhase::Done => {
                    guard.finished();
                    if let Some(s) = sink {
                        s.text(text.get(sent..).unwrap_or_default()).await?;
                    }
                    let n = p.sampling.max_tokens.unwrap_or(0) as usize;
                    let eos = tokens.last().is_some_and(|t| p.model.eos.contains(t));
                    let finish = if !eos && tokens.len() >= n {
                        "length"
                    } else {
                        "stop"
                    };
                    return Ok(Generated {
                        tokens,
                        text,
                        finish,
                    });
                }
                proto::JobPhase::Failed => {
                    guard.finished();
                    return Err(ApiError::status(
                        500,
                        "server_error",
                        format!("job {id} failed: {}", m.message),
                    ));
                }
                proto::JobPhase::Cancelled => {
                    guard.finished();
                    return Err(ApiError::status(
                        500,
                        "server_error",
                        format!("job {id} was cancelled"),
                    ));
                }
                _ => {}
            }
        }
    }

    /// Log-probabilities of `tokens[from..]` given their prefixes, from a score job (the first
    /// token has none: `None`).
    async fn logprobs(
        &self,
        p: &Prepared<'_>,
        tokens: &[u32],
        from: usize,
    ) -> Result<Vec<Option<f32>>, ApiError> {
        if tokens.len() < 2 {
            return Ok(vec![None; tokens.len().saturating_sub(from)]);
        }
        let id = self
            .c
            .create_job(self.spec(p, JobMode::Score), tokens.to_vec(), job_span(p))
            .await
            .map_err(from_status)?;
        let mut guard = CancelOnDrop {
            c: self.c.clone(),
            id: Some(id),
        };
        let out = self.c.result(id, &p.caller).await.map_err(from_status);
        guard.finished();
        let Outcome::Scored { first, nll } = out?.outcome else {
            return Err(ApiError::status(
                500,
                "server_error",
                format!("score job {id} returned tokens"),
            ));
        };
        Ok((from..tokens.len())
            .map(|pos| {
                let i = (pos as u64).checked_sub(first)?;
                nll.get(i as usize).map(|x| -x)
            })
            .collect())
    }
}

fn tokenizer<'a>(name: &str, m: &'a ServedModel) -> Result<&'a ringmoe_hf::Tokenizer, ApiError> {
    m.tokenizer.as_ref().ok_or_else(|| {
        ApiError::field(
            "model",
            format!("model '{name}' has no tokenizer.json; this API speaks text (use gRPC with token ids)"),
        )
    })
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// An SSE response fed by `run`, which gets the sink; an error after the stream started goes
/// out as an error event. The stream ends with `data: [DONE]`.
fn sse<F>(chunk: Box<dyn Fn(&str) -> Value + Send + Sync>, run: impl FnOnce(Sink) -> F) -> Response
where
    F: std::future::Future<Output = Result<(), ApiError>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let sink = Sink {
        tx: tx.clone(),
        chunk,
    };
    let fut = run(sink);
    tokio::spawn(async move {
        if let Err(e) = fut.await {
            if e.status == 499 {
                return;
            }
            let _ = tx
                .send(Ok(SseEvent::default().data(e.body().to_string())))
                .await;
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}

async fn completions(
    State(api): State<Api>,
    Authed(caller): Authed,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req = openai::completion(api.body(&headers, body).await?)?;
    let model = api.model(&req.model)?;
    let tok = tokenizer(&req.model, model)?;
    let (tokens, prompt_text) = match &req.prompt {
        Prompt::Text(t) => (
            tok.encode(t, true)
                .map_err(|e| ApiError::field("prompt", format!("tokenizing the prompt: {e}")))?,
            t.clone(),
        ),
        Prompt::Tokens(ids) => {
            let vocab = model.config.vocab_size;
            if let Some((i, t)) = ids.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
                return Err(ApiError::field(
                    "prompt",
                    format!("prompt[{i}] = {t} is outside the model's vocabulary of {vocab} ids"),
                ));
            }
            (
                ids.clone(),
                tok.decode(ids, true)
                    .map_err(|e| ApiError::status(500, "server_error", e.to_string()))?,
            )
        }
    };
    if tokens.is_empty() {
        return Err(ApiError::field("prompt", "the prompt is empty"));
    }
    if req.logprobs && req.sampling.stream {
        return Err(ApiError::field(
            "logprobs",
            "logprobs with stream is not supported; send stream: false",
        ));
    }
    let p = Prepared {
        name: req.model.clone(),
        model,
        tokens,
        sampling: req.sampling.clone(),
        trace: trace_headers(&headers),
        caller,
    };
    api.admit(&p).await?;
    let n = p.sampling.max_tokens.unwrap_or(0);
    let created = now_secs();
    let name = req.model.clone();
    if p.sampling.stream {
        let (id, mut guard) = if n > 0 {
            let (i, g) = api.start(&p, n).await?;
            (i, Some(g))
        } else {
            (0, None)
        };
        let cid = format!("cmpl-{id}");
        let chunk = {
            let (cid, name) = (cid.clone(), name.clone());
            Box::new(move |t: &str| {
                json!({"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": t, "logprobs": null, "finish_reason": null}]})
            })
        };
        let prompt_len = p.tokens.len();
        let api = api.clone();
        return Ok(sse(chunk, move |sink| async move {
            let p = Prepared {
                name: p.name.clone(),
                model: api.model(&name)?,
                tokens: p.tokens,
                sampling: p.sampling,
                trace: p.trace,
                caller: p.caller,
            };
            if req.echo {
                sink.text(&prompt_text).await?;
            }
            let g = match guard.as_mut() {
                Some(guard) => api.drive(id, guard, &p, Some(&sink)).await?,
                None => Generated {
                    tokens: Vec::new(),
                    text: String::new(),
                    finish: "length",
                },
            };
            sink.send(&json!({"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": "", "logprobs": null, "finish_reason": g.finish}]})).await?;
            if p.sampling.include_usage {
                sink.send(&json!({"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [], "usage": usage(prompt_len, g.tokens.len())})).await?;
            }
            Ok(())
        }));
    }
    let (id, g) = if n > 0 {
        let (id, mut guard) = api.start(&p, n).await?;
        (id, api.drive(id, &mut guard, &p, None).await?)
    } else {
        (
            0,
            Generated {
                tokens: Vec::new(),
                text: String::new(),
                finish: "length",
            },
        )
    };
    let mut text = if req.echo {
        prompt_text.clone()
    } else {
        String::new()
    };
    text.push_str(&g.text);
    let logprobs = if req.logprobs {
        let all: Vec<u32> = p.tokens.iter().chain(&g.tokens).copied().collect();
        let from = if req.echo { 0 } else { p.tokens.len() };
        let lp = api.logprobs(&p, &all, from).await?;
        let mut offset = if req.echo {
            0
        } else {
            prompt_text.chars().count()
        };
        let (mut strs, mut offsets) = (Vec::new(), Vec::new());
        for t in &all[from..] {
            let s = tok
                .decode(&[*t], false)
                .map_err(|e| ApiError::status(500, "server_error", e.to_string()))?;
            offsets.push(offset);
            offset += s.chars().count();
            strs.push(s);
        }
        json!({"tokens": strs, "token_logprobs": lp, "top_logprobs": null, "text_offset": offsets})
    } else {
        Value::Null
    };
    Ok(axum::Json(json!({
        "id": format!("cmpl-{id}"), "object": "text_completion", "created": created, "model": name,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": g.finish}],
        "usage": usage(p.tokens.len(), g.tokens.len()),
    }))
    .into_response())
}

async fn chat_completions(
    State(api): State<Api>,
    Authed(caller): Authed,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req = openai::chat(api.body(&headers, body).await?)?;
    let model = api.model(&req.model)?;
    let tok = tokenizer(&req.model, model)?;
    let template = model.chat.as_ref().ok_or_else(|| {
        ApiError::field(
            "model",
            format!(
                "model '{}' has no chat template (its tokenizer_config.json has no chat_template); \
                 use /v1/completions with a prompt",
                req.model
            ),
        )
    })?;
    let prompt = template
        .render(&req.messages, true)
        .map_err(|e| ApiError::field("messages", e.to_string()))?;
    // The template writes the special tokens (BOS) itself.
    let tokens = tok
        .encode(&prompt, false)
        .map_err(|e| ApiError::field("messages", format!("tokenizing the chat prompt: {e}")))?;
    if tokens.is_empty() {
        return Err(ApiError::field("messages", "the chat prompt is empty"));
    }
    let mut sampling = req.sampling.clone();
    let n = *sampling.max_tokens.get_or_insert(CHAT_DEFAULT_MAX_TOKENS);
    if n == 0 {
        return Err(ApiError::field(
            "max_tokens",
            "a chat completion needs max_tokens ≥ 1",
        ));
    }
    let p = Prepared {
        name: req.model.clone(),
        model,
        tokens,
        sampling,
        trace: trace_headers(&headers),
        caller,
    };
    api.admit(&p).await?;
    let created = now_secs();
    let name = req.model.clone();
    let (id, mut guard) = api.start(&p, n).await?;
    let cid = format!("chatcmpl-{id}");
    if p.sampling.stream {
        let chunk = {
            let (cid, name) = (cid.clone(), name.clone());
            Box::new(move |t: &str| {
                json!({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": {"content": t}, "logprobs": null, "finish_reason": null}]})
            })
        };
        let prompt_len = p.tokens.len();
        let api = api.clone();
        return Ok(sse(chunk, move |sink| async move {
            let p = Prepared {
                name: p.name.clone(),
                model: api.model(&name)?,
                tokens: p.tokens,
                sampling: p.sampling,
                trace: p.trace,
                caller: p.caller,
            };
            sink.send(&json!({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]})).await?;
            let g = api.drive(id, &mut guard, &p, Some(&sink)).await?;
            sink.send(&json!({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": g.finish}]})).await?;
            if p.sampling.include_usage {
                sink.send(&json!({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [], "usage": usage(prompt_len, g.tokens.len())})).await?;
            }
            Ok(())
        }));
    }
    let g = api.drive(id, &mut guard, &p, None).await?;
    Ok(axum::Json(json!({
        "id": cid, "object": "chat.completion", "created": created, "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text}, "logprobs": null, "finish_reason": g.finish}],
        "usage": usage(p.tokens.len(), g.tokens.len()),
    }))
    .into_response())
}

async fn models(State(api): State<Api>, _: Authed) -> Response {
    let mut names: Vec<&String> = api.c.rt.models.keys().collect();
    names.sort();
    let data: Vec<Value> = names
        .into_iter()
        .map(|n| json!({"id": n, "object": "model", "created": 0, "owned_by": "ringmoe"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn health(State(api): State<Api>) -> Response {
    match api.c.rt.live_workers().await {
        Ok(w) => axum::Json(json!({"status": "ok", "workers": w.len()})).into_response(),
        Err(e) => from_status(e).into_response(),
    }
}
