//! The `ringmoe` binary end to end on the fixture models: what a user runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};
use ringmoe_model::{Checkpoint, LoadOptions, Model, Tokenizer};
use ringmoe_testkit::fixture;
use safetensors::tensor::TensorView;

fn ringmoe(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_ringmoe"))
        .args(args)
        .output()?)
}

/// `ringmoe forward --model M --input-ids IN --out OUT EXTRA…`.
fn forward(model: &Path, inp: &Path, outp: &Path, extra: &[&str]) -> Result<Output> {
    let mut args = vec![
        "forward",
        "--model",
        model.to_str().context("path")?,
        "--input-ids",
        inp.to_str().context("path")?,
        "--out",
        outp.to_str().context("path")?,
    ];
    args.extend_from_slice(extra);
    ringmoe(&args)
}

fn reference_ids(model: &str, name: &str) -> Result<Vec<i64>> {
    let dir = fixture(model);
    Ok(
        Checkpoint::open_files(&dir, &[dir.join("reference.safetensors")])?
            .load_i64(name)?
            .0,
    )
}

fn write_input_ids(path: &Path, ids: &[i64]) -> Result<()> {
    let bytes: Vec<u8> = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = TensorView::new(safetensors::Dtype::I64, vec![1, ids.len()], &bytes)?;
    safetensors::serialize_to_file([("input_ids", view)], None, path)?;
    Ok(())
}

#[test]
fn generate_prints_transformers_greedy_text_and_timings() -> Result<()> {
    let dir = fixture("qwen2-moe-tiny");
    let dir_s = dir.to_str().context("utf-8 path")?;
    let out = ringmoe(&[
        "generate",
        "--model",
        dir_s,
        "--prompt",
        "The quick brown fox",
        "--max-new-tokens",
        "16",
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want_ids: Vec<u32> = reference_ids("qwen2-moe-tiny", "gen_output_ids")?
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let want = Tokenizer::from_dir(&dir)?.decode(&want_ids, true)?;
    let stdout = String::from_utf8(out.stdout)?;
    ensure!(
        stdout.trim_end_matches('\n') == want,
        "stdout {stdout:?}, transformers {want:?}"
    );
    let stderr = String::from_utf8(out.stderr)?;
    for field in ["load time", "prefill", "decode", "tokens/s"] {
        ensure!(stderr.contains(field), "stderr lacks {field}: {stderr}");
    }
    Ok(())
}

#[test]
fn forward_writes_logits_matching_transformers() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ids = reference_ids("qwen3-moe-tiny", "input_ids_L64")?;
    let inp = tmp.path().join("in.safetensors");
    let outp = tmp.path().join("out.safetensors");
    write_input_ids(&inp, &ids)?;
    let model = fixture("qwen3-moe-tiny");
    let out = forward(&model, &inp, &outp, &[])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = Checkpoint::open_files(tmp.path(), std::slice::from_ref(&outp))?;
    ensure!(got.meta("logits")?.shape == vec![1, 64, 384]);
    let logits = got.load("logits", &[1, 64, 384])?.into_vec();
    let r = Checkpoint::open_files(&model, &[model.join("reference.safetensors")])?;
    let want = r.load("logits_L64", &[64, 384])?.into_vec();
    let d = logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    ensure!(d <= 1e-4, "max |Δ| {d:e}");
    Ok(())
}

/// The same logits file from a sequence sharded over ranks: threads, and OS processes over TCP.
#[test]
fn sharded_forward_writes_the_same_logits() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ids = reference_ids("mixtral-tiny", "input_ids_L300")?;
    let inp = tmp.path().join("in.safetensors");
    write_input_ids(&inp, &ids)?;
    let model = fixture("mixtral-tiny");
    let r = Checkpoint::open_files(&model, &[model.join("reference.safetensors")])?;
    let want = r.load("logits_L300", &[300, 384])?.into_vec();
    for (shards, transport, sharding) in [("3", "tcp", "contiguous"), ("4", "inproc", "zigzag")] {
        let outp = tmp.path().join(format!("out-{transport}.safetensors"));
        let extra = [
            "--seq-shards",
            shards,
            "--transport",
            transport,
            "--sharding",
            sharding,
        ];
        let out = forward(&model, &inp, &outp, &extra)?;
        ensure!(
            out.status.success(),
            "{transport}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = Checkpoint::open_files(tmp.path(), std::slice::from_ref(&outp))?
            .load("logits", &[1, 300, 384])?
            .into_vec();
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        ensure!(d <= 1e-4, "{transport} P={shards}: max |Δ| {d:e}");
    }
    Ok(())
}

/// `--attention`: a sparse mode over TCP processes writes what it writes in one process, and
/// `--compare` reports how far that is from dense.
#[test]
fn sparse_forward_is_the_same_in_one_process_and_over_tcp() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let inp = tmp.path().join("in.safetensors");
    write_input_ids(&inp, &reference_ids("qwen3-moe-tiny", "input_ids_L300")?)?;
    let model = fixture("qwen3-moe-tiny");
    let run = |name: &str, extra: &[&str]| -> Result<(PathBuf, String)> {
        let outp = tmp.path().join(name);
        let out = forward(&model, &inp, &outp, extra)?;
        ensure!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((outp, String::from_utf8_lossy(&out.stdout).into_owned()))
    };
    let (dense, _) = run("dense.safetensors", &[])?;
    let load = |p: &Path| -> Result<Vec<f32>> {
        Ok(Checkpoint::open_files(tmp.path(), &[p.to_path_buf()])?
            .load("logits", &[1, 300, 384])?
            .into_vec())
    };
    for mode in [
        ["--attention", "a-shape", "--sink", "4", "--local", "64"],
        [
            "--attention",
            "vertical-slash",
            "--vertical",
            "24",
            "--slash",
            "40",
        ],
    ] {
        let (one, _) = run("one.safetensors", &mode)?;
        let mut tcp_args = mode.to_vec();
        tcp_args.extend(["--seq-shards", "3", "--transport", "tcp", "--compare"]);
        tcp_args.push(dense.to_str().context("path")?);
        let (tcp, stdout) = run("tcp.safetensors", &tcp_args)?;
        let (a, b) = (load(&one)?, load(&tcp)?);
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        ensure!(
            d <= 1e-4,
            "{mode:?}: P=3 over TCP vs one process: max |Δ| {d:e}"
        );
        ensure!(
            stdout.contains("max |Δ|") && stdout.contains("top-1 agrees at"),
            "no comparison printed: {stdout}"
        );
    }
    Ok(())
}

