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
