//! One worker's part of one job, on a thread of its own: the TCP communicator to the job's
//! peers, then prefill (and decode) with ring attention and expert-parallel MoE on the CPU or the
//! GPU, reporting progress and results on the job's event stream.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ringmoe_core::Backend;
use ringmoe_parallel::Collective;

use crate::*;

/// A GPU backend's error as the distributed forward's: cancellations, collective failures and
/// model errors keep their kind; the rest is a device error.
pub(crate) fn from_cuda(e: CudaError) -> ParallelError {
    match e {
        CudaError::Parallel(p) => p,
        CudaError::Comm(c) => ParallelError::Comm(c),
        CudaError::Model(m) => ParallelError::Model(m),
        CudaError::Core(c) => ParallelError::Core(c),
        other => ParallelError::Device(Box::new(other)),
    }
}

/// One worker's part of one job, on its own thread.
pub(crate) struct JobRun<'a> {
    pub id: u64,
    pub gpu: Option<&'a Arc<CudaBackend>>,
    pub loaded: &'a Loaded,
    pub shard: &'a Shard,
    pub cancel: &'a AtomicBool,
    pub tx: &'a tokio::sync::mpsc::Sender<Result<proto::WorkerEvent, Status>>,
}

/// Values per streamed chunk of scores or tokens (well under any sane message limit).
pub(crate) const CHUNK: usize = 16 * 1024;