#[test]
fn score_reports_the_engines_mean_nll() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let text = "Ring attention passes key and value blocks around a ring of workers.";
    let file = tmp.path().join("t.txt");
    std::fs::write(&file, text)?;
    let dir = fixture("mixtral-tiny");
    let out = ringmoe(&[
        "score",
        "--model",
        dir.to_str().context("path")?,
        "--file",
        file.to_str().context("path")?,
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout)?;
    let mean: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("mean NLL/token"))
        .context("mean line")?
        .trim()
        .parse()?;
    let ppl: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("perplexity"))
        .context("ppl line")?
        .trim()
        .parse()?;
    let ids = Tokenizer::from_dir(&dir)?.encode(text, true)?;
    let nll = Model::load(&dir, &LoadOptions::default())?.score(&ids)?;
    let want = nll.iter().map(|&x| x as f64).sum::<f64>() / nll.len() as f64;
    ensure!(
        (mean - want).abs() < 1e-5 && (ppl - want.exp()).abs() < 1e-3 * want.exp(),
        "{mean} vs {want}"
    );
    Ok(())
}

#[test]
fn bad_inputs_exit_nonzero_with_a_message() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let inp = tmp.path().join("in.safetensors");
    write_input_ids(&inp, &[1, 2, 99_999])?;
    let model = fixture("mixtral-tiny");
    let out = forward(&model, &inp, Path::new("/dev/null"), &[])?;
    ensure!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    ensure!(
        err.contains("token id 99999 at position 2 is outside the vocabulary of 384"),
        "{err}"
    );

    let out = ringmoe(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "hi",
    ])?;
    ensure!(!out.status.success() && String::from_utf8(out.stderr)?.contains("/nonexistent/model"));

    // A GPU the build or the machine cannot use is a clear error, never a panic; a device name
    // that is not one is refused by the parser.
    let model_s = model.to_str().context("utf-8 path")?;
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let readme_s = readme.to_str().context("utf-8 path")?;
    let out = ringmoe(&[
        "score", "--model", model_s, "--file", readme_s, "--device", "cuda:0",
    ])?;
    let err = String::from_utf8(out.stderr)?;
    ensure!(
        !out.status.success()
            && (err.contains("not compiled with CUDA support")
                || err.contains("CUDA is not usable here"))
            && !err.contains("panicked"),
        "{err}"
    );
    // A worker on a GPU it cannot open fails at start (before registering), with the reason.
    let out = ringmoe(&[
        "worker",
        "--coordinator",
        "127.0.0.1:1",
        "--device",
        "cuda:0",
    ])?;
    let err = String::from_utf8(out.stderr)?;
    ensure!(
        !out.status.success()
            && err.contains("worker device cuda:0")
            && (err.contains("not compiled with CUDA support")
                || err.contains("CUDA is not usable here"))
            && !err.contains("panicked"),
        "{err}"
    );
    let out = ringmoe(&[
        "score", "--model", model_s, "--file", readme_s, "--device", "gpu",
    ])?;
    let err = String::from_utf8(out.stderr)?;
    ensure!(
        !out.status.success() && err.contains("want cpu, cuda or cuda:N"),
        "{err}"
    );
    // A rebalance threshold below perfect balance is refused at start, naming the flag.
    let m = format!("m={model_s}");
    let out = ringmoe(&["serve", "--model", &m, "--rebalance-threshold", "0.5"])?;
    let err = String::from_utf8(out.stderr)?;
    ensure!(
        !out.status.success()
            && err.contains("--rebalance-threshold must be 0 (off) or at least 1.0"),
        "{err}"
    );
    // `status` without a coordinator says which address failed.
    let out = ringmoe(&["status", "--addr", "127.0.0.1:1"])?;
    let err = String::from_utf8(out.stderr)?;
    ensure!(
        !out.status.success() && err.contains("127.0.0.1:1") && !err.contains("panicked"),
        "{err}"
    );
    Ok(())
}

