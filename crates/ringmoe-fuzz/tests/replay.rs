//! The committed fuzz corpora (`fuzz/corpus/<target>/`: the seeds, and every input a fuzzing
//! run found worth keeping, crashes included once fixed) replayed through the targets on
//! stable: what once broke a target stays fixed without a nightly toolchain.

use std::path::Path;

use anyhow::{Context, Result, ensure};

#[test]
fn every_corpus_input_runs_through_its_target() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for (name, target) in ringmoe_fuzz::TARGETS {
        let dir = root.join(name);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let path = entry?.path();
            let data = std::fs::read(&path)?;
            // A panic names the input that caused it.
            let ok = std::panic::catch_unwind(|| target(&data));
            ensure!(ok.is_ok(), "{name}: {} panicked", path.display());
            n += 1;
        }
        ensure!(n > 0, "{name}: an empty corpus in {}", dir.display());
        eprintln!("{name}: {n} inputs");
    }
    Ok(())
}

/// The upload target's seeds mean what their names say: the well-formed uploads are admitted
/// (with the expected tokens), every other one refused with its reason.
#[test]
fn the_upload_seeds_are_admitted_or_refused_as_named() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/upload");
    let admitted = [
        ("tokens", Some(5)),
        ("tokens_chunks_declared", Some(6)),
        ("score", Some(49)),
        ("text", None),
        ("text_split_utf8", None),
    ];
    let refused = [
        ("declared_mismatch", "declared 9 tokens"),
        ("bad_utf8", "not valid UTF-8"),
        ("no_spec", "spec is missing"),
        ("two_specs", "a second job spec"),
        ("mixed", "not both"),
        ("out_of_vocab", "outside the model's vocabulary"),
        ("unknown_model", "unknown model 'nope'"),
        ("over_tenant", "max_input_tokens"),
        ("over_capacity", "the cluster holds"),
        ("empty_message", "an empty upload message"),
        ("spec_only", "needs at least 1"),
    ];
    for (name, len) in admitted {
        let data = std::fs::read(dir.join(name))?;
        let job = ringmoe_fuzz::upload_outcome(&data)
            .with_context(|| format!("{name}: did not decode"))?
            .map_err(|e| anyhow::anyhow!("{name}: {}", e.message()))?;
        if let Some(n) = len {
            ensure!(job.tokens.len() == n, "{name}: {} tokens", job.tokens.len());
        }
    }
    for (name, why) in refused {
        let data = std::fs::read(dir.join(name))?;
        let e = ringmoe_fuzz::upload_outcome(&data)
            .with_context(|| format!("{name}: did not decode"))?
            .err()
            .with_context(|| format!("{name}: admitted"))?;
        ensure!(
            e.code() == tonic::Code::InvalidArgument && e.message().contains(why),
            "{name}: {e:?}"
        );
    }
    Ok(())
}
