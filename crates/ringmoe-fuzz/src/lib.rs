//! `ringmoe-fuzz`: what each fuzz target feeds hostile bytes into, one function per target.
//! Every function must return (never panic, never allocate without bound) whatever the bytes;
//! `fuzz/fuzz_targets/*.rs` call them under libFuzzer (nightly), and `tests/replay.rs` runs
//! the committed corpora (`fuzz/corpus/<target>/`) through them on stable in every test run.
//!
//! The targets: the communicator's hello and frame decoder (bytes from any peer on the data
//! plane), a safetensors file (a checkpoint someone hands the engine), `config.json`, the
//! tokenizer's input path (any text a client submits), a worker's shard header (from the
//! coordinator, or anyone without a cluster secret), the OpenAI API's request bodies, and the
//! coordinator's job upload (the `SubmitJob` messages a client streams).

use std::sync::OnceLock;

use ringmoe_comm::Data;
use ringmoe_comm::wire::{HELLO_LEN, Hello, read_frame};

/// One target: takes any bytes, returns (panics only on a broken invariant).
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/fuzz_targets/` and `fuzz/corpus/` name them.
pub const TARGETS: &[(&str, Target)] = &[
    ("wire", wire),
    ("safetensors", safetensors),
    ("config", config),
    ("tokenizer", tokenizer),
    ("shard_header", shard_header),
    ("openai", openai),
    ("upload", upload),
];

/// Frames (and a hello) as a peer's socket delivers them: decode until the bytes run out or a
/// frame is refused. Payloads are capped at 1 MiB, as a small `max_frame_bytes` would.
pub fn wire(data: &[u8]) {
    if let Some(h) = data.get(..HELLO_LEN) {
        let mut b = [0u8; HELLO_LEN];
        b.copy_from_slice(h);
        let _ = Hello::decode(&b);
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
        return;
    };
    rt.block_on(async {
        let mut r = data;
        while read_frame(&mut r, 1 << 20, Data::zeroed).await.is_ok() {}
    });
}

/// A safetensors file: open it as a checkpoint (header, offsets, dtypes) and decode every
/// tensor small enough to be worth it.
pub fn safetensors(data: &[u8]) {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let path = dir.path().join("model.safetensors");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(ck) = ringmoe_model::Checkpoint::open_files(dir.path(), &[path]) else {
        return;
    };
    let names: Vec<String> = ck.tensor_names().map(str::to_string).collect();
    for name in names {
        let Ok(meta) = ck.meta(&name) else { continue };
        let shape = meta.shape.clone();
        if shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .is_some_and(|n| n <= 1 << 16)
        {
            let _ = ck.load(&name, &shape);
        }
    }
}

/// A `config.json`: parse and validate it as a model configuration.
pub fn config(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = ringmoe_hf::ModelConfig::from_json(&v);
    }
}

fn fixture_tokenizer() -> Option<&'static ringmoe_hf::Tokenizer> {
    static TOK: OnceLock<Option<ringmoe_hf::Tokenizer>> = OnceLock::new();
    TOK.get_or_init(|| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/mixtral-tiny");
        ringmoe_hf::Tokenizer::from_dir(&path).ok()
    })
    .as_ref()
}

/// Text a client submits: tokenize it, decode the ids, and stream-decode them; the streamed
/// pieces must add up to the whole decode, special tokens skipped as the stream skips them
/// (the detokeniser's promise), however odd the text.
pub fn tokenizer(data: &[u8]) {
    let Some(tok) = fixture_tokenizer() else {
        return;
    };
    let text = String::from_utf8_lossy(data);
    let Ok(ids) = tok.encode(&text, true) else {
        return;
    };
    let whole = tok.decode(&ids, true);
    let mut stream = ringmoe_hf::TextStream::default();
    let mut pieces = String::new();
    for &id in &ids {
        match stream.push(tok, id) {
            Ok(p) => pieces.extend(p),
            Err(_) => return,
        }
    }
    if let Ok(rest) = stream.finish(tok) {
        pieces.extend(rest);
    }
    if let Ok(whole) = whole {
        assert_eq!(
            pieces, whole,
            "streamed pieces differ from the decode of {ids:?}"
        );
    }
}

/// A shard header as a worker receives it (protobuf): the checks before any plan is built,
/// and the plan's own arithmetic when they pass.
pub fn shard_header(data: &[u8]) {
    use prost::Message;
    let Ok(h) = ringmoe_proto::proto::ShardHeader::decode(data) else {
        return;
    };
    // A small worker: K/V for 1M tokens in a 1 GiB budget.
    if let Ok(plan) = ringmoe_worker::plan_of_shard_header(&h, 1 << 20, 1 << 30) {
        let mine = plan.positions(h.rank as usize);
        assert!(
            mine.len() as u64 <= (1 << 20) + 2,
            "a shard past the K/V budget"
        );
    }
}

/// An OpenAI API request body: parse it as a completion and as a chat request.
pub fn openai(data: &[u8]) {
    use ringmoe_coordinator::openai::{chat, completion, object};
    if let Ok(o) = object(data) {
        let _ = completion(o.clone());
        let _ = chat(o);
    }
}

/// The coordinator's admission of a `SubmitJob` upload, message by message as the stream
/// delivers them. Byte 0 chooses the setting (bit 0: a tenant limited to 64 input tokens;
/// bit 1: one live worker whose K/V budget holds 100 tokens of the model; else none, so the
/// job would queue); then messages follow, each a little-endian u16 length and that many bytes
/// of protobuf (`SubmitJobRequest`). Bytes that do not decode end the stream as a broken one.
/// An admitted job's tokens lie in the vocabulary and within every limit in force.
pub fn upload(data: &[u8]) {
    let _ = upload_outcome(data);
}

/// What [`upload`] decided: `None` when the bytes hold no setting or a message that does not
/// decode (the stream broke), else the admission's answer.
pub fn upload_outcome(
    data: &[u8],
) -> Option<Result<ringmoe_coordinator::admission::Admitted, tonic::Status>> {
    use prost::Message;
    use ringmoe_coordinator::admission::Admission;
    let models = fixture_models()?;
    let (&flags, mut rest) = data.split_first()?;
    let tenant = ringmoe_coordinator::Tenant {
        name: "fuzz".into(),
        admin: false,
        max_input_tokens: Some(64),
        max_queued_jobs: None,
        max_jobs_per_minute: None,
    };
    let model = &models["m"];
    let per_token = model.kv_bytes_per_token();
    let workers = [ringmoe_membership::WorkerRecord {
        id: "w".into(),
        addr: "127.0.0.1:1".into(),
        device: "cpu".into(),
        kv_budget_bytes: 100 * per_token,
        models: Vec::new(),
        placement: None,
        draining: false,
    }];
    let tenant = (flags & 1 == 1).then_some(&tenant);
    let workers: &[_] = if flags & 2 == 2 { &workers } else { &[] };
    let mut adm = Admission::new(models, workers, tenant);
    while let [a, b, tail @ ..] = rest {
        let n = usize::from(u16::from_le_bytes([*a, *b])).min(tail.len());
        let m = ringmoe_proto::proto::SubmitJobRequest::decode(&tail[..n]).ok()?;
        rest = &tail[n..];
        if let Err(e) = adm.push(m) {
            return Some(Err(e));
        }
    }
    let res = adm.finish();
    if let Ok(job) = &res {
        let vocab = model.config.vocab_size;
        assert!(!job.tokens.is_empty(), "a job admitted without input");
        assert!(
            job.tokens.iter().all(|&t| (t as usize) < vocab),
            "a token outside the vocabulary admitted"
        );
        if tenant.is_some() {
            assert!(
                job.tokens.len() <= 64,
                "the tenant's max_input_tokens passed"
            );
        }
        if !workers.is_empty() {
            assert!(
                job.tokens.len() <= 100,
                "a job past the workers' K/V admitted"
            );
        }
    }
    Some(res)
}

fn fixture_models()
-> Option<&'static std::collections::HashMap<String, ringmoe_coordinator::ServedModel>> {
    static MODELS: OnceLock<
        Option<std::collections::HashMap<String, ringmoe_coordinator::ServedModel>>,
    > = OnceLock::new();
    MODELS
        .get_or_init(|| {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/mixtral-tiny");
            let entry = ringmoe_coordinator::ModelEntry {
                name: "m".into(),
                path,
            };
            let m = ringmoe_coordinator::ServedModel::open(&entry).ok()?;
            Some([("m".to_string(), m)].into_iter().collect())
        })
        .as_ref()
}