/// `--workers/--placement`: experts spread over workers (with the sequence over some of them) write
/// the logits one process writes, in-process and as TCP processes, for built-in layouts, a
/// placement file and replicated hot experts; a placement file that leaves an expert without a
/// host is refused with the reason.
#[test]
fn expert_parallel_forward_writes_the_single_process_logits() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let inp = tmp.path().join("in.safetensors");
    write_input_ids(&inp, &reference_ids("mixtral-tiny", "input_ids_L64")?)?;
    let model = fixture("mixtral-tiny");
    let run = |name: &str, extra: &[&str]| -> Result<(PathBuf, Output)> {
        let outp = tmp.path().join(name);
        let out = forward(&model, &inp, &outp, extra)?;
        Ok((outp, out))
    };
    let load = |p: &Path| -> Result<Vec<f32>> {
        Ok(Checkpoint::open_files(tmp.path(), &[p.to_path_buf()])?
            .load("logits", &[1, 64, 384])?
            .into_vec())
    };
    let (single, out) = run("single.safetensors", &[])?;
    ensure!(out.status.success());
    let want = load(&single)?;
    // Two layers of eight experts: worker 0 hosts expert 0 only, worker 1 the rest, and worker 2
    // replicates experts 1 and 2.
    let layer: Vec<Vec<usize>> = (0..8)
        .map(|e| match e {
            0 => vec![0],
            1 | 2 => vec![1, 2],
            _ => vec![1],
        })
        .collect();
    let file = tmp.path().join("placement.json");
    std::fs::write(
        &file,
        ringmoe_parallel::Placement::from_hosts(3, 3, &[layer.clone(), layer])?.to_json(),
    )?;
    let file_s = file.to_str().context("path")?;
    let cases: Vec<Vec<&str>> = vec![
        vec![
            "--workers",
            "4",
            "--placement",
            "round-robin",
            "--seq-shards",
            "2",
        ],
        vec!["--workers", "3", "--placement", file_s, "--seq-shards", "3"],
        vec![
            "--workers",
            "2",
            "--replicate-hot",
            "2",
            "--seq-shards",
            "2",
            "--overlap",
        ],
        vec![
            "--workers",
            "3",
            "--placement",
            "contiguous",
            "--transport",
            "tcp",
        ],
        vec![
            "--workers",
            "2",
            "--placement",
            file_s.trim_end_matches(".json"),
            "--transport",
            "tcp",
        ],
        vec![
            "--workers",
            "3",
            "--replicate-hot",
            "1",
            "--seq-shards",
            "3",
            "--transport",
            "tcp",
        ],
    ];
    for (i, case) in cases.iter().enumerate() {
        let (outp, out) = run(&format!("ep{i}.safetensors"), case)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if i == 4 {
            // A file that does not exist is named.
            ensure!(
                !out.status.success() && stderr.contains("cannot read"),
                "{stderr}"
            );
            continue;
        }
        ensure!(out.status.success(), "{case:?}: {stderr}");
        let d = load(&outp)?
            .iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        ensure!(d <= 1e-4, "{case:?}: max |Δ| {d:e}");
        ensure!(
            stderr.contains("experts: placement version") && stderr.contains("max/mean"),
            "{stderr}"
        );
        if case.contains(&"--replicate-hot") {
            ensure!(
                stderr.contains("calibration pass") && stderr.contains("placement version 2"),
                "{stderr}"
            );
        }
    }
    // An expert nobody hosts.
    let mut bad: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file)?)?;
    bad["layers"][1][5] = serde_json::json!([]);
    std::fs::write(&file, bad.to_string())?;
    let (_, out) = run(
        "bad.safetensors",
        &["--workers", "3", "--placement", file_s],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("expert 5 of layer 1 is hosted by no worker"),
        "{stderr}"
    );
    Ok(())
}
