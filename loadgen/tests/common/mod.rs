//! What the loadgen tests share: the options that point a run at one of
//! the repository's models, served in-process or by the `shoal` built
//! beside `shoal-loadgen`.
#![allow(dead_code)]

use shoal_loadgen::ModelOpts;
use std::path::PathBuf;

/// `model` (a folder of `model_repository` holding `file` in version 1),
/// batch 2, 50 keys, seed 7, a quarter second of warm-up.
pub fn model_opts(model: &str, file: &str) -> ModelOpts {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../model_repository");
    assert!(
        repo.join(model).join("1").join(file).exists(),
        "{model}/1/{file} is missing: run scripts/setup.sh to generate the models"
    );
    ModelOpts {
        model: model.into(),
        input: "input".into(),
        isz: vec![784],
        bsz: 2,
        model_repository: repo,
        server: None,
        shoal_bin: Some(PathBuf::from(env!("CARGO_BIN_EXE_shoal-loadgen")).with_file_name("shoal")),
        keys: Some(50),
        zipf: None,
        seed: 7,
        warmup: 0.25,
        out: None,
        brokers: None,
        npy: None,
        kafka_state: false,
    }
}
