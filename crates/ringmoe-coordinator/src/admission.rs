//! Admission of a job upload: the spec first, a known model, ids inside the vocabulary, UTF-8
//! text, the declared length, the message size limit, and the K/V capacity of the live workers
//! — all checked as the upload arrives, so an oversized job is refused before it is buffered.
//! Every refusal is `INVALID_ARGUMENT` naming what was wrong.

use ringmoe_proto::proto::{self, submit_job_request};
use tonic::{Code, Status, Streaming};

use crate::auth::Tenant;
use crate::convert::spec_from_proto;
use crate::machine::capacity;
use crate::models::ServedModel;
use crate::store::{JobMode, JobSpec};

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// The upload of one job, checked as it arrives.
struct Upload<'a> {
    model: &'a ServedModel,
    tokens: Vec<u32>,
    text: Vec<u8>,
    /// Most tokens (or text bytes) accepted before the job is known to be too long.
    limit: u64,
}

impl Upload<'_> {
    fn add_tokens(&mut self, ids: Vec<u32>) -> Result<(), Status> {
        if !self.text.is_empty() {
            return Err(invalid("a job's input is token ids or text, not both"));
        }
        let vocab = self.model.config.vocab_size;
        if let Some((i, t)) = ids.iter().enumerate().find(|(_, t)| **t as usize >= vocab) {
            return Err(invalid(format!(
                "token id {t} at position {} is outside the model's vocabulary of {vocab} ids",
                self.tokens.len() + i
            )));
        }
        self.tokens.extend(ids);
        Ok(())
    }

    fn add_text(&mut self, bytes: Vec<u8>) -> Result<(), Status> {
        if !self.tokens.is_empty() {
            return Err(invalid("a job's input is token ids or text, not both"));
        }
        self.text.extend(bytes);
        // A token is at least one byte: many more bytes than tokens fit is hopeless, but a few
        // bytes per token is normal, so only refuse far past the limit.
        if self.text.len() as u64 > self.limit.saturating_mul(16) {
            return Err(invalid(format!(
                "the input text passed {} bytes, far more than the cluster's K/V capacity of {} tokens",
                self.text.len(),
                self.limit
            )));
        }
        Ok(())
    }
}

/// An admitted job: its spec and its input tokens.
#[derive(Debug)]
pub struct Admitted {
    pub spec: JobSpec,
    pub tokens: Vec<u32>,
}

/// The checks on a job's input however it arrived (gRPC upload or HTTP): at least the tokens
/// its mode needs, and room for its K/V on the live workers (none yet: checked when it runs).
pub(crate) fn check_length(
    spec: &JobSpec,
    n: usize,
    model: &ServedModel,
    workers: &[ringmoe_membership::WorkerRecord],
) -> Result<(), Status> {
    let (need, extra) = match spec.mode {
        JobMode::Score => (2, 0),
        JobMode::Generate { max_new_tokens, .. } => (1, u64::from(max_new_tokens)),
    };
    if n < need {
        return Err(invalid(format!(
            "the job has {n} input tokens; {} needs at least {need}",
            if need == 2 { "scoring" } else { "generation" }
        )));
    }
    let capacity = capacity(model.kv_bytes_per_token(), workers);
    if !workers.is_empty() && n as u64 + extra > capacity {
        return Err(invalid(format!(
            "the job needs K/V for {} tokens ({n} input + {extra} to generate) but the cluster \
             holds {capacity} ({} workers; {} bytes per token for {})",
            n as u64 + extra,
            workers.len(),
            model.kv_bytes_per_token(),
            spec.model
        )));
    }
    Ok(())
}

/// The admission of one upload as a state machine: [`Admission::push`] each message as it
/// arrives (the spec first), then [`Admission::finish`]. Synchronous and free of I/O, so the
/// gRPC upload, the tests and the `upload` fuzz target drive the same code.
pub struct Admission<'a> {
    models: &'a std::collections::HashMap<String, ServedModel>,
    workers: &'a [ringmoe_membership::WorkerRecord],
    tenant: Option<&'a Tenant>,
    /// `None` until the spec arrived.
    job: Option<Receiving<'a>>,
}

/// An upload past its spec.
struct Receiving<'a> {
    spec: JobSpec,
    declared: u64,
    up: Upload<'a>,
    /// K/V capacity of the live workers in tokens, and tokens the job generates.
    capacity: u64,
    extra: u64,
}

impl<'a> Admission<'a> {
    /// An upload for one of `models` (the served models), bounded by the K/V budgets of
    /// `workers` (none yet: the job queues, and its length is checked when it runs) and by
    /// `tenant`'s own limits.
    pub fn new(
        models: &'a std::collections::HashMap<String, ServedModel>,
        workers: &'a [ringmoe_membership::WorkerRecord],
        tenant: Option<&'a Tenant>,
    ) -> Self {
        Self {
            models,
            workers,
            tenant,
            job: None,
        }
    }

    /// Takes the upload's next message; an error ends the upload.
    pub fn push(&mut self, m: proto::SubmitJobRequest) -> Result<(), Status> {
        let Some(job) = self.job.as_mut() else {
            let Some(submit_job_request::Part::Spec(pspec)) = m.part else {
                return Err(invalid(
                    "a job upload starts with the job spec (the spec is missing)",
                ));
            };
            self.job = Some(self.start(&pspec)?);
            return Ok(());
        };
        match m.part {
            Some(submit_job_request::Part::Tokens(t)) => job.up.add_tokens(t.ids),
            Some(submit_job_request::Part::Text(b)) => job.up.add_text(b),
            Some(submit_job_request::Part::Spec(_)) => Err(invalid("a second job spec")),
            None => Err(invalid("an empty upload message")),
        }?;
        // Refuse as soon as the upload outgrows the cluster, not after buffering all of it.
        if job.up.tokens.len() as u64 > job.up.limit {
            return Err(job.capacity_error(job.up.tokens.len(), self.workers.len()));
        }
        // Text, at a few bytes per token, may run 16 bytes a token before it is hopeless.
        let sent = job.up.tokens.len().max(job.up.text.len() / 16);
        check_tenant_input(self.tenant, sent)
    }

