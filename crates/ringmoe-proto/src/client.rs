//! The client side of [`JobService`](crate::proto::job_service_server::JobService): what
//! `ringmoe submit` and the tests use.

use tonic::Status;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::proto::job_service_client::JobServiceClient;
use crate::proto::{self, result_chunk, submit_job_request};
use crate::tls::Tls;

/// A job's input.
#[derive(Debug, Clone)]
pub enum Input {
    Tokens(Vec<u32>),
    /// UTF-8 text as bytes (sent as is; the coordinator checks it and tokenizes).
    Text(Vec<u8>),
}

impl Input {
    fn len(&self) -> usize {
        match self {
            Self::Tokens(t) => t.len(),
            Self::Text(b) => b.len(),
        }
    }
}

/// A finished job's result.
#[derive(Debug, Clone, PartialEq)]
pub enum JobResult {
    Tokens(Vec<u32>),
    /// `nll[i]` scores input token `i + 1`.
    Scores(Vec<f32>),
}

/// Puts the client's bearer token, when it has one, on every request.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = JobServiceClient<InterceptedService<Channel, Bearer>>;

/// Connects to a coordinator (`host:port` or a URL) with `max_message_bytes` limits.
pub async fn connect(addr: &str, max_message_bytes: usize) -> Result<Client, Status> {
    connect_as(addr, max_message_bytes, None).await
}

/// [`connect`] as the client holding `token` (for a coordinator with `--auth-tokens-file`).
pub async fn connect_as(
    addr: &str,
    max_message_bytes: usize,
    token: Option<&str>,
) -> Result<Client, Status> {
    connect_with(addr, max_message_bytes, token, None).await
}

/// [`connect_as`] over TLS when `tls` is given (the server checked against its CA; this
/// client's certificate presented, if it has one).
pub async fn connect_with(
    addr: &str,
    max_message_bytes: usize,
    token: Option<&str>,
    tls: Option<&Tls>,
) -> Result<Client, Status> {
    let bearer = token
        .map(|t| format!("Bearer {}", t.trim()).parse::<AsciiMetadataValue>())
        .transpose()
        .map_err(|_| {
            Status::invalid_argument("the token holds characters a header cannot carry")
        })?;
    let c = JobServiceClient::with_interceptor(channel(addr, tls).await?, Bearer(bearer));
    Ok(c.max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes))
}

/// A connection to a server at `host:port` or a URL, over TLS with `tls`.
async fn channel(addr: &str, tls: Option<&Tls>) -> Result<Channel, Status> {
    crate::tls::endpoint(addr, tls)
        .map_err(|e| Status::invalid_argument(format!("{addr}: not an address: {e}")))?
        .connect()
        .await
        .map_err(|e| {
            Status::unavailable(format!("connecting to {addr}: {}", crate::error_chain(&e)))
        })
}

/// Tokens (or bytes of text) per upload message.
pub const UPLOAD_CHUNK: usize = 64 * 1024;

/// Uploads a job: the spec, then `input` in chunks of `chunk`; `sent(n)` is called as the
/// stream is consumed with the number of tokens or bytes sent so far. Returns the job id.
pub async fn submit(
    client: &mut Client,
    spec: proto::JobSpec,
    input: Input,
    chunk: usize,
    sent: impl Fn(u64) + Send + Sync + 'static,
) -> Result<proto::SubmitJobResponse, Status> {
    submit_with(client, spec, input, chunk, sent, Default::default()).await
}

/// [`submit`] with request metadata (a trace context, say).
pub async fn submit_with(
    client: &mut Client,
    mut spec: proto::JobSpec,
    input: Input,
    chunk: usize,
    sent: impl Fn(u64) + Send + Sync + 'static,
    metadata: tonic::metadata::MetadataMap,
) -> Result<proto::SubmitJobResponse, Status> {
    spec.input_length = input.len() as u64;
    let chunk = chunk.max(1);
    let mut msgs = vec![proto::SubmitJobRequest {
        part: Some(submit_job_request::Part::Spec(spec)),
    }];
    let mut sizes = vec![0u64];
    let mut total = 0u64;
    match input {
        Input::Tokens(t) => {
            for c in t.chunks(chunk) {
                total += c.len() as u64;
                sizes.push(total);
                msgs.push(proto::SubmitJobRequest {
                    part: Some(submit_job_request::Part::Tokens(proto::TokenIds {
                        ids: c.to_vec(),
                    })),
                });
            }
        }
        Input::Text(b) => {
            for c in b.chunks(chunk) {
                total += c.len() as u64;
                sizes.push(total);
                msgs.push(proto::SubmitJobRequest {
                    part: Some(submit_job_request::Part::Text(c.to_vec())),
                });
            }
        }
    }
    let stream = tokio_stream::StreamExt::map(
        tokio_stream::iter(msgs.into_iter().zip(sizes)),
        move |(m, n)| {
            sent(n);
            m
        },
    );
    let mut req = tonic::Request::new(stream);
    *req.metadata_mut() = metadata;
    Ok(client.submit_job(req).await?.into_inner())
}

/// Follows a job's progress until it finishes; returns the last progress message.
pub async fn watch(
    client: &mut Client,
    job_id: u64,
    mut on: impl FnMut(&proto::JobProgress),
) -> Result<proto::JobProgress, Status> {
    let mut s = client
        .watch_job(proto::WatchJobRequest { job_id })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(p) = s.message().await? {
        on(&p);
        last = Some(p);
    }
    last.ok_or_else(|| Status::unavailable("the progress stream ended without a message"))
}

/// The result of a job (waits for it to finish).
pub async fn result(client: &mut Client, job_id: u64) -> Result<JobResult, Status> {
    Ok(result_with_text(client, job_id).await?.0)
}

/// The result of a job and, for a generate job on a model with a tokenizer, the generated text
/// the coordinator decoded (waits for the job to finish).
pub async fn result_with_text(
    client: &mut Client,
    job_id: u64,
) -> Result<(JobResult, Option<String>), Status> {
    let mut s = client
        .get_result(proto::GetResultRequest { job_id })
        .await?
        .into_inner();
    let (mut tokens, mut nll) = (Vec::new(), Vec::new());
    let (mut scores, mut text) = (false, None);
    while let Some(c) = s.message().await? {
        match c.part {
            Some(result_chunk::Part::Tokens(t)) => tokens.extend(t.ids),
            Some(result_chunk::Part::Text(t)) => text = Some(t),
            Some(result_chunk::Part::Scores(sc)) => {
                scores = true;
                if sc.offset as usize != nll.len() {
                    return Err(Status::data_loss(format!(
                        "score chunk at offset {} after {} scores",
                        sc.offset,
                        nll.len()
                    )));
                }
                nll.extend(sc.nll);
            }
            None => {}
        }
    }
    let result = if scores {
        JobResult::Scores(nll)
    } else {
        JobResult::Tokens(tokens)
    };
    Ok((result, text))
}

/// Asks a server's `grpc.health.v1` whether `service` (`""`: the server as a whole) is serving;
/// what `ringmoe health` (the images' health check) runs.
pub async fn health(addr: &str, service: &str, tls: Option<&Tls>) -> Result<bool, Status> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut c = HealthClient::new(channel(addr, tls).await?);
    let r = c
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await?
        .into_inner();
    Ok(r.status == ServingStatus::Serving as i32)
}
