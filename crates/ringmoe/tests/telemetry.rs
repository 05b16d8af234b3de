//! Telemetry with real components: spans exported over OTLP to a real gRPC `TraceService`
//! (opentelemetry-proto's) in the test, and metrics scraped by a real Prometheus (Debian's
//! `prometheus` package, which `scripts/test.sh` installs) and checked by `promtool`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use ringmoe_model::ModelConfig;
use ringmoe_testkit::fixture;

/// A `ringmoe` process, killed when dropped; its stdout lines are collected.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(name: &str, args: &[&str], env: &[(&str, &str)], logs: &Path) -> Result<Self> {
        let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringmoe"))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let out = child.stdout.take().context("stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if let Ok(mut v) = l2.lock() {
                    v.push(l);
                }
            }
        });
        Ok(Self {
            child,
            lines,
            name: name.into(),
        })
    }

    /// The rest of the first stdout line starting with `prefix`.
    fn line(&self, prefix: &str) -> Result<String> {
        let t = Instant::now();
        loop {
            if let Some(l) = self.lines.lock().ok().and_then(|v| {
                v.iter()
                    .find_map(|l| l.strip_prefix(prefix).map(String::from))
            }) {
                return Ok(l);
            }
            ensure!(
                t.elapsed() < Duration::from_secs(30),
                "{} printed no {prefix:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself.
    fn wait(mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            ensure!(
                t.elapsed() < limit,
                "{} still running after {limit:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    instance: String,
    trace: String,
    id: String,
    parent: String,
    name: String,
    attrs: HashMap<String, String>,
}

/// Every span's parent (but the root's) is among `trace`.
fn parents_present(trace: &[Span]) -> bool {
    let ids: BTreeSet<&str> = trace.iter().map(|s| s.id.as_str()).collect();
    trace
        .iter()
        .all(|s| s.parent.is_empty() || ids.contains(s.parent.as_str()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attrs(kv: &[KeyValue]) -> HashMap<String, String> {
    kv.iter()
        .map(|a| {
            let v = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::DoubleValue(d)) => d.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                other => format!("{other:?}"),
            };
            (a.key.clone(), v)
        })
        .collect()
}

/// The OTLP receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = Vec::new();
        for rs in req.into_inner().resource_spans {
            let res = attrs(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(Span {
                        service: res.get("service.name").cloned().unwrap_or_default(),
                        instance: res.get("service.instance.id").cloned().unwrap_or_default(),
                        trace: hex(&s.trace_id),
                        id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        name: s.name,
                        attrs: attrs(&s.attributes),
                    });
                }
            }
        }
        if let Ok(mut v) = self.0.lock() {
            v.extend(out);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// `ringmoe coordinator` serving `model` as `m` for 2 workers, its store and logs in `dir`.
fn coordinator(dir: &Path, model: &Path, extra: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
    let store = dir.join("store");
    let model_arg = format!("m={}", model.display());
    let mut args = vec![
        "coordinator",
        "--addr",
        "127.0.0.1:0",
        "--store",
        store.to_str().context("path")?,
        "--model",
        &model_arg,
        "--min-workers",
        "2",
    ];
    args.extend_from_slice(extra);
    Proc::start("coordinator", &args, env, dir)
}

/// The receiver served on a free port of `rt` until `stop` is sent (or dropped).
struct Collector {
    receiver: Receiver,
    /// `http://127.0.0.1:PORT`, for OTEL_EXPORTER_OTLP_ENDPOINT.
    otlp: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Collector {
    fn start(rt: &tokio::runtime::Runtime) -> Result<Self> {
        let receiver = Receiver::default();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let otlp = format!("http://{}", listener.local_addr()?);
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = rt.spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(receiver.clone()))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stop_rx.await;
                    },
                ),
        );
        Ok(Self {
            receiver,
            otlp,
            stop,
            server,
        })
    }

    fn spans(&self) -> Vec<Span> {
        self.receiver
            .0
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }
}

fn rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Runs `ringmoe submit` on `prompt` against `addr` (with `env`) and checks it succeeded.
fn submit(addr: &str, prompt: &Path, extra: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_ringmoe"))
        .args(["submit", "--addr", addr, "--file"])
        .arg(prompt)
        .args(extra)
        .envs(env.iter().copied())
        .output()?;
    ensure!(
        out.status.success(),
        "submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn one_job_is_one_trace_across_the_client_the_coordinator_and_every_worker() -> Result<()> {
    let rt = rt()?;
    let Collector {
        receiver,
        otlp,
        stop: stop_tx,
        server,
    } = Collector::start(&rt)?;
    let dir = tempfile::tempdir()?;
    let model = fixture("mixtral-tiny");
    let layers = ModelConfig::from_dir(&model)?.num_layers;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let coord = coordinator(dir.path(), &model, &[], &env)?;
    let addr = coord.line("listening on ")?;
    // Heartbeat mode: the coordinator sends LoadModel, so loading is in the trace too.
    let workers: Vec<Proc> = (0..2)
        .map(|i| {
            Proc::start(
                &format!("worker{i}"),
                &["worker", "--coordinator", &addr],
                &env,
                dir.path(),
            )
        })
        .collect::<Result<_>>()?;
    let prompt = dir.path().join("p.txt");
    std::fs::write(&prompt, "The quick brown fox jumps over the lazy dog")?;
    let env_client = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_SERVICE_NAME", "test-client"),
    ];
    submit(
        &addr,
        &prompt,
        &["--max-new-tokens", "4", "--json"],
        &env_client,
    )?;

    // Every process exports within its batch delay; the job's spans end when it finishes.
    let t = Instant::now();
    let spans = loop {
        let spans = receiver.0.lock().map(|v| v.clone()).unwrap_or_default();
        let job = spans
            .iter()
            .find(|s| s.name == "job" && s.attrs.get("job.id").map(String::as_str) == Some("1"));
        if let Some(job) = job {
            let trace: Vec<Span> = spans
                .iter()
                .filter(|s| s.trace == job.trace)
                .cloned()
                .collect();
            let layer_spans = trace.iter().filter(|s| s.name == "layer").count();
            let has_client = trace.iter().any(|s| s.service == "test-client");
            // Spans arrive as they end, parents after children: wait for the whole tree.
            if layer_spans >= 2 * layers && has_client && parents_present(&trace) {
                break trace;
            }
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "no complete trace of job 1 among {} spans: {:?}",
            spans.len(),
            spans
                .iter()
                .map(|s| (&s.service, &s.name))
                .collect::<BTreeSet<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let ids: BTreeSet<&str> = spans.iter().map(|s| s.id.as_str()).collect();
    // The client's span is the root; every other span's parent is in the same trace.
    let roots: Vec<&Span> = spans.iter().filter(|s| s.parent.is_empty()).collect();
    ensure!(
        roots.len() == 1 && roots[0].service == "test-client" && roots[0].name == "submit",
        "roots: {roots:?}"
    );
    for s in &spans {
        ensure!(
            s.parent.is_empty() || ids.contains(s.parent.as_str()),
            "span {} ({}) has a parent outside the trace",
            s.name,
            s.service
        );
    }
    let job = spans.iter().find(|s| s.name == "job").context("job span")?;
    ensure!(job.service == "ringmoe-coordinator" && job.parent == roots[0].id);
    ensure!(
        job.attrs.get("model").map(String::as_str) == Some("m"),
        "{job:?}"
    );
    let by_name = |n: &'static str| spans.iter().filter(move |s| s.name == n);
    let run = by_name("run").next().context("run span")?;
    ensure!(run.parent == job.id && run.attrs.get("attempt").map(String::as_str) == Some("0"));
    for n in ["admission", "store", "placement", "upload", "execute"] {
        ensure!(by_name(n).count() >= 1, "no {n} span");
    }
    // Both worker processes (distinct instances) answered every call inside this trace.
    let mut per_instance: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    for s in spans.iter().filter(|s| s.service == "ringmoe-worker") {
        *per_instance
            .entry(s.instance.as_str())
            .or_default()
            .entry(s.name.as_str())
            .or_default() += 1;
    }
    ensure!(
        per_instance.len() == 2,
        "worker instances: {per_instance:?}"
    );
    for (inst, names) in &per_instance {
        for n in [
            "worker.load_model",
            "worker.prepare_job",
            "worker.send_shard",
            "worker.run_job",
            "prefill",
            "decode",
        ] {
            ensure!(names.get(n) == Some(&1), "{inst}: {n}: {names:?}");
        }
        ensure!(
            names.get("layer") == Some(&layers),
            "{inst}: {:?} layer spans, the model has {layers}",
            names.get("layer")
        );
    }
    let ranks: BTreeSet<&str> = by_name("worker.run_job")
        .filter_map(|s| s.attrs.get("rank").map(String::as_str))
        .collect();
    ensure!(ranks == BTreeSet::from(["0", "1"]), "ranks {ranks:?}");
    for s in by_name("worker.run_job") {
        ensure!(
            s.attrs.get("job.id").map(String::as_str) == Some("1"),
            "{s:?}"
        );
    }
    let layer = by_name("layer").next().context("layer")?;
    ensure!(
        layer.attrs.contains_key("ring_wait_secs") && layer.attrs.contains_key("all_to_all_bytes"),
        "{layer:?}"
    );

    // The collector goes away: jobs still complete, and promptly.
    let _ = stop_tx.send(());
    rt.block_on(server)??;
    let t = Instant::now();
    submit(&addr, &prompt, &["--max-new-tokens", "16"], &[])?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(secs < 20.0, "a job took {secs:.1}s with the collector gone");
    // And a process with spans it cannot deliver still stops on SIGTERM (the flush is
    // bounded), and cleanly.
    let pid = coord.child.id().to_string();
    ensure!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()?
            .success()
    );
    let status = coord.wait(Duration::from_secs(20))?;
    ensure!(status.success(), "the coordinator exited with {status:?}");
    drop(workers);
    Ok(())
}

/// `GET path` on `addr`; the body.
fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").context("no HTTP header end")?;
    ensure!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    Ok(body.to_string())
}

/// `promtool check metrics` on `text`.
fn promtool_check(text: &str, what: &str) -> Result<()> {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool (Debian's prometheus package; scripts/test.sh installs it)")?;
    p.stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = p.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics on {what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A Prometheus instant query's samples as (labels, value).
fn query(prom: &str, q: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let body = http_get(prom, &format!("/api/v1/query?query={enc}"))?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(v["status"] == "success", "{body}");
    let mut out = Vec::new();
    for r in v["data"]["result"].as_array().context("result")? {
        let labels = r["metric"]
            .as_object()
            .context("metric")?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
            .collect();
        let val: f64 = r["value"][1].as_str().context("value")?.parse()?;
        out.push((labels, val));
    }
    Ok(out)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[test]
fn prometheus_scrapes_the_coordinator_and_a_worker_and_sees_the_job() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = fixture("mixtral-tiny");
    let coord = coordinator(dir.path(), &model, &["--metrics-addr", "127.0.0.1:0"], &[])?;
    let addr = coord.line("listening on ")?;
    let coord_metrics = coord.line("metrics on http://")?;
    // Two workers (a job of one has no peer traffic); Prometheus scrapes the first.
    let worker = Proc::start(
        "worker0",
        &[
            "worker",
            "--coordinator",
            &addr,
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[],
        dir.path(),
    )?;
    let other = Proc::start(
        "worker1",
        &["worker", "--coordinator", &addr],
        &[],
        dir.path(),
    )?;
    let worker_metrics = worker.line("metrics on http://")?;
    let target = |u: &str| u.trim_end_matches("/metrics").to_string();
    let (ct, wt) = (target(&coord_metrics), target(&worker_metrics));
    let prom_addr = format!("127.0.0.1:{}", free_port()?);
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ringmoe\n    \
             static_configs:\n      - targets: ['{ct}', '{wt}']\n"
        ),
    )?;
    let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={prom_addr}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting prometheus (Debian's package; scripts/test.sh installs it)")?;
    let res = (|| -> Result<()> {
        let prompt = dir.path().join("p.txt");
        std::fs::write(&prompt, "The quick brown fox jumps over the lazy dog")?;
        submit(&addr, &prompt, &["--mode", "score"], &[])?;
        submit(&addr, &prompt, &["--max-new-tokens", "8"], &[])?;
        // Both endpoints are valid exposition text.
        let c = http_get(&ct, "/metrics")?;
        let w = http_get(&wt, "/metrics")?;
        promtool_check(&c, "the coordinator's /metrics")?;
        promtool_check(&w, "the worker's /metrics")?;
        for name in [
            "ringmoe_jobs_total",
            "ringmoe_jobs_queued",
            "ringmoe_tokens_queued",
            "ringmoe_jobs_running",
            "ringmoe_job_duration_seconds_bucket",
            "ringmoe_prefill_tokens_per_second",
            "ringmoe_decode_tokens_per_second",
            "ringmoe_workers",
            "ringmoe_desired_workers",
            "ringmoe_expert_imbalance",
            "ringmoe_placement_version",
            "process_resident_memory_bytes",
        ] {
            ensure!(
                c.contains(&format!("\n{name}")),
                "the coordinator has no {name}:\n{c}"
            );
        }
        for name in [
            "ringmoe_expert_rows_total",
            "ringmoe_comm_bytes_total",
            "ringmoe_comm_wait_seconds_total",
            "ringmoe_kv_bytes",
            "process_resident_memory_bytes",
        ] {
            ensure!(
                w.contains(&format!("\n{name}")),
                "the worker has no {name}:\n{w}"
            );
        }
        // Prometheus scraped both and has what the jobs did.
        let t = Instant::now();
        loop {
            let jobs = query(&prom_addr, "ringmoe_jobs_total").unwrap_or_default();
            let done: f64 = jobs
                .iter()
                .filter(|(l, _)| l.get("outcome").map(String::as_str) == Some("done"))
                .map(|(_, v)| v)
                .sum();
            let up = query(&prom_addr, "up").unwrap_or_default();
            if done == 2.0 && up.len() == 2 && up.iter().all(|(_, v)| *v == 1.0) {
                let modes: BTreeSet<String> = jobs
                    .iter()
                    .filter_map(|(l, _)| l.get("mode").cloned())
                    .collect();
                ensure!(
                    modes == BTreeSet::from(["generate".into(), "score".into()]),
                    "{jobs:?}"
                );
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("Prometheus never saw the 2 jobs: jobs {jobs:?}, up {up:?}");
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let tps = query(&prom_addr, "ringmoe_prefill_tokens_per_second")?;
        ensure!(tps.len() == 1 && tps[0].1 > 0.0, "{tps:?}");
        ensure!(
            tps[0].0.get("model").map(String::as_str) == Some("m"),
            "{tps:?}"
        );
        // The same value the coordinator serves directly.
        let direct = c
            .lines()
            .find_map(|l| l.strip_prefix("ringmoe_prefill_tokens_per_second{model=\"m\"} "))
            .context("direct value")?
            .parse::<f64>()?;
        ensure!(
            (tps[0].1 - direct).abs() <= 1e-6 * direct,
            "{} vs {direct}",
            tps[0].1
        );
        let rows = query(&prom_addr, "sum(ringmoe_expert_rows_total)")?;
        ensure!(rows.len() == 1 && rows[0].1 > 0.0, "{rows:?}");
        let workers = query(&prom_addr, "ringmoe_workers{state=\"live\"}")?;
        ensure!(workers.len() == 1 && workers[0].1 == 2.0, "{workers:?}");
        Ok(())
    })();
    let _ = prom.kill();
    let _ = prom.wait();
    drop((coord, worker, other));
    res
}

/// The cost of tracing: a 32K-token score job on `serve --workers 2`, with spans exported to
/// the in-test receiver vs without, alternating, `ROUNDS` rounds. Prints the times; asserts nothing
/// about them (docs/performance.md has the numbers). Run it with
/// `cargo nextest run -p ringmoe --test telemetry --run-ignored only tracing_overhead`.
#[test]
#[ignore = "a measurement, not a test: run on a quiet machine"]
fn tracing_overhead_on_a_32k_token_job() -> Result<()> {
    const ROUNDS: usize = 6;
    use ringmoe_proto::client::{self, Input};
    use ringmoe_proto::proto;
    let rt = rt()?;
    let collector = Collector::start(&rt)?;
    let otlp = collector.otlp.clone();
    let dir = tempfile::tempdir()?;
    let model = fixture("mixtral-tiny");
    let vocab = ModelConfig::from_dir(&model)?.vocab_size as u32;
    let serve = |name: &str, env: &[(&str, &str)]| -> Result<(Proc, String)> {
        let store = dir.path().join(name);
        let p = Proc::start(
            name,
            &[
                "serve",
                "--model",
                &format!("m={}", model.display()),
                "--workers",
                "2",
                "--addr",
                "127.0.0.1:0",
                "--store",
                store.to_str().context("path")?,
                "--no-http",
                "--no-metrics",
                "--kv-budget-gib",
                "2",
            ],
            env,
            dir.path(),
        )?;
        let addr = p.line("listening on ")?;
        Ok((p, addr))
    };
    let (_on, on_addr) = serve("traced", &[("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str())])?;
    let (_off, off_addr) = serve("untraced", &[])?;
    let ids: Vec<u32> = (0..32_768u32)
        .map(|i| i.wrapping_mul(2_654_435_761) >> 7 & 0xffff)
        .map(|x| x % vocab)
        .collect();
    let job = |addr: String| -> Result<f64> {
        let ids = ids.clone();
        rt.block_on(async move {
            let mut c = client::connect(&addr, 64 << 20).await?;
            let spec = proto::JobSpec {
                model: "m".into(),
                mode: proto::JobMode::Score as i32,
                ..Default::default()
            };
            let t = Instant::now();
            let id = client::submit(
                &mut c,
                spec,
                Input::Tokens(ids),
                client::UPLOAD_CHUNK,
                |_| {},
            )
            .await?
            .job_id;
            client::result(&mut c, id).await?;
            Ok(t.elapsed().as_secs_f64())
        })
    };
    // One warm-up each (placement load), then alternate.
    job(on_addr.clone())?;
    job(off_addr.clone())?;
    let (mut on, mut off) = (Vec::new(), Vec::new());
    // Which goes first alternates too (the second of a pair runs on a warmer machine).
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            on.push(job(on_addr.clone())?);
            off.push(job(off_addr.clone())?);
        } else {
            off.push(job(off_addr.clone())?);
            on.push(job(on_addr.clone())?);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (m_on, m_off) = (median(&mut on), median(&mut off));
    let spans = collector.spans().len();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "32K-token score job, serve --workers 2: traced {on:?} s, untraced {off:?} s; medians \
         {m_on:.3} / {m_off:.3} s = {:.3}x; {spans} spans received; load average {}",
        m_on / m_off,
        load.trim()
    );
    Ok(())
}

#[test]
fn serve_traces_each_in_process_worker_and_a_collector_lost_mid_job_costs_the_job_nothing()
-> Result<()> {
    use ringmoe_proto::client::{self, Input};
    use ringmoe_proto::proto::{self, JobPhase};
    let rt = rt()?;
    let collector = Collector::start(&rt)?;
    let dir = tempfile::tempdir()?;
    let model = fixture("mixtral-tiny");
    let config = ModelConfig::from_dir(&model)?;
    let store = dir.path().join("store");
    let serve = Proc::start(
        "serve",
        &[
            "serve",
            "--model",
            &format!("m={}", model.display()),
            "--workers",
            "3",
            "--addr",
            "127.0.0.1:0",
            "--store",
            store.to_str().context("path")?,
            "--no-http",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.otlp.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        dir.path(),
    )?;
    let addr = serve.line("listening on ")?;
    let vocab = config.vocab_size as u32;
    // Submits `n` tokens; `on` sees each progress message; the job must end Done.
    let run = |n: u32, mode: proto::JobMode, on: &mut dyn FnMut(&proto::JobProgress)| {
        let addr = addr.clone();
        rt.block_on(async move {
            let mut c = client::connect(&addr, 64 << 20).await?;
            let spec = proto::JobSpec {
                model: "m".into(),
                mode: mode as i32,
                max_new_tokens: 4,
                sampling: Some(proto::Sampling::default()),
                ..Default::default()
            };
            let ids: Vec<u32> = (0..n).map(|i| (i * 7 + 3) % vocab).collect();
            let id = client::submit(
                &mut c,
                spec,
                Input::Tokens(ids),
                client::UPLOAD_CHUNK,
                |_| {},
            )
            .await?
            .job_id;
            let last = client::watch(&mut c, id, |p| on(p)).await?;
            ensure!(
                last.phase() == JobPhase::Done,
                "job {id}: {:?} {}",
                last.phase(),
                last.message
            );
            Ok::<u64, anyhow::Error>(id)
        })
    };
    let id = run(64, proto::JobMode::Generate, &mut |_| {})?;
    // One trace holds the job and, under its run, every worker's part: three workers of one
    // process, told apart by their `worker` attribute.
    let t = Instant::now();
    let (trace, workers) = loop {
        let spans = collector.spans();
        let job = spans.iter().find(|s| {
            s.name == "job" && s.attrs.get("job.id").map(String::as_str) == Some(&id.to_string())
        });
        if let Some(job) = job {
            let trace: Vec<Span> = spans
                .iter()
                .filter(|s| s.trace == job.trace)
                .cloned()
                .collect();
            let workers: BTreeSet<String> = trace
                .iter()
                .filter(|s| s.name == "worker.run_job")
                .filter_map(|s| s.attrs.get("worker").cloned())
                .collect();
            let layers = trace.iter().filter(|s| s.name == "layer").count();
            if workers.len() == 3 && layers == 3 * config.num_layers && parents_present(&trace) {
                break (trace, workers);
            }
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "no complete trace of job {id}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        trace.iter().all(|s| s.service == "ringmoe-serve"),
        "{trace:?}"
    );
    let ids: BTreeSet<&str> = trace.iter().map(|s| s.id.as_str()).collect();
    ensure!(
        trace.iter().filter(|s| s.parent.is_empty()).count() == 1
            && trace
                .iter()
                .all(|s| s.parent.is_empty() || ids.contains(s.parent.as_str())),
        "one root, every parent inside the trace: {trace:?}"
    );
    ensure!(workers.len() == 3, "{workers:?}");

    // The collector goes away while a longer job is in its prefill: the job completes.
    let mut stop = Some(collector.stop);
    let mut stopped_in = None;
    run(8192, proto::JobMode::Score, &mut |p| {
        if p.phase() == JobPhase::Prefill
            && p.layer >= 1
            && let Some(s) = stop.take()
        {
            let _ = s.send(());
            stopped_in = Some(p.layer);
        }
    })?;
    ensure!(
        stopped_in.is_some(),
        "the job never reported its prefill layers"
    );
    rt.block_on(collector.server)??;
    drop(serve);
    Ok(())
}