    fn start(&self, pspec: &proto::JobSpec) -> Result<Receiving<'a>, Status> {
        let spec = spec_from_proto(pspec).map_err(invalid)?;
        let models = self.models;
        let model = models.get(&spec.model).ok_or_else(|| {
            let mut known: Vec<&str> = models.keys().map(String::as_str).collect();
            known.sort_unstable();
            invalid(format!(
                "unknown model '{}'; this coordinator serves: {}",
                spec.model,
                known.join(", ")
            ))
        })?;
        let extra = match spec.mode {
            JobMode::Generate { max_new_tokens, .. } => u64::from(max_new_tokens),
            JobMode::Score => 0,
        };
        let capacity = capacity(model.kv_bytes_per_token(), self.workers);
        let limit = if self.workers.is_empty() {
            u64::MAX
        } else {
            capacity.saturating_sub(extra)
        };
        Ok(Receiving {
            spec,
            declared: pspec.input_length,
            up: Upload {
                model,
                tokens: Vec::new(),
                text: Vec::new(),
                limit,
            },
            capacity,
            extra,
        })
    }

    /// The stream ended: the declared length, the text's encoding and tokens, and the job's
    /// length against its mode, the tenant and the workers.
    pub fn finish(self) -> Result<Admitted, Status> {
        let Some(Receiving {
            spec, declared, up, ..
        }) = self.job
        else {
            return Err(invalid(
                "a job upload starts with the job spec (the spec is missing)",
            ));
        };
        let got = if up.text.is_empty() {
            up.tokens.len()
        } else {
            up.text.len()
        } as u64;
        if declared != 0 && declared != got {
            let unit = if up.text.is_empty() {
                "tokens"
            } else {
                "bytes"
            };
            return Err(invalid(format!(
                "the spec declared {declared} {unit} of input but the stream ended after {got}"
            )));
        }
        let model = up.model;
        let tokens = if up.text.is_empty() {
            up.tokens
        } else {
            let text = std::str::from_utf8(&up.text).map_err(|e| {
                invalid(format!(
                    "the input text is not valid UTF-8 (at byte {})",
                    e.valid_up_to()
                ))
            })?;
            let tok = model.tokenizer.as_ref().ok_or_else(|| {
                invalid(format!(
                    "model '{}' has no tokenizer.json; send token ids instead of text",
                    spec.model
                ))
            })?;
            tok.encode(text, true)
                .map_err(|e| invalid(format!("tokenizing the input: {e}")))?
        };
        check_tenant_input(self.tenant, tokens.len())?;
        check_length(&spec, tokens.len(), model, self.workers)?;
        Ok(Admitted { spec, tokens })
    }
}

impl Receiving<'_> {
    fn capacity_error(&self, n: usize, workers: usize) -> Status {
        invalid(format!(
            "the job needs K/V for {} tokens ({n} input + {} to generate) but the cluster \
             holds {} ({workers} workers; {} bytes per token for {})",
            n as u64 + self.extra,
            self.extra,
            self.capacity,
            self.up.model.kv_bytes_per_token(),
            self.spec.model
        ))
    }
}

/// Reads and checks a `SubmitJob` stream (see [`Admission`]); a pause longer than `idle`
/// between messages ends it.
pub(crate) async fn admit(
    stream: &mut Streaming<proto::SubmitJobRequest>,
    models: &std::collections::HashMap<String, ServedModel>,
    workers: &[ringmoe_membership::WorkerRecord],
    max_message_bytes: usize,
    tenant: Option<&Tenant>,
    idle: std::time::Duration,
) -> Result<Admitted, Status> {
    let limit_msg = |e: Status| -> Status {
        if e.code() == Code::OutOfRange || e.message().contains("too large") {
            invalid(format!(
                "a message exceeded the size limit of {max_message_bytes} bytes \
                 (--max-message-bytes): {}; send the input in smaller chunks",
                e.message()
            ))
        } else {
            invalid(format!("the upload stream broke: {}", e.message()))
        }
    };
    let mut adm = Admission::new(models, workers, tenant);
    while let Some(m) = next_message(stream, idle).await?.map_err(limit_msg)? {
        adm.push(m)?;
    }
    adm.finish()
}

/// The next message of an upload, or `DEADLINE_EXCEEDED` when none came within `idle`: a
/// client that opens an upload and then sends nothing holds a slot only that long.
async fn next_message(
    stream: &mut Streaming<proto::SubmitJobRequest>,
    idle: std::time::Duration,
) -> Result<Result<Option<proto::SubmitJobRequest>, Status>, Status> {
    tokio::time::timeout(idle, stream.message())
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "the upload sent nothing for {} s (--upload-idle-secs); send the input without \
                 pauses",
                idle.as_secs()
            ))
        })
}

/// A client's own input limit (`max_input_tokens` in the tokens file), whatever the cluster
/// could hold: `INVALID_ARGUMENT` naming it (the job can never run for this client).
pub(crate) fn check_tenant_input(tenant: Option<&Tenant>, n: usize) -> Result<(), Status> {
    match tenant.and_then(|t| t.max_input_tokens.map(|m| (t, m))) {
        Some((t, most)) if n as u64 > most => Err(invalid(format!(
            "client '{}' may send at most {most} input tokens a job (max_input_tokens); \
             this job has {n} or more",
            t.name
        ))),
        _ => Ok(()),
    }
}
