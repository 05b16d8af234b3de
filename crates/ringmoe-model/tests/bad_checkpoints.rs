//! Malformed checkpoints and configs give errors that name what is wrong, never a panic.

use std::path::Path;

use anyhow::{Result, ensure};
use ringmoe_model::{Checkpoint, LoadOptions, Model};
use ringmoe_testkit::fixture;
use safetensors::tensor::TensorView;

/// A copy of the Mixtral fixture whose tensors pass through `edit` (name, shape, bytes) → keep?
fn edited_copy(
    edit: impl Fn(&str, &mut Vec<usize>, &mut Vec<u8>) -> bool,
) -> Result<tempfile::TempDir> {
    let src = fixture("mixtral-tiny");
    let dir = tempfile::tempdir()?;
    for f in ["config.json", "tokenizer.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f))?;
    }
    let bytes = std::fs::read(src.join("model.safetensors"))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut kept: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut shape = view.shape().to_vec();
        let mut data = view.data().to_vec();
        if edit(&name, &mut shape, &mut data) {
            kept.push((name, view.dtype(), shape, data));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = kept
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors"))?;
    Ok(dir)
}

fn load_err(dir: &Path) -> String {
    match Model::load(dir, &LoadOptions::default()) {
        Ok(_) => "loaded without error".into(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_tensor_is_named() -> Result<()> {
    let dir = edited_copy(|n, _, _| n != "model.layers.1.block_sparse_moe.experts.3.w2.weight")?;
    let e = load_err(dir.path());
    ensure!(
        e.contains("no tensor \"model.layers.1.block_sparse_moe.experts.3.w2.weight\""),
        "{e}"
    );
    Ok(())
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() -> Result<()> {
    let dir = edited_copy(|n, shape, data| {
        if n == "model.layers.0.self_attn.q_proj.weight" {
            shape.swap(0, 1);
            shape[0] /= 2;
            shape[1] *= 2;
            data.truncate(data.len());
        }
        true
    })?;
    let e = load_err(dir.path());
    ensure!(
        e.contains("q_proj.weight") && e.contains("expected [64, 64]"),
        "{e}"
    );
    Ok(())
}

#[test]
fn truncated_or_garbage_safetensors_is_an_error() -> Result<()> {
    let dir = edited_copy(|_, _, _| true)?;
    let path = dir.path().join("model.safetensors");
    let full = std::fs::read(&path)?;
    std::fs::write(&path, &full[..full.len() / 2])?;
    let e = load_err(dir.path());
    ensure!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors file"),
        "{e}"
    );
    std::fs::write(&path, b"this is not a checkpoint")?;
    ensure!(load_err(dir.path()).contains("not a valid safetensors file"));
    Ok(())
}

#[test]
fn inconsistent_or_unknown_config_is_named() -> Result<()> {
    let dir = edited_copy(|_, _, _| true)?;
    let cfg_path = dir.path().join("config.json");
    let orig: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
    let cases: [(&str, serde_json::Value, &str); 4] = [
        (
            "architectures",
            serde_json::json!(["GPT2LMHeadModel"]),
            "unsupported architecture \"GPT2LMHeadModel\"",
        ),
        (
            "num_experts_per_tok",
            serde_json::json!(0),
            "num_experts_per_tok",
        ),
        ("hidden_size", serde_json::json!(48), "expected [384, 48]"),
        ("hidden_act", serde_json::json!("gelu"), "hidden_act"),
    ];
    for (field, value, want) in cases {
        let mut cfg = orig.clone();
        cfg[field] = value;
        std::fs::write(&cfg_path, serde_json::to_string(&cfg)?)?;
        let e = load_err(dir.path());
        ensure!(e.contains(want), "{field}: {e}");
    }
    std::fs::write(&cfg_path, "{ not json")?;
    ensure!(load_err(dir.path()).contains("invalid JSON"));
    Ok(())
}

#[test]
fn sharded_index_pointing_outside_the_directory_is_rejected() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"lm_head.weight": "../../etc/passwd"}}"#,
    )?;
    let e = Checkpoint::open(dir.path()).unwrap_err().to_string();
    ensure!(e.contains("leaves the directory"), "{e}");
    Ok(())
}