impl JobRun<'_> {
    fn emit(&self, ev: worker_event::Event) -> Result<(), ParallelError> {
        self.tx
            .blocking_send(Ok(proto::WorkerEvent { event: Some(ev) }))
            .map_err(|_| ParallelError::Cancelled(self.id))
    }

    /// Stops the job when it was cancelled or the coordinator stopped listening.
    fn check(&self) -> Result<(), ParallelError> {
        if self.cancel.load(Ordering::Relaxed) || self.tx.is_closed() {
            return Err(ParallelError::Cancelled(self.id));
        }
        Ok(())
    }

    pub(crate) fn execute(
        &self,
        listener: TcpListener,
        peers: &[SocketAddr],
        opts: &TcpOptions,
        r: &proto::RunJobRequest,
        attention: ringmoe_parallel::AttentionMode,
        timeout: Duration,
    ) -> Result<(), ParallelError> {
        let s = self.shard;
        let comm = ringmoe_comm::tcp(s.rank, listener, peers, opts, timeout)?;
        // A cancel (or the coordinator going away) aborts the communicator from a watcher
        // thread: a receive blocked on a peer wakes at once, ring attention stops at its next
        // piece, and the peers' links drop so they stop too — rather than at the next layer.
        let (cancel, tx, id) = (self.cancel, self.tx, self.id);
        let finished = AtomicBool::new(false);
        let res = std::thread::scope(|scope| {
            scope.spawn(|| {
                while !finished.load(Ordering::Relaxed) {
                    if cancel.load(Ordering::Relaxed) || tx.is_closed() {
                        comm.abort(&format!("job {id} was cancelled"));
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            let res = self.execute_on(&comm, r, attention, timeout);
            finished.store(true, Ordering::Relaxed);
            res
        });
        let res = match res {
            Err(_) if self.check().is_err() => Err(ParallelError::Cancelled(id)),
            res => res,
        };
        crate::telemetry::job_done(self, &comm.totals(), res.is_ok());
        res
    }

    fn execute_on(
        &self,
        comm: &ringmoe_comm::Communicator,
        r: &proto::RunJobRequest,
        attention: ringmoe_parallel::AttentionMode,
        timeout: Duration,
    ) -> Result<(), ParallelError> {
        let s = self.shard;
        let ep = ExpertParallel {
            load: self.loaded.load.clone(),
            ..ExpertParallel::new(self.loaded.placement.clone())
        };
        let job = JobOptions {
            id: self.id,
            attention,
            piece_rows: 0,
        };
        let lead = s.rank == 0;
        // One span per layer of the prefill, with the layer's ring and all-to-all traffic.
        let mut layers = crate::telemetry::LayerSpans::start(
            comm,
            s.tokens.len(),
            self.loaded.model.config().num_layers,
        );
        let mut on_layer = |layer: usize, layers_n: usize| {
            layers.layer_done(layer, layers_n, comm);
            self.check()?;
            if lead {
                self.emit(worker_event::Event::LayerDone(proto::LayerDone {
                    layer: layer as u32,
                    layers: layers_n as u32,
                }))?;
            }
            Ok(())
        };
        let mode = proto::JobMode::try_from(r.mode)
            .ok()
            .filter(|m| matches!(m, proto::JobMode::Score | proto::JobMode::Generate))
            .ok_or_else(|| ParallelError::Invalid(format!("unknown job mode {}", r.mode)))?;
        // The backend was picked once, when the model was loaded; the job runs the same code
        // on either.
        match &self.loaded.model {
            Engine::Cpu(model) => self.run_on(&**model, comm, job, &ep, r, mode, &mut on_layer),
            Engine::Cuda(model) => {
                if attention != ringmoe_parallel::AttentionMode::Dense {
                    return Err(ParallelError::Invalid(format!(
                        "GPU workers run dense attention only; this job asks for {attention:?}"
                    )));
                }
                // Refused on the whole plan, not on this rank's positions, so every rank of the
                // NCCL group refuses together instead of leaving the others waiting.
                if let Some(w) = model.config.min_window()
                    && self.shard.plan.len > w
                {
                    return Err(ParallelError::Invalid(format!(
                        "sequence of {} tokens exceeds a layer's sliding window of {w}; \
                         sliding-window attention is not implemented on the CUDA path (the CPU \
                         engine runs it)",
                        self.shard.plan.len
                    )));
                }
                let b = self.gpu.ok_or_else(|| {
                    ParallelError::Invalid("a GPU model on a worker with no GPU opened".into())
                })?;
                let nccl = b.join_nccl(comm, timeout).map_err(from_cuda)?;
                self.run_on(&**model, &nccl, job, &ep, r, mode, &mut on_layer)
            }
        }
    }

    /// The job on a model of any backend over a collective on it: a scored prefill, or a
    /// prefill and decode steps.
    #[allow(clippy::too_many_arguments)]
    fn run_on<B: Backend, C: Collective<B>>(
        &self,
        model: &Model<B>,
        comm: &C,
        job: JobOptions,
        ep: &ExpertParallel,
        r: &proto::RunJobRequest,
        mode: proto::JobMode,
        on_layer: &mut dyn FnMut(usize, usize) -> Result<(), ParallelError>,
    ) -> Result<(), ParallelError> {
        let s = self.shard;
        let plan = &s.plan;
        match mode {
            proto::JobMode::Score => {
                let out =
                    prefill_shard_observed(model, comm, plan, &s.tokens, job, Some(ep), on_layer)?;
                let b = &**model.backend();
                self.scores(model.config.vocab_size, &out.positions, |a, e| {
                    Ok(model.logits(&b.rows(&out.hidden, a, e)?)?)
                })
            }
            _ => {
                let (mut seq, logits) = ShardedSequence::prefill_shard(
                    model,
                    comm,
                    plan,
                    &s.tokens,
                    job,
                    Some(ep),
                    on_layer,
                )?;
                self.generate(r, logits, |t| seq.decode(t))
            }
        }
    }

    /// Samples from `logits`, feeds each token to `decode` for the next logits, until an EOS
    /// token or `max_new_tokens`; the lead rank reports progress and streams the tokens.
    fn generate(
        &self,
        r: &proto::RunJobRequest,
        mut logits: Vec<f32>,
        mut decode: impl FnMut(u32) -> Result<Vec<f32>, ParallelError>,
    ) -> Result<(), ParallelError> {
        let lead = self.shard.rank == 0;
        let sp = r.sampling.unwrap_or_default();
        let mut sampler = Sampler::new(SamplingParams {
            temperature: sp.temperature,
            top_p: if sp.top_p == 0.0 { 1.0 } else { sp.top_p },
            seed: sp.seed,
        })?;
        let mut out = Vec::new();
        let span = info_span!(
            "decode",
            max_new_tokens = r.max_new_tokens,
            tokens = tracing::field::Empty
        );
        let _in_decode = span.enter();
        loop {
            let next = sampler.sample(&logits);
            out.push(next);
            if lead {
                self.emit(worker_event::Event::Step(proto::DecodeStep {
                    decoded: out.len() as u32,
                    token: next,
                }))?;
            }
            if r.eos_token_ids.contains(&next) || out.len() >= r.max_new_tokens as usize {
                break;
            }
            self.check()?;
            logits = decode(next)?;
        }
        span.record("tokens", out.len());
        if lead {
            for c in out.chunks(CHUNK) {
                self.emit(worker_event::Event::Generated(proto::TokenIds {
                    ids: c.to_vec(),
                }))?;
            }
        }
        Ok(())
    }

    /// NLL of the next token at each of this rank's positions that has one, streamed in chunks;
    /// `logits(start, end)` (lm_head) runs on a few hundred rows at a time.
    fn scores(
        &self,
        vocab: usize,
        positions: &[usize],
        logits: impl Fn(usize, usize) -> Result<ringmoe_core::Tensor, ParallelError>,
    ) -> Result<(), ParallelError> {
        let targets = &self.shard.targets;
        if targets.len() != positions.len() {
            return Err(ParallelError::Invalid(format!(
                "score mode needs a target per position: {} targets for {} positions",
                targets.len(),
                positions.len()
            )));
        }
        let (mut pos, mut nll) = (Vec::new(), Vec::new());
        const ROWS: usize = 256;
        for s in (0..positions.len()).step_by(ROWS) {
            self.check()?;
            let e = (s + ROWS).min(positions.len());
            let logits = logits(s, e)?;
            for (i, row) in logits.as_slice().chunks(vocab).enumerate() {
                let t = targets[s + i];
                if t == u32::MAX {
                    continue;
                }
                if t as usize >= vocab {
                    return Err(ParallelError::Invalid(format!(
                        "target token {t} outside the vocabulary of {vocab}"
                    )));
                }
                pos.push(positions[s + i] as u64);
                nll.push(nll_of(row, t as usize));
            }
            if pos.len() >= CHUNK || e == positions.len() {
                self.emit(worker_event::Event::Scores(proto::PositionScores {
                    positions: std::mem::take(&mut pos),
                    nll: std::mem::take(&mut nll),
                }))?;
            }
        }
        Ok(())
    }
}
